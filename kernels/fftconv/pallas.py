"""Pallas kernels for the factorised FFT convolution (see `monarch` for the math and layout).

Two kernels share one body shape, an order-2 "four-step" conv on a (f_a, f_b) tile per sequence:

    A = F_a·X ⊙ T_a ;  B = A·F_b ;  Y = B ⊙ K̂ ;  C = Y·conj(F_b) ⊙ conj(T_a) ;  out = conj(F_a)·C

* fused (plans with 2 stages, N ≤ 4096): real input rows [0, rows_in) of u (zero past L), optional
  pre-gate on load, 1/N folded into T_a, real part of only the first rows_out output rows, then the
  D skip (bias ⊙ x) and the post-gate, all in one kernel: u and the gates are read once, y written once.
* fused, overlap-save (the partial conv, K ≤ C, C ≥ 512, 2C ≤ 4096: `conv.overlap_save_chunk`): the same
  kernel over a third grid axis of chunks; each program reads its chunk of C samples and the one before
  it, transforms the 2C window (F0's columns split between the two halves: no concatenation) and writes
  only the chunk's C outputs (G0's last rows), gates and bias fused: one pass for any L.
* fused, 3 levels (dense 3-stage plans up to `Tuning.fused3_max_fft`, off by default until measured): the
  same one-pass kernel with all three levels inside (`_spectrum3`): a whole N-point sequence per
  iteration, the middle level's axis moved first by an in-kernel transpose. No XLA pass, no planes in HBM.
* inner (plans with 3-4 stages, N > 4096): the outer stage(s) (F_0, twiddle, …) run as plain XLA
  einsums in their own pass (`monarch.forward_levels`); each remaining (f_{p-2}, f_{p-1}) row is an
  independent complex-input conv that this kernel does with the filter spectrum row, then XLA does the
  outer inverse stage(s), the real part, bias and gates.
* fused backward (2-stage plans): one program per channel loops over the batch, reads u, the gates and
  dy once, writes du, dpre, dpost once and accumulates dbias and dk's spectrum Σ_b conj(X_b)·DZ_b in
  fp32, recomputing the forward transforms (nothing but the filter spectrum is saved by the forward).
  For overlap-save it loops over (batch, chunk) on windows of two chunks: [dz_i; dz_{i+1}] for du and
  dpre, [x_{i−1}; x_i] against [0; dz_i] for dk, the forward's window for dpost.
* inner backward (3-4 stages): after XLA's outer level(s) of x and dz, one kernel does the inner levels
  of both, dk's spectrum, and the inverse inner levels of conj(K̂)·DZ (for du, dpre) and K̂·X (for
  dpost): one kernel instead of three convolutions.

Everything inside is 2-D dots on (re, im) planes (no complex dtypes) at a `precision` setting
(`kernels.fftconv.precision`): the DFT matrices arrive already cast to the operand dtype (bf16/fp16),
the data are cast before each dot, accumulation is fp32, and twiddles, the spectrum product, bias and
gates are fp32 on the accumulator.
Dot dimensions are ≥ 16 and powers of two: dense plans pad time rows up to a power of two ≥ 16, and
frequency-sparse plans made for this impl keep at least 16 last digits, and 16 first digits on 2-stage
plans, where they are a dot dimension (`sparse_min_keep`, `monarch.MIN_DOT`; an 8-wide bf16 dot compiled
and gave wrong results on an H200). On ≥ 3-stage plans the first digits are the inner kernels' grid rows,
so a mask that drops outer groups (`monarch.comb_mask`) skips their whole inner transforms.
Grid: (batch, channel tiles[, row tiles]); each
program loops over its channels (and rows) with `lax.fori_loop`. Block shapes keep full trailing
dims so they are legal for Mosaic too.

Backends: on GPU the kernels request Triton (jax >= 0.10 defaults to Mosaic GPU, which rejects them; the
Mosaic GPU wgmma kernel for L ≤ 2048 is `kernels.fftconv.mosaic`, impl "mosaic");
the fp32 HIGHEST version ran correctly but slowly on one H200 (../shared/measurements/h200-2026-11-28.md);
with bf16 dots the forward is 0.96× jnp.fft at L 1K and 0.3-0.6× beyond (results/fftconv/README.md).
Launch settings are in `TUNING` (`tuning()` for sweeps: scripts/gpu_kernel_sweep.py). `tests/test_fftconv_lowering.py`
checks on CPU that forward and backward lower for "cuda" (Triton) and "tpu" (Mosaic) through `jax.export`
at every precision; `scripts/kernel_resources.py` compiles them for sm_90 and reports spills.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels.fftconv import monarch
from kernels.fftconv import precision as _precision
from kernels.fftconv.monarch import Plan
from kernels.fftconv.reference import next_power_of_two


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch settings and path choices of the kernels, for sweeps on a GPU (`scripts/gpu_kernel_sweep.py`).

    fused_channels / inner_channels / inner_rows: the most channels (rows) one program loops over (powers of
    two; the grid covers the rest). fused_stack: channels the fused forward kernel transforms together, side
    by side in its dots (N = stack·f1 for the first stage, M = stack·f0 for the second), instead of one
    channel per dot. fused3_max_fft: dense 3-stage plans (N = 8192 …) up to this size also run as ONE fused
    kernel (`_spectrum3`: all three levels inside, no XLA outer stage, no HBM round trip of the planes)
    instead of XLA + the inner kernel. overlap_save: partial convs run the fused kernels as overlap-save
    (False: overlap-added chunks, a fused kernel over the chunk rows plus XLA passes). num_warps,
    num_stages: Triton's. The launch defaults are what ran on the H200 (results/fftconv/bench_NVIDIA_H200.md;
    overlap_save is new since and not yet timed there). Jitted ops cache their trace: call
    `jax.clear_caches()` after changing these."""

    fused_channels: int = 8
    fused_stack: int = 1  # channels per dot in the fused forward kernel (> 1: `_spectrum_stacked`)
    inner_channels: int = 4
    inner_rows: int = 8
    num_warps: int = 4
    num_stages: int = 1
    low_precision_planes: bool = True  # inner kernel planes in `precision.plane_dtype` (False: fp32)
    fused3_max_fft: int = 0  # dense 3-stage plans up to this FFT size run `conv_fused` too (0: none)
    overlap_save: bool = True  # partial convs (K ≤ L/4) as one overlap-save kernel (False: overlap-add chunks)


