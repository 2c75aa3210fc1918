"""Based linear attention with the 2nd-order Taylor feature map (zoology `based.py`, based `linear_attention.py`).

    q = W_q x, k = W_k x    (B, L, H, d)   d = feature_dim       (no biases)
    v = W_v x               (B, L, H, Dv)  Dv = d_model / H
    φ(x) = [1, x / d^{1/4}, vec(x ⊗ x) / (√2·√d)]   (1 + d + d² features), so
    φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d) = ((q·k/√d + 1)² + 1) / 2  >= 1/2
    y_t = Σ_{s<=t} φ(q_t)·φ(k_s) v_s / (Σ_{s<=t} φ(q_t)·φ(k_s) + eps)
    out = W_o concat_h(y)

Two exact causal forms of the same sum (both in fp32), chosen by `impl`:
- "quadratic": A_ts = φ(q_t)·φ(k_s) evaluated from s = q_t·k_s (no feature expansion), masked to s <= t;
  O(L²·(d + Dv)) time, O(L²) memory per head. Best for short sequences (MQAR).
- "chunked": chunks of `chunk_size`; inside a chunk the quadratic form, across chunks the running state
  S = Σ φ(k_s) v_sᵀ ((1+d+d²) × Dv) and z = Σ φ(k_s); O(L·(C·(d+Dv) + (1+d+d²)·Dv)) time, linear in L.
- "auto": quadratic when L <= chunk_size, else chunked.
The kernel is bounded below by 1/2, so the normaliser is >= (t+1)/2 and needs no stabilisation; eps
(1e-12, as in the references) only mirrors them.

Hybrid Based models (linear attention + sliding-window attention + BaseConv layers) are assembled with
per-layer mixer specs in the model config; see the module README section for recipes.
For recurrent decoding: `project(x)` gives (q, k, v), `feature_map` expands q/k, `output(y)` projects.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ConfigError
from lm.mixers.layers import check_seqlen, dense, out_proj_std
from lm.mixers.registry import register_mixer


@dataclasses.dataclass
class BasedConfig:
    feature_dim: int = 16            # d: projected q/k dimension per head (Zoology MQAR uses 8)
    num_heads: int = 1
    head_dim: int | None = None      # value dim per head; default d_model // num_heads
    eps: float = 1e-12
    impl: Literal["auto", "quadratic", "chunked"] = "auto"
    chunk_size: int = 128
    init_std: float = 0.02
    scaled_out_init: bool = False    # Zoology names it `proj_o`, so its GPT-2 rescale skips it; Based's `out_proj` gets it

    def validate(self) -> None:
        if self.feature_dim < 1:
            raise ConfigError(f"based: feature_dim must be >= 1, got {self.feature_dim}")
        if self.num_heads < 1:
            raise ConfigError(f"based: num_heads must be >= 1, got {self.num_heads}")
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError(f"based: head_dim must be >= 1 or null, got {self.head_dim}")
        if self.chunk_size < 1:
            raise ConfigError(f"based: chunk_size must be >= 1, got {self.chunk_size}")
        if self.eps < 0:
            raise ConfigError(f"based: eps must be >= 0, got {self.eps}")
        if self.impl not in ("auto", "quadratic", "chunked"):
            raise ConfigError(f"based: impl must be 'auto', 'quadratic' or 'chunked', got {self.impl!r}")


def taylor_feature_map(x):
    """φ(x) = [1, x/d^{1/4}, vec(x⊗x)/(√2·√d)] over the last axis (size d) -> size 1 + d + d²."""
    d = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    return jnp.concatenate(
        [jnp.ones_like(x[..., :1]), x / d ** 0.25, x2 / (math.sqrt(2.0) * math.sqrt(d))], axis=-1
    )


def taylor_kernel(dots, d: int):
    """φ(q)·φ(k) as a function of q·k: 1 + s/√d + s²/(2d)."""
    return 1.0 + dots / math.sqrt(d) + dots * dots / (2.0 * d)


def linear_attention_quadratic(q, k, v, eps: float = 1e-12):
    """Causal Based attention, masked quadratic form. q, k (B, L, H, d), v (B, L, H, Dv) -> (B, L, H, Dv), fp32."""
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    seqlen, d = q.shape[1], q.shape[-1]
    a = taylor_kernel(jnp.einsum("bthd,bshd->bhts", q, k), d)
    a = jnp.where(jnp.tril(jnp.ones((seqlen, seqlen), bool)), a, 0.0)
    num = jnp.einsum("bhts,bshe->bthe", a, v)
    den = jnp.sum(a, axis=-1).transpose(0, 2, 1)[..., None]  # (B, L, H, 1)
    return num / (den + eps)


def linear_attention_chunked(q, k, v, eps: float = 1e-12, chunk_size: int = 128):
    """Causal Based attention, chunked: quadratic inside chunks, Taylor-feature state across chunks.

    Same inputs/outputs as `linear_attention_quadratic`; the sequence is zero-padded to a multiple of
    ``chunk_size`` (padding sits after every real position, so it never contributes)."""
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    batch, seqlen, heads, d = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, seqlen)
    n_chunks = -(-seqlen // c)
    pad = n_chunks * c - seqlen
    if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    # (n, B, C, H, .) chunk-major for the scan
    qc, kc, vc = (a.reshape(batch, n_chunks, c, heads, a.shape[-1]).transpose(1, 0, 2, 3, 4) for a in (q, k, v))
    tril = jnp.tril(jnp.ones((c, c), bool))
    n_feat = 1 + d + d * d

    def step(carry, chunk):
        s_state, z_state = carry  # (B, H, F, Dv), (B, H, F)
        qi, ki, vi = chunk
        a = jnp.where(tril, taylor_kernel(jnp.einsum("bthd,bshd->bhts", qi, ki), d), 0.0)
        fq, fk = taylor_feature_map(qi), taylor_feature_map(ki)  # (B, C, H, F)
        num = jnp.einsum("bhts,bshe->bthe", a, vi) + jnp.einsum("bthf,bhfe->bthe", fq, s_state)
        den = jnp.sum(a, axis=-1).transpose(0, 2, 1) + jnp.einsum("bthf,bhf->bth", fq, z_state)
        s_state = s_state + jnp.einsum("bshf,bshe->bhfe", fk, vi)
        z_state = z_state + jnp.sum(fk, axis=1)
        return (s_state, z_state), num / (den[..., None] + eps)

    init = (jnp.zeros((batch, heads, n_feat, dv), jnp.float32), jnp.zeros((batch, heads, n_feat), jnp.float32))
    _, y = jax.lax.scan(step, init, (qc, kc, vc))
    y = y.transpose(1, 0, 2, 3, 4).reshape(batch, n_chunks * c, heads, dv)
    return y[:, :seqlen]


@register_mixer("based", BasedConfig, "Based linear attention (2nd-order Taylor feature map)")
class Based(nnx.Module):
    def __init__(self, cfg: BasedConfig, *, d_model: int, max_len: int, layer_idx: int = 0, n_layers: int = 1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        if cfg.head_dim is None and d_model % cfg.num_heads:
            raise ConfigError(f"based: d_model={d_model} is not divisible by num_heads={cfg.num_heads}")
        self.cfg = cfg
        self.d_model, self.max_len, self.layer_idx, self.n_layers = d_model, max_len, layer_idx, n_layers
        self.num_heads, self.feature_dim = cfg.num_heads, cfg.feature_dim
        self.head_dim = cfg.head_dim or d_model // cfg.num_heads
        self.dtype = dtype
        std = cfg.init_std
        out_std = out_proj_std(n_layers, std) if cfg.scaled_out_init else std
        width_qk, width_v = cfg.feature_dim * cfg.num_heads, self.head_dim * cfg.num_heads
        self.proj_q = dense(d_model, width_qk, dtype=dtype, rngs=rngs, std=std, use_bias=False)
        self.proj_k = dense(d_model, width_qk, dtype=dtype, rngs=rngs, std=std, use_bias=False)
        self.proj_v = dense(d_model, width_v, dtype=dtype, rngs=rngs, std=std, use_bias=False)
        self.proj_o = dense(width_v, d_model, dtype=dtype, rngs=rngs, std=out_std, use_bias=False)

    feature_map = staticmethod(taylor_feature_map)

    def project(self, x):
        """x (B, L, d_model) -> q, k (B, L, H, feature_dim), v (B, L, H, head_dim), activation dtype."""
        batch, seqlen, _ = x.shape
        x = x.astype(self.dtype)
        q = self.proj_q(x).reshape(batch, seqlen, self.num_heads, self.feature_dim)
        k = self.proj_k(x).reshape(batch, seqlen, self.num_heads, self.feature_dim)
        v = self.proj_v(x).reshape(batch, seqlen, self.num_heads, self.head_dim)
        return q, k, v

    def output(self, y):
        """y (B, L, H, head_dim) -> (B, L, d_model)."""
        batch, seqlen = y.shape[:2]
        return self.proj_o(y.reshape(batch, seqlen, self.num_heads * self.head_dim).astype(self.dtype))

    def mix(self, q, k, v):
        """Causal linear attention (fp32) with the configured implementation."""
        impl = self.cfg.impl
        if impl == "auto":
            impl = "quadratic" if q.shape[1] <= self.cfg.chunk_size else "chunked"
        if impl == "quadratic":
            return linear_attention_quadratic(q, k, v, self.cfg.eps)
        return linear_attention_chunked(q, k, v, self.cfg.eps, self.cfg.chunk_size)

    def __call__(self, x):
        seqlen = x.shape[1]
        check_seqlen(seqlen, self.max_len, "based")
        q, k, v = self.project(x)
        return self.output(self.mix(q, k, v))
