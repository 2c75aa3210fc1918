"""The Pallas kernels lower for real accelerators, checked on CPU by cross-platform export.

`jax.export` lowers (without compiling or running) for a platform this machine does not have: for
"cuda" the kernels go through Pallas' Triton lowering, for "tpu" through Mosaic. This catches
illegal block shapes and unsupported ops in kernel bodies; it does not check Triton/Mosaic compilation
limits (registers, shared memory), which need the device.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import triton as pltriton

from jaxpr_walk import equations
from kernels.fftconv import conv, monarch, pallas

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


# Every plan shape `impl="auto"` may pick (the tuned table can name pallas at any FFT size): the fused
# 2-stage kernel, the inner kernel after 1 or 2 outer XLA stages, the partial conv as the overlap-save
# kernel (L >= 4·512) and as overlap-added chunks (shorter L), and frequency-sparse plans (a low-pass band,
# and a comb that drops 3 of 4 outer groups: an inner grid of 4 rows); bf16 inputs at
# their default precision, then each other precision on the fused and 3-stage plans (the 4-stage plan and
# the full matrix are in -m slow).
PLANS = {"fused": (256, 256, None), "inner-3stage": (4096, 4096, None), "partial": (4096, 256, None),
         "partial-overlap-add": (1000, 60, None), "freq-sparse": (4096, 4096, "lowpass"),
         "freq-sparse-comb": (4096, 4096, "comb"),
         "inner-4stage": (1 << 18, 1 << 18, None)}
OTHER_PRECISIONS = ["fp32", "bf16x3", "tf32", "fp16"]


def _export_grad(platform, plan_name, precision, monkeypatch):
    jax.clear_caches()
    if platform == "cuda":
        monkeypatch.setattr(pallas, "_compiler_params", functools.partial(pallas._compiler_params, "gpu"))
    seqlen, ksize, mask_name = PLANS[plan_name]
    mask = None if mask_name is None else getattr(monarch, f"{mask_name}_mask")(seqlen, ksize, 0.25)

    def loss_at(u, k):
        y = conv.fftconv_matmul(u, k, None, u, u, freq_mask=mask, impl="pallas", interpret=False, precision=precision)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    u = jax.ShapeDtypeStruct((2, seqlen, 32), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((ksize, 32), jnp.float32)
    exported = export.export(jax.jit(jax.grad(loss_at, argnums=(0, 1))), platforms=[platform],
                             disabled_checks=UNCHECKED_CALLS)(u, k)
    assert ("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in exported.mlir_module()


def _cases(plans, precisions, slow=False):
    return [pytest.param(platform, plan, p, marks=[pytest.mark.slow] if slow else [])
            for platform in ("cuda", "tpu") for plan in plans for p in precisions
            if not (platform == "tpu" and p == "tf32")]  # tf32 is rejected on TPU (precision.GPU_ONLY)


@pytest.mark.parametrize("platform,plan_name,precision",
                         _cases(["fused", "inner-3stage", "partial", "partial-overlap-add", "freq-sparse",
                                 "freq-sparse-comb"], ["bf16"])
                         + _cases(["fused", "inner-3stage"], OTHER_PRECISIONS)
                         + _cases(["inner-4stage"], ["bf16", *OTHER_PRECISIONS], slow=True)
                         + _cases(["partial", "freq-sparse"], OTHER_PRECISIONS, slow=True))
def test_every_auto_plan_and_precision_lowers(platform, plan_name, precision, monkeypatch):
    _export_grad(platform, plan_name, precision, monkeypatch)


def _kernel_dot_shapes(fn, *args) -> list[tuple[tuple, tuple]]:
    """(lhs shape, rhs shape) of every dot_general inside a pallas_call in fn's jaxpr."""
    return [tuple(v.aval.shape for v in eqn.invars) for eqn, inside in equations(fn, *args)
            if inside and eqn.primitive.name == "dot_general"]


@pytest.mark.parametrize("seqlen,ksize,mask_name", [
    (256, 256, None), (256, 256, "lowpass"), (1000, 60, None), (4096, 256, None), (4096, 4096, "lowpass"),
    (5000, 5000, "comb"),
    (16384, 16384, "lowpass"), (16384, 16384, None)])
def test_kernel_dots_fit_the_tensor_core_tile(seqlen, ksize, mask_name):
    """Every in-kernel dot is at least 16 in M, N and K (Triton's tl.dot minimum; an 8-wide bf16 dot of a
    25 % frequency-sparse plan compiled, ran and returned garbage on an H200 (rel. error 0.31 at L 16K), so
    sparse plans round their kept digits out to 16), forward and backward."""
    mask = {None: None, "lowpass": monarch.lowpass_mask(seqlen, ksize, 0.25),
            "comb": monarch.comb_mask(seqlen, ksize, 0.25)}[mask_name]

    def loss(u, k):
        y = conv.fftconv_matmul(u, k, None, u, u, freq_mask=mask, impl="pallas", precision="bf16")
        return jnp.sum(y.astype(jnp.float32))

    u = jax.ShapeDtypeStruct((2, seqlen, 4), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((ksize, 4), jnp.float32)
    shapes = _kernel_dot_shapes(jax.grad(loss, argnums=(0, 1)), u, k)
    assert shapes, "no pallas kernel dot found"
    small = sorted({s for s in shapes if min(*s[0][-2:], *s[1][-2:]) < monarch.MIN_DOT})
    assert not small, f"dots below {monarch.MIN_DOT}: {small}"


@pytest.mark.parametrize("seqlen,ksize,changes", [(1024, 1024, {"fused_stack": 4, "num_warps": 8}),
                                                   (4096, 4096, {"fused3_max_fft": 8192}),
                                                   (4096, 256, {"fused_stack": 4})])  # stacked overlap-save
def test_tuned_fused_kernels_lower_for_cuda(seqlen, ksize, changes, monkeypatch):
    """The stacked fused kernel (dense and overlap-save) and the 3-level fused kernel (3-D transposes and
    reshapes around the dots) lower through Triton."""
    jax.clear_caches()
    monkeypatch.setattr(pallas, "_compiler_params", functools.partial(pallas._compiler_params, "gpu"))
    u = jax.ShapeDtypeStruct((2, seqlen, 32), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((ksize, 32), jnp.float32)
    with pallas.tuning(**changes):
        exported = export.export(jax.jit(lambda u, k: conv.fftconv_matmul(u, k, None, u, u, impl="pallas",
                                                                          interpret=False)),
                                 platforms=["cuda"], disabled_checks=UNCHECKED_CALLS)(u, k)
    jax.clear_caches()
    assert "xla.gpu.triton" in exported.mlir_module()
