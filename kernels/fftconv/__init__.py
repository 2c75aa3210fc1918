"""Causal long convolution y = k ∗ u (+ D ⊙ u), with optional gates; see `kernels.fftconv.api`."""

from kernels.fftconv.api import IMPLEMENTATIONS, FFTConvError, auto_impl, default_impl, fftconv, validate

__all__ = ["fftconv", "FFTConvError", "IMPLEMENTATIONS", "auto_impl", "default_impl", "validate"]
