"""Reference causal long convolutions.

`fftconv_xla` is the production XLA path (``rfft`` with zero padding to a power of two >= L + K - 1,
fp32 math). `direct_causal_conv` (JAX, differentiable) and `direct_causal_conv_np` (NumPy float64,
O(L*K)) are independent references used by tests only.

Layout everywhere: u (B, L, H), k (K, H), bias (H,), gates (B, L, H); output (B, L, H).
Math: y = post ⊙ (k ∗ (pre ⊙ u) + bias ⊙ (pre ⊙ u)), with (k ∗ x)_t = Σ_{s=0}^{min(t,K-1)} k_s x_{t-s}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def fftconv_xla(u, k, bias=None, pre_gate=None, post_gate=None):
    """Causal FFT convolution in fp32 through ``jnp.fft.rfft``; returns u's dtype. Shapes as module doc."""
    out_dtype = u.dtype
    seqlen, ksize = u.shape[1], k.shape[0]
    x = u.astype(jnp.float32)
    if pre_gate is not None:
        x = x * pre_gate.astype(jnp.float32)
    n = next_power_of_two(seqlen + ksize - 1)
    x_f = jnp.fft.rfft(x, n=n, axis=1)
    k_f = jnp.fft.rfft(k.astype(jnp.float32), n=n, axis=0)
    y = jnp.fft.irfft(x_f * k_f[None], n=n, axis=1)[:, :seqlen]
    if bias is not None:
        y = y + x * bias.astype(jnp.float32)
    if post_gate is not None:
        y = y * post_gate.astype(jnp.float32)
    return y.astype(out_dtype)


def direct_causal_conv(u, k, bias=None, pre_gate=None, post_gate=None):
    """Causal depthwise convolution by `lax.conv_general_dilated` (no FFT); differentiable reference."""
    x = u if pre_gate is None else u * pre_gate
    channels, ksize = u.shape[2], k.shape[0]
    rhs = jnp.flip(k, axis=0)[:, None, :]  # (K, 1, H): spatial, in-per-group, out
    y = jax.lax.conv_general_dilated(
        x,
        rhs.astype(x.dtype),
        window_strides=(1,),
        padding=[(ksize - 1, 0)],
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=channels,
        precision=jax.lax.Precision.HIGHEST,
    )
    if bias is not None:
        y = y + x * bias
    if post_gate is not None:
        y = y * post_gate
    return y


def direct_causal_conv_np(u, k, bias=None, pre_gate=None, post_gate=None) -> np.ndarray:
    """Causal convolution in float64 NumPy by explicit shifted sums, O(L*K): the ground truth for tests."""
    x = np.asarray(u, np.float64)
    if pre_gate is not None:
        x = x * np.asarray(pre_gate, np.float64)
    kk = np.asarray(k, np.float64)
    seqlen = x.shape[1]
    y = np.zeros_like(x)
    for s in range(min(kk.shape[0], seqlen)):
        y[:, s:] += kk[s][None, None, :] * x[:, : seqlen - s]
    if bias is not None:
        y = y + x * np.asarray(bias, np.float64)
    if post_gate is not None:
        y = y * np.asarray(post_gate, np.float64)
    return y
