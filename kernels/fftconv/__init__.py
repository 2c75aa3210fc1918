"""Causal long convolution y = k ∗ u (+ D ⊙ u), with optional gates; see `kernels.fftconv.api`."""

from kernels.fftconv.api import IMPLEMENTATIONS, FFTConvError, default_impl, fftconv, validate

__all__ = ["fftconv", "FFTConvError", "IMPLEMENTATIONS", "default_impl", "validate"]
