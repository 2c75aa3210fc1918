"""The public `fftconv` runs the implementation and plan it is asked for, read off its jaxpr.

Every implementation computes the same function, so value tests cannot tell them apart: these tests
look at the traced program of `kernels.fftconv.fftconv` itself (not of the internal entry points).
"xla" has `fft` primitives and no `pallas_call`; "xla-matmul" has neither, only DFT-matrix
`dot_general`s of the plan's factor sizes; "pallas" has a `pallas_call` and no `fft`. The partial mode
(K <= L/4) must run block-Toeplitz: the sequence reshaped to (B·chunks, C, H) and 2C-point plans.
"""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import pytest

from kernels.fftconv import FFTConvError, fftconv, monarch
from kernels.fftconv.conv import chunk_size, overlap_save_chunk
from kernels.fftconv.reference import direct_causal_conv_np

from test_fftconv import FP32_TOL, make_inputs, rel_l2


def equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its parameters (jit, custom_vjp, pallas)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def traced(u, k, **kwargs):
    return list(equations(jax.make_jaxpr(lambda u, k: fftconv(u, k, **kwargs))(u, k).jaxpr))


def dft_sizes(eqns) -> set[int]:
    """Largest side of every 2-D operand of the matmuls and of the Pallas kernel: the DFT-matrix
    (and twiddle) sizes f_j of the plans that ran (stage 0 reads only rows_in <= f_0 rows)."""
    return {max(var.aval.shape) for eqn in eqns if eqn.primitive.name in ("dot_general", "pallas_call")
            for var in eqn.invars if len(getattr(var.aval, "shape", ())) == 2}


@pytest.mark.parametrize("impl", ["xla", "xla-matmul", "pallas", "auto"])
def test_public_op_runs_the_requested_impl(impl):
    u, k = make_inputs(1, 1024, 2, 1024)[:2]
    eqns = traced(u, k, impl=impl)
    names = Counter(eqn.primitive.name for eqn in eqns)
    ran = "pallas" if names["pallas_call"] else "xla" if names["fft"] else "xla-matmul"
    assert ran == ("xla" if impl == "auto" else impl), names  # auto = xla on CPU
    if ran != "xla":  # the 2048-point plan of L + K - 1 = 2047: 32 x 64 DFT matrices
        assert dft_sizes(eqns) == set(monarch.plan_factors(2048)) == {32, 64}


@pytest.mark.parametrize("impl", ["xla-matmul", "pallas"])
def test_partial_filter_runs_block_toeplitz_on_the_public_op(impl):
    """K = 100 <= L/4: chunks, not the dense 4096-point plan (64 x 64). xla-matmul: C = 128 with 256-point
    (16 x 16) plans, overlap-added; pallas: the overlap-save kernel over C = 512 (1024-point, 32 x 32
    plans; its grid walks the L / C chunks). The result is the K-tap causal conv (float64 direct reference)."""
    batch, seqlen, ksize = 2, 2048, 100
    u, k, bias, pre, post = make_inputs(batch, seqlen, 2, ksize, seed=3)
    eqns = traced(u, k, impl=impl)
    if impl == "pallas":
        c = overlap_save_chunk(seqlen, ksize)
        (call,) = [eqn for eqn in eqns if eqn.primitive.name == "pallas_call"]
        assert c == 512 and tuple(call.params["grid_mapping"].grid)[-1] == seqlen // c
    else:
        c = chunk_size(seqlen, ksize)
        reshapes = {tuple(eqn.outvars[0].aval.shape) for eqn in eqns if eqn.primitive.name == "reshape"}
        assert c == 128 and (batch * seqlen // c, c, 2) in reshapes
    assert dft_sizes(eqns) == set(monarch.plan_factors(2 * c))
    y = fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl=impl)
    assert rel_l2(y, direct_causal_conv_np(u, k, bias, pre, post)) < FP32_TOL


def test_auto_impl_scope_sets_what_auto_runs_in_a_model():
    """Inside `auto_impl("pallas")` a Hyena mixer (which calls fftconv with impl="auto") traces a
    `pallas_call`; outside it, auto is jnp.fft on CPU for this batch of 1; the scope nests and an unknown
    impl is an error."""
    from flax import nnx

    from kernels.fftconv import auto_impl
    from lm.config import from_dict
    from lm.model import LM, ModelConfig

    model = LM(from_dict(ModelConfig, {"vocab_size": 11, "d_model": 8, "n_layers": 1, "max_len": 32,
                                       "mixer": {"name": "hyena"}}), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((1, 32), jnp.int32)

    def primitives():
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state))

    outside = primitives()
    assert "pallas_call" not in outside and "fft[" in outside
    with auto_impl("pallas"):
        assert "pallas_call" in primitives()
        with auto_impl("xla"):
            assert "pallas_call" not in primitives() and "fft[" in primitives()
        assert "pallas_call" in primitives()
    assert "pallas_call" not in primitives()
    with pytest.raises(FFTConvError, match="unknown impl 'cuda'"):
        with auto_impl("cuda"):
            pass
