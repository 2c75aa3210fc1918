"""impl="mosaic" (the Hopper wgmma kernels, kernels/fftconv/mosaic.py): Mosaic GPU interpret mode on CPU against
a float64 direct conv and its gradients, the errors, and that forward and backward kernels lower for cuda."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxpr_walk import equations
from kernels.fftconv import FFTConvError, fftconv, mosaic
from kernels.fftconv.gpu_check import OUTPUT_ROUNDING
from kernels.fftconv.precision import ERROR_BOUNDS
from kernels.fftconv.reference import direct_causal_conv_np

from test_fftconv import make_inputs, rel_l2

pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params",
                    reason="this JAX has no Mosaic GPU interpret mode (a private module in jax 0.10)")


def _hbl(a):
    return None if a is None else jnp.transpose(a, (2, 0, 1))  # (B, L, H) -> (H, B, L)


def _against_float64(seqlen, ksize, dtype, precision, gated, layout, seqs, batch, channels):
    """(y as (B, L, H), the float64 direct conv of the same rounded inputs, the error bound)."""
    u, k, bias, pre, post = make_inputs(batch, seqlen, channels, ksize, seed=seqlen + ksize)
    if not gated:
        pre = post = None
    to = _hbl if layout == "hbl" else (lambda a: a)
    cast = (lambda a: None if a is None else to(a).astype(dtype))
    y = mosaic.fftconv_mosaic(cast(u), k, bias, cast(pre), cast(post), precision=precision, layout=layout,
                              tuning=mosaic.Tuning(seqs_per_program=seqs))
    assert y.dtype == dtype and y.shape == to(u).shape
    y = jnp.transpose(y, (1, 2, 0)) if layout == "hbl" else y
    ref = direct_causal_conv_np(*(None if a is None else np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))
                                  for a in (u, k, bias, pre, post)))
    return y, ref, ERROR_BOUNDS[precision] + OUTPUT_ROUNDING[jnp.dtype(dtype).name]


@pytest.mark.parametrize("seqlen,ksize,dtype,precision,gated,layout,seqs", [
    (1000, 1000, jnp.bfloat16, "bf16", True, "blh", 2),   # L padded to 1024; two programs per channel
    (2048, 600, jnp.float16, "fp16", False, "hbl", 8),    # N = 4096; a partial filter too long for windows
    (300, 300, jnp.float32, "bf16", True, "hbl", 4),      # L padded to 512
    (512, 37, jnp.float32, "fp16", True, "blh", 1),       # one sequence per program
])
def test_mosaic_matches_float64(seqlen, ksize, dtype, precision, gated, layout, seqs):
    assert not mosaic.geometry(seqlen, ksize).window
    y, ref, bound = _against_float64(seqlen, ksize, dtype, precision, gated, layout, seqs, batch=4, channels=3)
    err = rel_l2(y, ref)
    assert err < bound
    if precision == "bf16":  # the interpreter's wgmma really rounds its operands to bf16, as the GPU does
        assert err > 1e-3


@pytest.mark.parametrize("seqlen,ksize,dtype,gated,layout,seqs", [
    (2048, 100, jnp.bfloat16, True, "blh", 2),   # C 512: 4 chunks, two sequences per program
    (3000, 300, jnp.float16, True, "hbl", 8),    # L not a multiple of C: padded to 6 chunks
    (8192, 1024, jnp.bfloat16, False, "hbl", 1),  # C 1024 (n2 32): 8 chunks, a filter as long as a chunk
    (4096, 513, jnp.float32, True, "blh", 4),    # K just over 512: C 1024
])
def test_mosaic_overlap_save_matches_float64(seqlen, ksize, dtype, gated, layout, seqs):
    geo = mosaic.geometry(seqlen, ksize)
    assert geo.window and geo.chunks == -(-seqlen // (32 * geo.n2)) and geo.chunks >= 4
    precision = "fp16" if dtype == jnp.float16 else "bf16"
    y, ref, bound = _against_float64(seqlen, ksize, dtype, precision, gated, layout, seqs, batch=2, channels=2)
    assert rel_l2(y, ref) < bound
    head = 32 * geo.n2  # the first chunk alone: its window's masked half must not leak in
    assert rel_l2(y[:, :head], ref[:, :head]) < bound


def test_overlap_save_runs_windows_of_two_chunks():
    u, k, bias, pre, post = make_inputs(2, 2048, 2, 100, dtype=jnp.bfloat16)
    eqns = [eqn for eqn, _ in equations(lambda *a: fftconv(*a[:3], pre_gate=a[3], post_gate=a[4], impl="mosaic"),
                                        u, k, bias, pre, post)]
    (kernel,) = [eqn for eqn in eqns if eqn.primitive.name == "mpmd_map"]
    shapes = [tuple(v.aval.shape) for v in kernel.invars]
    # u, pre, post as 16 rows (2 sequences × 2 channels × 4 chunks) of one 512-sample chunk each; N = 1024
    assert shapes[:3] == [(16, 32, 16)] * 3
    assert (128, 64) in shapes  # the first DFT stage reads the whole 2-chunk window (64 rows), Re; Im
    assert (64, 16) in shapes[-1:]  # and the window's second-half mask comes last
    assert rel_l2(fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl="mosaic"),
                  direct_causal_conv_np(*(np.asarray(a.astype(jnp.float32)) for a in (u, k, bias, pre, post)))) < 1e-2
    assert mosaic.geometry(2048, 100) == mosaic.Geometry(n2=16, chunks=4, padded=2048)
    assert mosaic.geometry(2048, 600) == mosaic.Geometry(n2=64, chunks=1, padded=2048)  # 4C > L: dense


def test_public_op_runs_the_wgmma_kernel():
    u, k, bias, pre, post = make_inputs(2, 512, 3, 512, dtype=jnp.bfloat16)
    eqns = [eqn for eqn, _ in equations(lambda *a: fftconv(*a[:3], pre_gate=a[3], post_gate=a[4], impl="mosaic"),
                                        u, k, bias, pre, post)]
    names = [eqn.primitive.name for eqn in eqns]
    assert names.count("mpmd_map") == 1  # one kernel launch
    accumulators = sorted(tuple(eqn.invars[0].aval.shape) for eqn in eqns if eqn.primitive.name == "wgmma_ref")
    # first stage (Re; Im stacked) once, the two column stages 4 dots each, the last stage once; n2 = 16
    assert accumulators == [(64, 16)] * 9 + [(128, 16)]
    assert rel_l2(fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl="mosaic"),
                  direct_causal_conv_np(*(np.asarray(a.astype(jnp.float32)) for a in (u, k, bias, pre, post)))) < 1e-2


def _grads_float64(u, k, bias, pre, post, w):
    """Gradients of sum(w ⊙ y) w.r.t. (u, k, bias, pre, post) by direct shifted sums in float64 (B, L, H)."""
    u, k, bias, w = (np.asarray(a, np.float64) for a in (u, k, bias, w))
    pre = None if pre is None else np.asarray(pre, np.float64)
    post = None if post is None else np.asarray(post, np.float64)
    x = u * pre if pre is not None else u
    dz = w * post if post is not None else w
    dx = direct_causal_conv_np(dz[:, ::-1], k)[:, ::-1] + bias * dz        # correlation with k, + D skip
    seqlen = u.shape[1]
    dk = np.stack([np.einsum("blh,blh->h", dz[:, j:], x[:, :seqlen - j]) for j in range(k.shape[0])])
    return (dx * pre if pre is not None else dx, dk, np.einsum("blh,blh->h", dz, x),
            None if pre is None else dx * u, None if post is None else w * direct_causal_conv_np(x, k, bias))


@pytest.mark.parametrize("seqlen,ksize,dtype,gates,layout,batch,resident", [
    (256, 256, jnp.float32, "both", "blh", 4, None),
    (1000, 300, jnp.bfloat16, "both", "hbl", 10, None),  # two programs per channel: dk sums their spectra
    (512, 512, jnp.float32, "none", "blh", 4, False),    # twiddles and K̂ read from shared memory
    (700, 700, jnp.float16, "pre", "hbl", 4, True),
    # overlap-save windows (the backward reads [x_c; 0], [dz_c; dz_c+1] and, for dpost, [x_c-1; x_c])
    (2048, 100, jnp.bfloat16, "both", "blh", 2, None),   # C 512: 4 chunks
    (3000, 300, jnp.float16, "post", "hbl", 3, None),    # 6 chunks, the last one padded
    (4096, 1024, jnp.float32, "none", "blh", 2, None),   # C 1024, K = C
    (2048, 512, jnp.bfloat16, "pre", "hbl", 4, False),
])
def test_mosaic_gradients_match_float64(seqlen, ksize, dtype, gates, layout, batch, resident):
    u, k, bias, pre, post = make_inputs(batch, seqlen, 3, ksize, seed=5)
    w = make_inputs(batch, seqlen, 3, ksize, seed=6)[0]
    pre, post = (pre if gates in ("both", "pre") else None), (post if gates in ("both", "post") else None)
    assert mosaic.geometry(seqlen, ksize).window == (ksize <= seqlen // 4)
    rounded = [None if a is None else a.astype(dtype) for a in (u, pre, post)]
    to = _hbl if layout == "hbl" else (lambda a: a)
    precision = "fp16" if dtype == jnp.float16 else "bf16"

    def loss(u, k, bias, pre, post):
        y = mosaic.fftconv_mosaic(u, k, bias, pre, post, precision=precision, layout=layout,
                                  tuning=mosaic.Tuning(constants_in_registers=resident))
        return jnp.sum(y.astype(jnp.float32) * to(w))

    args = (to(rounded[0]), k, bias, to(rounded[1]), to(rounded[2]))
    present = tuple(i for i, a in enumerate(args) if a is not None)
    assert sum(eqn.primitive.name == "mpmd_map" for eqn, _ in equations(
        jax.grad(loss, argnums=present), *args)) == 2  # the forward kernel and the backward kernel
    got = dict(zip(present, jax.grad(loss, argnums=present)(*args)))
    f32 = [None if a is None else np.asarray(a.astype(jnp.float32)) for a in rounded]
    want = _grads_float64(f32[0], k, bias, f32[1], f32[2], w)
    bound = ERROR_BOUNDS[precision] + OUTPUT_ROUNDING[jnp.dtype(dtype).name]
    for i in present:
        g = got[i] if i in (1, 2) else to(got[i]) if layout == "blh" else jnp.transpose(got[i], (1, 2, 0))
        assert g.dtype == args[i].dtype
        assert rel_l2(g, want[i]) < bound, (i, rel_l2(g, want[i]))


def test_backward_falls_back_to_jnp_fft_where_its_kernel_does_not_fit():
    u, k, bias, pre, post = make_inputs(2, 2048, 2, 2048, seed=7, dtype=jnp.bfloat16)
    assert mosaic.unsupported(2048, "bf16", jnp.bfloat16, 2, "backward") is not None  # 280 KiB
    assert mosaic.unsupported(1024, "bf16", jnp.bfloat16, 2, "backward") is None

    def loss(impl, *args):
        return jnp.sum(fftconv(*args[:3], pre_gate=args[3], post_gate=args[4], impl=impl).astype(jnp.float32))

    args = (u, k, bias, pre, post)
    grad = jax.grad(lambda *a: loss("mosaic", *a), argnums=tuple(range(5)))
    assert sum(eqn.primitive.name == "mpmd_map" for eqn, _ in equations(grad, *args)) == 1  # forward only
    want = jax.grad(lambda *a: loss("xla", *a), argnums=tuple(range(5)))(*args)
    for g, r in zip(grad(*args), want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seqlen", [512, 1024, 2048])
@pytest.mark.parametrize("gated", [False, True])
def test_mosaic_kernels_lower_for_cuda(seqlen, gated):
    u = jax.ShapeDtypeStruct((4, 8, seqlen), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((seqlen, 4), jnp.float32)
    bias = jax.ShapeDtypeStruct((4,), jnp.float32)
    gate = u if gated else None

    tuning = mosaic.Tuning(constants_in_registers=False if seqlen == 1024 else None)  # both ways at 1K

    def loss(u, k, bias, pre, post):
        y = mosaic.fftconv_mosaic(u, k, bias, pre, post, precision="bf16", layout="hbl", interpret=False,
                                  tuning=tuning)
        return jnp.sum(y.astype(jnp.float32))

    args = (u, k, bias, gate, gate)
    grad = jax.grad(loss, argnums=tuple(i for i, a in enumerate(args) if a is not None))
    assert "mosaic_gpu" in export.export(jax.jit(loss), platforms=["cuda"])(*args).mlir_module()
    backward_kernel = mosaic.unsupported(seqlen, "bf16", jnp.bfloat16, 2 * gated, "backward") is None
    assert backward_kernel == (seqlen < 2048)  # L 2048: the backward falls back to jnp.fft (shared memory)
    assert ("mosaic_gpu" in export.export(jax.jit(grad), platforms=["cuda"])(*args).mlir_module()) == backward_kernel


@pytest.mark.parametrize("seqlen,ksize,gated", [(4096, 100, True), (8192, 1024, False), (8192, 1024, True)])
def test_overlap_save_kernel_lowers_for_cuda(seqlen, ksize, gated):
    u = jax.ShapeDtypeStruct((4, 8, seqlen), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((ksize, 4), jnp.float32)
    bias = jax.ShapeDtypeStruct((4,), jnp.float32)
    gate = u if gated else None

    def run(u, k, bias, pre, post):
        return mosaic.fftconv_mosaic(u, k, bias, pre, post, precision="bf16", layout="hbl", interpret=False)

    def loss(*args):
        return jnp.sum(run(*args).astype(jnp.float32))

    args = (u, k, bias, gate, gate)
    grad = jax.grad(loss, argnums=tuple(i for i, a in enumerate(args) if a is not None))
    assert mosaic.geometry(seqlen, ksize).window
    assert "mosaic_gpu" in export.export(jax.jit(run), platforms=["cuda"])(*args).mlir_module()
    assert mosaic.unsupported(seqlen, "bf16", jnp.bfloat16, 2 * gated, "backward", ksize) is None
    assert "mosaic_gpu" in export.export(jax.jit(grad), platforms=["cuda"])(*args).mlir_module()


def test_padded_length():
    assert [mosaic.padded_length(n) for n in (1, 512, 513, 1024, 1500, 2048)] == [512, 512, 1024, 1024, 2048, 2048]
    with pytest.raises(ValueError, match="L <= 2048"):
        mosaic.padded_length(2049)


@pytest.mark.parametrize("kwargs,message", [
    (dict(precision=None), "precision 'bf16' or 'fp16', not 'fp32' \\(the default for fp32 input\\)"),
    (dict(precision="bf16x3"), "not 'bf16x3'"),
    (dict(precision="bf16", freq_mask=np.ones((1, 1), bool)), "a freq_mask needs"),
])
def test_mosaic_rejects_what_it_cannot_compute(kwargs, message):
    u, k, *_ = make_inputs(1, 512, 2, 512)
    with pytest.raises(FFTConvError, match=message):
        fftconv(u, k, impl="mosaic", **kwargs)


@pytest.mark.parametrize("seqlen,ksize", [(4096, 4096), (4096, 2048), (8192, 1025)])
def test_mosaic_rejects_long_sequences_with_long_filters(seqlen, ksize):
    u, k, *_ = make_inputs(1, seqlen, 2, ksize, dtype=jnp.bfloat16)
    with pytest.raises(FFTConvError, match=f"L <= 2048, or any L with a filter of K <= 1024 and K <= L/4 "
                                           f"\\(overlap-save\\); got L={seqlen}, K={ksize}"):
        fftconv(u, k, impl="mosaic")


def test_mosaic_rejects_what_does_not_fit_shared_memory():
    u, k, *_ = make_inputs(1, 2048, 2, 2048)  # fp32 input and gates: the staging buffers double
    with pytest.raises(FFTConvError, match="needs 264 KiB of shared memory \\(limit 227 KiB\\)"):
        fftconv(u, k, pre_gate=u, post_gate=u, impl="mosaic", precision="bf16")
    assert mosaic.unsupported(2048, "bf16", jnp.bfloat16, 2) is None  # the headline case fits (208 KiB)
    assert mosaic.shared_memory_bytes(2048, 2048, "bf16", jnp.bfloat16) == 208 * 1024
    assert mosaic.shared_memory_bytes(1024, 1024, "bf16", jnp.bfloat16) == 110 * 1024  # two programs per SM
