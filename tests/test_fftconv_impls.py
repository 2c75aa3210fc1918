"""The factorised implementations ("xla-matmul", "pallas" in interpret mode) against float64 references.

Data are unit-scale with long non-decaying filters, so an all-zero or short-range output fails.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.fftconv import fftconv, monarch, pallas
from kernels.fftconv.conv import chunk_size, overlap_save_chunk
from kernels.fftconv.reference import direct_causal_conv, direct_causal_conv_np

from test_fftconv import BF16_TOL, FP32_TOL, make_inputs, rel_l2
from test_fftconv_lowering import _kernel_dot_shapes
from jaxpr_walk import kernel_calls, kernel_name

IMPLS = ["xla", "xla-matmul", "pallas"]
MATMUL = ["xla-matmul", "pallas"]


def fft_ref(u, k, mask_bins=None, n=None):
    """float64 complex-FFT reference Re IFFT(FFT(u)·FFT(k)·M)[0:L] (exact linear conv when M = 1)."""
    u = np.asarray(jnp.asarray(u, jnp.float32), np.float64)
    k = np.asarray(jnp.asarray(k, jnp.float32), np.float64)
    seqlen = u.shape[1]
    n = n or monarch.fft_size(seqlen + k.shape[0] - 1)
    spec = np.fft.fft(u, n, axis=1) * np.fft.fft(k, n, axis=0)[None]
    if mask_bins is not None:
        spec = spec * mask_bins[None, :, None]
    return np.real(np.fft.ifft(spec, axis=1))[:, :seqlen]


@functools.lru_cache(maxsize=None)
def cached_direct(seqlen, ksize, seed, batch=1, channels=2, gated=False):
    """float64 direct conv of `make_inputs(...)`, computed once per case (O(L·K) NumPy)."""
    u, k, bias, pre, post = make_inputs(batch, seqlen, channels, ksize, seed=seed)
    if gated:
        return direct_causal_conv_np(u, k, bias, pre, post)
    return direct_causal_conv_np(u, k)


# --- plans -------------------------------------------------------------------------------------------


def test_plans_cover_256_to_16m():
    for bits in range(8, 25):
        n = 1 << bits
        f = monarch.plan_factors(n)
        assert int(np.prod(f)) == n and all(16 <= x <= 64 and x & (x - 1) == 0 for x in f)
        assert len(f) == (2 if bits <= 12 else 3 if bits <= 18 else 4)
    for bad in (128, 1000, 1 << 25):
        with pytest.raises(ValueError):
            monarch.plan_factors(bad)


@pytest.mark.parametrize("n", [256, 2048, 8192, 1 << 19])
def test_spectrum_is_permuted_fft(n):
    """forward_real output axis j holds digit k_j of k = k_0 + f_0·(k_1 + f_1·(…))."""
    x = np.random.default_rng(1).standard_normal(n // 2)
    plan = monarch.make_plan(n // 2, n // 2, n // 2)
    assert plan.n == n
    zr, zi = monarch.forward_real(jnp.asarray(x, jnp.float32)[None], plan, scaled=False)
    f = plan.factors
    idx = np.zeros(f, int)
    stride = 1
    for axis, size in enumerate(f):
        shape = [1] * len(f)
        shape[axis] = size
        idx = idx + stride * np.arange(size).reshape(shape)
        stride *= size
    want = np.fft.fft(x, n)[idx]
    got = np.asarray(zr[0], np.float64) + 1j * np.asarray(zi[0], np.float64)
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-6


# --- forward accuracy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "seqlen,ksize", [(256, 256), (1000, 1000), (2048, 2048), (4097, 4097), (3000, 1500), (16384, 16384)]
)
def test_fp32_gated_matches_direct(impl, seqlen, ksize):
    u, k, bias, pre, post = make_inputs(1, seqlen, 2, ksize)
    y = fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl=impl)
    assert y.dtype == jnp.float32 and y.shape == u.shape
    assert rel_l2(y, cached_direct(seqlen, ksize, 0, gated=True)) < FP32_TOL


@pytest.mark.parametrize("impl", MATMUL)
@pytest.mark.parametrize("seqlen,ksize", [(300, 300), (1000, 37), (4096, 100), (513, 1)])
def test_plain_and_partial_matches_direct(impl, seqlen, ksize):
    u, k, *_ = make_inputs(2, seqlen, 3, ksize, seed=2)
    y = fftconv(u, k, impl=impl)
    assert rel_l2(y, direct_causal_conv_np(u, k)) < FP32_TOL


def test_partial_uses_block_toeplitz_chunks():
    assert chunk_size(4096, 100) == 128 and chunk_size(4096, 1000) == 1024
    assert chunk_size(4096, 1025) is None and chunk_size(300, 37) is None
    # the fused overlap-save kernel: C >= 512 (16-row half windows), a 2-stage 2C plan, 4C <= L
    assert overlap_save_chunk(2048, 100) == 512 and overlap_save_chunk(16384, 1024) == 1024
    assert overlap_save_chunk(16384, 2048) == 2048 and overlap_save_chunk(65536, 4096) is None  # 2C = 8192
    assert overlap_save_chunk(2047, 100) is None and overlap_save_chunk(4096, 1025) is None


@pytest.mark.parametrize("layout", ["blh", "hbl"])
def test_partial_is_one_overlap_save_kernel(layout):
    """impl="pallas", K <= L/4: the forward is ONE kernel (fftconv_partial) whose grid walks the chunks
    (B, channel tiles, ceil(L / C)) and reads u and the gates in the given layout and dtype; it matches the
    direct conv with gates and bias for an L that is not a multiple of C (padded last chunk) and a filter
    longer than half a chunk (taps reach into the previous chunk); every gradient comes from ONE backward
    kernel (fftconv_partial_bwd: chunks i-1, i, i+1 per window) and matches the direct conv's;
    `tuning(overlap_save=False)` gives the same result from the overlap-add kernels."""
    seqlen, ksize = 2500, 300  # C = 512: 5 chunks, the last one 452 samples
    u, k, bias, pre, post = make_inputs(2, seqlen, 3, ksize, seed=22, dtype=jnp.bfloat16)
    to = _hbl if layout == "hbl" else (lambda a: a)
    args = (to(u), k, bias, to(pre), to(post))

    def conv(u, k, bias, pre, post):
        return fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl="pallas", layout=layout)

    (call,) = kernel_calls(conv, *args)
    assert kernel_name(call) == "fftconv_partial" and tuple(call.params["grid_mapping"].grid) == (2, 3, 5)
    assert _kernel_io_dtypes(conv, *args)["fftconv_partial"] == ({"bfloat16"}, {"bfloat16"})
    y = conv(*args)
    assert y.dtype == jnp.bfloat16 and y.shape == args[0].shape
    y = np.asarray(jnp.transpose(y, (1, 2, 0)) if layout == "hbl" else y, np.float64)
    f32 = [np.asarray(jnp.asarray(a, jnp.float32)) for a in (u, k, bias, pre, post)]
    assert rel_l2(y, direct_causal_conv_np(*f32)) < BF16_TOL
    with pallas.tuning(overlap_save=False):
        jax.clear_caches()
        assert _pallas_calls(conv, *args) == ["fftconv_fused"]
        y_add = np.asarray(jnp.asarray(conv(*args), jnp.float32), np.float64)
    jax.clear_caches()
    assert rel_l2(np.transpose(y_add, (1, 2, 0)) if layout == "hbl" else y_add, y) < BF16_TOL

    w = make_inputs(2, seqlen, 3, ksize, seed=23)[0]
    args32 = [jnp.asarray(a, jnp.float32) for a in (u, k, bias, pre, post)]
    ref = _grads(direct_causal_conv, *args32, w)

    def loss(u, k, bias, pre, post):
        return jnp.sum(to(w) * conv(to(u), k, bias, to(pre), to(post)))

    assert _pallas_calls(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), *args32) == [
        "fftconv_partial", "fftconv_partial_bwd"]
    got = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args32)
    for name, g, r in zip(("u", "k", "bias", "pre", "post"), got, ref):
        assert rel_l2(g, np.asarray(r, np.float64)) < 1e-5, name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seqlen,ksize", [(512, 512), (1999, 300)])
def test_bf16_matches_direct(impl, seqlen, ksize):
    u, k, bias, pre, post = make_inputs(2, seqlen, 3, ksize, dtype=jnp.bfloat16)
    y = fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl=impl)
    assert y.dtype == jnp.bfloat16
    ref = direct_causal_conv_np(*(np.asarray(a.astype(jnp.float32)) for a in (u, k, bias, pre, post)))
    assert rel_l2(y, ref) < BF16_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_65536_matches_fft64(impl):
    """At 65536 the reference is the float64 FFT conv (the O(L^2) direct sum takes ~40 s; it is the
    reference up to 16384 above and in the slow test below)."""
    u, k, *_ = make_inputs(1, 65536, 2, 65536, seed=3)
    y = fftconv(u, k, impl=impl)
    assert rel_l2(y, fft_ref(u, k)) < FP32_TOL


@pytest.mark.slow
def test_65536_matches_direct():
    u, k, *_ = make_inputs(1, 65536, 2, 65536, seed=3)
    ref = direct_causal_conv_np(u, k)
    for impl in IMPLS:
        assert rel_l2(fftconv(u, k, impl=impl), ref) < FP32_TOL, impl


@pytest.mark.slow
@pytest.mark.parametrize("impl", MATMUL)
@pytest.mark.parametrize("seqlen", [1 << 18, 1 << 19])  # 4-stage plans (N = 2^19, 2^20)
def test_four_stage_plans_match_fft64(impl, seqlen):
    u, k, *_ = make_inputs(1, seqlen, 2, seqlen, seed=4)
    assert monarch.make_plan(seqlen, seqlen, seqlen).stages == 4
    y = fftconv(u, k, impl=impl)
    assert rel_l2(y, fft_ref(u, k)) < 4 * FP32_TOL


# --- frequency-sparse ----------------------------------------------------------------------------------


def _masks(seqlen, ksize):
    n, f0, fl = monarch.freq_grid(seqlen, ksize)
    rng = np.random.default_rng(5)
    random_blocks = rng.random((f0 // 4, fl // 4)) < 0.4
    random_blocks[0, 0] = True
    return {
        "lowpass": monarch.lowpass_mask(seqlen, ksize, 0.25),
        "random": random_blocks,
        "comb": monarch.comb_mask(seqlen, ksize, 0.25),  # whole outer groups (first digits) dropped
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seqlen", [1000, 5000])
def test_freq_sparse_matches_masked_fft(impl, seqlen):
    u, k, bias, pre, post = make_inputs(2, seqlen, 3, seqlen, seed=6)
    n, *_ = monarch.freq_grid(seqlen, seqlen)
    for name, mask in _masks(seqlen, seqlen).items():
        bins = monarch.expand_freq_mask(mask, n)
        y = fftconv(u, k, bias, pre_gate=pre, post_gate=post, freq_mask=mask, impl=impl)
        x = np.asarray(u, np.float64) * np.asarray(pre, np.float64)
        ref = (fft_ref(x, k, bins) + x * np.asarray(bias, np.float64)) * np.asarray(post, np.float64)
        assert rel_l2(y, ref) < FP32_TOL, name


def test_freq_sparse_skips_blocks():
    seqlen = 5000
    masks = _masks(seqlen, seqlen)
    plan = monarch.make_plan(seqlen, seqlen, seqlen, masks["lowpass"])
    assert len(plan.keep_cols) == plan.factors[-1] // 4 and len(plan.keep_rows) == plan.factors[0]
    assert plan.mask is None and abs(plan.kept_fraction - 0.25) < 1e-9
    plan = monarch.make_plan(seqlen, seqlen, seqlen, masks["comb"])
    assert len(plan.keep_rows) == plan.factors[0] // 4 and plan.mask is None
    np.testing.assert_array_equal(monarch.expand_freq_mask(masks["comb"], plan.n), np.arange(plan.n) % 4 == 0)
    dense = monarch.make_plan(seqlen, seqlen, seqlen)
    assert dense.dense and dense.spectrum_shape == dense.factors


# --- gradients -----------------------------------------------------------------------------------------


def _grads(fn, u, k, bias, pre, post, w):
    def loss(u, k, bias, pre, post):
        return jnp.sum(w * fn(u, k, bias, pre, post).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(u, k, bias, pre, post)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seqlen,ksize", [(300, 300), (1000, 37), (5000, 700)])
def test_grads_match_direct(impl, seqlen, ksize):
    u, k, bias, pre, post = make_inputs(2, seqlen, 3, ksize, seed=7)
    w = make_inputs(2, seqlen, 3, ksize, seed=8)[0]
    ref = _grads(direct_causal_conv, u, k, bias, pre, post, w)
    got = _grads(lambda *a: fftconv(*a[:3], pre_gate=a[3], post_gate=a[4], impl=impl), u, k, bias, pre, post, w)
    for name, g, r in zip(("u", "k", "bias", "pre", "post"), got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert rel_l2(g, np.asarray(r, np.float64)) < 1e-5, name


@pytest.mark.parametrize("impl", MATMUL)
@pytest.mark.parametrize("seqlen", [700, 2100])  # 2-stage and 3-stage plans
def test_grads_without_optional_args_and_bf16(impl, seqlen):
    u, k, *_ = make_inputs(2, seqlen, 3, seqlen, seed=9, dtype=jnp.bfloat16)
    w = make_inputs(2, seqlen, 3, seqlen, seed=10)[0]
    f = lambda u, k: jnp.sum(w * fftconv(u, k, impl=impl).astype(jnp.float32))
    gu, gk = jax.grad(f, argnums=(0, 1))(u, k)
    assert gu.dtype == jnp.bfloat16 and gk.dtype == jnp.bfloat16
    uf, kf = u.astype(jnp.float32), k.astype(jnp.float32)
    ru, rk = jax.grad(lambda u, k: jnp.sum(w * direct_causal_conv(u, k)), argnums=(0, 1))(uf, kf)
    assert rel_l2(gu, np.asarray(ru, np.float64)) < BF16_TOL
    assert rel_l2(gk, np.asarray(rk, np.float64)) < BF16_TOL


@pytest.mark.parametrize("impl", MATMUL)
def test_freq_sparse_grads_match_xla_autodiff(impl):
    seqlen = 1000
    u, k, bias, pre, post = make_inputs(2, seqlen, 3, seqlen, seed=11)
    w = make_inputs(2, seqlen, 3, seqlen, seed=12)[0]
    mask = _masks(seqlen, seqlen)["random"]

    def via(name):
        return lambda *a: fftconv(*a[:3], pre_gate=a[3], post_gate=a[4], freq_mask=mask, impl=name)

    ref = _grads(via("xla"), u, k, bias, pre, post, w)  # jnp.fft path, differentiated by JAX
    got = _grads(via(impl), u, k, bias, pre, post, w)
    for name, g, r in zip(("u", "k", "bias", "pre", "post"), got, ref):
        assert rel_l2(g, np.asarray(r, np.float64)) < 1e-5, name


def _pallas_calls(fn, *args) -> list[str]:
    return [kernel_name(eqn) for eqn in kernel_calls(fn, *args)]


def test_pallas_sparse_skips_outer_groups():
    """A 3-stage plan whose mask keeps 1 in 4 first digits runs the inner kernels on those 4 rows only (the
    first digits are grid rows there, not a dot dimension, so they are not rounded out to 16), forward and
    backward, with every gradient equal to the masked jnp.fft path's."""
    seqlen = 5000  # N = 16384 = 16·32·32
    mask = _masks(seqlen, seqlen)["comb"]
    f0 = monarch.freq_grid(seqlen, seqlen)[1]
    u, k, bias, pre, post = make_inputs(2, seqlen, 3, seqlen, seed=16)
    w = make_inputs(2, seqlen, 3, seqlen, seed=17)[0]

    def via(name):
        return lambda *a: fftconv(*a[:3], pre_gate=a[3], post_gate=a[4], freq_mask=mask, impl=name)

    def loss(*a):
        return jnp.sum(w * via("pallas")(*a))

    calls = kernel_calls(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), u, k, bias, pre, post)
    rows = {kernel_name(eqn): eqn.outvars[0].aval.shape[2] for eqn in calls}  # (B, H, rows, f_a, f_b) planes
    assert rows == {"fftconv_inner": f0 // 4, "fftconv_inner_bwd": f0 // 4}
    ref = _grads(via("xla"), u, k, bias, pre, post, w)
    got = _grads(via("pallas"), u, k, bias, pre, post, w)
    for name, g, r in zip(("u", "k", "bias", "pre", "post"), got, ref):
        assert rel_l2(g, np.asarray(r, np.float64)) < 1e-5, name


@pytest.mark.parametrize("seqlen,ksize,batch,kernels", [
    (300, 300, 3, ["fftconv_fused", "fftconv_fused_bwd"]),  # 2-stage plan: one backward kernel
    (1000, 37, 3, ["fftconv_fused", "fftconv_fused_bwd"]),  # partial: 256-point chunk plans
    (5000, 2000, 3, ["fftconv_inner", "fftconv_inner_bwd"]),  # 3 stages: outer levels in XLA
])
def test_pallas_backward_kernels(seqlen, ksize, batch, kernels):
    """The gradient is one kernel: fused for 2-stage plans (du, dpre, dpost, dbias and dk's spectrum from
    one pass), the inner backward kernel (g, z and dk's spectrum) for ≥ 3 stages; correct for an odd batch."""
    u, k, bias, pre, post = make_inputs(batch, seqlen, 3, ksize, seed=13)
    w = make_inputs(batch, seqlen, 3, ksize, seed=14)[0]

    def loss(u, k, bias, pre, post):
        return jnp.sum(w * fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl="pallas"))

    assert _pallas_calls(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), u, k, bias, pre, post) == kernels
    ref = _grads(direct_causal_conv, u, k, bias, pre, post, w)
    got = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(u, k, bias, pre, post)
    for name, g, r in zip(("u", "k", "bias", "pre", "post"), got, ref):
        assert rel_l2(g, np.asarray(r, np.float64)) < 1e-5, name


