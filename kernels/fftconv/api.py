"""Public causal long-convolution op: validation and implementation dispatch.

    y = fftconv(u, k, bias, pre_gate=..., post_gate=..., impl="auto")

Layout: u (B, L, H) in bf16/fp16/fp32; k (K, H) with 1 <= K <= L (K < L is a partial filter);
bias (H,) the D skip; gates (B, L, H). Computes, in fp32,
    y = post ⊙ (k ∗ (pre ⊙ u) + bias ⊙ (pre ⊙ u)),   (k ∗ x)_t = Σ_{s<=min(t, K-1)} k_s x_{t-s},
and returns u's dtype. Bad shapes, dtypes and lengths raise `FFTConvError` naming the problem.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kernels.fftconv.reference import fftconv_xla


class FFTConvError(ValueError):
    """Invalid input to `fftconv`; the message names the argument and the problem."""


_INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# name -> implementation with the signature of `fftconv_xla`.
IMPLEMENTATIONS: dict[str, Callable] = {"xla": fftconv_xla}


def _check_float(name: str, x, allowed=_INPUT_DTYPES) -> None:
    if not any(x.dtype == jnp.dtype(d) for d in allowed):
        names = ", ".join(jnp.dtype(d).name for d in allowed)
        raise FFTConvError(f"fftconv: {name} has dtype {x.dtype}; expected one of {names}")


def validate(u, k, bias=None, pre_gate=None, post_gate=None) -> None:
    """Raise FFTConvError unless the arguments have the documented shapes and dtypes."""
    if getattr(u, "ndim", None) != 3:
        raise FFTConvError(f"fftconv: u must have shape (batch, length, channels); got shape {jnp.shape(u)}")
    if getattr(k, "ndim", None) != 2:
        raise FFTConvError(f"fftconv: k must have shape (filter_length, channels); got shape {jnp.shape(k)}")
    batch, seqlen, channels = u.shape
    ksize, k_channels = k.shape
    if seqlen < 1 or channels < 1 or batch < 1:
        raise FFTConvError(f"fftconv: u has an empty dimension: shape {u.shape}")
    if k_channels != channels:
        raise FFTConvError(f"fftconv: k has {k_channels} channels but u has {channels} (k is (K, H), u is (B, L, H))")
    if ksize < 1:
        raise FFTConvError("fftconv: k has filter length 0")
    if ksize > seqlen:
        raise FFTConvError(
            f"fftconv: filter length K={ksize} exceeds sequence length L={seqlen}; slice the filter to k[:L]"
        )
    _check_float("u", u)
    _check_float("k", k)
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (channels,):
            raise FFTConvError(f"fftconv: bias must have shape ({channels},); got {bias.shape}")
    for name, gate in (("pre_gate", pre_gate), ("post_gate", post_gate)):
        if gate is not None:
            _check_float(name, gate)
            if gate.shape != u.shape:
                raise FFTConvError(f"fftconv: {name} must have u's shape {u.shape}; got {gate.shape}")


def default_impl(seqlen: int, backend: str | None = None) -> str:
    """The implementation `impl="auto"` picks for this backend and length."""
    return "xla"


def fftconv(u, k, bias=None, *, pre_gate=None, post_gate=None, impl: str = "auto"):
    """Causal long convolution (see module docstring). ``impl``: "auto" or a key of IMPLEMENTATIONS."""
    validate(u, k, bias, pre_gate, post_gate)
    if impl == "auto":
        impl = default_impl(u.shape[1], jax.default_backend())
    if impl not in IMPLEMENTATIONS:
        raise FFTConvError(f"fftconv: unknown impl {impl!r}; choose 'auto' or one of {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[impl](u, k, bias, pre_gate, post_gate)
