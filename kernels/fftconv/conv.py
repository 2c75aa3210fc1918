"""The differentiable op behind impl="xla-matmul" and impl="pallas", plus the masked jnp.fft path.

Forward, for u (B, L, H), k (K, H): y = post ⊙ ((pre⊙u ∗ k)[0:L] + bias ⊙ pre⊙u), fp32 inside.

Modes (both are static parameters of the same op; both equal a dense conv with a masked filter):

* partial (K < L): the filter spectrum only reads the filter's non-zero time rows; and when
  K ≤ L/4 (and no freq_mask) the conv runs block-Toeplitz: the sequence is cut into chunks of
  C = max(128, next_pow2(K)) samples, each chunk is convolved with a 2C-point plan (full linear output)
  and the two halves are overlap-added. With K ≤ C only the diagonal and first sub-diagonal blocks of
  the causal conv matrix are non-zero; all other blocks are skipped (O(L·log C) instead of O(L·log L)
  work; spectrum memory 2C instead of 2L per channel). The result is exactly the K-tap causal conv.
* frequency-sparse (`freq_mask`, a static (G0, G1) boolean block mask): y = Re IFFT(FFT(x)·FFT(k)·M)
  over the plan's N-point FFT, M = `monarch.expand_freq_mask(freq_mask, N)`. Zero rows/columns of the
  block grid are skipped in every matmul (see `monarch`).

Backward (custom_vjp, same machinery): with dz = dy ⊙ post and x = pre ⊙ u,
    g  = Re IFFT(conj(K̂)·FFT(dz))[0:L] + bias ⊙ dz   (the forward conv with the conjugated spectrum)
    du = pre ⊙ g,  dpre = u ⊙ g,  dpost = dy ⊙ z (z recomputed),  dbias = Σ_{b,t} dz ⊙ x,
    dk = Re IFFT(M · Σ_b conj(FFT(x_b))·FFT(dz_b))[0:K]        (fp32 accumulation over the batch).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from kernels.fftconv import monarch
from kernels.fftconv import precision as _precision
from kernels.fftconv.monarch import Plan
from kernels.fftconv.reference import next_power_of_two

MATMUL_IMPLS = ("xla-matmul", "pallas")
CHUNK_MIN = 128  # smallest chunk (2C = 256 = smallest plan)


@dataclass(frozen=True)
class OpConfig:
    impl: str
    plan: Plan
    interpret: bool
    precision: str = "fp32"  # matmul operand setting, see kernels.fftconv.precision


def chunk_size(seqlen: int, ksize: int) -> int | None:
    """Chunk length C for the block-Toeplitz partial conv, or None when the dense plan is used."""
    c = max(CHUNK_MIN, next_power_of_two(ksize))
    return c if 4 * c <= seqlen else None


def _raw(cfg: OpConfig, x, spec, plan: Plan, pre=None, post=None, bias=None):
    """post ⊙ ((pre⊙x ∗ k)[0:n_out] + bias ⊙ pre⊙x), x (B, H, L_in) fp32 → (B, H, n_out) fp32."""
    if cfg.impl == "pallas":
        from kernels.fftconv.pallas import conv_pallas

        return conv_pallas(x, spec, plan, pre, post, bias, interpret=cfg.interpret, precision=cfg.precision)
    if pre is not None:
        x = x * pre
    y = monarch.conv_xla_matmul(x, spec, plan, cfg.precision)
    if bias is not None:
        y = y + bias.astype(jnp.float32)[:, None] * x[..., : plan.n_out]
    if post is not None:
        y = y * post
    return y


def _bhl(a):
    return None if a is None else jnp.swapaxes(a.astype(jnp.float32), 1, 2)


def _blh(a):
    return jnp.swapaxes(a, 1, 2)


def _backward_plan(plan: Plan, len_in: int) -> Plan:
    """Same FFT, input = the n_out-long cotangent, output = the len_in-long input gradient."""
    rest0 = plan.rest0
    return dataclasses.replace(
        plan, rows_in=-(-plan.n_out // rest0), rows_out=-(-len_in // rest0), n_out=len_in
    )


def _conv_fwd_impl(u, k, bias, pre, post, cfg: OpConfig):
    plan = cfg.plan
    spec = monarch.filter_spectrum(k, plan)
    y = _raw(cfg, _bhl(u), spec, plan, _bhl(pre), _bhl(post), bias)
    return _blh(y).astype(u.dtype), spec


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def monarch_conv(u, k, bias, pre, post, cfg: OpConfig):
    """Differentiable factorised conv; u (B, L_in, H) → (B, n_out, H) in u's dtype."""
    return _conv_fwd_impl(u, k, bias, pre, post, cfg)[0]