def _kernel_io_dtypes(fn, *args) -> dict[str, tuple[set, set]]:
    """pallas_call name -> (dtypes of its (B, H, rows, f1) operands, dtypes of such outputs) in fn's jaxpr."""
    tiles = lambda vs: {v.aval.dtype.name for v in vs if v.aval.ndim == 4}  # not constants or sums
    return {kernel_name(eqn): (tiles(eqn.invars), tiles(eqn.outvars)) for eqn in kernel_calls(fn, *args)}


def test_fused_kernels_read_and_write_bf16():
    """bf16 activations enter and leave the fused kernels as bf16 (no fp32 copies of u, the gates, dy or
    the gradients in HBM); only the spectra and the per-channel sums are fp32."""
    u, k, bias, pre, post = make_inputs(2, 300, 4, 300, seed=15, dtype=jnp.bfloat16)

    def loss(u, pre, post):
        y = fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl="pallas")
        return jnp.sum(y.astype(jnp.float32))

    io = _kernel_io_dtypes(jax.grad(loss, argnums=(0, 1, 2)), u, pre, post)
    assert io["fftconv_fused"] == ({"bfloat16"}, {"bfloat16"})
    assert io["fftconv_fused_bwd"] == ({"bfloat16"}, {"bfloat16"})  # u, gates, dy in; du, dpre, dpost out


