"""Causal multi-head softmax attention, with optional rotary embeddings and a sliding window.

    q, k, v = split(W_qkv x + b_qkv)            (one fused projection, layout "(three heads head_dim)")
    q, k    = RoPE(q, pos), RoPE(k, pos)        (rotate-half / GPT-NeoX convention; `rotary: false` skips it)
    A_ts    = softmax_s(q_t . k_s / sqrt(D) + mask_ts)       mask: s <= t and t - s < window
    y       = W_o concat_h(Σ_s A_ts v_s) + b_o

This is Zoology's `MHA` (fused qkv with bias, out-proj with bias, attention dropout on the probabilities)
when `rotary: false` (Zoology adds learned absolute positions in the model instead), and Based's
sliding-window attention with `window: 128`. Scores and softmax are computed in fp32.

`window` counts keys including the current one: query t sees keys t-window+1 .. t (flash-attn's
`window_size=(window - 1, 0)`).

Without attention dropout the softmax attention is `jax.nn.dot_product_attention` (the full-sequence
forward passes ``is_causal`` and ``local_window_size=(window - 1, 0)`` instead of a mask array): cuDNN's
fused flash attention on GPU for bf16/fp16 activations (`sdpa_implementation`), XLA elsewhere. With
dropout on the probabilities it is written out (scores, mask, softmax, dropout, weighted sum).

For KV-cache decoding the forward pass is split into reusable pieces:
`project_qkv(x, positions)` (RoPE at absolute positions), `attention_mask(q_pos, k_pos)` (from absolute
positions; negative key positions mark empty cache slots), `attend(q, k, v, mask)` and `output(o)`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ConfigError
from lm.mixers.layers import check_seqlen, dense, out_proj_std
from lm.mixers.registry import register_mixer


@dataclasses.dataclass
class AttentionConfig:
    num_heads: int = 1
    rotary: bool = True              # RoPE on q and k; false for models with learned absolute positions
    rope_base: float = 10000.0
    window: int | None = None        # sliding window (keys per query, current included); None = full causal
    dropout: float = 0.0             # dropout on the attention probabilities (training only)
    bias: bool = True                # biases on the qkv and out projections (Zoology MHA: true)
    init_std: float = 0.02
    scaled_out_init: bool = True     # out-projection std init_std / sqrt(2 * n_layers) (GPT-2 / Zoology)

    def validate(self) -> None:
        if self.num_heads < 1:
            raise ConfigError(f"attention: num_heads must be >= 1, got {self.num_heads}")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"attention: window must be a positive integer or null, got {self.window}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"attention: dropout must be in [0, 1), got {self.dropout}")
        if self.rope_base <= 0:
            raise ConfigError(f"attention: rope_base must be > 0, got {self.rope_base}")
        if self.init_std <= 0:
            raise ConfigError(f"attention: init_std must be > 0, got {self.init_std}")


def rope_angles(positions, head_dim: int, base: float = 10000.0):
    """(cos, sin) of shape positions.shape + (head_dim // 2,), fp32; frequency i is base^(-2i/head_dim)."""
    inv_freq = base ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, positions, base: float = 10000.0):
    """Rotate-half RoPE on x (B, L, H, D) at integer positions (L,) or (B, L); computed in fp32."""
    half = x.shape[-1] // 2
    cos, sin = rope_angles(positions, x.shape[-1], base)
    if cos.ndim == 2:  # (L, D/2) -> (1, L, 1, D/2)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:  # (B, L, D/2) -> (B, L, 1, D/2)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def sdpa_implementation(dtype, head_dim: int, backend: str | None = None) -> str | None:
    """`jax.nn.dot_product_attention`'s ``implementation`` for activations of ``dtype``: "cudnn" on GPU
    for bf16/fp16 with a head_dim cuDNN's flash kernel takes (a multiple of 8, at most 128); None (XLA)
    otherwise."""
    backend = backend or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return None


def causal_window_mask(q_positions, k_positions, window: int | None = None):
    """Boolean mask (..., Lq, Lk): key s is visible to query t iff 0 <= pos_s <= pos_t and pos_t - pos_s < window.

    Positions are absolute integer positions of shape (L,) or (B, L); a negative key position marks an
    empty (not yet written) cache slot and is never visible.
    """
    qp = jnp.asarray(q_positions)[..., :, None]
    kp = jnp.asarray(k_positions)[..., None, :]
    mask = (kp <= qp) & (kp >= 0)
    if window is not None:
        mask = mask & (qp - kp < window)
    return mask


