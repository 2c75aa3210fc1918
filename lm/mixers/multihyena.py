"""MultiHyena (Laughing Hyena Distillery §4, arXiv 2310.18780): multi-head Hyena with one filter per head.

Forward pass (order 2 only):
    u = short_conv(in_proj(x))            in_proj: D → 3D (bias); depthwise short conv over 3D channels
    (q, k, v) = split(u, 3)               blocks in this order (safari naming: q = x⁰, k = x¹)
    per head m < M (channels [m·N, (m+1)·N), N = D/M):
        z_t = k_t ⊗ v_t ∈ ℝ^{N×N};  y_t = q_tᵀ [ (h^m ∗ z)_t + D_m z_t ]
      = Σ_{s≤t} (h^m_{t-s} + D_m δ_{ts}) (q_t·k_s) v_s      (causal linear attention, Toeplitz mask)
    out = out_proj(concat_m y^m).
The N² entries of z share the head's filter: ``filter`` (a `HyenaImplicitFilter` with M channels)
is materialised once as (L, M) and repeated to (L, M·N²) for one `fftconv` call (`layers.headwise_outer_conv`).
With M = D (N = 1) this is exactly safari Hyena order 2.

Naming trap: MAD's ``MultiHeadHyenaConv`` passes ``head_dim=num_heads`` and its kernel's "head_dim"
is the outer-product size N. Here ``num_heads`` is M (the number of filters) and the head size is
N = d_model / M, so MAD's "heads 16, head state 2" is not our num_heads=16 unless d_model = 32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ConfigError
from lm.mixers.filters import ImplicitFilterOptions
from lm.mixers.layers import ShortConv, check_seqlen, dense, headwise_outer_conv, out_proj_std
from lm.mixers.registry import register_mixer


@dataclasses.dataclass
class MultiHyenaConfig(ImplicitFilterOptions):
    """num_heads: M (number of filters; head size N = d_model/M). Filter options: `ImplicitFilterOptions`."""

    num_heads: int = 16
    short_filter_order: int = 3
    init_std: float = 0.02

    def validate(self) -> None:
        if self.num_heads < 1:
            raise ConfigError(f"multihyena: num_heads must be >= 1, got {self.num_heads}")
        self.validate_filter("multihyena")
        if self.short_filter_order < 1:
            raise ConfigError(f"multihyena: short_filter_order must be >= 1, got {self.short_filter_order}")


@register_mixer("multihyena", MultiHyenaConfig, "Multi-head Hyena: per-head k⊗v convolved with one shared filter")
class MultiHyena(nnx.Module):
    """Submodules: ``in_proj`` (D → 3D), ``short_conv``, ``filter`` (M channels), ``bias`` (M,) skip D_m
    (init N(0, 1)), ``out_proj``. See the module docstring."""

    def __init__(self, cfg: MultiHyenaConfig, *, d_model: int, max_len: int, layer_idx: int = 0,
                 n_layers: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        if d_model % cfg.num_heads:
            raise ConfigError(f"multihyena: d_model={d_model} is not divisible by num_heads={cfg.num_heads}")
        self.cfg, self.d_model, self.max_len, self.dtype = cfg, int(d_model), int(max_len), dtype
        self.num_heads, self.head_size = cfg.num_heads, d_model // cfg.num_heads
        self.in_proj = dense(d_model, 3 * d_model, dtype=dtype, rngs=rngs, std=cfg.init_std)
        self.short_conv = ShortConv(3 * d_model, cfg.short_filter_order, dtype=dtype, rngs=rngs)
        self.filter = cfg.build_filter(cfg.num_heads, max_len, rngs)
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (cfg.num_heads,), jnp.float32))
        self.out_proj = dense(d_model, d_model, dtype=dtype, rngs=rngs, std=out_proj_std(n_layers, cfg.init_std))

    def long_filters(self, seqlen: int) -> dict[str, jax.Array]:
        """{"filter": (seqlen, M)}: column m is convolved with every entry of k_t ⊗ v_t of head m, skip
        ``long_filter_skips()["filter"][m]``; the result is contracted with q_t (see module docstring)."""
        return {"filter": self.filter(seqlen)}

    def long_filter_skips(self) -> dict[str, jax.Array]:
        return {"filter": self.bias[...]}

    def __call__(self, x: jax.Array) -> jax.Array:
        seqlen = x.shape[1]
        check_seqlen(seqlen, self.max_len, "multihyena")
        q, k, v = jnp.split(self.short_conv(self.in_proj(x.astype(self.dtype))), 3, axis=-1)
        y = headwise_outer_conv(q, k, v, self.filter(seqlen), self.bias[...], self.num_heads)
        return self.out_proj(y)