@pytest.mark.parametrize("precision,planes", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")])
def test_inner_kernels_exchange_planes_in_the_operand_dtype(precision, planes):
    """On ≥ 3-stage plans the planes between XLA's outer stages and the inner kernels (the HBM round trips
    of that path) are stored in the dot operand dtype of 16-bit settings (half the bytes of fp32), fp32
    for the others; only dk's spectrum sums stay fp32. `pallas.tuning(low_precision_planes=False)` keeps
    fp32 (the A/B switch of scripts/gpu_kernel_sweep.py)."""
    u, k, bias, pre, post = make_inputs(2, 5000, 4, 5000, seed=16, dtype=jnp.bfloat16)

    def loss(u, pre, post):
        y = fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl="pallas", precision=precision)
        return jnp.sum(y.astype(jnp.float32))

    def dtypes():
        jax.clear_caches()
        return {kernel_name(eqn): ({v.aval.dtype.name for v in eqn.invars if v.aval.ndim == 5},
                                   [v.aval.dtype.name for v in eqn.outvars])
                for eqn in kernel_calls(jax.grad(loss, argnums=(0, 1, 2)), u, pre, post)}

    io = dtypes()
    assert io["fftconv_inner"] == ({planes}, [planes, planes])
    assert io["fftconv_inner_bwd"] == ({planes}, [planes, planes, "float32", "float32", planes, planes])
    with pallas.tuning(low_precision_planes=False):
        io = dtypes()
    assert io["fftconv_inner"] == ({"float32"}, ["float32", "float32"])
    jax.clear_caches()


