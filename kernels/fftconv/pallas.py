"""Pallas kernels for the factorised FFT convolution (see `monarch` for the math and layout).

Two kernels share one body shape, an order-2 "four-step" conv on a (f_a, f_b) tile per sequence:

    A = F_a·X ⊙ T_a ;  B = A·F_b ;  Y = B ⊙ K̂ ;  C = Y·conj(F_b) ⊙ conj(T_a) ;  out = conj(F_a)·C

* fused (plans with 2 stages, N ≤ 4096): real input rows [0, rows_in) of u (zero past L), optional
  pre-gate on load, 1/N folded into T_a, real part of only the first rows_out output rows, then the
  D skip (bias ⊙ x) and the post-gate, all in one kernel: u and the gates are read once, y written once.
* inner (plans with 3-4 stages, N > 4096): the outer stage(s) (F_0, twiddle, …) run as plain XLA
  einsums in their own pass (`monarch.forward_levels`); each remaining (f_{p-2}, f_{p-1}) row is an
  independent complex-input conv that this kernel does with the filter spectrum row, then XLA does the
  outer inverse stage(s), the real part, bias and gates.

Everything inside is 2-D dots on (re, im) planes (no complex dtypes) at a `precision` setting
(`kernels.fftconv.precision`): the DFT matrices arrive already cast to the operand dtype (bf16/fp16),
the data are cast before each dot, accumulation is fp32, and twiddles, the spectrum product, bias and
gates are fp32 on the accumulator.
Dot dimensions are ≥ 16 and powers of two for dense plans (time rows are padded up to a power of
two ≥ 16); frequency-sparse plans shrink the k-dimensions to the kept digits, so on GPU choose masks
that keep a power-of-two number (≥ 16) of rows and of columns. Grid: (batch, channel tiles[, row tiles]); each
program loops over its channels (and rows) with `lax.fori_loop`. Block shapes keep full trailing
dims so they are legal for Mosaic too.

Backends: on GPU the kernels request Triton (jax >= 0.10 defaults to Mosaic GPU, which rejects them);
the fp32 HIGHEST version ran correctly but slowly on one H200 (../shared/measurements/h200-2026-11-28.md);
the low-precision settings have not run on a GPU yet (`scripts/gpu_check.py`). `tests/test_fftconv_lowering.py`
checks on CPU that forward and backward lower for "cuda" (Triton) and "tpu" (Mosaic) through `jax.export`
at every precision; `scripts/kernel_resources.py` compiles them for sm_90 and reports spills.
"""

from __future__ import annotations

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

MIN_DOT = 16


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


def _compiler_params(backend: str | None = None):
    """Triton on GPU: jax >= 0.10 lowers GPU Pallas through Mosaic GPU by default, where these kernels
    do not lower (lane-semantics dot_general, shared-memory limits); None elsewhere (TPU Mosaic, CPU)."""
    if (backend or jax.default_backend()) == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=1)
    return None


def _full_spec(arr):
    nd = arr.ndim
    return pl.BlockSpec(arr.shape, lambda *_: (0,) * nd)


# ----------------------------------------------------------------------------------------------------
# Fused kernel: 2-stage plans, real in / real out, gates and bias fused.
# ----------------------------------------------------------------------------------------------------


