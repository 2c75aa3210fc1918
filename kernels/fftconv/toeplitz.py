"""impl="direct": the causal conv as one Toeplitz matmul per channel, no FFT.

    T[h, s, t] = k[t − s, h] for 0 ≤ t − s < K (else 0);   y[b, t, h] = Σ_s x[b, s, h] · T[h, s, t]

O(B·H·L²) work and an (H, L, L) fp32 matrix, against the FFT's O(B·H·L log L): it wins for short
sequences, where the FFT's passes over memory cost more than the matmul (on the 2-core CPU VM, gated fp32
forward+backward at B·L = 32k: 1.6-2.7× faster at L 32-64, 1.1-1.9× at L 128, 0.6× at L 256, for H 64-256:
`scripts/bench_direct_conv.py`, results/fftconv/direct_vs_fft_cpu.md).
`api.default_impl` picks it on CPU up to `AUTO_MAX_LEN`. fp32 inside (dots at HIGHEST) at every
precision setting, like impl "xla"; the result is cast to u's dtype. T is built by copies (a tiled,
re-strided filter row), so its gradient is a sum over diagonals with no scatter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

AUTO_MAX_LEN = 128  # `impl="auto"` on CPU takes this impl for L ≤ this (measured crossover: 128-256)
MAX_MATRIX_BYTES = 1 << 30  # larger (H, L, L) Toeplitz matrices are refused: use an FFT impl


def matrix_bytes(seqlen: int, channels: int) -> int:
    """Bytes of the fp32 (H, L, L) Toeplitz matrix this impl materialises."""
    return 4 * channels * seqlen * seqlen


def toeplitz(k, seqlen: int):
    """(H, L, L) fp32 with T[h, s, t] = k[t − s, h] for 0 ≤ t − s < K, else 0; k (K, H), K ≤ L.

    Row s of T is the filter shifted right by s: a zero-padded filter row of period 2L+1, tiled L times
    and read back in rows of 2L, is shifted by one more sample per row (the wrapped tail lands in zeros)."""
    ksize, channels = k.shape
    row = jnp.pad(jnp.transpose(k.astype(jnp.float32)), ((0, 0), (0, 2 * seqlen + 1 - ksize)))  # (H, 2L+1)
    skewed = jnp.tile(row, (1, seqlen))[:, : 2 * seqlen * seqlen]
    return skewed.reshape(channels, seqlen, 2 * seqlen)[:, :, :seqlen]


@functools.partial(jax.jit, static_argnames=("layout",))
def toeplitz_conv(u, k, bias=None, pre_gate=None, post_gate=None, *, layout: str = "blh"):
    """post ⊙ (k ∗ x + bias ⊙ x), x = pre ⊙ u, as a Toeplitz matmul; u and the gates (B, L, H) for layout
    "blh" or (H, B, L) for "hbl", k (K, H), bias (H,); returns u's layout and dtype."""
    x = u.astype(jnp.float32)
    if pre_gate is not None:
        x = x * pre_gate.astype(jnp.float32)
    seqlen = x.shape[layout.index("l")]
    x_hbl = jnp.transpose(x, (2, 0, 1)) if layout == "blh" else x
    y = jax.lax.dot_general(x_hbl, toeplitz(k, seqlen), (((2,), (1,)), ((0,), (0,))),
                            precision=jax.lax.Precision.HIGHEST)  # (H, B, L)
    if layout == "blh":
        y = jnp.transpose(y, (1, 2, 0))
    if bias is not None:
        y = y + x * (bias.astype(jnp.float32) if layout == "blh" else bias.astype(jnp.float32)[:, None, None])
    if post_gate is not None:
        y = y * post_gate.astype(jnp.float32)
    return y.astype(u.dtype)