def _fwd(u, k, bias, pre, post, cfg):
    y, spec = _conv_fwd_impl(u, k, bias, pre, post, cfg)
    return y, (u, k, bias, pre, post, spec)


def _bwd(cfg: OpConfig, res, dy):
    u, k, bias, pre, post, spec = res
    plan = cfg.plan
    len_in = u.shape[1]
    ut, pret, postt, dyt = _bhl(u), _bhl(pre), _bhl(post), _bhl(dy)
    x = ut if pret is None else ut * pret
    dz = dyt if postt is None else dyt * postt
    conj = (spec[0], -spec[1])
    bplan = _backward_plan(plan, len_in)
    g = _raw(cfg, dz, conj, bplan, None, None, bias)  # (B, H, L_in)
    du = g if pret is None else g * pret
    dpre = None if pre is None else _blh(g * ut).astype(pre.dtype)
    dpost = None
    if post is not None:
        z = _raw(cfg, ut, spec, plan, pret, None, bias)
        dpost = _blh(dyt * z).astype(post.dtype)
    dbias = None
    if bias is not None:
        dbias = jnp.sum(dz * x[..., : plan.n_out], axis=(0, 2)).astype(bias.dtype)
    # dk = Re IFFT(M · Σ_b conj X_b · DZ_b)[0:K]. Both spectra are scaled transforms (s each) and the
    # inverse carries 1/(N·s), so the fp32 batch sums are rescaled by 1/s (folded into the mask).
    xr, xi = monarch.forward_real(x, plan, scaled=True, precision=cfg.precision)
    dr, di = monarch.forward_real(dz, plan, scaled=True, rows=bplan.rows_in, precision=cfg.precision)
    m = monarch.mask_array(plan)
    rescale = 1.0 / monarch.forward_scale(plan)
    m = rescale if m is None else m * rescale
    pr = jnp.sum(xr * dr + xi * di, axis=0) * m
    pi = jnp.sum(xr * di - xi * dr, axis=0) * m
    dk = monarch.inverse_real((pr, pi), plan, n_out=k.shape[0], precision=cfg.precision)  # (H, K)
    dk = jnp.swapaxes(dk, 0, 1).astype(k.dtype)
    return _blh(du).astype(u.dtype), dk, dbias, dpre, dpost


monarch_conv.defvjp(_fwd, _bwd)


def _check_mask(freq_mask, seqlen, ksize):
    grid = np.asarray(freq_mask)
    if grid.dtype != np.bool_:
        raise ValueError(f"freq_mask must be a boolean block mask; got dtype {grid.dtype}")
    n, f0, fl = monarch.freq_grid(seqlen, ksize)
    monarch.expand_block_mask(grid, f0, fl)  # raises on a bad shape / empty mask
    return grid


def _static_mask(freq_mask):
    if freq_mask is None:
        return None
    return tuple(tuple(bool(v) for v in row) for row in np.asarray(freq_mask, bool))