def _fused_kernel(*refs, ht, has_pre, has_post, has_bias, precision):
    it = iter(refs)
    x_ref = next(it)
    pre_ref = next(it) if has_pre else None
    post_ref = next(it) if has_post else None
    bias_ref = next(it) if has_bias else None
    kr_ref, ki_ref = next(it), next(it)
    f0r, f0i, t0r, t0i, f1r, f1i, g1r, g1i, s0r, s0i, g0r, g0i = (next(it) for _ in range(12))
    o_ref = next(it)

    def body(h, carry):
        x = x_ref[0, h]
        if has_pre:
            x = x * pre_ref[0, h]
        dot = functools.partial(_dot, precision=precision)
        a = (dot(f0r[...], x), dot(f0i[...], x))  # real input: 2 dots
        a = _cmul(a, (t0r[...], t0i[...]))
        b = _cdot(a, (f1r[...], f1i[...]), precision)
        y = _cmul(b, (kr_ref[h], ki_ref[h]))
        c = _cdot(y, (g1r[...], g1i[...]), precision)
        c = _cmul(c, (s0r[...], s0i[...]))
        out = dot(g0r[...], c[0]) - dot(g0i[...], c[1])  # real part only: 2 dots
        if has_bias:
            out = out + bias_ref[h] * x
        if has_post:
            out = out * post_ref[0, h]
        o_ref[0, h] = out
        return carry

    jax.lax.fori_loop(0, ht, body, 0)


def _conv_fused(x, spec, plan: Plan, pre, post, bias, interpret, precision):
    batch, channels, _ = x.shape
    f0, f1 = plan.factors
    # Triton wants power-of-two block dims and dots >= 16: round the row counts up (extra rows are zeros
    # on input and discarded on output).
    rows_in = min(f0, next_power_of_two(max(plan.rows_in, MIN_DOT)))
    rows_out = min(f0, next_power_of_two(max(plan.rows_out, MIN_DOT)))
    if bias is not None:
        rows_in = rows_out = max(rows_in, rows_out)
    kplan = dataclasses.replace(plan, rows_in=rows_in, rows_out=rows_out)
    xs = monarch.pad_rows(x, kplan, rows_in)  # (B, H, rows_in, f1)
    inputs = [xs]
    if pre is not None:
        inputs.append(monarch.pad_rows(pre, kplan, rows_in))
    if post is not None:
        inputs.append(monarch.pad_rows(post, kplan, rows_out))
    if bias is not None:
        inputs.append(bias.astype(jnp.float32).reshape(channels, 1, 1))
    inputs += list(spec)
    (f0p, tw0) = monarch.stage_constants(kplan, 0, scaled=True)
    (f1p, _) = monarch.stage_constants(kplan, 1, scaled=True)
    (g1p, _) = monarch.stage_constants(kplan, 1, inverse=True)
    (g0p, tw0c) = monarch.stage_constants(kplan, 0, inverse=True)
    dft = functools.partial(_dft_operands, precision=precision)
    consts = [*dft(f0p), *tw0, *dft(f1p), *dft(g1p), *tw0c, *dft(g0p)]
    ht = _pow2_divisor(channels, 8)

    def seq_spec(rows):
        return pl.BlockSpec((1, ht, rows, f1), lambda b, h: (b, h, 0, 0))

    in_specs = [seq_spec(rows_in)]
    if pre is not None:
        in_specs.append(seq_spec(rows_in))
    if post is not None:
        in_specs.append(seq_spec(rows_out))
    if bias is not None:
        in_specs.append(pl.BlockSpec((ht, 1, 1), lambda b, h: (h, 0, 0)))
    spec_block = (ht, *spec[0].shape[1:])
    in_specs += [pl.BlockSpec(spec_block, lambda b, h: (h, 0, 0))] * 2
    in_specs += [_full_spec(c) for c in consts]
    kernel = functools.partial(
        _fused_kernel, ht=ht, has_pre=pre is not None, has_post=post is not None, has_bias=bias is not None,
        precision=precision,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, channels, rows_out, f1), jnp.float32),
        grid=(batch, channels // ht),
        in_specs=in_specs,
        out_specs=seq_spec(rows_out),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(),
        name="fftconv_fused",
    )(*inputs, *consts)
    return out.reshape(batch, channels, rows_out * f1)[..., : plan.n_out]


# ----------------------------------------------------------------------------------------------------
# Inner kernel: complex (f_a, f_b) rows after the outer XLA stage(s).
# ----------------------------------------------------------------------------------------------------


