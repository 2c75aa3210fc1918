"""impl="direct" (the Toeplitz matmul, kernels/fftconv/toeplitz.py) against float64 references, and `auto`
choosing it for short sequences on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.fftconv import FFTConvError, default_impl, fftconv
from kernels.fftconv import toeplitz
from kernels.fftconv.reference import direct_causal_conv, direct_causal_conv_np

from test_fftconv import BF16_TOL, FP32_TOL, make_inputs, rel_l2
from jaxpr_walk import equations


def _hbl(a):
    return None if a is None else jnp.transpose(a, (2, 0, 1))  # (B, L, H) -> (H, B, L)


def test_toeplitz_matrix_is_the_shifted_filter():
    k = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    t = np.asarray(toeplitz.toeplitz(jnp.asarray(k), 9))
    want = np.zeros((3, 9, 9), np.float32)
    for s in range(9):
        for j in range(5):
            if s + j < 9:
                want[:, s, s + j] = k[j]
    np.testing.assert_array_equal(t, want)


@pytest.mark.parametrize("layout", ["blh", "hbl"])
@pytest.mark.parametrize("seqlen,ksize", [(1, 1), (7, 3), (64, 64), (100, 37), (300, 300)])
def test_direct_matches_float64(seqlen, ksize, layout):
    u, k, bias, pre, post = make_inputs(2, seqlen, 3, ksize, seed=1)
    to = _hbl if layout == "hbl" else (lambda a: a)
    y = fftconv(to(u), k, bias, pre_gate=to(pre), post_gate=to(post), impl="direct", layout=layout)
    assert y.dtype == jnp.float32 and y.shape == to(u).shape
    y = jnp.transpose(y, (1, 2, 0)) if layout == "hbl" else y
    assert rel_l2(y, direct_causal_conv_np(u, k, bias, pre, post)) < FP32_TOL
    assert rel_l2(fftconv(u, k, impl="direct"), direct_causal_conv_np(u, k)) < FP32_TOL  # no bias, no gates


def test_direct_bf16_keeps_the_dtype():
    u, k, bias, pre, post = make_inputs(2, 128, 3, 128, dtype=jnp.bfloat16)
    y = fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl="direct")
    assert y.dtype == jnp.bfloat16
    ref = direct_causal_conv_np(*(np.asarray(a.astype(jnp.float32)) for a in (u, k, bias, pre, post)))
    assert rel_l2(y, ref) < BF16_TOL


@pytest.mark.parametrize("layout", ["blh", "hbl"])
@pytest.mark.parametrize("seqlen,ksize", [(64, 64), (100, 37)])
def test_direct_grads_match_lax_conv(seqlen, ksize, layout):
    u, k, bias, pre, post = make_inputs(2, seqlen, 3, ksize, seed=2)
    w = make_inputs(2, seqlen, 3, ksize, seed=3)[0]
    to = _hbl if layout == "hbl" else (lambda a: a)

    def loss_direct(u, k, bias, pre, post):
        y = fftconv(to(u), k, bias, pre_gate=to(pre), post_gate=to(post), impl="direct", layout=layout)
        return jnp.sum(to(w) * y)

    def loss_ref(u, k, bias, pre, post):
        return jnp.sum(w * direct_causal_conv(u, k, bias, pre, post))

    got = jax.grad(loss_direct, argnums=(0, 1, 2, 3, 4))(u, k, bias, pre, post)
    ref = jax.grad(loss_ref, argnums=(0, 1, 2, 3, 4))(u, k, bias, pre, post)
    for name, g, r in zip(("u", "k", "bias", "pre", "post"), got, ref):
        assert g.shape == r.shape
        assert rel_l2(g, np.asarray(r, np.float64)) < 1e-5, name


def test_direct_rejects_masks_and_huge_matrices():
    u, k, *_ = make_inputs(1, 256, 2, 256)
    with pytest.raises(FFTConvError, match="freq_mask needs an FFT impl"):
        fftconv(u, k, freq_mask=np.ones((1, 2), bool), impl="direct")
    big = jax.ShapeDtypeStruct((1, 16384, 2), jnp.float32)  # (2, 16384, 16384) fp32 = 2 GiB
    with pytest.raises(FFTConvError, match=r"\(2, 16384, 16384\).*2.0 GiB"):
        jax.eval_shape(lambda u: fftconv(u, jnp.ones((4, 2)), impl="direct"), big)


def test_auto_takes_direct_for_short_sequences_in_large_batches_on_cpu():
    lmax, per_len = toeplitz.AUTO_MAX_LEN, toeplitz.AUTO_MIN_BATCH_PER_LEN
    assert default_impl(lmax, "cpu", batch=per_len * lmax) == "direct"
    assert default_impl(lmax + 1, "cpu", batch=per_len * (lmax + 1)) == "xla"
    assert default_impl(lmax, "cpu", batch=per_len * lmax - 1) == "xla"  # the matrix would cost more than the batch
    assert default_impl(64, "cpu", batch=512, freq_mask=np.ones((1, 2), bool)) == "xla"
    assert default_impl(64, "gpu", batch=512) == "xla" and default_impl(64, "tpu", batch=512) == "xla"  # not measured
    too_wide = toeplitz.MAX_MATRIX_BYTES // toeplitz.matrix_bytes(lmax, 1) + 1  # channels whose matrix is refused
    assert default_impl(lmax, "cpu", batch=per_len * lmax, channels=too_wide - 1) == "direct"
    assert default_impl(lmax, "cpu", batch=per_len * lmax, channels=too_wide) == "xla"
    wide = (jax.ShapeDtypeStruct((per_len * lmax, lmax, too_wide), jnp.float32),
            jax.ShapeDtypeStruct((lmax, too_wide), jnp.float32))
    jax.eval_shape(lambda u, k: fftconv(u, k), *wide)  # auto passes the channel count: no refused matrix
    if jax.default_backend() != "cpu":
        return
    seqlen = 16
    u, k, bias, pre, post = make_inputs(per_len * seqlen, seqlen, 3, seqlen, seed=4)

    def kinds(*args):
        return [eqn for eqn, _ in equations(lambda *a: fftconv(*a[:3], pre_gate=a[3], post_gate=a[4]), *args)]

    eqns = kinds(u, k, bias, pre, post)
    assert "fft" not in {eqn.primitive.name for eqn in eqns}  # the Toeplitz matmul ran, not jnp.fft
    dots = [eqn for eqn in eqns if eqn.primitive.name == "dot_general"]
    assert [eqn.invars[1].aval.shape for eqn in dots] == [(3, seqlen, seqlen)]  # (H, L, L)
    assert "HIGHEST" in str(dots[0].params["precision"])  # fp32 on every backend (GPU/TPU default is lower)
    assert rel_l2(fftconv(u, k, bias, pre_gate=pre, post_gate=post), direct_causal_conv_np(u, k, bias, pre, post)) < FP32_TOL
    small = [a[:per_len * seqlen - 1] if a.ndim == 3 else a for a in (u, k, bias, pre, post)]
    assert "fft" in {eqn.primitive.name for eqn in kinds(*small)}  # one row fewer: jnp.fft
