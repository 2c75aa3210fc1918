"""The factorised implementations ("xla-matmul", "pallas" in interpret mode) against float64 references.

Data are unit-scale with long non-decaying filters, so an all-zero or short-range output fails.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.fftconv import fftconv, monarch
from kernels.fftconv.conv import chunk_size
from kernels.fftconv.reference import direct_causal_conv, direct_causal_conv_np

from test_fftconv import BF16_TOL, FP32_TOL, make_inputs, rel_l2

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
    rows_only = np.zeros((f0, 1), bool)
    rows_only[::4] = True
    return {
        "lowpass": monarch.lowpass_mask(seqlen, ksize, 0.25),
        "random": random_blocks,
        "rows": rows_only,
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
    plan = monarch.make_plan(seqlen, seqlen, seqlen, masks["rows"])
    assert len(plan.keep_rows) == plan.factors[0] // 4 and plan.mask is None
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
def test_grads_without_optional_args_and_bf16(impl):
    u, k, *_ = make_inputs(2, 700, 3, 700, seed=9, dtype=jnp.bfloat16)
    w = make_inputs(2, 700, 3, 700, seed=10)[0]
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