def _kernel_grids(fn, *args) -> dict[str, tuple]:
    """pallas_call name -> its launch grid, in fn's jaxpr."""
    return {kernel_name(eqn): tuple(eqn.params["grid_mapping"].grid) for eqn in kernel_calls(fn, *args)}


@pytest.mark.parametrize("seqlen,kernel", [(300, "fftconv_fused"), (5000, "fftconv_inner")])
def test_tuning_changes_the_launch_not_the_result(seqlen, kernel):
    """`pallas.tuning` (the sweep knobs) changes the grid of the forward kernels; the output stays the same."""
    u, k, bias, pre, post = make_inputs(2, seqlen, 8, seqlen, seed=17)

    def run():
        jax.clear_caches()
        f = functools.partial(fftconv, impl="pallas")
        grids = _kernel_grids(lambda *a: f(*a[:3], pre_gate=a[3], post_gate=a[4]), u, k, bias, pre, post)
        return np.asarray(f(u, k, bias, pre_gate=pre, post_gate=post)), grids[kernel]

    y0, grid0 = run()
    with pallas.tuning(fused_channels=2, inner_channels=1, inner_rows=2):
        y1, grid1 = run()
    jax.clear_caches()
    assert np.prod(grid1) > np.prod(grid0), (grid0, grid1)
    assert np.array_equal(y0, y1)


