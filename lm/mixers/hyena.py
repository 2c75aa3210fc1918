"""Hyena operator (Poli et al. 2023, arXiv 2302.10866; safari `HyenaOperator` at 02220c6).

Two conventions for ``order`` N, selected by ``convention`` (see `HyenaConfig`):

safari (default; all released checkpoints): N+1 projections, N gates, N-1 long filters.
    u = in_proj(x) (D → (N+1)·D, bias); u = short_conv(u) (depthwise, length 3, over all (N+1)·D channels);
    split u into blocks (x⁰, x¹, …, x^{N-1}, v) of D channels each, in that order;
    for o = 0 … N-2 (gate x^{N-1-o}, filter o):   v ← h^o ∗ (x^{N-1-o} ⊙ v) + D^o ⊙ (x^{N-1-o} ⊙ v)
    y = out_proj(x⁰ ⊙ v).
  Order 2: y = W_o[x⁰ ⊙ (h ∗ (x¹ ⊙ v) + D ⊙ (x¹ ⊙ v))] (x¹ pre-gate, x⁰ post-gate).

paper (Def. 3.1): N+1 projections, N filters, N gates, no pre-gate.
    split u into blocks (v, x¹, …, x^N); z = v;
    for n = 1 … N (filter n-1):   z ← x^n ⊙ (h^{n-1} ∗ z + D^{n-1} ⊙ z)
    y = out_proj(z).
  (Paper order N ≈ safari order N+1 without its first pre-gate. The D skips are added here too.)

Filters: one `HyenaImplicitFilter` (``filter``) with n_filters·D channels; filter o is channels
[o·D, (o+1)·D), skip D^o is ``bias[o·D:(o+1)·D]`` (init N(0, 1)). Every long convolution is
`kernels.fftconv.fftconv(v, h^o, D^o, pre_gate=…, post_gate=…)` (the final x⁰ gate of the safari
convention is the post_gate of the last convolution). ``dropout`` (safari: on x ⊙ v before each
convolution) is applied to the convolution input. Order ≥ 2 (safari) or ≥ 1 (paper).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.fftconv import fftconv
from kernels.fftconv.conv import LAYOUTS
from lm.config import ConfigError
from lm.mixers.filters import ImplicitFilterOptions
from lm.mixers.layers import (ShortConv, check_seqlen, dense, linear_channels_first, linear_from_channels_first,
                              out_proj_std)
from lm.mixers.registry import register_mixer


@dataclasses.dataclass
class HyenaConfig(ImplicitFilterOptions):
    """Hyena options (defaults: safari Pile LM, `configs/experiment/pile/hyena.yaml`).

    order: see module docstring; convention: "safari" | "paper"; short_filter_order: length of the
    depthwise short conv; dropout: on conv inputs; init_std: std of in_proj (out_proj uses
    init_std/√(2·n_layers)); layout: "blh" computes the gated convolutions on (B, L, D) activations,
    "hbl" on (D, B, L) (in_proj writes that layout and out_proj reads it, each a single einsum: the order of
    the fused Pallas fftconv kernels, which then run with no transposes around them; same function and
    parameters). Implicit-filter options: see `ImplicitFilterOptions`.
    """

    order: int = 2
    convention: Literal["safari", "paper"] = "safari"
    short_filter_order: int = 3
    dropout: float = 0.0
    init_std: float = 0.02
    layout: Literal["blh", "hbl"] = "blh"

    def validate(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"hyena: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.convention not in ("safari", "paper"):
            raise ConfigError(f"hyena: convention must be 'safari' or 'paper', got {self.convention!r}")
        min_order = 2 if self.convention == "safari" else 1
        if self.order < min_order:
            raise ConfigError(
                f"hyena: order must be >= {min_order} for convention {self.convention!r}, got {self.order}"
            )
        self.validate_filter("hyena")
        if self.short_filter_order < 1:
            raise ConfigError(f"hyena: short_filter_order must be >= 1, got {self.short_filter_order}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"hyena: dropout must be in [0, 1), got {self.dropout}")

    @property
    def n_filters(self) -> int:
        return self.order - 1 if self.convention == "safari" else self.order


@register_mixer("hyena", HyenaConfig, "Hyena gated long convolution with implicit filters (safari/paper order)")
class Hyena(nnx.Module):
    """Hyena mixer; see the module docstring for the exact forward pass of each convention.

    Submodules: ``in_proj`` (D → (N+1)D), ``short_conv`` (`ShortConv`), ``filter``
    (`HyenaImplicitFilter`, n_filters·D channels, l_max = max_len), ``bias`` (n_filters·D,) skips,
    ``dropout``, ``out_proj`` (D → D).
    """

    def __init__(self, cfg: HyenaConfig, *, d_model: int, max_len: int, layer_idx: int = 0, n_layers: int = 1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg, self.d_model, self.max_len, self.dtype = cfg, int(d_model), int(max_len), dtype
        self.n_filters = cfg.n_filters
        width = (cfg.order + 1) * d_model
        self.in_proj = dense(d_model, width, dtype=dtype, rngs=rngs, std=cfg.init_std)
        self.short_conv = ShortConv(width, cfg.short_filter_order, dtype=dtype, rngs=rngs)
        self.filter = cfg.build_filter(self.n_filters * d_model, max_len, rngs)
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (self.n_filters * d_model,), jnp.float32))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.out_proj = dense(d_model, d_model, dtype=dtype, rngs=rngs, std=out_proj_std(n_layers, cfg.init_std))

    def long_filters(self, seqlen: int) -> dict[str, jax.Array]:
        """{"filter_o": (seqlen, D) fp32} for o < n_filters. Filter o is convolved (with skip
        ``long_filter_skips()["filter_o"]``) with: safari, x^{N-1-o} ⊙ v_o (v_0 = v); paper, z_o (z_0 = v),
        the result then gated by x^{o+1}. See the module docstring."""
        h = self.filter(seqlen)
        d = self.d_model
        return {f"filter_{o}": h[:, o * d:(o + 1) * d] for o in range(self.n_filters)}

    def long_filter_skips(self) -> dict[str, jax.Array]:
        """{"filter_o": D^o (D,)}: the skip added to filter o's convolution (y = h ∗ x + D ⊙ x)."""
        d = self.d_model
        return {f"filter_{o}": self.bias[...][o * d:(o + 1) * d] for o in range(self.n_filters)}

    def _conv(self, z, h, b, pre=None, post=None):
        layout = self.cfg.layout
        if self.cfg.dropout > 0.0:
            if pre is not None:
                z = z * pre
            return fftconv(self.dropout(z), h, b, post_gate=post, layout=layout)
        return fftconv(z, h, b, pre_gate=pre, post_gate=post, layout=layout)

    def __call__(self, x: jax.Array) -> jax.Array:
        seqlen = x.shape[1]
        check_seqlen(seqlen, self.max_len, "hyena")
        x = x.astype(self.dtype)
        channels_first = self.cfg.layout == "hbl"
        if channels_first:
            u = self.short_conv(linear_channels_first(self.in_proj, x), channels_first=True)
        else:
            u = self.short_conv(self.in_proj(x))
        parts = jnp.split(u, self.cfg.order + 1, axis=0 if channels_first else -1)
        h = self.filter(seqlen)
        d = self.d_model
        bias = self.bias[...]
        n = self.n_filters
        if self.cfg.convention == "safari":
            x0, gates, v = parts[0], parts[1:-1], parts[-1]
            for o, gate in enumerate(reversed(gates)):
                post = x0 if o == n - 1 else None
                v = self._conv(v, h[:, o * d:(o + 1) * d], bias[o * d:(o + 1) * d], pre=gate, post=post)
        else:
            v, gates = parts[0], parts[1:]
            for o, gate in enumerate(gates):
                v = self._conv(v, h[:, o * d:(o + 1) * d], bias[o * d:(o + 1) * d], post=gate)
        return linear_from_channels_first(self.out_proj, v) if channels_first else self.out_proj(v)
