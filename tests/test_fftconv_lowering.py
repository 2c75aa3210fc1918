"""The Pallas kernels lower for real accelerators, checked on CPU by cross-platform export.

`jax.export` lowers (without compiling or running) for a platform this machine does not have: for
"cuda" the kernels go through Pallas' Triton lowering, for "tpu" through Mosaic. This catches
illegal block shapes and unsupported ops in kernel bodies; it does not check Triton/Mosaic compilation
limits (registers, shared memory), which need the device.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.experimental.pallas import triton as pltriton

from kernels.fftconv import conv, pallas

UNCHECKED_CALLS = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
                   export.DisabledSafetyCheck.custom_call("tpu_custom_call")]


def loss(u, k):
    y = conv.fftconv_matmul(u, k, None, u, u, impl="pallas", interpret=False)
    return jnp.sum(y * y)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("seqlen", [256, 4096])  # fused 2-stage kernel; 3-stage inner kernel
def test_pallas_forward_and_backward_lower(platform, seqlen, monkeypatch):
    jax.clear_caches()  # the jitted op caches its trace, compiler params included
    if platform == "cuda":
        monkeypatch.setattr(pallas, "_compiler_params", functools.partial(pallas._compiler_params, "gpu"))
    u = jax.ShapeDtypeStruct((2, seqlen, 32), jnp.float32)
    k = jax.ShapeDtypeStruct((seqlen, 32), jnp.float32)
    exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=[platform],
                             disabled_checks=UNCHECKED_CALLS)(u, k)
    text = exported.mlir_module()
    assert ("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text


def test_gpu_uses_triton_compiler_params():
    assert isinstance(pallas._compiler_params("gpu"), pltriton.CompilerParams)
    assert pallas._compiler_params("tpu") is None
