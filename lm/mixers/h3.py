"""H3 (Fu et al. 2022, arXiv 2212.14052; safari `h3.py`): shift SSM on k, diagonal SSM on k ⊙ v.

Forward pass, x (B, L, D), H = D / head_dim heads:
    q, k, v = q_proj(x), k_proj(x), v_proj(x)                       D → D each (bias)
    k̄ = fftconv(k, shift, shift_skip)  = s ∗ k + D_k ⊙ k           shift SSM = FIR with taps
        ``shift`` (min(d_state, L), D) `FilterParam` (tap s multiplies k_{t-s}, s < d_state), D_k ~ N(0,1)
    head_dim 1:  y = q ⊙ (h ∗ (k̄ ⊙ v) + D ⊙ (k̄ ⊙ v))  = fftconv(k̄, h, D, pre_gate=v, post_gate=q)
    head_dim N:  per head m, y_t = q_tᵀ[(h^m ∗ k̄ vᵀ)_t + D_m k̄_t v_tᵀ] (`layers.headwise_outer_conv`)
    out = out_proj(y)
h = ``ssm`` (`S4DLinKernel`, H channels, d_state/2 complex modes, parameters `FilterParam`)
materialised over L; D = ``bias`` (H,) ~ N(0,1). The diagonal SSM is already modal
(``ssm.modes()``), and the shift FIR is a finite-state recurrence of size d_state, so H3 has an
exact recurrent form without distillation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.fftconv import fftconv
from lm.config import ConfigError
from lm.mixers.filters import S4DLinKernel
from lm.mixers.layers import check_seqlen, dense, headwise_outer_conv, out_proj_std
from lm.mixers.registry import register_mixer
from lm.params import FilterParam


@dataclasses.dataclass
class H3Config:
    """d_state: shift-FIR length and diagonal-SSM state size (even; Zoology MQAR uses seq_len);
    head_dim: 1 (elementwise k̄ ⊙ v) or N (per-head N×N outer products; Zoology uses 2);
    dt_min / dt_max: S4D step-size init range."""

    d_state: int = 64
    head_dim: int = 1
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    init_std: float = 0.02

    def validate(self) -> None:
        if self.d_state < 2 or self.d_state % 2:
            raise ConfigError(f"h3: d_state must be even and >= 2, got {self.d_state}")
        if self.head_dim < 1:
            raise ConfigError(f"h3: head_dim must be >= 1, got {self.head_dim}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"h3: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


@register_mixer("h3", H3Config, "H3: shift-SSM on k, diagonal S4D SSM on k⊙v, gated by q")
class H3(nnx.Module):
    """Submodules: ``q_proj``, ``k_proj``, ``v_proj``, ``shift`` (FIR taps), ``shift_skip`` (D,),
    ``ssm`` (`S4DLinKernel`), ``bias`` (H,), ``out_proj``. See the module docstring."""

    def __init__(self, cfg: H3Config, *, d_model: int, max_len: int, layer_idx: int = 0, n_layers: int = 1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        if d_model % cfg.head_dim:
            raise ConfigError(f"h3: d_model={d_model} is not divisible by head_dim={cfg.head_dim}")
        self.cfg, self.d_model, self.max_len, self.dtype = cfg, int(d_model), int(max_len), dtype
        self.num_heads = d_model // cfg.head_dim
        self.q_proj = dense(d_model, d_model, dtype=dtype, rngs=rngs, std=cfg.init_std)
        self.k_proj = dense(d_model, d_model, dtype=dtype, rngs=rngs, std=cfg.init_std)
        self.v_proj = dense(d_model, d_model, dtype=dtype, rngs=rngs, std=cfg.init_std)
        taps = min(cfg.d_state, max_len)
        self.shift = FilterParam(jax.random.normal(rngs.params(), (taps, d_model), jnp.float32) / math.sqrt(cfg.d_state))
        self.shift_skip = nnx.Param(jax.random.normal(rngs.params(), (d_model,), jnp.float32))
        self.ssm = S4DLinKernel(self.num_heads, cfg.d_state, dt_min=cfg.dt_min, dt_max=cfg.dt_max, rngs=rngs)
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (self.num_heads,), jnp.float32))
        self.out_proj = dense(d_model, d_model, dtype=dtype, rngs=rngs, std=out_proj_std(n_layers, cfg.init_std))

    def long_filters(self, seqlen: int) -> dict[str, jax.Array]:
        """{"shift": (seqlen, D) FIR taps zero-padded, convolved with k (skip shift_skip);
        "ssm": (seqlen, H), convolved with k̄ ⊙ v (head_dim 1; gated by q after) or with every entry
        of head m's k̄ ⊗ v (head_dim > 1; contracted with q after), skip ``bias``."""
        s = self.shift[...][:seqlen]
        s = jnp.pad(s, ((0, seqlen - s.shape[0]), (0, 0)))
        return {"shift": s, "ssm": self.ssm(seqlen)}

    def long_filter_skips(self) -> dict[str, jax.Array]:
        return {"shift": self.shift_skip[...], "ssm": self.bias[...]}

    def __call__(self, x: jax.Array) -> jax.Array:
        seqlen = x.shape[1]
        check_seqlen(seqlen, self.max_len, "h3")
        x = x.astype(self.dtype)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        k = fftconv(k, self.shift[...][:seqlen], self.shift_skip[...])
        h = self.ssm(seqlen)
        if self.cfg.head_dim == 1:
            y = fftconv(k, h, self.bias[...], pre_gate=v, post_gate=q)
        else:
            y = headwise_outer_conv(q, k, v, h, self.bias[...], self.num_heads)
        return self.out_proj(y)