@pytest.mark.parametrize("layout", ["blh", "hbl"])
def test_stacked_fused_kernel_matches_direct(layout):
    """`tuning(fused_stack=4)`: the fused forward transforms 4 channels per dot (first-stage dots 4·f1 wide,
    second-stage dots 4·f0 tall, as the kernel's jaxpr shows) and still computes the gated conv."""
    u, k, bias, pre, post = make_inputs(3, 300, 8, 300, seed=18)
    to = _hbl if layout == "hbl" else (lambda a: a)
    args = (to(u), k, bias, to(pre), to(post))

    def conv(u, k, bias, pre, post):
        return fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl="pallas", layout=layout)

    f0, f1 = monarch.make_plan(300, 300, 300).factors
    jax.clear_caches()
    with pallas.tuning(fused_stack=4):
        shapes = set(_kernel_dot_shapes(conv, *args))
        y = conv(*args)
    jax.clear_caches()
    assert any(b[-1] == 4 * f1 for _, b in shapes) and any(a[0] == 4 * f0 for a, _ in shapes), shapes
    x = np.asarray(u, np.float64) * np.asarray(pre, np.float64)
    ref = (fft_ref(x, k) + x * np.asarray(bias, np.float64)) * np.asarray(post, np.float64)
    y = np.transpose(np.asarray(y), (1, 2, 0)) if layout == "hbl" else np.asarray(y)
    assert rel_l2(y, ref) < FP32_TOL