def _inner_kernel(xr_ref, xi_ref, kr_ref, ki_ref, *refs, ht, rt, precision):
    far, fai, tar, tai, fbr, fbi, gbr, gbi, sar, sai, gar, gai, or_ref, oi_ref = refs
    cdot = functools.partial(_cdot, precision=precision)

    def row(h, r):
        x = (xr_ref[0, h, r], xi_ref[0, h, r])
        a = cdot((far[...], fai[...]), x)
        a = _cmul(a, (tar[...], tai[...]))
        b = cdot(a, (fbr[...], fbi[...]))
        y = _cmul(b, (kr_ref[h, r], ki_ref[h, r]))
        c = cdot(y, (gbr[...], gbi[...]))
        c = _cmul(c, (sar[...], sai[...]))
        o = cdot((gar[...], gai[...]), c)
        or_ref[0, h, r] = o[0]
        oi_ref[0, h, r] = o[1]

    # Nested loops rather than i // rt, i % rt: Triton's lowering rejects the sign fix-ups of floor division.
    def channel(h, carry):
        def row_step(r, c):
            row(h, r)
            return c

        return jax.lax.fori_loop(0, rt, row_step, carry)

    jax.lax.fori_loop(0, ht, channel, 0)


def _conv_inner(x, spec, plan: Plan, interpret, precision):
    """Plans with ≥ 3 stages: outer levels in XLA, inner two levels in the Pallas kernel."""
    batch, channels, _ = x.shape
    p = plan.stages
    fa, fb = plan.factors[-2], plan.factors[-1]
    # z planes: (B, H, kept k_0, f_1, …, f_{p-3}, f_a (time), f_b (time)) after the outer levels
    z = monarch.forward_levels(
        (monarch.pad_rows(x, plan), None), plan, 0, p - 2, scaled=True, precision=precision
    )
    outer = z[0].shape[2:-2]
    rows = int(np.prod(outer))
    z = tuple(c.reshape(batch, channels, rows, fa, fb) for c in z)
    sb = len(plan.keep_cols)
    kr, ki = (c.reshape(channels, rows, fa, sb) for c in spec)
    (fap, tap) = monarch.stage_constants(plan, p - 2, scaled=True)
    (fbp, _) = monarch.stage_constants(plan, p - 1, scaled=True)
    (gbp, _) = monarch.stage_constants(plan, p - 1, inverse=True)
    (gap, tac) = monarch.stage_constants(plan, p - 2, inverse=True)
    dft = functools.partial(_dft_operands, precision=precision)
    consts = [*dft(fap), *tap, *dft(fbp), *dft(gbp), *tac, *dft(gap)]
    ht = _pow2_divisor(channels, 4)
    rt = _pow2_divisor(rows, 8)
    data_spec = pl.BlockSpec((1, ht, rt, fa, fb), lambda b, h, r: (b, h, r, 0, 0))
    k_spec = pl.BlockSpec((ht, rt, fa, sb), lambda b, h, r: (h, r, 0, 0))
    out_shape = jax.ShapeDtypeStruct((batch, channels, rows, fa, fb), jnp.float32)
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
    o = tuple(c.reshape(batch, channels, *outer, fa * fb) for c in o)
    out, _ = monarch.inverse_levels(o, plan, p - 3, 0, real_out=True, precision=precision)
    return out[..., : plan.n_out]


def conv_pallas(x, spec, plan: Plan, pre=None, post=None, bias=None, *, interpret=False, precision="fp32"):
    """post ⊙ ((pre⊙x ∗ k)[0:n_out] + bias ⊙ pre⊙x) for x (B, H, L_in) fp32; returns (B, H, n_out)."""
    if plan.stages == 2:
        return _conv_fused(x, spec, plan, pre, post, bias, interpret, precision)
    if pre is not None:
        x = x * pre
    y = _conv_inner(x, spec, plan, interpret, precision)
    if bias is not None:
        y = y + bias.astype(jnp.float32)[:, None] * x[..., : plan.n_out]
    if post is not None:
        y = y * post
    return y
