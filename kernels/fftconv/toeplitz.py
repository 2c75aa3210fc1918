"""impl="direct": the causal conv as one Toeplitz matmul per channel, no FFT.

    T[h, s, t] = k[t − s, h] for 0 ≤ t − s < K (else 0);   y[b, t, h] = Σ_s x[b, s, h] · T[h, s, t]

O(B·H·L²) work plus an (H, L, L) fp32 matrix built per call, against the FFT's O(B·H·L log L): it wins for
short sequences in large batches, where the FFT's passes over memory cost more than the matmul and the
batch amortises the matrix. On the 2-core CPU VM (gated fp32 forward+backward, H 64-256,
`scripts/bench_direct_conv.py`, results/fftconv/direct_vs_fft_cpu.md) it is 1.2-2.6× faster than
`jnp.fft` for L ≤ 128 once B ≥ 2L (about even at L 256, slower beyond), and 1.5-50× slower at B 4 (the
matrix then costs more than the batch's conv). `api.default_impl` picks it on CPU for L ≤ `AUTO_MAX_LEN`
and B ≥ `AUTO_MIN_BATCH_PER_LEN`·L. fp32 inside (dots at HIGHEST) at every precision setting, like impl
"xla"; the result is cast to u's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

AUTO_MAX_LEN = 128  # `impl="auto"` on CPU takes this impl for L ≤ this …
AUTO_MIN_BATCH_PER_LEN = 2  # … and B ≥ this · L (the batch's B·L samples amortise the matrix's L² per channel)
MAX_MATRIX_BYTES = 1 << 30  # larger (H, L, L) Toeplitz matrices are refused: use an FFT impl


def matrix_bytes(seqlen: int, channels: int) -> int:
    """Bytes of the fp32 (H, L, L) Toeplitz matrix this impl materialises."""
    return 4 * channels * seqlen * seqlen


def toeplitz(k, seqlen: int):
    """(H, L, L) fp32 with T[h, s, t] = k[t − s, h] for 0 ≤ t − s < K, else 0; k (K, H), K ≤ L: one gather
    with static indices (its gradient, a scatter-add onto the K taps, measured faster on CPU than building
    T from re-strided copies)."""
    ksize = k.shape[0]
    lag = np.arange(seqlen)[None, :] - np.arange(seqlen)[:, None]  # (s, t) -> t − s
    taps = jnp.transpose(k.astype(jnp.float32))[:, np.clip(lag, 0, ksize - 1)]
    return jnp.where((lag >= 0) & (lag < ksize), taps, 0.0)


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