def fftconv_matmul(u, k, bias=None, pre_gate=None, post_gate=None, *, freq_mask=None, impl="xla-matmul",
                   interpret=None, precision=None):
    """Factorised causal conv (impl "xla-matmul" or "pallas"); same contract as `fftconv_xla`.

    ``precision``: a `kernels.fftconv.precision` setting, None = the default for u's dtype.
    """
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"unknown matmul impl {impl!r}")
    if interpret is None:
        interpret = impl == "pallas" and jax.default_backend() == "cpu"
    precision = _precision.resolve(precision, u.dtype)
    return _fftconv_matmul_jit(u, k, bias, pre_gate, post_gate, freq_mask=_static_mask(freq_mask), impl=impl,
                               interpret=bool(interpret), precision=precision)


@functools.partial(jax.jit, static_argnames=("freq_mask", "impl", "interpret", "precision"))
def _fftconv_matmul_jit(u, k, bias, pre_gate, post_gate, *, freq_mask, impl, interpret, precision):
    batch, seqlen, channels = u.shape
    ksize = k.shape[0]
    c = chunk_size(seqlen, ksize) if freq_mask is None else None
    if c is None:
        plan = monarch.make_plan(seqlen, ksize, seqlen, freq_mask)
        return monarch_conv(u, k, bias, pre_gate, post_gate, OpConfig(impl, plan, bool(interpret), precision))
    # Block-Toeplitz partial conv: chunks of C, each a full 2C-point linear conv, overlap-added.
    plan = monarch.make_plan(c, ksize, 2 * c, n=2 * c)
    x = u.astype(jnp.float32)
    if pre_gate is not None:
        x = x * pre_gate.astype(jnp.float32)
    nchunks = -(-seqlen // c)
    xc = jnp.pad(x, ((0, 0), (0, nchunks * c - seqlen), (0, 0))).reshape(batch * nchunks, c, channels)
    yf = monarch_conv(xc, k, None, None, None, OpConfig(impl, plan, bool(interpret), precision))
    yf = yf.reshape(batch, nchunks, 2 * c, channels)
    carry = jnp.pad(yf[:, :-1, c:], ((0, 0), (1, 0), (0, 0), (0, 0)))
    y = (yf[:, :, :c] + carry).reshape(batch, nchunks * c, channels)[:, :seqlen]
    if bias is not None:
        y = y + x * bias.astype(jnp.float32)
    if post_gate is not None:
        y = y * post_gate.astype(jnp.float32)
    return y.astype(u.dtype)


def fftconv_xla_masked(u, k, bias=None, pre_gate=None, post_gate=None, *, freq_mask):
    return _xla_masked_jit(u, k, bias, pre_gate, post_gate, freq_mask=_static_mask(freq_mask))


@functools.partial(jax.jit, static_argnames=("freq_mask",))
def _xla_masked_jit(u, k, bias, pre_gate, post_gate, *, freq_mask):
    """jnp.fft path with a frequency mask: y = Re IFFT(FFT(x)·FFT(k)·M)[0:L] (+ bias, gates).

    Uses rfft/irfft with the Hermitian part of the mask, m[k] = (M[k] + M[N−k]) / 2, which is exact
    for real x and k.
    """
    seqlen, ksize = u.shape[1], k.shape[0]
    n = monarch.fft_size(seqlen + ksize - 1)
    full = monarch.expand_freq_mask(freq_mask, n)
    half = 0.5 * (full + full[(-np.arange(n)) % n])[: n // 2 + 1]
    x = u.astype(jnp.float32)
    if pre_gate is not None:
        x = x * pre_gate.astype(jnp.float32)
    x_f = jnp.fft.rfft(x, n=n, axis=1)
    k_f = jnp.fft.rfft(k.astype(jnp.float32), n=n, axis=0) * jnp.asarray(half, jnp.float32)[:, None]
    y = jnp.fft.irfft(x_f * k_f[None], n=n, axis=1)[:, :seqlen]
    if bias is not None:
        y = y + x * bias.astype(jnp.float32)
    if post_gate is not None:
        y = y * post_gate.astype(jnp.float32)
    return y.astype(u.dtype)