TUNING = Tuning()


@contextlib.contextmanager
def tuning(**changes):
    """``with tuning(num_warps=8): ...`` runs the forward kernels with these `Tuning` fields changed."""
    global TUNING
    saved, TUNING = TUNING, dataclasses.replace(TUNING, **changes)
    try:
        yield TUNING
    finally:
        TUNING = saved


def _dot(a, b, precision):
    return _precision.dot(jnp.dot, a, b, precision)


def _cdot(a, b, precision):
    ar, ai = a
    br, bi = b
    dot = functools.partial(_dot, precision=precision)
    return dot(ar, br) - dot(ai, bi), dot(ar, bi) + dot(ai, br)


def _dft_operands(planes, precision):
    """DFT-matrix planes cast once, outside the kernel, to the dtype the dots take."""
    return [_precision.operand(c, precision) for c in planes]


def _cmul(a, b):
    ar, ai = a
    br, bi = b
    return ar * br - ai * bi, ar * bi + ai * br


def _pow2_divisor(n: int, cap: int) -> int:
    t = 1
    while t * 2 <= cap and n % (t * 2) == 0:
        t *= 2
    return t


def _compiler_params(backend: str | None = None, num_warps: int | None = None):
    """Triton on GPU: jax >= 0.10 lowers GPU Pallas through Mosaic GPU by default, where these kernels
    do not lower (lane-semantics dot_general, shared-memory limits); None elsewhere (TPU Mosaic, CPU).
    num_warps None: the forward kernels' `TUNING.num_warps`."""
    if (backend or jax.default_backend()) == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=num_warps or TUNING.num_warps, num_stages=TUNING.num_stages)
    return None


def _bwd_num_warps(tile: tuple[int, int], inner: bool = False) -> int:
    """Warps for a backward kernel, which keeps about twice the forward's (f_a, f_b) planes live. Chosen
    from ptxas for sm_90 at bf16 (results/fftconv/kernel_resources_sm90.md): 8 from 32×32 tiles on (4
    warps spill 112 B/thread on the fused 32×64 tile and 108 B on the inner 32×32 tile; 8 warps: 0 and
    12 B). Both spill on 64×64 tiles, the inner kernel less with 4 warps (864 B against 1,936 B)."""
    size = tile[0] * tile[1]
    if inner and size >= 4096:
        return 4
    return 8 if size >= 1024 else 4


def _full_spec(arr):
    nd = arr.ndim
    return pl.BlockSpec(arr.shape, lambda *_: (0,) * nd)


# ----------------------------------------------------------------------------------------------------
# Fused kernel: 2-stage plans, real in / real out, gates and bias fused.
# ----------------------------------------------------------------------------------------------------


def _first_stage(x, c, precision, prev=None):
    """F0·x as (re, im) for a real (rows, n) tile: 2 dots. With ``prev`` (overlap-save) the tile is
    [prev; x] stacked by rows, and F0's columns are split between the two (constants p0r/p0i for prev)."""
    dot = functools.partial(_dot, precision=precision)
    a = (dot(c["f0r"][...], x), dot(c["f0i"][...], x))
    if prev is None:
        return a
    return a[0] + dot(c["p0r"][...], prev), a[1] + dot(c["p0i"][...], prev)


def _spectrum(x, c, precision, prev=None):
    """Scaled 2-stage transform of a real (rows, f1) tile: (F0·x ⊙ T0)·F1 as (re, im), (k0, k1) (prev: see
    `_first_stage`)."""
    a = _cmul(_first_stage(x, c, precision, prev), (c["t0r"][...], c["t0i"][...]))
    return _cdot(a, (c["f1r"][...], c["f1i"][...]), precision)


def _real_inverse(y, c, precision):
    """Re of the inverse 2-stage transform of spectrum planes (k0, k1): a (rows_out, f1) tile."""
    dot = functools.partial(_dot, precision=precision)
    z = _cdot(y, (c["g1r"][...], c["g1i"][...]), precision)
    z = _cmul(z, (c["s0r"][...], c["s0i"][...]))
    return dot(c["g0r"][...], z[0]) - dot(c["g0i"][...], z[1])  # real part only: 2 dots


def _spectrum_stacked(x, c, precision, prev=None):
    """`_spectrum` of cb channels at once, x (cb, rows, f1) → planes (k0·cb, k1) (row k0·cb + channel): the
    first stage is one (f0 × rows)·(rows × cb·f1) dot, the second one (f0·cb × f1)·(f1 × k1) dot."""
    cb, rows, f1 = x.shape

    def side_by_side(t):
        return None if t is None else jnp.transpose(t, (1, 0, 2)).reshape(rows, cb * f1)

    a = _first_stage(side_by_side(x), c, precision, side_by_side(prev))  # (f0, cb·f1)
    f0 = a[0].shape[0]
    a = _cmul(tuple(p.reshape(f0, cb, f1) for p in a), (c["t0r"][...][:, None], c["t0i"][...][:, None]))
    return _cdot(tuple(p.reshape(f0 * cb, f1) for p in a), (c["f1r"][...], c["f1i"][...]), precision)


def _real_inverse_stacked(y, c, precision, cb):
    """`_real_inverse` of cb channels' spectra (k0·cb, k1) (as `_spectrum_stacked` leaves them): a
    (cb, rows_out, f1) tile."""
    dot = functools.partial(_dot, precision=precision)
    z = _cdot(y, (c["g1r"][...], c["g1i"][...]), precision)  # (f0·cb, f1)
    f0, f1 = z[0].shape[0] // cb, z[0].shape[1]
    z = _cmul(tuple(p.reshape(f0, cb, f1) for p in z), (c["s0r"][...][:, None], c["s0i"][...][:, None]))
    z = tuple(p.reshape(f0, cb * f1) for p in z)
    out = dot(c["g0r"][...], z[0]) - dot(c["g0i"][...], z[1])  # (rows_out, cb·f1)
    return jnp.transpose(out.reshape(out.shape[0], cb, f1), (1, 0, 2))


