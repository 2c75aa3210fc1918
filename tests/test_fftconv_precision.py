"""Matmul precision settings of the factorised impls: error bounds against float64 and proof, from the
jaxpr, that each setting's dots ran with the intended operands.

On CPU an fp16/bf16 dot rounds its operands and accumulates in fp32, exactly what a tensor core does,
so these errors are the GPU's operand-rounding errors (checked against ../shared/kernel-tools/emu.py's
NumPy emulation below). "tf32" is a `Precision.DEFAULT` fp32 dot, exact on CPU: only its dots are checked.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.fftconv import FFTConvError, fftconv, monarch
from kernels.fftconv import precision as prec
from kernels.fftconv.conv import chunk_size, overlap_save_chunk
from kernels.fftconv.reference import direct_causal_conv_np

from jaxpr_walk import equations
from test_fftconv import make_inputs, rel_l2
from test_fftconv_impls import fft_ref

MATMUL = ["xla-matmul", "pallas"]
CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU dot semantics")


def collect_dots(fn, *args):
    """Counter of (inside a pallas_call, operand dtypes, precision, accumulation dtype) over every
    dot_general in fn's jaxpr, nested jaxprs (jit, custom_vjp, pallas kernels, loops) included."""
    return collections.Counter(
        (inside, tuple(jnp.dtype(v.aval.dtype).name for v in eqn.invars), str(eqn.params["precision"]),
         jnp.dtype(eqn.params["preferred_element_type"]).name)
        for eqn, inside in equations(fn, *args) if eqn.primitive.name == "dot_general")


def expected_dot(precision: str):
    """(operand dtypes, precision, accumulation) a dot of this setting must have."""
    dtype = jnp.dtype(prec.OPERAND_DTYPES[precision]).name
    lax_precision = {"fp32": "(Precision.HIGHEST, Precision.HIGHEST)",
                     "tf32": "(Precision.DEFAULT, Precision.DEFAULT)"}.get(precision, "None")
    return (dtype, dtype), lax_precision, "float32"


FILTER_DOT = (("float32", "float32"), "(Precision.HIGHEST, Precision.HIGHEST)", "float32")

CASES = {  # name: (L, K, freq_mask?)  — 2-stage fused, 3-stage inner, partial (overlap-added chunks; for
    # pallas at L >= 2048 the overlap-save kernel), freq-sparse
    "dense-2stage": (1000, 1000, False),
    "dense-3stage": (2100, 2100, False),
    "partial": (1000, 100, False),
    "partial-long": (2048, 200, False),
    "freq-sparse": (1000, 1000, True),
}


def _case(name, batch=1, channels=2):
    seqlen, ksize, sparse = CASES[name]
    u, k, bias, pre, post = make_inputs(batch, seqlen, channels, ksize, seed=21)
    mask = monarch.lowpass_mask(seqlen, ksize, 0.25) if sparse else None
    x = np.asarray(u, np.float64) * np.asarray(pre, np.float64)
    if sparse:
        n = monarch.freq_grid(seqlen, ksize)[0]
        conv = fft_ref(x, k, monarch.expand_freq_mask(mask, n))
    else:
        conv = direct_causal_conv_np(x, k)
    ref = (conv + x * np.asarray(bias, np.float64)) * np.asarray(post, np.float64)
    return (u, k, bias, pre, post), mask, ref


def _plan(case, impl):
    """The plan whose filter spectrum the op computes (the chunk plan for the block-Toeplitz partial)."""
    seqlen, ksize, sparse = CASES[case]
    mask = monarch.lowpass_mask(seqlen, ksize, 0.25) if sparse else None
    c = None if sparse else chunk_size(seqlen, ksize)
    if c is not None and impl == "pallas":
        c = overlap_save_chunk(seqlen, ksize) or c
    if c is not None:
        return monarch.make_plan(c, ksize, 2 * c, n=2 * c)
    return monarch.make_plan(seqlen, ksize, seqlen, mask)


