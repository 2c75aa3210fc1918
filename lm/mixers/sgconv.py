"""SGConv block (Li et al. 2022, arXiv 2210.09298; ctlllll/SGConv `gconv_standalone.py::GConv`).

Forward pass, u = x (B, L, H):
    k = kernel(L)                          `SGConvKernel` (L, H): multiscale, decayed, init-normalised
    y = fftconv(u, k, D)                   = k ∗ u + D ⊙ u, D = ``bias`` (H,) ~ N(0, 1)
    out = out_proj(dropout(GELU(y)))       out_proj: H → H, or H → 2H followed by GLU (``glu``)
Kernel (per channel c): n_scales sub-kernels w_i ∈ ℝ^{kernel_dim}; segment i = upsample(w_i, 2^{max(i-1,0)})
(PyTorch `interpolate(linear, align_corners=False)`, or nearest) · m_c^{n_scales-1-i},
m_c = linspace(decay_min, decay_max, H); concatenate (lengths d, d, 2d, 4d, …), divide by the ℓ2 norm
the kernel had at initialisation (stored once), truncate to L / zero-pad.
n_scales defaults to 1 + ⌈log₂(max_len / kernel_dim)⌉ (at least 1).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.fftconv import fftconv
from lm.config import ConfigError
from lm.mixers.filters import SGConvKernel
from lm.mixers.layers import check_seqlen, dense, glu, out_proj_std
from lm.mixers.registry import register_mixer


@dataclasses.dataclass
class SGConvConfig:
    """kernel_dim: sub-kernel size d (64; the SGConv README uses 32); n_scales: override N_s;
    decay_min / decay_max: per-channel decay multiplier range (2, 2 → α = 1/2 per scale);
    mode: "cat_randn" | "cat_cos"; interpolation: "linear" | "nearest"; init_scale: shift of the
    upsampling exponents; dropout: after GELU; glu: output Linear(H → 2H) + GLU."""

    kernel_dim: int = 64
    n_scales: Optional[int] = None
    decay_min: float = 2.0
    decay_max: float = 2.0
    mode: Literal["cat_randn", "cat_cos"] = "cat_randn"
    interpolation: Literal["linear", "nearest"] = "linear"
    init_scale: int = 0
    dropout: float = 0.0
    glu: bool = False
    init_std: float = 0.02

    def validate(self) -> None:
        if self.kernel_dim < 1:
            raise ConfigError(f"sgconv: kernel_dim must be >= 1, got {self.kernel_dim}")
        if self.n_scales is not None and self.n_scales < 1:
            raise ConfigError(f"sgconv: n_scales must be >= 1, got {self.n_scales}")
        if self.mode not in ("cat_randn", "cat_cos"):
            raise ConfigError(f"sgconv: mode must be 'cat_randn' or 'cat_cos', got {self.mode!r}")
        if self.interpolation not in ("linear", "nearest"):
            raise ConfigError(f"sgconv: interpolation must be 'linear' or 'nearest', got {self.interpolation!r}")
        if self.init_scale < 0:
            raise ConfigError(f"sgconv: init_scale must be >= 0, got {self.init_scale}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"sgconv: dropout must be in [0, 1), got {self.dropout}")


@register_mixer("sgconv", SGConvConfig, "SGConv: multiscale decaying global convolution kernel")
class SGConv(nnx.Module):
    """Submodules: ``kernel`` (`SGConvKernel`, H channels), ``bias`` (H,) D skip, ``dropout``, ``out_proj``."""

    def __init__(self, cfg: SGConvConfig, *, d_model: int, max_len: int, layer_idx: int = 0, n_layers: int = 1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg, self.d_model, self.max_len, self.dtype = cfg, int(d_model), int(max_len), dtype
        self.kernel = SGConvKernel(d_model, max_len, kernel_dim=cfg.kernel_dim, n_scales=cfg.n_scales,
                                   decay_min=cfg.decay_min, decay_max=cfg.decay_max, mode=cfg.mode,
                                   interpolation=cfg.interpolation, init_scale=cfg.init_scale, rngs=rngs)
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (d_model,), jnp.float32))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        out = 2 * d_model if cfg.glu else d_model
        self.out_proj = dense(d_model, out, dtype=dtype, rngs=rngs, std=out_proj_std(n_layers, cfg.init_std))

    def long_filters(self, seqlen: int) -> dict[str, jax.Array]:
        """{"kernel": (seqlen, H)}: convolved with u (the mixer input) channel-wise, skip
        ``long_filter_skips()["kernel"]``, then GELU and out_proj."""
        return {"kernel": self.kernel(seqlen)}

    def long_filter_skips(self) -> dict[str, jax.Array]:
        return {"kernel": self.bias[...]}

    def __call__(self, x: jax.Array) -> jax.Array:
        seqlen = x.shape[1]
        check_seqlen(seqlen, self.max_len, "sgconv")
        y = fftconv(x.astype(self.dtype), self.kernel(seqlen), self.bias[...])
        y = self.out_proj(self.dropout(jax.nn.gelu(y, approximate=False)))
        return glu(y) if self.cfg.glu else y
