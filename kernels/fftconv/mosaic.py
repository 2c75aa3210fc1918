"""Fused gated FFT conv for Hopper as a Pallas Mosaic GPU kernel (wgmma tensor-core dots), L ≤ 2048.

One program per (channel, batch tile) holds the channel's filter spectrum and the DFT constants in
shared memory and loops over its sequences. Each sequence x = pre ⊙ u (zero-padded to N = 2·L_pad) is a
(64, n2 = N/64) tile X[j1, j2], j = j1·n2 + j2, transformed from both sides, so no
transpose is ever needed:

    A = F₆₄·X ⊙ T ;  Y = A·F_n2 ;  Z = Y ⊙ K̂ ;  W = Z·conj(F_n2) ⊙ conj(T) ;  y = Re(conj(F₆₄)·W)/N

with T[k1, j2] = ω_N^{j2·k1} and the output frequency k = k1 + 64·k2 (K̂ is arranged the same way).
Every dot is a `plgpu.wgmma` with 16-bit operands in swizzled shared memory and an fp32 accumulator
(128 or 64 rows: the real and imaginary planes stacked, or one plane); twiddles, the spectrum product
and the gates are fp32 on the accumulator. The zero half of the input is pruned from the first dot
(K = 32) and only the first L outputs are stored. The D skip is folded into the spectrum
(K̂ + bias is the spectrum of k + bias·δ), so the kernel reads u and the gates and writes y once.

Sizes: N = 64·n2 with n2 ∈ {16, 32, 64} (L_pad = 512, 1024, 2048); shorter L is zero-padded to 512 and
L is padded to a power of two. Operands bf16 or fp16 (`precision`), error bounds as in `precision`.
Layout "hbl" ((H, B, L): each sequence contiguous) runs with no transposes; "blh" is transposed around
the kernel by XLA. The gradient (custom_vjp) is the jnp.fft conv's (`reference.fftconv_xla`) until a
backward kernel exists. On CPU the kernel runs in Mosaic GPU interpret mode (simulated shared memory,
TMA and barriers); `tests/test_fftconv_mosaic.py` checks it against a float64 direct conv and that it
lowers for cuda. Speed on a GPU is measured by `scripts/gpu_kernel_sweep.py` (group "mosaic").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.fftconv import conv as _conv
from kernels.fftconv.reference import fftconv_xla

ROWS = 64                  # first factor of N: the wgmma M of one plane
COLUMNS = (16, 32, 64)     # second factor n2 (N = 64·n2)
MIN_LEN = ROWS * COLUMNS[0] // 2
MAX_LEN = ROWS * COLUMNS[-1] // 2
PRECISIONS = ("bf16", "fp16")
_OPERAND = {"bf16": jnp.bfloat16, "fp16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch settings: sequences per program (a divisor of the batch is used)."""
    seqs_per_program: int = 8


TUNING = Tuning()


def padded_length(seqlen: int) -> int:
    """L_pad: the power of two ≥ max(L, MIN_LEN) the kernel runs at; ValueError above MAX_LEN."""
    if seqlen > MAX_LEN:
        raise ValueError(f"impl='mosaic' runs L <= {MAX_LEN} (FFT size <= {2 * MAX_LEN}); got L={seqlen}")
    return max(MIN_LEN, 1 << (seqlen - 1).bit_length())


