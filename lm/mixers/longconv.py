"""Explicit long convolution with squash/smooth regularisation (Fu et al. 2023, arXiv 2302.06646;
safari `long_conv.py` + `long_conv_kernel.py`).

Forward pass, input u = x (B, L, H), C = ``channels`` copies:
    U = [u, …, u] (B, L, C·H), channel c·H + h holds u[..., h]
    K̃ = dropout(squash_λ(smooth(K)))[:L]   K (max_len, C·H) explicit `FilterParam` (``kernel.kernel``)
    y = fftconv(U, K̃, D)                    = K̃ ∗ U + D ⊙ U, D = ``bias`` (C·H,) ~ N(0, 1)
    out = GLU(out_proj(dropout(GELU(y))))    out_proj: C·H → 2H (``glu``) or C·H → H (no GLU)
smooth: moving average of width 2p+1 = ``ma_window_len`` (zero padded), only if ``smooth``;
squash: K̃ = sign(K)·max(|K| − λ, 0); kernel dropout on K̃ (training only).

Dead-gradient fact: ∂K̃/∂K = 𝟙[|K| > λ], so taps inside the dead zone receive exactly zero gradient
and (with weight decay 0 on the kernel) never move again. With the randn·0.002 init the dead fraction
is erf(λ/(0.002·√2)): 38/68/87/95 % for λ = 0.001/0.002/0.003/0.004. This is the plain soft-threshold
of safari, not a proximal (ISTA) update.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.fftconv import fftconv
from lm.config import ConfigError
from lm.mixers.filters import ExplicitLongKernel
from lm.mixers.layers import check_seqlen, dense, glu, out_proj_std
from lm.mixers.registry import register_mixer


@dataclasses.dataclass
class LongConvConfig:
    """channels: C kernel copies per feature; lam: squash threshold λ (LM H3-conv 0.003; safari's class
    default 0.1 would kill every tap of a 0.002-scale init); kernel_dropout (LM H3-conv 0.2; default 0
    for deterministic training); smooth / ma_window_len: moving-average smoothing (off in every shipped
    config); init: "random" (randn·0.002) | "double_exp"; dropout: after GELU; glu: Linear(CH→2H)+GLU."""

    channels: int = 1
    lam: float = 0.003
    kernel_dropout: float = 0.0
    smooth: bool = False
    ma_window_len: int = 7
    init: Literal["random", "double_exp"] = "random"
    dropout: float = 0.0
    glu: bool = True
    init_std: float = 0.02

    def validate(self) -> None:
        if self.channels < 1:
            raise ConfigError(f"longconv: channels must be >= 1, got {self.channels}")
        if self.lam < 0:
            raise ConfigError(f"longconv: lam must be >= 0, got {self.lam}")
        if self.ma_window_len < 1 or self.ma_window_len % 2 == 0:
            raise ConfigError(f"longconv: ma_window_len must be odd and >= 1, got {self.ma_window_len}")
        if self.init not in ("random", "double_exp"):
            raise ConfigError(f"longconv: init must be 'random' or 'double_exp', got {self.init!r}")
        for name in ("kernel_dropout", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"longconv: {name} must be in [0, 1), got {getattr(self, name)}")


@register_mixer("longconv", LongConvConfig, "Explicit long convolution with squash/smooth (FlashButterfly paper)")
class LongConv(nnx.Module):
    """Submodules: ``kernel`` (`ExplicitLongKernel`, C·H channels, length max_len), ``bias`` (C·H,) D skip,
    ``dropout``, ``out_proj``. See the module docstring."""

    def __init__(self, cfg: LongConvConfig, *, d_model: int, max_len: int, layer_idx: int = 0, n_layers: int = 1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg, self.d_model, self.max_len, self.dtype = cfg, int(d_model), int(max_len), dtype
        width = cfg.channels * d_model
        self.kernel = ExplicitLongKernel(width, max_len, lam=cfg.lam, init=cfg.init, smooth=cfg.smooth,
                                         ma_window_len=cfg.ma_window_len, kernel_dropout=cfg.kernel_dropout, rngs=rngs)
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (width,), jnp.float32))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        out = 2 * d_model if cfg.glu else d_model
        self.out_proj = dense(width, out, dtype=dtype, rngs=rngs, std=out_proj_std(n_layers, cfg.init_std))

    def long_filters(self, seqlen: int) -> dict[str, jax.Array]:
        """{"kernel": (seqlen, C·H)} = squash(smooth(K))[:seqlen] (no dropout). Channel c·H+h is convolved
        with u[..., h] with skip ``long_filter_skips()["kernel"][c·H+h]``; then GELU and out_proj(+GLU)."""
        return {"kernel": self.kernel.regularized(seqlen)}

    def long_filter_skips(self) -> dict[str, jax.Array]:
        return {"kernel": self.bias[...]}

    def __call__(self, x: jax.Array) -> jax.Array:
        seqlen = x.shape[1]
        check_seqlen(seqlen, self.max_len, "longconv")
        u = x.astype(self.dtype)
        if self.cfg.channels > 1:
            u = jnp.tile(u, (1, 1, self.cfg.channels))
        y = fftconv(u, self.kernel(seqlen), self.bias[...])
        y = self.dropout(jax.nn.gelu(y, approximate=False))
        y = self.out_proj(y)
        return glu(y) if self.cfg.glu else y