@register_mixer("attention", AttentionConfig, "causal multi-head softmax attention (RoPE, optional sliding window)")
class Attention(nnx.Module):
    def __init__(self, cfg: AttentionConfig, *, d_model: int, max_len: int, layer_idx: int = 0, n_layers: int = 1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        if d_model % cfg.num_heads:
            raise ConfigError(f"attention: d_model={d_model} is not divisible by num_heads={cfg.num_heads}")
        head_dim = d_model // cfg.num_heads
        if cfg.rotary and head_dim % 2:
            raise ConfigError(f"attention: rotary embeddings need an even head_dim; got {head_dim} "
                              f"(d_model={d_model}, num_heads={cfg.num_heads})")
        self.cfg = cfg
        self.d_model, self.max_len, self.layer_idx, self.n_layers = d_model, max_len, layer_idx, n_layers
        self.num_heads, self.head_dim = cfg.num_heads, head_dim
        self.dtype = dtype
        out_std = out_proj_std(n_layers, cfg.init_std) if cfg.scaled_out_init else cfg.init_std
        self.qkv = dense(d_model, 3 * d_model, dtype=dtype, rngs=rngs, std=cfg.init_std, use_bias=cfg.bias)
        self.out = dense(d_model, d_model, dtype=dtype, rngs=rngs, std=out_std, use_bias=cfg.bias)
        self.attn_dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None

    # ---- pieces reused by KV-cache decoding -------------------------------------------------------
    def project_qkv(self, x, positions=None):
        """x (B, L, d_model) -> q, k, v each (B, L, H, D) in the activation dtype, RoPE applied at
        ``positions`` (absolute, (L,) or (B, L); default arange(L))."""
        batch, seqlen, _ = x.shape
        qkv = self.qkv(x.astype(self.dtype)).reshape(batch, seqlen, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.cfg.rotary:
            if positions is None:
                positions = jnp.arange(seqlen)
            q = apply_rope(q, positions, self.cfg.rope_base)
            k = apply_rope(k, positions, self.cfg.rope_base)
        return q, k, v

    def attention_mask(self, q_positions, k_positions):
        """Causal (and windowed) visibility mask from absolute positions; see `causal_window_mask`."""
        return causal_window_mask(q_positions, k_positions, self.cfg.window)

    def attend(self, q, k, v, mask):
        """Softmax attention. q (B, Lq, H, D), k/v (B, Lk, H, D); mask boolean, broadcastable to
        (B, H, Lq, Lk) — shapes (Lq, Lk) and (B, Lq, Lk) are accepted too (True = visible).
        Returns (B, Lq, H, D) in v's dtype. Scores and softmax in fp32."""
        mask = jnp.asarray(mask)
        if mask.ndim == 2:  # (Lq, Lk) -> (1, 1, Lq, Lk)
            mask = mask[None, None]
        elif mask.ndim == 3:  # (B, Lq, Lk) -> (B, 1, Lq, Lk)
            mask = mask[:, None]
        if self.attn_dropout is None:
            return jax.nn.dot_product_attention(q, k, v, mask=mask).astype(v.dtype)
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = self.attn_dropout(jax.nn.softmax(scores, axis=-1))
        return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)

    def output(self, o):
        """o (B, L, H, D) -> (B, L, d_model) through the out projection."""
        batch, seqlen = o.shape[:2]
        return self.out(o.reshape(batch, seqlen, self.d_model).astype(self.dtype))

    # ---- full-sequence forward ---------------------------------------------------------------------
    def __call__(self, x):
        seqlen = x.shape[1]
        check_seqlen(seqlen, self.max_len, "attention")
        positions = jnp.arange(seqlen)
        q, k, v = self.project_qkv(x, positions)
        if self.attn_dropout is not None:
            return self.output(self.attend(q, k, v, self.attention_mask(positions, positions)))
        window = None if self.cfg.window is None else (self.cfg.window - 1, 0)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                         implementation=sdpa_implementation(q.dtype, self.head_dim))
        return self.output(o)