def test_stacked_overlap_save_kernel_matches_direct():
    """`tuning(fused_stack=4)` on the partial conv: the overlap-save kernel transforms 4 channels per dot
    (first-stage dots 4·f1 wide, for the chunk and its predecessor) and still computes the gated conv."""
    seqlen, ksize = 2048, 200
    u, k, bias, pre, post = make_inputs(1, seqlen, 8, ksize, seed=24)

    def conv(u, k, bias, pre, post):
        return fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl="pallas")

    f0, f1 = monarch.plan_factors(2 * overlap_save_chunk(seqlen, ksize))
    jax.clear_caches()
    with pallas.tuning(fused_stack=4):
        assert _pallas_calls(conv, u, k, bias, pre, post) == ["fftconv_partial"]
        shapes = _kernel_dot_shapes(conv, u, k, bias, pre, post)
        y = conv(u, k, bias, pre, post)
    jax.clear_caches()
    assert sum(a == (f0, f0 // 2) and b == (f0 // 2, 4 * f1) for a, b in shapes) == 4, shapes  # 2 halves × (re, im)
    assert rel_l2(y, direct_causal_conv_np(u, k, bias, pre, post)) < FP32_TOL


@pytest.mark.parametrize("layout", ["hbl", pytest.param("blh", marks=pytest.mark.slow)])
def test_three_level_fused_kernel_matches_direct(layout):
    """`tuning(fused3_max_fft=8192)`: a dense 3-stage plan (L 3000 → N 8192) runs as ONE fused kernel, all
    three levels inside (no XLA outer stage: no fftconv_inner in the jaxpr), matches the direct conv, and
    its gradient is one fused backward kernel with the default path's values; a sparse plan keeps the
    inner kernels."""
    u, k, bias, pre, post = make_inputs(2, 3000, 2, 3000, seed=19)
    to = _hbl if layout == "hbl" else (lambda a: a)
    args = (to(u), k, bias, to(pre), to(post))

    def conv(u, k, bias, pre, post, mask=None):
        return fftconv(u, k, bias, pre_gate=pre, post_gate=post, freq_mask=mask, impl="pallas", layout=layout)

    def grads():
        return jax.grad(lambda *a: jnp.sum(conv(*a) ** 2), argnums=(0, 1, 2, 3, 4))(*args)

    jax.clear_caches()
    reference_grads = grads()
    with pallas.tuning(fused3_max_fft=8192):
        jax.clear_caches()
        assert _pallas_calls(conv, *args) == ["fftconv_fused"]
        grad_fn = jax.grad(lambda *a: jnp.sum(conv(*a) ** 2), argnums=(0, 1, 2, 3, 4))
        assert _pallas_calls(grad_fn, *args) == ["fftconv_fused", "fftconv_fused_bwd"]
        mask = monarch.lowpass_mask(3000, 3000, 0.5)
        assert _pallas_calls(functools.partial(conv, mask=mask), *args) == ["fftconv_inner"]
        y = conv(*args)
        got_grads = grads()
    jax.clear_caches()
    x = np.asarray(u, np.float64) * np.asarray(pre, np.float64)
    ref = (fft_ref(x, k) + x * np.asarray(bias, np.float64)) * np.asarray(post, np.float64)
    y = np.transpose(np.asarray(y), (1, 2, 0)) if layout == "hbl" else np.asarray(y)
    assert rel_l2(y, ref) < FP32_TOL
    for g, r in zip(got_grads, reference_grads):  # the cotangent 2y differs by rounding between the paths
        assert rel_l2(g, np.asarray(r, np.float64)) < 1e-5


# --- layout "hbl" (channels first) ------------------------------------------------------------------------


def _hbl(a):
    return None if a is None else jnp.transpose(a, (2, 0, 1))  # (B, L, H) -> (H, B, L)


@pytest.mark.parametrize("impl,seqlen,ksize", [("xla", 300, 300), ("xla-matmul", 300, 300), ("pallas", 300, 300),
                                               ("pallas", 1000, 37),  # fused, chunked, then 3-stage (transposes)
                                               pytest.param("pallas", 5000, 2000, marks=pytest.mark.slow)])
def test_hbl_layout_matches_direct_and_blh_grads(impl, seqlen, ksize):
    u, k, bias, pre, post = make_inputs(2, seqlen, 3, ksize, seed=16)
    y = fftconv(_hbl(u), k, bias, pre_gate=_hbl(pre), post_gate=_hbl(post), impl=impl, layout="hbl")
    assert y.shape == (3, 2, seqlen)
    ref = direct_causal_conv_np(u, k, bias, pre, post)
    assert rel_l2(jnp.transpose(y, (1, 2, 0)), ref) < FP32_TOL
    w = make_inputs(2, seqlen, 3, ksize, seed=17)[0]

    def grads(layout, to):
        def loss(u, k, bias, pre, post):
            out = fftconv(to(u), k, bias, pre_gate=to(pre), post_gate=to(post), impl=impl, layout=layout)
            return jnp.sum(to(w) * out)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(u, k, bias, pre, post)

    for name, g, r in zip(("u", "k", "bias", "pre", "post"), grads("hbl", _hbl), grads("blh", lambda a: a)):
        assert rel_l2(g, np.asarray(r, np.float64)) < 1e-6, name


def test_hbl_fused_kernels_need_no_transpose():
    """In the "hbl" layout the fused kernels read u and the gates and write y (and the gradients) as
    given: no transpose of a (B, L, H)-sized array anywhere in the forward or the backward."""
    batch, seqlen, channels = 4, 1024, 4  # B·L·H = 2·(H·N): larger than any filter-spectrum array
    u, k, bias, pre, post = (_hbl(a) if a.ndim == 3 else a for a in make_inputs(batch, seqlen, channels, seqlen))

    def loss(u, pre, post, layout):
        return jnp.sum(fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl="pallas", layout=layout) ** 2)

    def big_transposes(layout, *args):
        text = jax.make_jaxpr(jax.grad(functools.partial(loss, layout=layout), argnums=(0, 1, 2)))(*args)
        found = []

        def visit(jaxpr):
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "transpose" and eqn.invars[0].aval.size >= batch * seqlen * channels:
                    found.append(eqn.invars[0].aval.shape)
                for value in eqn.params.values():
                    inner = getattr(value, "jaxpr", value)
                    if hasattr(inner, "eqns"):
                        visit(inner)

        visit(text.jaxpr)
        return found

    assert _pallas_calls(jax.grad(functools.partial(loss, layout="hbl")), u, pre, post) == [
        "fftconv_fused", "fftconv_fused_bwd"]
    assert big_transposes("hbl", u, pre, post) == []
    blh = [jnp.transpose(a, (1, 2, 0)) for a in (u, pre, post)]
    assert len(big_transposes("blh", *blh)) >= 8  # u, pre, post, y; dy, du, dpre, dpost: the cost avoided


def test_layout_validation():
    u, k, *_ = make_inputs(1, 64, 3, 64)
    with pytest.raises(ValueError, match="unknown layout 'lbh'"):
        fftconv(u, k, layout="lbh")
    with pytest.raises(ValueError, match=r"k has 3 channels but u has 1 .*\(channels, batch, length\)"):
        fftconv(u, k, layout="hbl")  # a (B, L, H) array passed as (H, B, L)