@pytest.mark.parametrize("impl", MATMUL)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("precision", prec.PRECISIONS)
def test_error_within_documented_bound_and_dots_as_intended(impl, case, precision):
    """fp32 inputs (no output rounding): the conv error is the setting's own and ≤ its documented bound;
    every dot except the fp32 filter spectrum's has the setting's operands and fp32 accumulation, and
    for impl="pallas" they run inside the kernel (all of them for 2-stage plans)."""
    (u, k, bias, pre, post), mask, ref = _case(case)

    def run(u, k):
        return fftconv(u, k, bias, pre_gate=pre, post_gate=post, freq_mask=mask, impl=impl, precision=precision)

    y = run(u, k)
    assert y.dtype == jnp.float32
    assert rel_l2(y, ref) <= prec.ERROR_BOUNDS[precision]

    plan = _plan(case, impl)
    spectrum = collect_dots(lambda k: monarch.filter_spectrum(k, plan), k)
    assert set(spectrum) == {(False, *FILTER_DOT)}
    dots = collect_dots(run, u, k)
    assert dots[(False, *FILTER_DOT)] >= spectrum[(False, *FILTER_DOT)]
    conv_dots = dots - spectrum
    assert conv_dots and all(tuple(sig) == expected_dot(precision) for _, *sig in conv_dots), dots
    inside = sum(n for (in_kernel, *_), n in conv_dots.items() if in_kernel)
    if impl == "xla-matmul":
        assert inside == 0
    elif plan.stages == 2:
        assert inside == sum(conv_dots.values())
    else:
        assert 0 < inside < sum(conv_dots.values())  # outer stage in XLA, inner stages in the kernel


@CPU_ONLY
def test_cpu_dots_emulate_operand_rounding():
    """A bf16/fp16 dot on CPU equals the float64 product of the rounded operands (fp32 accumulation),
    and the four-step conv reproduces emu.py's emulated errors for its 32×64 split at N = 2048 (same
    data: bf16 3.4e-3, fp16 3.9e-4; fp32 1e-7-level)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
    for dtype in (jnp.bfloat16, jnp.float16):
        ar, br = (np.asarray(jnp.asarray(m, dtype), np.float64) for m in (a, b))
        got = np.asarray(prec.dot(jnp.dot, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                  "bf16" if dtype == jnp.bfloat16 else "fp16"), np.float64)
        assert np.abs(got - ar @ br).max() < 1e-5 * np.abs(ar @ br).max()  # fp32 accumulation only
        assert np.abs(got - a @ b).max() > 1e-4 * np.abs(a @ b).max()  # the operands were rounded

    rng = np.random.default_rng(0)  # emu.py's draw: 8 sequences of L = 1024, filters 1/sqrt(L)
    x = rng.standard_normal((8, 1024))
    kk = rng.standard_normal((8, 1024)) / np.sqrt(1024)
    ref = np.fft.irfft(np.fft.rfft(x, 2048) * np.fft.rfft(kk, 2048), 2048)[:, :1024]
    assert monarch.plan_factors(2048) == (32, 64)
    u, k = jnp.asarray(x.T[None], jnp.float32), jnp.asarray(kk.T, jnp.float32)
    emulated = {"bf16": 3.4e-3, "fp16": 3.9e-4}
    for impl in MATMUL:
        for precision, want in emulated.items():
            y = np.asarray(fftconv(u, k, impl=impl, precision=precision), np.float64)[0].T
            err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
            assert abs(err - want) < 0.05 * want, (impl, precision, err)


def test_default_precision_follows_input_dtype():
    assert [prec.resolve(None, d) for d in (jnp.bfloat16, jnp.float16, jnp.float32)] == ["bf16", "fp16", "fp32"]
    assert prec.resolve("HIGHEST", jnp.bfloat16) == "fp32" and prec.resolve("bfloat16", jnp.float32) == "bf16"
    u, k, *_ = make_inputs(1, 300, 2, 300, dtype=jnp.bfloat16)
    for dtype, precision in ((jnp.bfloat16, "bf16"), (jnp.float16, "fp16"), (jnp.float32, "fp32")):
        ud = u.astype(dtype)
        dots = collect_dots(lambda u: fftconv(u, k, impl="pallas"), ud)
        assert any(inside and tuple(sig) == expected_dot(precision) for (inside, *sig) in dots), (dtype, dots)
        assert fftconv(ud, k, impl="pallas").dtype == dtype


@pytest.mark.parametrize(
    "precision,backend,match",
    [("bf8", "cpu", "unknown precision 'bf8'"), (3, "cpu", "precision must be a string"),
     ("tf32", "tpu", "needs a GPU")],
)
def test_bad_precision_is_rejected(precision, backend, match):
    with pytest.raises(ValueError, match=match):
        prec.resolve(precision, jnp.float32, backend)
    if backend == jax.default_backend():
        u, k, *_ = make_inputs(1, 16, 2, 16)
        with pytest.raises(FFTConvError, match=match):
            fftconv(u, k, impl="xla-matmul", precision=precision)


@pytest.mark.parametrize("impl", MATMUL)
@pytest.mark.parametrize("precision,bound", [("bf16x3", 1e-4), ("bf16", 2e-2)])
def test_grads_at_low_precision(impl, precision, bound):
    """Backward (du, dk, dbias, gates) runs at the same setting; errors stay at the setting's level."""
    from test_fftconv_impls import _grads
    from kernels.fftconv.reference import direct_causal_conv

    u, k, bias, pre, post = make_inputs(1, 600, 2, 600, seed=22)
    w = make_inputs(1, 600, 2, 600, seed=23)[0]
    ref = _grads(direct_causal_conv, u, k, bias, pre, post, w)
    got = _grads(lambda *a: fftconv(*a[:3], pre_gate=a[3], post_gate=a[4], impl=impl, precision=precision),
                 u, k, bias, pre, post, w)
    for name, g, r in zip(("u", "k", "bias", "pre", "post"), got, ref):
        assert rel_l2(g, np.asarray(r, np.float64)) < bound, name