def _stack_spectrum(spec, cb: int):
    """Filter spectrum planes (H, k0, k1) regrouped for `_spectrum_stacked`: (H / cb, k0·cb, k1)."""
    channels, k0, k1 = spec.shape
    return spec.reshape(channels // cb, cb, k0, k1).transpose(0, 2, 1, 3).reshape(channels // cb, k0 * cb, k1)


_FUSED_CONSTANTS = ("f0r", "f0i", "t0r", "t0i", "f1r", "f1i", "g1r", "g1i", "s0r", "s0i", "g0r", "g0i")
_OVERLAP_SAVE_CONSTANTS = (*_FUSED_CONSTANTS, "p0r", "p0i", "q0r", "q0i")


def _fused_constants(kplan: Plan, precision):
    """The constant planes of the fused kernels, in `_FUSED_CONSTANTS` order for a 2-stage plan (12) and
    `_FUSED3_CONSTANTS` order for a 3-stage plan (20); DFT matrices pre-cast."""
    if kplan.stages == 3:
        return _fused3_constants(kplan, precision)
    (f0p, tw0) = monarch.stage_constants(kplan, 0, scaled=True)
    (f1p, _) = monarch.stage_constants(kplan, 1, scaled=True)
    (g1p, _) = monarch.stage_constants(kplan, 1, inverse=True)
    (g0p, tw0c) = monarch.stage_constants(kplan, 0, inverse=True)
    dft = functools.partial(_dft_operands, precision=precision)
    return [*dft(f0p), *tw0, *dft(f1p), *dft(g1p), *tw0c, *dft(g0p)]


def _overlap_save_constants(kplan: Plan, precision):
    """The fused kernels' constants for overlap-save on a 2C-point plan (f0 time rows, the chunk is the
    second half), in `_OVERLAP_SAVE_CONSTANTS` order: F0's columns split between the chunk (f0r/f0i, rows
    f0/2 … f0) and its predecessor (p0r/p0i, rows 0 … f0/2), and G0 split by rows into the chunk's second
    half (g0r/g0i: the conv's outputs) and first half (q0r/q0i: the backward's correlation outputs)."""
    c = dict(zip(_FUSED_CONSTANTS, _fused_constants(kplan, precision)))  # rows_in = rows_out = f0
    half = kplan.factors[0] // 2
    c["p0r"], c["p0i"] = c["f0r"][:, :half], c["f0i"][:, :half]
    c["f0r"], c["f0i"] = c["f0r"][:, half:], c["f0i"][:, half:]
    c["q0r"], c["q0i"] = c["g0r"][:half], c["g0i"][:half]
    c["g0r"], c["g0i"] = c["g0r"][half:], c["g0i"][half:]
    return [c[name] for name in _OVERLAP_SAVE_CONSTANTS]


def _spectrum3(x, c, precision):
    """The 3-level transform of a real (rows, f1·f2) tile inside one kernel: planes (k1·k0, k2) (row
    k1·k0 + k0). Level 0 is one (k0 × rows)·(rows × f1·f2) dot; level 1 one (k1 × n1)·(n1 × k0·n2) dot
    after moving n1 first; level 2 one (k1·k0 × n2)·(n2 × k2) dot."""
    dot = functools.partial(_dot, precision=precision)
    a = _cmul((dot(c["f0r"][...], x), dot(c["f0i"][...], x)), (c["t0r"][...], c["t0i"][...]))  # (k0, n1·n2)
    k0, (k1, n1) = a[0].shape[0], c["f1r"].shape
    n2 = a[0].shape[1] // n1
    a = tuple(jnp.transpose(p.reshape(k0, n1, n2), (1, 0, 2)).reshape(n1, k0 * n2) for p in a)
    b = _cdot((c["f1r"][...], c["f1i"][...]), a, precision)  # (k1, k0·n2)
    b = _cmul(tuple(p.reshape(k1, k0, n2) for p in b), (c["t1r"][...][:, None], c["t1i"][...][:, None]))
    return _cdot(tuple(p.reshape(k1 * k0, n2) for p in b), (c["f2r"][...], c["f2i"][...]), precision)


def _real_inverse3(y, c, precision):
    """Re of the inverse of `_spectrum3`'s layout (k1·k0, k2): a (rows_out, n1·n2) tile."""
    dot = functools.partial(_dot, precision=precision)
    z = _cdot(y, (c["g2r"][...], c["g2i"][...]), precision)  # (k1·k0, n2)
    (n1, k1), k0 = c["g1r"].shape, c["s0r"].shape[0]
    n2 = z[0].shape[1]
    z = _cmul(tuple(p.reshape(k1, k0, n2) for p in z), (c["s1r"][...][:, None], c["s1i"][...][:, None]))
    z = _cdot((c["g1r"][...], c["g1i"][...]), tuple(p.reshape(k1, k0 * n2) for p in z), precision)  # (n1, k0·n2)
    z = tuple(jnp.transpose(p.reshape(n1, k0, n2), (1, 0, 2)).reshape(k0, n1 * n2) for p in z)
    z = _cmul(z, (c["s0r"][...], c["s0i"][...]))
    return dot(c["g0r"][...], z[0]) - dot(c["g0i"][...], z[1])  # real part only


_FUSED3_CONSTANTS = ("f0r", "f0i", "t0r", "t0i", "f1r", "f1i", "t1r", "t1i", "f2r", "f2i", "g2r", "g2i", "g1r", "g1i",
                     "s1r", "s1i", "s0r", "s0i", "g0r", "g0i")


def _fused3_constants(kplan: Plan, precision):
    """The 20 constant planes of a 3-stage plan, in `_FUSED3_CONSTANTS` order (DFT matrices pre-cast)."""
    dft = functools.partial(_dft_operands, precision=precision)
    (f0p, tw0), (f1p, tw1), (f2p, _) = (monarch.stage_constants(kplan, j, scaled=True) for j in range(3))
    (g2p, _), (g1p, tw1c), (g0p, tw0c) = (monarch.stage_constants(kplan, j, inverse=True) for j in (2, 1, 0))
    return [*dft(f0p), *tw0, *dft(f1p), *tw1, *dft(f2p), *dft(g2p), *dft(g1p), *tw1c, *tw0c, *dft(g0p)]


def uses_fused_kernels(plan: Plan) -> bool:
    """Whether `conv_fused` takes this plan: every 2-stage plan, and dense 3-stage plans up to
    `TUNING.fused3_max_fft`."""
    return plan.stages == 2 or (plan.stages == 3 and plan.dense and plan.n <= TUNING.fused3_max_fft)


def sparse_min_keep(n: int) -> tuple[int, int]:
    """Fewest (first, last) frequency digits a sparse plan of FFT size n keeps for these kernels: the last
    digits are a dot dimension in every kernel (`monarch.MIN_DOT`); the first digits only in the fused
    2-stage kernels. On ≥ 3-stage plans they are the inner kernels' grid rows (the XLA outer stage takes
    any count), so a mask that drops whole outer groups skips their work outright."""
    return (monarch.MIN_DOT if len(monarch.plan_factors(n)) == 2 else 1, monarch.MIN_DOT)


def _transforms(stages: int, overlap_save: bool = False):
    """(forward transform, real inverse, constant names) of the fused kernels for a 2- or 3-stage plan
    (overlap-save: 2 stages)."""
    if stages == 3:
        return _spectrum3, _real_inverse3, _FUSED3_CONSTANTS
    return _spectrum, _real_inverse, _OVERLAP_SAVE_CONSTANTS if overlap_save else _FUSED_CONSTANTS


def _to_kernel_spectrum(planes, plan: Plan):
    """Spectrum planes (H, *plan.spectrum_shape) in the fused kernels' order: unchanged for 2 stages,
    (H, k1·k0, k2) for 3 (`_spectrum3`)."""
    if plan.stages == 2:
        return planes
    return planes.transpose(0, 2, 1, 3).reshape(planes.shape[0], -1, planes.shape[3])


def _from_kernel_spectrum(planes, plan: Plan):
    """Inverse of `_to_kernel_spectrum`."""
    if plan.stages == 2:
        return planes
    k0, k1, k2 = plan.spectrum_shape
    return planes.reshape(planes.shape[0], k1, k0, k2).transpose(0, 2, 1, 3)


def _kernel_rows(rows: int, f0: int) -> int:
    """Time rows a kernel tile holds: Triton wants power-of-two block dims and dots >= 16 (extra rows
    are zeros on input and discarded on output)."""
    return min(f0, next_power_of_two(max(rows, monarch.MIN_DOT)))


def _load(ref, *idx):
    """A data tile in fp32 (inputs arrive in their own dtype: bf16 in, bf16 out, no fp32 copies in HBM)."""
    return ref[idx].astype(jnp.float32)


def _take(it, *present):
    """The next ref for each True flag and None for each False one (the refs of optional arguments)."""
    return [next(it) if p else None for p in present]


def _batch_channels(x, channels_first: bool):
    """(batch, channels, the two leading dims as stored) of a (B, H, L) or, channels_first, (H, B, L) array."""
    lead = tuple(x.shape[:2])
    return (*(lead[::-1] if channels_first else lead), lead)


def _fused_kernel(*refs, ht, cb, stages, has_pre, has_post, has_bias, channels_first, precision, overlap_save):
    it = iter(refs)
    x_ref, xp_ref, pre_ref, prep_ref, post_ref, bias_ref, kr_ref, ki_ref = _take(
        it, True, overlap_save, has_pre, has_pre and overlap_save, has_post, has_bias, True, True)
    spectrum, real_inverse, names = _transforms(stages, overlap_save)
    c = {name: next(it) for name in names}
    o_ref = next(it)
    # overlap-save: the predecessor of chunk 0 (its block index clamped to 0) is the zero history
    has_history = (pl.program_id(2) > 0).astype(jnp.float32) if overlap_save else None

    def gated(ref, gate_ref, at):
        x = _load(ref, *at)
        return x * _load(gate_ref, *at) if has_pre else x

    def body(g, carry):  # channel g (cb = 1) or channels [g·cb, (g+1)·cb) side by side
        h = g if cb == 1 else pl.ds(g * cb, cb)
        at = (h, 0) if channels_first else (0, h)
        x = gated(x_ref, pre_ref, at)
        prev = (has_history * gated(xp_ref, prep_ref, at),) if overlap_save else ()
        k = (kr_ref[g], ki_ref[g])
        if cb == 1:
            out = real_inverse(_cmul(spectrum(x, c, precision, *prev), k), c, precision)
        else:
            out = _real_inverse_stacked(_cmul(_spectrum_stacked(x, c, precision, *prev), k), c, precision, cb)
        if has_bias:
            out = out + bias_ref[h] * x
        if has_post:
            out = out * _load(post_ref, *at)
        o_ref[at] = out.astype(o_ref.dtype)
        return carry

    jax.lax.fori_loop(0, ht // cb, body, 0)


def conv_fused(x, spec, plan: Plan, pre=None, post=None, bias=None, *, out_dtype=jnp.float32,
               channels_first=False, interpret=False, precision="fp32", overlap_save=False):
    """The gated conv of a 2-stage (or, see `uses_fused_kernels`, dense 3-stage) plan in one kernel: x,
    pre (B, H, L_in), post (B, H, n_out) in any float dtype (cast to fp32 inside); returns (B, H, n_out) in
    out_dtype.
    channels_first: every (B, H, ·) is (H, B, ·) instead (the "hbl" layout).
    overlap_save: the partial conv of a long x (any L) with a filter of K ≤ C taps, ``plan`` a 2-stage
    2C-point plan (`overlap_save_chunk`): a third grid axis walks the chunks of C samples; each program
    reads its chunk and the one before (zero before the first), transforms the 2C window and keeps the
    last C outputs of its circular conv, which are the linear causal conv there. post (B, H, L); returns
    (B, H, L): every input read once (the predecessor re-read from cache), y written once."""
    batch, channels, lead = _batch_channels(x, channels_first)
    f0, f1 = plan.factors[0], plan.rest0  # a tile is (rows, R_0): R_0 = f1 (2 stages) or f1·f2 (3)
    if overlap_save:
        rows_in = rows_out = f0 // 2  # a chunk: C = f0/2 rows of f1
        nchunks = -(-x.shape[-1] // (rows_in * f1))
        kplan = dataclasses.replace(plan, rows_in=f0, rows_out=f0)
        n_out = x.shape[-1]
    else:
        nchunks = 1
        rows_in = _kernel_rows(plan.rows_in, f0)
        rows_out = _kernel_rows(plan.rows_out, f0)
        if bias is not None:
            rows_in = rows_out = max(rows_in, rows_out)
        kplan = dataclasses.replace(plan, rows_in=rows_in, rows_out=rows_out)
        n_out = plan.n_out
    pad_in = functools.partial(monarch.pad_rows, plan=kplan, rows=nchunks * rows_in)  # (B, H, rows, f1)
    inputs = [pad_in(x)] * (2 if overlap_save else 1)  # overlap-save: as the chunk and as its predecessor
    if pre is not None:
        inputs += [pad_in(pre)] * (2 if overlap_save else 1)
    if post is not None:
        inputs.append(monarch.pad_rows(post, kplan, nchunks * rows_out))
    if bias is not None:
        inputs.append(bias.astype(jnp.float32).reshape(channels, 1, 1))
    ht = _pow2_divisor(channels, max(TUNING.fused_channels, TUNING.fused_stack))
    cb = 1 if plan.stages == 3 else min(TUNING.fused_stack, ht)  # 3 levels: one channel per dot
    spec = [_stack_spectrum(_to_kernel_spectrum(s, plan), cb) for s in spec]
    inputs += spec
    consts = _overlap_save_constants(kplan, precision) if overlap_save else _fused_constants(kplan, precision)

    def seq_spec(rows, predecessor=False):
        def at(b, h, *chunk):  # (batch, channel tile[, chunk]) -> block index
            i = chunk[0] if chunk else 0
            i = jnp.maximum(i - 1, 0) if predecessor else i
            return (h, b, i, 0) if channels_first else (b, h, i, 0)

        return pl.BlockSpec((ht, 1, rows, f1) if channels_first else (1, ht, rows, f1), at)

    in_specs = [seq_spec(rows_in), seq_spec(rows_in, predecessor=True)][: 1 + overlap_save]
    if pre is not None:
        in_specs += [seq_spec(rows_in), seq_spec(rows_in, predecessor=True)][: 1 + overlap_save]
    if post is not None:
        in_specs.append(seq_spec(rows_out))
    if bias is not None:
        in_specs.append(pl.BlockSpec((ht, 1, 1), lambda b, h, *_: (h, 0, 0)))
    spec_block = (ht // cb, *spec[0].shape[1:])
    in_specs += [pl.BlockSpec(spec_block, lambda b, h, *_: (h, 0, 0))] * 2
    in_specs += [_full_spec(c) for c in consts]
    kernel = functools.partial(
        _fused_kernel, ht=ht, cb=cb, stages=plan.stages, has_pre=pre is not None, has_post=post is not None,
        has_bias=bias is not None, channels_first=channels_first, precision=precision, overlap_save=overlap_save,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((*lead, nchunks * rows_out, f1), out_dtype),
        grid=(batch, channels // ht, nchunks) if overlap_save else (batch, channels // ht),
        in_specs=in_specs,
        out_specs=seq_spec(rows_out),
        interpret=interpret,
        # the 3-level tile (a whole N-point sequence) spills 1.7 KB/thread at 4 warps, 188 B at 8 (sm_90, N 8192)
        compiler_params=None if interpret else _compiler_params(
            num_warps=max(TUNING.num_warps, 8) if plan.stages == 3 else None),
        name="fftconv_partial" if overlap_save else "fftconv_fused",
    )(*inputs, *consts)
    return out.reshape(*lead, nchunks * rows_out * f1)[..., :n_out]


# ----------------------------------------------------------------------------------------------------
# Fused backward kernel: 2-stage plans, every gradient in one pass over u, the gates and dy.
# ----------------------------------------------------------------------------------------------------


def _fused_bwd_kernel(*refs, batch, stages, has_pre, has_post, has_bias, channels_first, precision, nchunks=1,
                      half=None):
    """Every gradient of one channel, looping over the batch (dense plans) or, with ``half`` (the chunk's
    rows; overlap-save), over (batch, chunk). With x = pre·u and dz = post·dy, overlap-save takes windows
    of two chunks in the 2C-point plan (K ≤ C: no wrap-around in any of them; chunks outside [0, L) are 0):
      g   = first C outputs of IFFT(conj(K̂)·FFT([dz_i; dz_{i+1}]))  (the correlation of dz with k),
      dk  = IFFT(Σ conj(FFT([x_{i−1}; x_i]))·FFT([0; dz_i]))[0:K]  (spectrum accumulated here),
      z   = last C outputs of IFFT(K̂·FFT([x_{i−1}; x_i]))  (for dpost)."""
    overlap_save = half is not None
    it = iter(refs)
    u_ref, pre_ref, post_ref, bias_ref, dy_ref, kr_ref, ki_ref = _take(it, True, has_pre, has_post, has_bias,
                                                                       True, True, True)
    spectrum, real_inverse, names = _transforms(stages, overlap_save)
    c = {name: next(it) for name in names}
    c_first = {**c, "g0r": c["q0r"], "g0i": c["q0i"]} if overlap_save else c  # g: the window's first C rows
    du_ref, dpre_ref, dpost_ref, dbias_ref, pr_ref, pi_ref = _take(it, True, has_pre, has_post, has_bias, True, True)

    pr_ref[0] = jnp.zeros(pr_ref.shape[1:], jnp.float32)
    pi_ref[0] = jnp.zeros(pi_ref.shape[1:], jnp.float32)
    if has_bias:
        dbias_ref[0] = jnp.zeros(dbias_ref.shape[1:], jnp.float32)

    def gated(ref, gate_ref, where, has_gate):
        a = _load(ref, *where)
        return a * _load(gate_ref, *where) if has_gate else a

    # Order chosen to keep few (k0, k1) planes live: DZ, then g from conj(K̂)·DZ, then X, then dk's
    # spectrum Σ_b conj(X_b)·DZ_b (accumulated in fp32 in the output block), then z from K̂·X. K̂ and dy
    # are read again at their later uses rather than held live across the transforms.
    def body(j, carry):
        if overlap_save:
            b, i = jax.lax.div(j, nchunks), jax.lax.rem(j, nchunks)  # (jnp's floor forms do not lower to Triton)

            def at(chunk):
                rows = pl.ds(chunk * half, half)
                return (0, b, rows) if channels_first else (b, 0, rows)

            here, before, after = at(i), at(jnp.maximum(i - 1, 0)), at(jnp.minimum(i + 1, nchunks - 1))
        else:
            here = (0, j) if channels_first else (j, 0)
        dz = gated(dy_ref, post_ref, here, has_post)
        if overlap_save:
            dz_after = (i < nchunks - 1).astype(jnp.float32) * gated(dy_ref, post_ref, after, has_post)
            vr, vi = spectrum(dz_after, c, precision, prev=dz)
        else:
            vr, vi = spectrum(dz, c, precision)
        kr, ki = kr_ref[0], ki_ref[0]
        g = real_inverse((kr * vr + ki * vi, kr * vi - ki * vr), c_first, precision)
        u = _load(u_ref, *here)
        pre = _load(pre_ref, *here) if has_pre else None
        x = u * pre if has_pre else u
        if has_bias:
            g = g + bias_ref[0] * dz
            dbias_ref[0] += dz * x
        du_ref[here] = (g * pre if has_pre else g).astype(du_ref.dtype)
        if has_pre:
            dpre_ref[here] = (g * u).astype(dpre_ref.dtype)
        if overlap_save:
            x_before = (i > 0).astype(jnp.float32) * gated(u_ref, pre_ref, before, has_pre)
            xr, xi = spectrum(x, c, precision, prev=x_before)
            dr, di = spectrum(dz, c, precision)  # [0; dz_i]: the chunk's half of F0 only
        else:
            xr, xi = spectrum(x, c, precision)
            dr, di = vr, vi
        pr_ref[0] += xr * dr + xi * di
        pi_ref[0] += xr * di - xi * dr
        if has_post:
            z = real_inverse(_cmul((xr, xi), (kr_ref[0], ki_ref[0])), c, precision)
            if has_bias:
                z = z + bias_ref[0] * x
            dpost_ref[here] = (_load(dy_ref, *here) * z).astype(dpost_ref.dtype)
        return carry

    jax.lax.fori_loop(0, batch * nchunks, body, 0)


def conv_backward_fused(u, spec, plan: Plan, pre, post, bias, dy, *, channels_first=False, interpret=False,
                        precision="fp32", overlap_save=False):
    """Every gradient of `conv_fused` (a `uses_fused_kernels` plan) from one kernel pass (see `conv` for the
    math).

    u, pre (B, H, L_in), post, dy (B, H, n_out) in any float dtype (cast to fp32 inside; du, dpre, dpost
    come back in u's, pre's and post's dtypes); spec the filter spectrum planes. One program per
    channel loops over the batch: it reads u, the gates and dy once, writes du, dpre, dpost once, and
    accumulates Σ_b dz ⊙ x (dbias) and Σ_b conj(X_b)·DZ_b (dk's spectrum) in fp32, recomputing the
    forward transforms instead of storing them. Returns (du, dpre, dpost, dbias (H,) or None,
    (pr, pi) (H, *plan.spectrum_shape), scaled like `monarch.forward_real`'s product of two scaled
    transforms). channels_first: every (B, H, ·) is (H, B, ·) instead (the "hbl" layout).
    overlap_save: the gradients of `conv_fused(..., overlap_save=True)` (dy (B, H, L)): the program loops
    over batch and chunks (`_fused_bwd_kernel`).
    """
    batch, channels, lead = _batch_channels(u, channels_first)
    len_in = u.shape[-1]
    f0, f1 = plan.factors[0], plan.rest0
    if overlap_save:
        tile = f0 // 2  # a chunk's rows
        rows = -(-len_in // (tile * f1)) * tile
        kplan = dataclasses.replace(plan, rows_in=f0, rows_out=f0)
        consts = _overlap_save_constants(kplan, precision)
        kernel = functools.partial(_fused_bwd_kernel, stages=2, nchunks=rows // tile, half=tile)
    else:
        rows = tile = _kernel_rows(max(plan.rows_in, plan.rows_out), f0)
        kplan = dataclasses.replace(plan, rows_in=rows, rows_out=rows)
        consts = _fused_constants(kplan, precision)
        kernel = functools.partial(_fused_bwd_kernel, stages=plan.stages)
    pad = functools.partial(monarch.pad_rows, plan=kplan, rows=rows)  # (B, H, rows, f1) (or (H, B, …))
    inputs = [pad(u)]
    if pre is not None:
        inputs.append(pad(pre))
    if post is not None:
        inputs.append(pad(post))
    if bias is not None:
        inputs.append(bias.astype(jnp.float32).reshape(channels, 1, 1))
    spec = [_to_kernel_spectrum(s, plan) for s in spec]
    inputs += [pad(dy), *spec]
    if channels_first:
        seq = pl.BlockSpec((1, batch, rows, f1), lambda h: (h, 0, 0, 0))
    else:
        seq = pl.BlockSpec((batch, 1, rows, f1), lambda h: (0, h, 0, 0))
    per_channel = pl.BlockSpec((1, tile, f1), lambda h: (h, 0, 0))
    spec_block = pl.BlockSpec((1, *spec[0].shape[1:]), lambda h: (h, 0, 0))
    in_specs = [seq] * (1 + (pre is not None) + (post is not None))
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, 1, 1), lambda h: (h, 0, 0)))
    in_specs += [seq, spec_block, spec_block] + [_full_spec(c) for c in consts]
    spec_shape = jax.ShapeDtypeStruct(spec[0].shape, jnp.float32)
    out_shapes = [jax.ShapeDtypeStruct((*lead, rows, f1), a.dtype) for a in (u, pre, post) if a is not None]
    out_specs = [seq] * len(out_shapes)
    if bias is not None:
        out_shapes.append(jax.ShapeDtypeStruct((channels, tile, f1), jnp.float32))
        out_specs.append(per_channel)
    out_shapes += [spec_shape, spec_shape]
    out_specs += [spec_block, spec_block]
    kernel = functools.partial(kernel, batch=batch, has_pre=pre is not None, has_post=post is not None,
                               has_bias=bias is not None, channels_first=channels_first, precision=precision)
    outs = iter(pl.pallas_call(
        kernel,
        out_shape=tuple(out_shapes),
        grid=(channels,),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(
            num_warps=8 if plan.stages == 3 else _bwd_num_warps(plan.factors)),
        name="fftconv_partial_bwd" if overlap_save else "fftconv_fused_bwd",
    )(*inputs, *consts))

    def time(a, n):
        return a.reshape(*lead, rows * f1)[..., :n]

    du = time(next(outs), len_in)
    dpre = time(next(outs), len_in) if pre is not None else None
    dpost = time(next(outs), len_in if overlap_save else plan.n_out) if post is not None else None
    dbias = jnp.sum(next(outs), axis=(1, 2)) if bias is not None else None
    return du, dpre, dpost, dbias, tuple(_from_kernel_spectrum(next(outs), plan) for _ in range(2))


# ----------------------------------------------------------------------------------------------------
# Inner kernel: complex (f_a, f_b) rows after the outer XLA stage(s).
# ----------------------------------------------------------------------------------------------------


_INNER_CONSTANTS = ("far", "fai", "tar", "tai", "fbr", "fbi", "gbr", "gbi", "sar", "sai", "gar", "gai")


def _inner_constants(plan: Plan, precision):
    """The 12 constant planes of the inner two levels, in `_INNER_CONSTANTS` order."""
    p = plan.stages
    (fap, tap) = monarch.stage_constants(plan, p - 2, scaled=True)
    (fbp, _) = monarch.stage_constants(plan, p - 1, scaled=True)
    (gbp, _) = monarch.stage_constants(plan, p - 1, inverse=True)
    (gap, tac) = monarch.stage_constants(plan, p - 2, inverse=True)
    dft = functools.partial(_dft_operands, precision=precision)
    return [*dft(fap), *tap, *dft(fbp), *dft(gbp), *tac, *dft(gap)]


def _inner_spectrum(x, c, precision):
    """Inner two forward levels of one complex (f_a, f_b) row: (F_a·x ⊙ T_a)·F_b, (f_a, kept k_last)."""
    a = _cdot((c["far"][...], c["fai"][...]), x, precision)
    a = _cmul(a, (c["tar"][...], c["tai"][...]))
    return _cdot(a, (c["fbr"][...], c["fbi"][...]), precision)


def _inner_inverse(y, c, precision):
    """Inner two inverse levels of one spectrum row: conj F_a·((y·conj F_b) ⊙ conj T_a), (f_a, f_b)."""
    z = _cdot(y, (c["gbr"][...], c["gbi"][...]), precision)
    z = _cmul(z, (c["sar"][...], c["sai"][...]))
    return _cdot((c["gar"][...], c["gai"][...]), z, precision)


def _over_rows(ht, rt, row):
    """row(h, r) for every channel and row of a block. Nested loops rather than i // rt, i % rt: Triton's
    lowering rejects the sign fix-ups of floor division."""
    def channel(h, carry):
        def row_step(r, carry):
            row(h, r)
            return carry

        return jax.lax.fori_loop(0, rt, row_step, carry)

    jax.lax.fori_loop(0, ht, channel, 0)


def _inner_kernel(xr_ref, xi_ref, kr_ref, ki_ref, *refs, ht, rt, precision):
    c = dict(zip(_INNER_CONSTANTS, refs))
    or_ref, oi_ref = refs[len(_INNER_CONSTANTS):]

    def row(h, r):
        y = _cmul(_inner_spectrum((xr_ref[0, h, r], xi_ref[0, h, r]), c, precision), (kr_ref[h, r], ki_ref[h, r]))
        o = _inner_inverse(y, c, precision)
        or_ref[0, h, r] = o[0].astype(or_ref.dtype)
        oi_ref[0, h, r] = o[1].astype(oi_ref.dtype)

    _over_rows(ht, rt, row)


def _outer_forward(x, plan: Plan, precision):
    """The XLA outer level(s) of real x (B, H, L): planes (B, H, rows, f_a, f_b) for the inner kernels."""
    batch, channels, _ = x.shape
    p = plan.stages
    z = monarch.forward_levels((monarch.pad_rows(x, plan), None), plan, 0, p - 2, scaled=True, precision=precision)
    fa, fb = plan.factors[-2], plan.factors[-1]
    return tuple(c.reshape(batch, channels, -1, fa, fb) for c in z)


def _outer_inverse(o, plan: Plan, precision):
    """Real (B, H, n_out) from the inner kernels' time rows (B, H, rows, f_a, f_b): XLA outer inverse."""
    p = plan.stages
    outer = (len(plan.keep_rows), *plan.factors[1:-2])
    o = tuple(c.reshape(*c.shape[:2], *outer, c.shape[-2] * c.shape[-1]) for c in o)
    out, _ = monarch.inverse_levels(o, plan, p - 3, 0, real_out=True, precision=precision)
    return out[..., : plan.n_out]


def _inner_inputs(x, spec, plan: Plan, precision):
    """What the inner kernels read for x (B, H, L): the XLA outer level(s) of x as planes (B, H, rows,
    f_a, f_b), the filter spectrum planes as (H, rows, f_a, kept k_last), and the 12 constants."""
    z = _outer_forward(x, plan, precision)
    _, channels, rows, fa, _ = z[0].shape
    k = tuple(c.reshape(channels, rows, fa, len(plan.keep_cols)) for c in spec)
    return z, k, _inner_constants(plan, precision)


def conv_inner(x, spec, plan: Plan, *, interpret=False, precision="fp32"):
    """(x ∗ k)[0:n_out] for a ≥ 3-stage plan, x (B, H, L_in) fp32 → (B, H, n_out) fp32: outer levels in XLA,
    inner two levels in the Pallas kernel."""
    z, (kr, ki), consts = _inner_inputs(x, spec, plan, precision)
    planes = _precision.plane_dtype(precision) if TUNING.low_precision_planes else jnp.float32
    z = tuple(c.astype(planes) for c in z)  # XLA writes them in this dtype (fused into its last einsum)
    batch, channels, rows, fa, fb = z[0].shape
    sb = kr.shape[-1]
    ht = _pow2_divisor(channels, TUNING.inner_channels)
    rt = _pow2_divisor(rows, TUNING.inner_rows)
    data_spec = pl.BlockSpec((1, ht, rt, fa, fb), lambda b, h, r: (b, h, r, 0, 0))
    k_spec = pl.BlockSpec((ht, rt, fa, sb), lambda b, h, r: (h, r, 0, 0))
    out_shape = jax.ShapeDtypeStruct((batch, channels, rows, fa, fb), planes)
    o = pl.pallas_call(
        functools.partial(_inner_kernel, ht=ht, rt=rt, precision=precision),
        out_shape=(out_shape, out_shape),
        grid=(batch, channels // ht, rows // rt),
        in_specs=[data_spec, data_spec, k_spec, k_spec] + [_full_spec(c) for c in consts],
        out_specs=(data_spec, data_spec),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(),
        name="fftconv_inner",
    )(*z, kr, ki, *consts)
    return _outer_inverse(o, plan, precision)


def _inner_bwd_kernel(*refs, batch, ht, rt, with_z, precision):
    xr_ref, xi_ref, dr_ref, di_ref, kr_ref, ki_ref = refs[:6]
    c = dict(zip(_INNER_CONSTANTS, refs[6:]))
    outs = refs[6 + len(_INNER_CONSTANTS):]
    gr_ref, gi_ref, pr_ref, pi_ref = outs[:4]
    zr_ref, zi_ref = outs[4:] if with_z else (None, None)

    def row(h, r):
        kr, ki = kr_ref[h, r], ki_ref[h, r]
        pr_ref[h, r] = jnp.zeros(pr_ref.shape[2:], jnp.float32)
        pi_ref[h, r] = jnp.zeros(pi_ref.shape[2:], jnp.float32)

        def sample(b, carry):
            xr, xi = _inner_spectrum((xr_ref[b, h, r], xi_ref[b, h, r]), c, precision)
            dr, di = _inner_spectrum((dr_ref[b, h, r], di_ref[b, h, r]), c, precision)
            pr_ref[h, r] += xr * dr + xi * di  # Σ_b conj(X_b)·DZ_b, fp32
            pi_ref[h, r] += xr * di - xi * dr
            g = _inner_inverse((kr * dr + ki * di, kr * di - ki * dr), c, precision)  # conj(K̂)·DZ
            gr_ref[b, h, r], gi_ref[b, h, r] = (a.astype(gr_ref.dtype) for a in g)
            if with_z:
                z = _inner_inverse(_cmul((xr, xi), (kr, ki)), c, precision)  # K̂·X
                zr_ref[b, h, r], zi_ref[b, h, r] = (a.astype(zr_ref.dtype) for a in z)
            return carry

        jax.lax.fori_loop(0, batch, sample, 0)

    _over_rows(ht, rt, row)


def conv_backward_inner(x, dz, spec, plan: Plan, bplan: Plan, *, with_z=True, interpret=False, precision="fp32"):
    """The three convolutions of the gradient of a ≥ 3-stage plan with ONE inner kernel.

    x = pre ⊙ u (B, H, L_in), dz = dy ⊙ post (B, H, n_out) fp32. XLA runs the outer level(s) of x and dz;
    one kernel (a program per channel tile and row tile, looping over the batch) transforms both rows,
    accumulates Σ_b conj(X_b)·DZ_b (dk's spectrum) in fp32 and inverts conj(K̂)·DZ and (with_z) K̂·X;
    XLA runs the outer inverses. Returns g = the correlation of dz with k (B, H, L_in), z = (x ∗ k)
    (B, H, n_out) or None (no bias in either), and the product planes (H, *plan.spectrum_shape).
    """
    zx, (kr, ki), consts = _inner_inputs(x, spec, plan, precision)
    zd = _outer_forward(dz, bplan, precision)
    planes = _precision.plane_dtype(precision) if TUNING.low_precision_planes else jnp.float32
    zx, zd = (tuple(c.astype(planes) for c in z) for z in (zx, zd))
    batch, channels, rows, fa, fb = zx[0].shape
    sb = kr.shape[-1]
    ht = _pow2_divisor(channels, 2)
    rt = _pow2_divisor(rows, 2)
    data_spec = pl.BlockSpec((batch, ht, rt, fa, fb), lambda h, r: (0, h, r, 0, 0))
    k_spec = pl.BlockSpec((ht, rt, fa, sb), lambda h, r: (h, r, 0, 0))
    data_shape = jax.ShapeDtypeStruct((batch, channels, rows, fa, fb), planes)
    k_shape = jax.ShapeDtypeStruct((channels, rows, fa, sb), jnp.float32)
    n_data = 4 if with_z else 2
    outs = pl.pallas_call(
        functools.partial(_inner_bwd_kernel, batch=batch, ht=ht, rt=rt, with_z=with_z, precision=precision),
        out_shape=(data_shape,) * 2 + (k_shape,) * 2 + (data_shape,) * (n_data - 2),
        grid=(channels // ht, rows // rt),
        in_specs=[data_spec] * 4 + [k_spec] * 2 + [_full_spec(c) for c in consts],
        out_specs=(data_spec,) * 2 + (k_spec,) * 2 + (data_spec,) * (n_data - 2),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(num_warps=_bwd_num_warps((fa, fb), inner=True)),
        name="fftconv_inner_bwd",
    )(*zx, *zd, kr, ki, *consts)
    g = _outer_inverse(outs[0:2], bplan, precision)
    z = _outer_inverse(outs[4:6], plan, precision) if with_z else None
    shape = (channels, *plan.spectrum_shape)
    return g, z, (outs[2].reshape(shape), outs[3].reshape(shape))