def _transforms(shape, dtype, swizzle: int):
    """Tiling (8, swizzle/itemsize) + swizzle: the shared-memory layout wgmma operands need."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = min(swizzle, shape[-1] * itemsize)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


@functools.lru_cache(maxsize=None)
def _dft_constants(n2: int) -> dict[str, np.ndarray]:
    """DFT blocks for N = 64·n2 (float64): first stage (re; im rows) over the nonzero input rows only,
    F_n2 planes (and −Im), the last stage [Re | Im] of conj(F₆₄) with 1/N, and the twiddle planes."""
    n = ROWS * n2
    w_rows = np.exp(-2j * np.pi * np.outer(np.arange(ROWS), np.arange(ROWS)) / ROWS)
    w_cols = np.exp(-2j * np.pi * np.outer(np.arange(n2), np.arange(n2)) / n2)
    twiddle = np.exp(-2j * np.pi * np.outer(np.arange(ROWS), np.arange(n2)) / n)  # [k1, j2]
    half = ROWS // 2
    return {
        "first": np.concatenate([w_rows.real[:, :half], w_rows.imag[:, :half]], axis=0),  # (128, 32)
        "cols_re": w_cols.real, "cols_im": w_cols.imag, "cols_im_neg": -w_cols.imag,        # (n2, n2)
        "last": np.concatenate([w_rows.real, w_rows.imag], axis=1) / n,                     # (64, 128)
        "tw_re": twiddle.real, "tw_im": twiddle.imag,                                       # (64, n2)
    }


_MATRICES = ("first", "cols_re", "cols_im", "cols_im_neg", "last")
_TWIDDLES = ("tw_re", "tw_im")


def spectrum(k, bias, n: int):
    """(H, 2, 64, n/64) fp32: Re/Im of FFT_N(k + bias·δ) per channel at frequency k1 + 64·k2, [k1, k2]."""
    kf = jnp.fft.fft(k.astype(jnp.float32), n=n, axis=0)                       # (N, H)
    if bias is not None:
        kf = kf + bias.astype(jnp.float32)
    grid = kf.reshape(n // ROWS, ROWS, -1).transpose(2, 1, 0)                   # (H, k1, k2)
    return jnp.stack([grid.real, grid.imag], axis=1)


def _kernel(n2: int, batch: int, seqs: int, dtype, out_dtype, gated_pre: bool, gated_post: bool):
    """The kernel body for one (channel, batch tile) program; refs in the order `conv_hbl` passes them."""
    half = ROWS // 2
    f32 = jnp.float32

    def body(*refs):
        ins, rest = refs[:-10], refs[-10:]
        u_g, spec_g = ins[0], ins[1]
        pre_g = ins[2] if gated_pre else None
        post_g = ins[2 + gated_pre] if gated_post else None
        const_g = ins[2 + gated_pre + gated_post:]
        out_g, (u_s, x_s, spec_s, planes_s, inv_s, out_s, const_s, bars, in_bars) = rest[0], rest[1:]
        first, cols_re, cols_im, cols_im_neg, last, tw_re_s, tw_im_s = const_s
        h, tile = jax.lax.axis_index("h"), jax.lax.axis_index("b")
        for i, (src, dst) in enumerate(zip(const_g, const_s)):
            plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
        for part in range(2):        # Re, Im planes of K̂ (one 3-D copy would need too many TMA dims)
            plgpu.copy_gmem_to_smem(spec_g.at[2 * h + part], spec_s.at[part], bars.at[len(const_s) + part])
        streams = [g for g in (u_g, pre_g, post_g) if g is not None]

        def fetch(i, slot):
            for j, g in enumerate(streams):
                plgpu.copy_gmem_to_smem(g.at[h * batch + tile * seqs + i], u_s.at[slot, j, :half], in_bars.at[slot])

        fetch(0, 0)
        for i in range(len(const_s) + 2):
            plgpu.barrier_wait(bars.at[i])
        tw_re, tw_im = tw_re_s[...], tw_im_s[...]

        def matmul(pairs, rows, cols):
            def run(acc):
                for a, b in pairs:
                    plgpu.wgmma(acc, a, b)
                return acc[...]
            return pl.run_scoped(run, plgpu.ACC((rows, cols), f32))

        def sequence(i, carry):
            slot = i % 2
            plgpu.barrier_wait(in_bars.at[slot])

            @pl.when(i + 1 < seqs)
            def _():
                fetch(i + 1, 1 - slot)

            x = u_s[slot, 0].astype(f32)
            if gated_pre:
                x = x * u_s[slot, 1].astype(f32)
            x_s[...] = x.astype(dtype)
            plgpu.commit_smem()
            a = matmul([(first, x_s.at[:half])], 2 * ROWS, n2)                # F₆₄·X, (Re; Im)
            a_re, a_im = a[:ROWS], a[ROWS:]
            planes_s[0] = (a_re * tw_re - a_im * tw_im).astype(dtype)          # ⊙ T
            planes_s[1] = (a_re * tw_im + a_im * tw_re).astype(dtype)
            plgpu.commit_smem()
            b_re, b_im = planes_s.at[0], planes_s.at[1]
            y_re = matmul([(b_re, cols_re), (b_im, cols_im_neg)], ROWS, n2)   # ·F_n2
            y_im = matmul([(b_re, cols_im), (b_im, cols_re)], ROWS, n2)
            k_re, k_im = spec_s[0], spec_s[1]
            planes_s[0] = (y_re * k_re - y_im * k_im).astype(dtype)            # ⊙ K̂
            planes_s[1] = (y_re * k_im + y_im * k_re).astype(dtype)
            plgpu.commit_smem()
            w_re = matmul([(b_re, cols_re), (b_im, cols_im)], ROWS, n2)        # ·conj(F_n2)
            w_im = matmul([(b_im, cols_re), (b_re, cols_im_neg)], ROWS, n2)
            inv_s[:ROWS] = (w_re * tw_re + w_im * tw_im).astype(dtype)         # ⊙ conj(T)
            inv_s[ROWS:] = (w_im * tw_re - w_re * tw_im).astype(dtype)
            plgpu.commit_smem()
            y = matmul([(last, inv_s)], ROWS, n2)                              # Re(conj(F₆₄)·W)/N
            if gated_post:
                y = y * u_s[slot, len(streams) - 1].astype(f32)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)                    # out_s read out
            out_s[...] = y.astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_s.at[:half], out_g.at[h * batch + tile * seqs + i])
            return carry

        jax.lax.fori_loop(0, seqs, sequence, 0)
        plgpu.wait_smem_to_gmem(0)

    return body


def _interpret_params():
    """Mosaic GPU interpret mode (CPU): simulated shared memory, TMA and barriers (a private JAX API)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


