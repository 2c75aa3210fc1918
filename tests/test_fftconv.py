"""The public `fftconv` op: the XLA (jnp.fft) path against float64 direct convolution, and validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.fftconv import FFTConvError, fftconv, validate
from kernels.fftconv import api
from kernels.fftconv.api import default_impl
from kernels.fftconv.reference import direct_causal_conv_np, next_power_of_two

FP32_TOL = 2e-6
BF16_TOL = 1e-2


def rel_l2(y, ref) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def make_inputs(batch, seqlen, channels, ksize, seed=0, dtype=jnp.float32):
    """Unit-scale u, a long NON-decaying filter, bias and gates (all O(1))."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((batch, seqlen, channels))
    k = rng.standard_normal((ksize, channels)) / np.sqrt(ksize)
    bias = rng.standard_normal(channels)
    pre = rng.standard_normal((batch, seqlen, channels))
    post = rng.standard_normal((batch, seqlen, channels))
    return tuple(jnp.asarray(a, dtype) for a in (u, k, bias, pre, post))


def test_next_power_of_two():
    assert [next_power_of_two(n) for n in (1, 2, 3, 255, 256, 257)] == [1, 2, 4, 256, 256, 512]


@pytest.mark.parametrize("seqlen,ksize", [(256, 256), (1000, 1000), (777, 500), (4097, 64), (8192, 8192)])
@pytest.mark.parametrize("gated", [False, True])
def test_xla_fp32_matches_direct(seqlen, ksize, gated):
    u, k, bias, pre, post = make_inputs(2, seqlen, 3, ksize)
    kw = dict(pre_gate=pre, post_gate=post) if gated else {}
    y = fftconv(u, k, bias if gated else None, impl="xla", **kw)
    ref = direct_causal_conv_np(u, k, bias if gated else None, *( (pre, post) if gated else (None, None)))
    assert y.dtype == jnp.float32 and y.shape == u.shape
    assert rel_l2(y, ref) < FP32_TOL


@pytest.mark.parametrize("seqlen,ksize", [(512, 512), (999, 100)])
def test_xla_bf16_inputs(seqlen, ksize):
    u, k, bias, pre, post = make_inputs(2, seqlen, 4, ksize, dtype=jnp.bfloat16)
    y = fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl="xla")
    assert y.dtype == jnp.bfloat16
    ref = direct_causal_conv_np(*(np.asarray(a.astype(jnp.float32)) for a in (u, k, bias, pre, post)))
    assert rel_l2(y, ref) < BF16_TOL


def test_fp16_inputs_and_mixed_filter_dtype():
    u, _, _, _, _ = make_inputs(1, 300, 2, 300, dtype=jnp.float16)
    k = make_inputs(1, 300, 2, 300)[1]  # fp32 filter with fp16 activations
    y = fftconv(u, k)
    assert y.dtype == jnp.float16
    assert rel_l2(y, direct_causal_conv_np(np.float32(u), k)) < 5e-3


def test_auto_is_xla_on_cpu_and_rule_on_gpu(monkeypatch):
    assert default_impl(4096, "cpu") == "xla"
    assert default_impl(4096, "tpu") == "xla"
    assert default_impl(2048, "gpu") == "xla"  # Pallas on GPU is opt-in until measured there
    monkeypatch.setattr(api, "PALLAS_AUTO_MAX_FFT", 4096)
    assert default_impl(2048, "gpu") == "pallas"  # N = 4096: fused kernel
    assert default_impl(2048, "gpu", ksize=1) == "pallas"
    assert default_impl(8192, "gpu") == "xla"
    if jax.default_backend() == "cpu":
        u, k, *_ = make_inputs(1, 256, 2, 256)
        np.testing.assert_array_equal(np.asarray(fftconv(u, k)), np.asarray(fftconv(u, k, impl="xla")))


def test_jit_and_grad_through_public_op():
    u, k, bias, pre, post = make_inputs(1, 256, 2, 256)
    f = jax.jit(lambda u, k: jnp.sum(fftconv(u, k, bias, pre_gate=pre, post_gate=post) ** 2))
    gu, gk = jax.grad(f, argnums=(0, 1))(u, k)
    assert gu.shape == u.shape and gk.shape == k.shape and bool(jnp.all(jnp.isfinite(gu)))


# --- validation: one case per message in api.validate / fftconv --------------------------------------

