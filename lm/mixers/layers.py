"""Building blocks shared by the mixers: projections, the causal short convolution, length checks.

Layout is (batch, length, channels) everywhere. Parameters are fp32; activations are cast to the
mixer's compute ``dtype`` (e.g. bf16) for projections and short convolutions. Long convolutions go
through `kernels.fftconv.fftconv` (fp32 inside, returns the input dtype).

Names exported (stable; other mixer modules import them):
- `dense(in, out, *, dtype, rngs, std=0.02, use_bias=True)`: `nnx.Linear`, kernel N(0, std²), zero bias.
- `out_proj_std(n_layers, std=0.02)`: GPT-2/safari residual-branch init std/sqrt(2·n_layers).
- `ShortConv(channels, kernel_size, *, dtype, rngs)`: causal depthwise FIR with bias ((B, L, C), or
  (C, B, L) with ``channels_first=True``).
- `linear_channels_first(layer, x)` / `linear_from_channels_first(layer, z)`: an `nnx.Linear` from
  (B, L, D) to (C, B, L) and back, each one einsum (the "hbl" layout of `kernels.fftconv`).
- `check_seqlen(seqlen, max_len, who)`: ValueError naming L and max_len when L > max_len.
- `headwise_outer_conv(q, k, v, filt, skip, num_heads)`: per-head y_t = q_tᵀ[(h ∗ k vᵀ)_t + D k_t v_tᵀ]
  (MultiHyena and H3 with head_dim > 1), one filter per head broadcast to its N² channels.
- `glu(x)`: a ⊙ σ(b) with [a, b] the two halves of the last axis (PyTorch `F.glu`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.fftconv import fftconv


def check_seqlen(seqlen: int, max_len: int, who: str = "mixer") -> None:
    """Raise ValueError when a sequence is longer than the mixer was built for."""
    if seqlen > max_len:
        raise ValueError(
            f"{who}: sequence length L={seqlen} exceeds max_len={max_len} (the filter length the mixer "
            f"was built for); rebuild it with a larger max_len"
        )


def dense(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs, std: float = 0.02,
          use_bias: bool = True) -> nnx.Linear:
    """Linear layer with fp32 parameters, kernel ~ N(0, std²), zero bias, computing in ``dtype``."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(stddev=std), bias_init=nnx.initializers.zeros_init(), rngs=rngs,
    )


def out_proj_std(n_layers: int, std: float = 0.02) -> float:
    """Init std of a residual-branch output projection: std/sqrt(2·n_layers) (GPT-2 / safari)."""
    return std / math.sqrt(2 * max(int(n_layers), 1))


def glu(x):
    """Gated linear unit over the last axis: first half ⊙ sigmoid(second half)."""
    a, b = jnp.split(x, 2, axis=-1)
    return a * jax.nn.sigmoid(b)