def _batch_tile(batch: int, target: int) -> int:
    """Largest divisor of `batch` not above `target` (sequences per program)."""
    return max(d for d in range(1, min(batch, target) + 1) if batch % d == 0)


def _buffers(n2: int, streams: int, in_dtype, out_dtype, dtype) -> list[tuple[tuple[int, ...], object]]:
    """(shape, dtype) of every shared-memory buffer, in the kernel's order; the constants last."""
    return [
        ((2, streams, ROWS, n2), in_dtype),  # u, pre, post × 2 slots (first half: the sequence)
        ((ROWS, n2), dtype),                 # x = pre ⊙ u, the first dot's operand (first half read)
        ((2, ROWS, n2), jnp.float32),        # K̂ (Re, Im)
        ((2, ROWS, n2), dtype),              # complex planes between the column dots
        ((2 * ROWS, n2), dtype),             # [Re W; Im W], the last dot's operand
        ((ROWS, n2), out_dtype),             # output tile (first half stored)
        *[(m.shape, dtype) for m in (_dft_constants(n2)[name] for name in _MATRICES)],
        *[(t.shape, jnp.float32) for t in (_dft_constants(n2)[name] for name in _TWIDDLES)],
    ]


SHARED_MEMORY_LIMIT = 227 * 1024  # bytes of dynamic shared memory one block may use on H100/H200


def unsupported(seqlen: int, precision: str, in_dtype, gates: int = 2) -> str | None:
    """Why this kernel cannot run the case (None if it can): precision, length or shared memory."""
    if precision not in PRECISIONS:
        return f"impl='mosaic' runs 16-bit tensor-core operands: precision 'bf16' or 'fp16', not {precision!r}"
    if seqlen > MAX_LEN:
        return f"impl='mosaic' runs L <= {MAX_LEN}; got L={seqlen}"
    n2 = 2 * padded_length(seqlen) // ROWS
    need = sum(int(np.prod(shape)) * jnp.dtype(dt).itemsize
               for shape, dt in _buffers(n2, 1 + gates, in_dtype, in_dtype, _OPERAND[precision]))
    if need > SHARED_MEMORY_LIMIT:
        return (f"impl='mosaic' at L={seqlen} with {jnp.dtype(in_dtype).name} input and {gates} gate(s) needs "
                f"{need // 1024} KiB of shared memory (limit {SHARED_MEMORY_LIMIT // 1024} KiB): use 16-bit inputs")
    return None