def _bf16_round_trips(fn, *args) -> int:
    """Number of convert(convert(x, bf16), f32) chains in fn's jaxpr (nested jaxprs and kernels included):
    the pattern XLA's GPU compiler folds to x when excess precision is allowed (its default)."""
    made_bf16, count = set(), 0
    for eqn, _ in equations(fn, *args):
        if eqn.primitive.name == "convert_element_type":
            src, dst = (jnp.dtype(v.aval.dtype) for v in (eqn.invars[0], eqn.outvars[0]))
            if (src, dst) == (jnp.float32, jnp.bfloat16):
                made_bf16.add(eqn.outvars[0])
            elif dst == jnp.float32 and eqn.invars[0] in made_bf16:
                count += 1
    return count


@pytest.mark.parametrize("impl", MATMUL)
def test_bf16x3_split_survives_excess_precision(impl):
    """bf16x3's hi part is rounded with integer ops, never by an fp32 → bf16 → fp32 round trip (on an H200
    XLA folded that round trip, lo became 0 and "bf16x3" ran at bf16 accuracy, 1.7e-3); hi is still
    round-to-nearest-even bf16 (ties included) and hi + lo is within 2⁻¹⁷ of the input."""
    u, k, *_ = make_inputs(1, 1000, 2, 1000, seed=3)
    assert _bf16_round_trips(lambda u, k: fftconv(u, k, impl=impl, precision="bf16x3"), u, k) == 0
    assert _bf16_round_trips(lambda a: prec.operand(a, "bf16").astype(jnp.float32), u) == 1  # the check sees one

    rng = np.random.default_rng(0)
    mantissas = rng.integers(0, 1 << 23, 4096, dtype=np.uint32)
    mantissas[:4] = [0x8000, 0x18000, 0x7FFF, 0x17FFF]  # ties to even (down, up) and just below a tie
    bits = (mantissas | (np.uint32(127 + 5) << np.uint32(23))).astype(np.uint32)
    a = jnp.asarray(np.concatenate([bits.view(np.float32), -bits.view(np.float32)]))
    hi, lo = prec._split_bf16(a)
    assert (np.asarray(hi) == np.asarray(a.astype(jnp.bfloat16))).all()
    a64 = np.asarray(a, np.float64)
    err = np.abs(a64 - np.asarray(hi, np.float64) - np.asarray(lo, np.float64)) / np.abs(a64)
    assert err.max() <= 2.0**-17
