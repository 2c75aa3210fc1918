"""The differentiable op behind impl="xla-matmul" and impl="pallas", plus the masked jnp.fft path.

Forward, for u (B, L, H), k (K, H): y = post ⊙ ((pre⊙u ∗ k)[0:L] + bias ⊙ pre⊙u), fp32 inside.

Modes (both are static parameters of the same op; both equal a dense conv with a masked filter):

* partial (K < L): the filter spectrum only reads the filter's non-zero time rows; and when
  K ≤ L/4 (and no freq_mask) the conv runs block-Toeplitz: the sequence is cut into chunks of
  C = max(128, next_pow2(K)) samples, each chunk is convolved with a 2C-point plan (full linear output)
  and the two halves are overlap-added. With K ≤ C only the diagonal and first sub-diagonal blocks of
  the causal conv matrix are non-zero; all other blocks are skipped (O(L·log C) instead of O(L·log L)
  work; spectrum memory 2C instead of 2L per channel). The result is exactly the K-tap causal conv.
  impl="pallas" runs it as ONE kernel each way instead (`overlap_save_chunk`, `pallas.Tuning.overlap_save`):
  overlap-save over chunks of C ≥ 512 (2C ≤ 4096, a 2-stage plan); the forward program reads its chunk
  and the one before it and writes C outputs, gates and bias fused, in the layout given; the backward
  reads chunks i−1, i, i+1 (dz's correlation with k reaches forward) and writes every gradient once.
* frequency-sparse (`freq_mask`, a static (G0, G1) boolean block mask): y = Re IFFT(FFT(x)·FFT(k)·M)
  over the plan's N-point FFT, M = `monarch.expand_freq_mask(freq_mask, N)`. Zero rows/columns of the
  block grid are skipped in every matmul (see `monarch`).

Backward (custom_vjp, same machinery): with dz = dy ⊙ post and x = pre ⊙ u,
    g  = Re IFFT(conj(K̂)·FFT(dz))[0:L] + bias ⊙ dz   (the forward conv with the conjugated spectrum)
    du = pre ⊙ g,  dpre = u ⊙ g,  dpost = dy ⊙ z (z recomputed),  dbias = Σ_{b,t} dz ⊙ x,
    dk = Re IFFT(M · Σ_b conj(FFT(x_b))·FFT(dz_b))[0:K]        (fp32 accumulation over the batch).
impl="pallas" computes all of it in one kernel for 2-stage plans (and dense 3-stage plans within
`pallas.TUNING.fused3_max_fft`) and g, z and the dk spectrum in one inner kernel for larger plans
(`kernels.fftconv.pallas`); "xla-matmul" runs the three convolutions.
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
# smallest overlap-save chunk: half the 2C window's f0 time rows must fill a dot (monarch.MIN_DOT = 16)
OVERLAP_SAVE_CHUNK_MIN = 512  # 2C = 1024 = 32·32


@dataclass(frozen=True)
class OpConfig:
    impl: str
    plan: Plan
    interpret: bool
    precision: str = "fp32"  # matmul operand setting, see kernels.fftconv.precision
    layout: str = "blh"  # axes of u, the gates and y: "blh" (B, L, H) or "hbl" (H, B, L), see LAYOUTS
    overlap_save: bool = False  # plan is a 2C-point chunk plan run by the fused overlap-save kernels


# Axis order of u, the gates and the output. "hbl" is the fused kernels' native order (no transposes:
# each channel's sequence is contiguous, and a mixer's in/out projections to and from (H, B·L) can be plain
# GEMMs); every other path transposes to (B, H, L) internally.
LAYOUTS = ("blh", "hbl")


def chunk_size(seqlen: int, ksize: int) -> int | None:
    """Chunk length C for the block-Toeplitz partial conv, or None when the dense plan is used."""
    c = max(CHUNK_MIN, next_power_of_two(ksize))
    return c if 4 * c <= seqlen else None


def overlap_save_chunk(seqlen: int, ksize: int) -> int | None:
    """Chunk length C of the fused overlap-save kernel (impl "pallas"), or None where it does not apply:
    C = max(OVERLAP_SAVE_CHUNK_MIN, next_pow2(K)), with a 2-stage 2C-point plan and 4C ≤ L."""
    c = max(OVERLAP_SAVE_CHUNK_MIN, next_power_of_two(ksize))
    return c if len(monarch.plan_factors(2 * c)) == 2 and 4 * c <= seqlen else None


def _raw(cfg: OpConfig, x, spec, plan: Plan, pre=None, post=None, bias=None):
    """post ⊙ ((pre⊙x ∗ k)[0:n_out] + bias ⊙ pre⊙x), x (B, H, L_in) fp32 → (B, H, n_out) fp32 (the
    xla-matmul path, and pallas on ≥ 3-stage plans; 2-stage pallas plans run `pallas.conv_fused`)."""
    if pre is not None:
        x = x * pre
    if cfg.impl == "pallas":
        y = _pallas().conv_inner(x, spec, plan, interpret=cfg.interpret, precision=cfg.precision)
    else:
        y = monarch.conv_xla_matmul(x, spec, plan, cfg.precision)
    if bias is not None:
        y = y + bias.astype(jnp.float32)[:, None] * x[..., : plan.n_out]
    if post is not None:
        y = y * post
    return y


def _bhl(a, layout: str = "blh"):
    """u/gate in `layout` → (B, H, L) fp32."""
    if a is None:
        return None
    a = a.astype(jnp.float32)
    return jnp.swapaxes(a, 1, 2) if layout == "blh" else jnp.transpose(a, (1, 0, 2))


def _from_bhl(a, layout: str = "blh"):
    """(B, H, L) → `layout`."""
    return jnp.swapaxes(a, 1, 2) if layout == "blh" else jnp.transpose(a, (1, 0, 2))


def _fused_io(a, layout: str):
    """u/gate in `layout` → what the fused kernels take, in a's own dtype (they cast on load and store):
    (B, H, L) for "blh" (one transpose each way), the array itself for "hbl" (channels first)."""
    if a is None or layout == "hbl":
        return a
    return jnp.swapaxes(a, 1, 2)


def seq_axis(layout: str) -> int:
    """Index of the length axis of u in `layout`."""
    return layout.index("l")


def as_blh(a, layout: str):
    """u/gate in `layout` → (B, L, H) for the paths that work in that order (None stays None)."""
    return a if a is None or layout == "blh" else jnp.transpose(a, (1, 2, 0))


def from_blh(a, layout: str):
    """(B, L, H) → `layout`."""
    return a if layout == "blh" else jnp.transpose(a, (2, 0, 1))


def _pallas():
    """The Pallas kernels module, imported on first use (importing Pallas costs a second)."""
    from kernels.fftconv import pallas

    return pallas


def _backward_plan(plan: Plan, len_in: int) -> Plan:
    """Same FFT, input = the n_out-long cotangent, output = the len_in-long input gradient."""
    rest0 = plan.rest0
    return dataclasses.replace(
        plan, rows_in=-(-plan.n_out // rest0), rows_out=-(-len_in // rest0), n_out=len_in
    )


def _fused(cfg: OpConfig) -> bool:
    """Whether the op runs the fused kernels (one pass each way; bf16 stays bf16 through them)."""
    return cfg.impl == "pallas" and (cfg.overlap_save or _pallas().uses_fused_kernels(cfg.plan))


def _conv_fwd_impl(u, k, bias, pre, post, cfg: OpConfig):
    plan = cfg.plan
    spec = monarch.filter_spectrum(k, plan)
    layout = cfg.layout
    if _fused(cfg):
        io = functools.partial(_fused_io, layout=layout)
        y = _pallas().conv_fused(io(u), spec, plan, io(pre), io(post), bias, out_dtype=u.dtype,
                                 channels_first=layout == "hbl", interpret=cfg.interpret, precision=cfg.precision,
                                 overlap_save=cfg.overlap_save)
        return io(y), spec
    y = _raw(cfg, _bhl(u, layout), spec, plan, _bhl(pre, layout), _bhl(post, layout), bias)
    return _from_bhl(y, layout).astype(u.dtype), spec


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def monarch_conv(u, k, bias, pre, post, cfg: OpConfig):
    """Differentiable factorised conv; u (B, L_in, H) → (B, n_out, H) in u's dtype (or (H, B, ·) for
    cfg.layout "hbl"); with cfg.overlap_save, the partial conv (B, L, H) → (B, L, H) over chunks."""
    return _conv_fwd_impl(u, k, bias, pre, post, cfg)[0]


def _fwd(u, k, bias, pre, post, cfg):
    y, spec = _conv_fwd_impl(u, k, bias, pre, post, cfg)
    return y, (u, k, bias, pre, post, spec)


def _bwd(cfg: OpConfig, res, dy):
    u, k, bias, pre, post, spec = res
    plan = cfg.plan
    layout = cfg.layout
    len_in = u.shape[seq_axis(layout)]
    if _fused(cfg):
        io = functools.partial(_fused_io, layout=layout)
        du, dpre, dpost, dbias, prod = _pallas().conv_backward_fused(
            io(u), spec, plan, io(pre), io(post), bias, io(dy), channels_first=layout == "hbl",
            interpret=cfg.interpret, precision=cfg.precision, overlap_save=cfg.overlap_save)
        dk = _dk_from_spectrum_product(prod, plan, k, cfg.precision)
        return io(du), dk, None if bias is None else dbias.astype(bias.dtype), io(dpre), io(dpost)
    ut, pret, postt, dyt = (_bhl(a, layout) for a in (u, pre, post, dy))
    x = ut if pret is None else ut * pret
    dz = dyt if postt is None else dyt * postt
    bplan = _backward_plan(plan, len_in)
    if cfg.impl == "pallas":  # other ≥ 3-stage plans: the three convolutions in one inner kernel
        g, z, prod = _pallas().conv_backward_inner(x, dz, spec, plan, bplan, with_z=post is not None,
                                                   interpret=cfg.interpret, precision=cfg.precision)
        if bias is not None:
            b = bias.astype(jnp.float32)[:, None]
            g = g + b * dz[..., :len_in]
            z = None if z is None else z + b * x[..., : plan.n_out]
    else:
        g = _raw(cfg, dz, (spec[0], -spec[1]), bplan, None, None, bias)  # (B, H, L_in)
        z = None if post is None else _raw(cfg, ut, spec, plan, pret, None, bias)
        xr, xi = monarch.forward_real(x, plan, scaled=True, precision=cfg.precision)
        dr, di = monarch.forward_real(dz, plan, scaled=True, rows=bplan.rows_in, precision=cfg.precision)
        prod = (jnp.sum(xr * dr + xi * di, axis=0), jnp.sum(xr * di - xi * dr, axis=0))
    du = g if pret is None else g * pret
    dpre = None if pre is None else _from_bhl(g * ut, layout).astype(pre.dtype)
    dpost = None if post is None else _from_bhl(dyt * z, layout).astype(post.dtype)
    dbias = None
    if bias is not None:
        dbias = jnp.sum(dz * x[..., : plan.n_out], axis=(0, 2)).astype(bias.dtype)
    dk = _dk_from_spectrum_product(prod, plan, k, cfg.precision)
    return _from_bhl(du, layout).astype(u.dtype), dk, dbias, dpre, dpost


def _dk_from_spectrum_product(prod, plan: Plan, k, precision: str = "fp32"):
    """dk (K, H) in k's dtype = Re IFFT(M · Σ_b conj X_b · DZ_b)[0:K] from the batch-summed product planes
    (H, *spectrum_shape) of two scaled transforms: each carries s and the inverse 1/(N·s), so the sums
    are rescaled by 1/s (folded into the mask)."""
    m = monarch.mask_array(plan)
    rescale = 1.0 / monarch.forward_scale(plan)
    m = rescale if m is None else m * rescale
    pr, pi = prod[0] * m, prod[1] * m
    dk = monarch.inverse_real((pr, pi), plan, n_out=k.shape[0], precision=precision)  # (H, K)
    return jnp.swapaxes(dk, 0, 1).astype(k.dtype)


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
                   interpret=None, precision=None, layout="blh"):
    """Factorised causal conv (impl "xla-matmul" or "pallas"); same contract as `fftconv_xla`.

    ``precision``: a `kernels.fftconv.precision` setting, None = the default for u's dtype.
    ``layout``: axes of u, the gates and the result, "blh" (B, L, H) or "hbl" (H, B, L) (see LAYOUTS).
    """
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"unknown matmul impl {impl!r}")
    if interpret is None:
        interpret = impl == "pallas" and jax.default_backend() == "cpu"
    precision = _precision.resolve(precision, u.dtype)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    return _fftconv_matmul_jit(u, k, bias, pre_gate, post_gate, freq_mask=_static_mask(freq_mask), impl=impl,
                               interpret=bool(interpret), precision=precision, layout=layout)


@functools.partial(jax.jit, static_argnames=("freq_mask", "impl", "interpret", "precision", "layout"))
def _fftconv_matmul_jit(u, k, bias, pre_gate, post_gate, *, freq_mask, impl, interpret, precision, layout):
    seqlen = u.shape[seq_axis(layout)]
    ksize = k.shape[0]
    c = chunk_size(seqlen, ksize) if freq_mask is None else None
    if c is None:
        min_keep = _pallas().sparse_min_keep(monarch.fft_size(seqlen + ksize - 1)) if impl == "pallas" else (1, 1)
        plan = monarch.make_plan(seqlen, ksize, seqlen, freq_mask, min_keep=min_keep)
        cfg = OpConfig(impl, plan, bool(interpret), precision, layout)
        return monarch_conv(u, k, bias, pre_gate, post_gate, cfg)
    c_save = overlap_save_chunk(seqlen, ksize) if impl == "pallas" and _pallas().TUNING.overlap_save else None
    if c_save is not None:
        plan = monarch.make_plan(2 * c_save, ksize, 2 * c_save, n=2 * c_save)
        cfg = OpConfig(impl, plan, interpret, precision, layout, overlap_save=True)
        return monarch_conv(u, k, bias, pre_gate, post_gate, cfg)
    if layout != "blh":  # the chunked path works in (B, L, H)
        u, pre_gate, post_gate = (as_blh(a, layout) for a in (u, pre_gate, post_gate))
        y = _fftconv_matmul_jit(u, k, bias, pre_gate, post_gate, freq_mask=None, impl=impl, interpret=interpret,
                                precision=precision, layout="blh")
        return from_blh(y, layout)
    # Block-Toeplitz partial conv: chunks of C, each a full 2C-point linear conv, overlap-added.
    batch, _, channels = u.shape
    plan = monarch.make_plan(c, ksize, 2 * c, n=2 * c)
    x = u.astype(jnp.float32)
    if pre_gate is not None:
        x = x * pre_gate.astype(jnp.float32)
    nchunks = -(-seqlen // c)
    xc = jnp.pad(x, ((0, 0), (0, nchunks * c - seqlen), (0, 0))).reshape(batch * nchunks, c, channels)
    yf = monarch_conv(xc, k, None, None, None, OpConfig(impl, plan, interpret, precision))
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