def conv_hbl(x, spec, pre, post, *, precision: str, out_dtype, interpret: bool, tuning: Tuning = TUNING):
    """y (H, B, L_pad) = post ⊙ Re IFFT(FFT(pre ⊙ x) · spec) for x (H, B, L_pad); spec from `spectrum`."""
    channels, batch, seqlen = x.shape
    n2 = 2 * seqlen // ROWS
    half = ROWS // 2
    dtype = _OPERAND[precision]
    seqs = _batch_tile(batch, tuning.seqs_per_program)
    consts = _dft_constants(n2)
    matrices = [jnp.asarray(consts[name], dtype) for name in _MATRICES]
    twiddles = [jnp.asarray(consts[name], jnp.float32) for name in _TWIDDLES]
    streams = [a.reshape(channels * batch, half, n2) for a in (x, pre, post) if a is not None]  # row h·B + b
    swizzle = min(n2, ROWS // 2) * jnp.dtype(dtype).itemsize  # one swizzle for all dot operands (K = 32 fits)
    # every buffer tiled and swizzled: register tiles move to and from it in the accumulator's layout
    buffers = [plgpu.SMEM(shape, dt, transforms=_transforms(shape[-2:], dt, 128 if dt == jnp.float32 else swizzle))
               for shape, dt in _buffers(n2, len(streams), x.dtype, out_dtype, dtype)]
    scratch = [*buffers[:6], buffers[6:],
               plgpu.Barrier(num_barriers=len(matrices) + len(twiddles) + 2),
               plgpu.Barrier(num_arrivals=len(streams), num_barriers=2)]  # one arrival per stream copied
    kernel = plgpu.kernel(
        _kernel(n2, batch, seqs, dtype, out_dtype, pre is not None, post is not None),
        out_type=jax.ShapeDtypeStruct((channels * batch, half, n2), out_dtype),
        grid=(channels, batch // seqs), grid_names=("h", "b"),
        scratch_types=scratch, compiler_params=plgpu.CompilerParams(),
        interpret=_interpret_params() if interpret else None)
    spec = spec.reshape(channels * 2, ROWS, n2)  # row 2h + (0: Re, 1: Im)
    return kernel(*streams[:1], spec, *streams[1:], *matrices, *twiddles).reshape(channels, batch, seqlen)


def _forward(u, k, bias, pre, post, precision, layout, interpret, tuning):
    seqlen = u.shape[_conv.seq_axis(layout)]
    padded = padded_length(seqlen)
    spec = spectrum(k, bias, 2 * padded)

    def to_hbl(a):
        if a is None:
            return None
        a = a if layout == "hbl" else jnp.transpose(a, (2, 0, 1))
        return jnp.pad(a.astype(u.dtype), ((0, 0), (0, 0), (0, padded - seqlen)))

    y = conv_hbl(to_hbl(u), spec, to_hbl(pre), to_hbl(post), precision=precision, out_dtype=u.dtype,
                 interpret=interpret, tuning=tuning)[..., :seqlen]
    return y if layout == "hbl" else jnp.transpose(y, (1, 2, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _mosaic_conv(u, k, bias, pre, post, precision, layout, interpret, tuning):
    return _forward(u, k, bias, pre, post, precision, layout, interpret, tuning)


def _conv_fwd(u, k, bias, pre, post, precision, layout, interpret, tuning):
    return _forward(u, k, bias, pre, post, precision, layout, interpret, tuning), (u, k, bias, pre, post)


def _xla_in_layout(layout):
    """fftconv_xla taking and returning `layout` (the gradient's reference computation)."""
    def run(u, k, bias, pre, post):
        u, pre, post = (_conv.as_blh(a, layout) for a in (u, pre, post))
        return _conv.from_blh(fftconv_xla(u, k, bias, pre, post), layout)
    return run


def _conv_bwd(precision, layout, interpret, tuning, res, dy):
    _, vjp = jax.vjp(_xla_in_layout(layout), *res)
    return vjp(dy)


_mosaic_conv.defvjp(_conv_fwd, _conv_bwd)


def fftconv_mosaic(u, k, bias=None, pre_gate=None, post_gate=None, *, precision: str, layout: str = "blh",
                   interpret: bool | None = None, tuning: Tuning | None = None):
    """The gated causal conv of `kernels.fftconv.api` on the Mosaic GPU kernel (arguments validated there).

    ``precision``: "bf16" or "fp16" operands; ValueError (`unsupported`) for a case it cannot run.
    ``interpret``: None = on CPU."""
    reason = unsupported(u.shape[_conv.seq_axis(layout)], precision, u.dtype,
                         (pre_gate is not None) + (post_gate is not None))
    if reason:
        raise ValueError(reason)
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    return _mosaic_conv(u, k, bias, pre_gate, post_gate, precision, layout, interpret, tuning or TUNING)