U = jnp.zeros((2, 16, 3), jnp.float32)
K = jnp.zeros((16, 3), jnp.float32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(u=[[[1.0]]]), "u must be a jax or numpy array, got list"),
        (dict(k=((1.0,),)), "k must be a jax or numpy array, got tuple"),
        (dict(bias=[0.0, 0.0, 0.0]), "bias must be a jax or numpy array, got list"),
        (dict(u=jnp.zeros((16, 3))), "u must have shape"),
        (dict(k=jnp.zeros((16,))), "k must have shape"),
        (dict(u=jnp.zeros((2, 0, 3)), k=jnp.zeros((0, 3))), "empty dimension"),
        (dict(k=jnp.zeros((16, 4))), "k has 4 channels but u has 3"),
        (dict(u=jnp.zeros((2, 16, 3)), k=jnp.zeros((0, 3))), "filter length 0"),
        (dict(k=jnp.zeros((17, 3))), "exceeds sequence length"),
        (dict(u=jnp.zeros((2, 16, 3), jnp.int32)), "u has dtype int32"),
        (dict(k=jnp.zeros((16, 3), jnp.int32)), "k has dtype int32"),
        (dict(bias=jnp.zeros((3,), jnp.int32)), "bias has dtype"),
        (dict(bias=jnp.zeros((4,))), r"bias must have shape \(3,\)"),
        (dict(pre_gate=jnp.zeros((2, 16, 4))), "pre_gate must have u's shape"),
        (dict(post_gate=jnp.zeros((2, 16, 3), jnp.int8)), "post_gate has dtype"),
        (dict(impl="cuda"), "unknown impl 'cuda'"),
        (dict(freq_mask=np.ones((3, 1), bool)), "does not tile the plan's frequency grid"),
        (dict(freq_mask=np.zeros((1, 2), bool)), "keeps no frequency block"),
        (dict(freq_mask=np.ones((1, 2), np.float32)), "boolean block mask"),
        (dict(freq_mask=np.ones((2,), bool)), "2-D boolean block mask"),
    ],
)
def test_validation_messages(kwargs, match):
    args = dict(u=U, k=K, bias=None, pre_gate=None, post_gate=None, impl="xla", freq_mask=None)
    args.update(kwargs)
    u, k, bias = args.pop("u"), args.pop("k"), args.pop("bias")
    with pytest.raises(FFTConvError, match=match):
        fftconv(u, k, bias, **args)


def test_validation_traced_mask_and_oversized_fft():
    with pytest.raises(FFTConvError, match="concrete"):
        jax.jit(lambda m: fftconv(U, K, freq_mask=m))(jnp.ones((1, 2), bool))
    big = jax.ShapeDtypeStruct((1, 1 << 24, 1), jnp.float32)
    with pytest.raises(FFTConvError, match="needs an FFT larger"):
        validate(big, jax.ShapeDtypeStruct((1 << 24, 1), jnp.float32))


@pytest.mark.parametrize("impl", ["xla", "xla-matmul"])
def test_non_finite_input_poisons_the_whole_channel(impl):
    """The documented behaviour: a NaN at t makes every output of its channel NaN, before t too."""
    u, k, bias, pre, post = make_inputs(1, 256, 2, 256)
    y = np.asarray(fftconv(u.at[0, 200, 0].set(jnp.nan), k, impl=impl))
    assert np.isnan(y[0, :, 0]).all() and np.isfinite(y[0, :, 1]).all()


NAN_CASES = ["u", "k", "bias", "pre_gate", "post_gate"]


def _with_nan(name):
    u, k, bias, pre, post = make_inputs(1, 64, 2, 64)
    args = dict(u=u, k=k, bias=bias, pre_gate=pre, post_gate=post)
    args[name] = args[name].at[(0,) * args[name].ndim].set(jnp.inf if name == "k" else jnp.nan)
    return args


@pytest.mark.parametrize("name", NAN_CASES)
def test_check_finite_names_the_argument(name):
    args = _with_nan(name)
    call = lambda **kw: fftconv(args["u"], args["k"], args["bias"], pre_gate=args["pre_gate"],
                                post_gate=args["post_gate"], impl="xla", **kw)
    assert not np.isfinite(np.asarray(call())).all()  # off by default: no error, non-finite output
    with pytest.raises(FFTConvError, match=f"fftconv: {name} holds a non-finite value"):
        call(check_finite=True)


def test_check_finite_raises_inside_jit_and_passes_finite_input():
    u, k, bias, pre, post = make_inputs(1, 64, 2, 64)
    f = jax.jit(lambda u, pre: fftconv(u, k, bias, pre_gate=pre, post_gate=post, check_finite=True))
    assert rel_l2(f(u, pre), direct_causal_conv_np(u, k, bias, pre, post)) < FP32_TOL
    with pytest.raises(Exception, match="fftconv: pre_gate holds a non-finite value"):
        jax.block_until_ready(f(u, pre.at[0, 3, 1].set(jnp.nan)))


def test_fftconv_error_is_value_error():
    assert issubclass(FFTConvError, ValueError)