class ShortConv(nnx.Module):
    """Causal depthwise convolution over (B, L, C) with bias (PyTorch ``Conv1d(C, C, K, groups=C,
    padding=K-1)`` truncated to the first L outputs).

    ``kernel`` has shape (K, C) in PyTorch cross-correlation order:
        y_t[c] = bias[c] + Σ_{j<K} kernel[j, c] · x_{t-(K-1)+j}[c]     (x_{<0} = 0),
    i.e. the causal FIR taps are h_s = kernel[K-1-s] (see `taps()`). Init as PyTorch's Conv1d default:
    U(-1/√K, 1/√K) for kernel and bias (fan_in = K for a depthwise conv).
    """

    def __init__(self, channels: int, kernel_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if kernel_size < 1:
            raise ValueError(f"ShortConv: kernel_size must be >= 1, got {kernel_size}")
        self.channels = int(channels)
        self.kernel_size = int(kernel_size)
        self.dtype = dtype
        bound = 1.0 / math.sqrt(kernel_size)
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (kernel_size, channels), jnp.float32,
                                                   -bound, bound))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (channels,), jnp.float32, -bound, bound))

    def taps(self) -> jax.Array:
        """Causal FIR taps (K, C): y_t = bias + Σ_s taps[s] · x_{t-s}."""
        return jnp.flip(self.kernel[...], axis=0)

    def __call__(self, x: jax.Array, *, channels_first: bool = False) -> jax.Array:
        """x (B, L, C), or (C, B, L) when channels_first; returns the same layout in ``dtype``."""
        channel_axis, time_axis = (0, 2) if channels_first else (2, 1)
        if x.ndim != 3 or x.shape[channel_axis] != self.channels:
            expected = f"({self.channels}, batch, length)" if channels_first else f"(batch, length, {self.channels})"
            raise ValueError(f"ShortConv: expected {expected} input, got {x.shape}")
        # Shifted multiply-adds: K is short, and this fuses into one elementwise pass on every backend
        # (XLA's grouped convolution and its gradient are ~30x slower on CPU).
        x = x.astype(self.dtype)
        taps = self.taps().astype(self.dtype)
        bias = self.bias[...].astype(self.dtype)
        if channels_first:
            taps, bias = taps[:, :, None, None], bias[:, None, None]
        seqlen = x.shape[time_axis]
        y = x * taps[0]
        for shift in range(1, self.kernel_size):
            pad = [(0, 0)] * 3
            pad[time_axis] = (shift, 0)
            y = y + jax.lax.slice_in_dim(jnp.pad(x, pad), 0, seqlen, axis=time_axis) * taps[shift]
        return y + bias


def linear_channels_first(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """``layer(x)`` for x (B, L, D), returned as (C, B, L): the GEMM W^T·x^T, computed in layer.dtype."""
    x, kernel, bias = layer.promote_dtype((x, layer.kernel[...], layer.bias[...]), dtype=layer.dtype)
    return jnp.einsum("bld,dc->cbl", x, kernel) + bias[:, None, None]


def linear_from_channels_first(layer: nnx.Linear, z: jax.Array) -> jax.Array:
    """``layer`` applied to z (C, B, L) along C, returned as (B, L, D): the GEMM z^T·W."""
    z, kernel, bias = layer.promote_dtype((z, layer.kernel[...], layer.bias[...]), dtype=layer.dtype)
    return jnp.einsum("cbl,cd->bld", z, kernel) + bias


def headwise_outer_conv(q, k, v, filt, skip, num_heads: int):
    """Multi-head "linear attention with a Toeplitz mask" via one long convolution.

    q, k, v: (B, L, M·N) with head m owning channels [m·N, (m+1)·N); filt: (≥L, M) fp32, one filter per
    head; skip: (M,) or None. Per head, z_t = k_t ⊗ v_t (N×N) is convolved with the head's filter
    (tied over the N² entries) and contracted with q:
        y_t[m, j] = Σ_i q_t[m, i] · ( Σ_{s≤t} h_{t-s}[m] k_s[m, i] v_s[m, j] + D[m] k_t[m, i] v_t[m, j] )
    which equals Σ_{s≤t} (h_{t-s} + D·δ_{ts}) (q_t·k_s) v_s[j]. Returns (B, L, M·N) in q's dtype.
    """
    batch, seqlen, width = q.shape
    n = width // num_heads
    kh = k.reshape(batch, seqlen, num_heads, n, 1)
    vh = v.reshape(batch, seqlen, num_heads, 1, n)
    z = (kh * vh).reshape(batch, seqlen, num_heads * n * n)
    f = jnp.repeat(filt[:seqlen].astype(jnp.float32), n * n, axis=1)  # (L, M·N²), head-major
    d = None if skip is None else jnp.repeat(skip.astype(jnp.float32), n * n)
    y = fftconv(z, f, d).reshape(batch, seqlen, num_heads, n, n)
    qh = q.reshape(batch, seqlen, num_heads, n)
    out = jnp.einsum("blmi,blmij->blmj", qh.astype(jnp.float32), y.astype(jnp.float32))
    return out.reshape(batch, seqlen, width).astype(q.dtype)
