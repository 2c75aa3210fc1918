"""Gated FFT conv for Hopper as Pallas Mosaic GPU kernels (wgmma tensor-core dots): L ≤ 2048, or any L
with a filter of K ≤ min(1024, L/4) (overlap-save).

One program per (channel, batch tile) holds the channel's filter spectrum and the DFT constants in
shared memory and loops over its sequences (`_program`), the next sequence's tiles copied by TMA while
the current one computes. Each real sequence (zero-padded to N = 2·L_pad) is a (64, n2 = N/64) tile
X[j1, j2], j = j1·n2 + j2, transformed from both sides, so no transpose is ever needed (`_Ops`):

    A = F₆₄·X ⊙ T ;  Y = A·F_n2           (transform: Y[k1, k2] = FFT_N(x)[k1 + 64·k2])
    W = Z·conj(F_n2) ⊙ conj(T) ;  y = Re(conj(F₆₄)·W)/N      (inverse of a spectrum Z at [k1, k2])

with T[k1, j2] = ω_N^{j2·k1}; K̂ is arranged the same way. Every dot is a `plgpu.wgmma` with 16-bit
operands in swizzled shared memory and an fp32 accumulator (128 or 64 rows: the real and imaginary
planes stacked, or one plane); twiddles, spectrum products and gates are fp32 on the accumulator. The
zero half of the input is pruned from the first dot (K = 32) and only the first L outputs are stored.
The D skip is folded into the spectrum (K̂ + bias is the spectrum of k + bias·δ).

* forward: x = pre ⊙ u; y = post ⊙ inverse(transform(x)·K̂). Reads u and the gates, writes y once.
* forward, overlap-save (`geometry`: C = max(512, next_pow2(K)) ≤ 1024, 4C ≤ L): each chunk of C samples
  is the second half of a 2C-point window whose first half is the previous chunk (zero before chunk 0):
  the first dot reads all 64 rows, and rows 32..63 of the inverse, which no wrap-around reaches since
  K ≤ C, are the chunk's output. Reads u and pre twice (as a chunk and as the next one's previous), post
  and y once; any L (padded to a multiple of C).
* backward: with dz = post ⊙ dy, dx = inverse(transform(dz)·conj(K̂)) gives du = pre ⊙ dx and
  dpre = u ⊙ dx; dpost = dy ⊙ inverse(transform(x)·K̂); each program adds conj(X)·DZ over its sequences
  in fp32 and XLA sums the programs' spectra and takes one inverse FFT for dk (lags < K) and dbias (lag 0).
  It reads u, the gates and dy once and writes du, dpre, dpost once. Where its buffers do not fit
  shared memory (L 2048 for 16-bit inputs) the gradient is jnp.fft's (impl "xla").
* backward, overlap-save (`_window_backward_step`): per chunk c, [dz_c; dz_c+1] gives dx_c (first half)
  and, against [x_c; 0], the dk spectrum (lags < K ≤ C reach only the next chunk); dpost_c comes from the
  forward window [x_c-1; x_c]. u and pre are read two or three times, dy and post twice (`PLACEMENTS`).

Sizes: N = 64·n2 with n2 ∈ {16, 32, 64} (dense: L_pad = 512, 1024, 2048; shorter L is zero-padded to 512
and L is padded to a power of two). Operands bf16 or fp16 (`precision`), error bounds as in `precision`.
Layout "hbl" ((H, B, L): each sequence contiguous) runs with no transposes; "blh" is transposed around
the kernels by XLA. On CPU the kernels run in Mosaic GPU interpret mode (simulated shared memory, TMA
and barriers); `tests/test_fftconv_mosaic.py` checks them against a float64 direct conv and its
gradients and that they lower for cuda. Speed on a GPU: `scripts/gpu_kernel_sweep.py` (group "mosaic").
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

ROWS = 64                  # first factor of N: the wgmma M of one plane
COLUMNS = (16, 32, 64)     # second factor n2 (N = 64·n2)
MIN_LEN = ROWS * COLUMNS[0] // 2
MAX_LEN = ROWS * COLUMNS[-1] // 2
PRECISIONS = ("bf16", "fp16")
_OPERAND = {"bf16": jnp.bfloat16, "fp16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch settings: sequences per program (a divisor of the batch is used); whether the twiddles and
    the spectrum (and an overlap-save window's mask) stay in registers for the whole program (4 or 5
    × 64·n2/128 fp32 registers per thread) or are read from shared memory at each use (None: in registers
    for n2 <= 32, i.e. FFT size <= 2048)."""
    seqs_per_program: int = 8
    constants_in_registers: bool | None = None


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
def _dft_constants(n2: int, window: bool = False) -> dict[str, np.ndarray]:
    """DFT blocks for N = 64·n2 (float64): the first stage (Re; Im rows) over the input rows it reads (the
    first 32, or all 64 for an overlap-save window), F_n2 planes (and −Im), the last stage [Re | Im] of
    conj(F₆₄) with 1/N, the twiddle planes, and for a window the mask of its second half (rows 32..63)."""
    n = ROWS * n2
    w_rows = np.exp(-2j * np.pi * np.outer(np.arange(ROWS), np.arange(ROWS)) / ROWS)
    w_cols = np.exp(-2j * np.pi * np.outer(np.arange(n2), np.arange(n2)) / n2)
    twiddle = np.exp(-2j * np.pi * np.outer(np.arange(ROWS), np.arange(n2)) / n)  # [k1, j2]
    rows_in = ROWS if window else ROWS // 2
    consts = {
        "first": np.concatenate([w_rows.real[:, :rows_in], w_rows.imag[:, :rows_in]], axis=0),  # (128, rows_in)
        "cols_re": w_cols.real, "cols_im": w_cols.imag, "cols_im_neg": -w_cols.imag,              # (n2, n2)
        "last": np.concatenate([w_rows.real, w_rows.imag], axis=1) / n,                           # (64, 128)
        "tw_re": twiddle.real, "tw_im": twiddle.imag,                                             # (64, n2)
    }
    if window:
        consts["second_half"] = np.repeat((np.arange(ROWS) >= ROWS // 2)[:, None], n2, axis=1).astype(float)
    return consts


_MATRICES = ("first", "cols_re", "cols_im", "cols_im_neg", "last")


def _elementwise(window: bool) -> tuple[str, ...]:
    """The fp32 constants applied on the accumulator (after the DFT matrices, in the kernel's order)."""
    return ("tw_re", "tw_im") + (("second_half",) if window else ())


def spectrum(k, bias, n: int):
    """(H, 2, 64, n/64) fp32: Re/Im of FFT_N(k + bias·δ) per channel at frequency k1 + 64·k2, [k1, k2]."""
    kf = jnp.fft.fft(k.astype(jnp.float32), n=n, axis=0)                       # (N, H)
    if bias is not None:
        kf = kf + bias.astype(jnp.float32)
    grid = kf.reshape(n // ROWS, ROWS, -1).transpose(2, 1, 0)                   # (H, k1, k2)
    return jnp.stack([grid.real, grid.imag], axis=1)


# Where an input tile's chunks go: (chunk offset, half) per TMA copy, half 0 = rows 0-31, 1 = rows 32-63.
# "own": the item's chunk in the first half (a dense item's whole sequence); "window": [previous; own];
# "ahead": [own; next]; "own twice": [own; own] (the step masks a half; both finite); "high": [·; own].
PLACEMENTS = {"own": ((0, 0),), "window": ((-1, 0), (0, 1)), "ahead": ((0, 0), (1, 1)),
              "own twice": ((0, 0), (0, 1)), "high": ((0, 1),)}


@dataclasses.dataclass(frozen=True)
class _Launch:
    """Static shape of one kernel launch: per-item input tiles ((name, placement) in `PLACEMENTS`) and
    output tiles ((name, half) of the tile that is stored), the real tiles it transforms, and whether it
    also writes Σ conj(X)·DZ per program (the filter's gradient)."""
    n2: int
    batch: int
    seqs: int            # sequences per program (a divisor of batch)
    dtype: object        # dot operand dtype (bf16 / fp16)
    io_dtype: object     # dtype of the input and output tiles in memory
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, int], ...]
    transforms: int      # real tiles transformed per item
    accumulates: bool
    resident_constants: bool = True  # twiddles and K̂ in registers (`Tuning.constants_in_registers`)
    chunks: int = 1      # > 1: overlap-save, each sequence as chunks of 32·n2 samples, one 2-chunk window each

    @property
    def window(self) -> bool:
        """Overlap-save: the first DFT dot reads all 64 rows (a window of two chunks)."""
        return self.chunks > 1

    @property
    def constant_names(self) -> tuple[str, ...]:
        return _MATRICES + _elementwise(self.window)

    @property
    def copies(self) -> int:
        """TMA copies per item (one arrival each on the item's barrier)."""
        return sum(len(PLACEMENTS[placement]) for _, placement in self.inputs)

    def buffers(self) -> list[tuple[tuple[int, ...], object]]:
        """(shape, dtype) of every shared-memory buffer in the kernel's order; the DFT constants last."""
        n2 = self.n2
        consts = _dft_constants(n2, self.window)
        return [
            ((2, len(self.inputs), ROWS, n2), self.io_dtype),  # input tiles × 2 slots
            ((self.transforms, ROWS, n2), self.dtype),        # real tiles to transform
            ((2, ROWS, n2), jnp.float32),                     # K̂ (Re, Im)
            ((2, ROWS, n2), self.dtype),                      # complex planes between the column dots
            ((2 * ROWS, n2), self.dtype),                     # [Re W; Im W], the last dot's operand
            ((len(self.outputs), ROWS, n2), self.io_dtype),   # output tiles (one half of each stored)
            *[((2, ROWS, n2), jnp.float32)] * self.accumulates,  # Σ conj(X)·DZ
            *[(consts[name].shape, self.dtype) for name in _MATRICES],
            *[(consts[name].shape, jnp.float32) for name in _elementwise(self.window)],
        ]

    def shared_memory_bytes(self) -> int:
        return sum(int(np.prod(shape)) * jnp.dtype(dt).itemsize for shape, dt in self.buffers())


def _program(launch: _Launch, step):
    """Kernel body for one (channel h, batch tile) program: DFT constants and h's spectrum loaded once,
    then its items in order, the next item's input tiles copied while `step` computes the current one.

    An item is a sequence, or with `launch.chunks` > 1 one chunk of a sequence (GMEM row
    (h·B + b)·chunks + c of each (H·B·chunks, 32, n2) input): items run in order, so a chunk's neighbours
    are the rows before and after its own (`PLACEMENTS`).

    step(ops, tile, acc_s, chunk) -> {output name: (64, n2) fp32 value}; `tile(name[, placement])` loads
    an input tile, `ops` has the transforms (`_Ops`), acc_s is the Σ conj(X)·DZ buffer (or None), chunk
    the item's chunk index. Refs arrive as: inputs, spectrum, constants | outputs (then the accumulator) | scratch
    (`_Launch.buffers`), barriers."""
    half, n2 = ROWS // 2, launch.n2
    items = launch.seqs * launch.chunks
    n_in, n_out, n_const = len(launch.inputs), len(launch.outputs), len(launch.constant_names)

    def body(*refs):
        in_g, spec_g, const_g = refs[:n_in], refs[n_in], refs[n_in + 1:n_in + 1 + n_const]
        refs = refs[n_in + 1 + n_const:]
        out_g, acc_g = refs[:n_out], refs[n_out] if launch.accumulates else None
        refs = refs[n_out + launch.accumulates:]
        stage_s, tiles_s, spec_s, planes_s, inv_s, out_s = refs[:6]
        acc_s = refs[6] if launch.accumulates else None
        refs = refs[6 + launch.accumulates:]
        const_s, bars, in_bars = refs[:n_const], refs[n_const], refs[n_const + 1]
        h, tile = jax.lax.axis_index("h"), jax.lax.axis_index("b")
        for i, (src, dst) in enumerate(zip(const_g, const_s)):
            plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
        for part in range(2):  # Re, Im planes of K̂ (one 3-D copy would need too many TMA dimensions)
            plgpu.copy_gmem_to_smem(spec_g.at[2 * h + part], spec_s.at[part], bars.at[n_const + part])

        first_row = (h * launch.batch + tile * launch.seqs) * launch.chunks

        def fetch(i, slot):
            chunk = i % launch.chunks
            rows = {0: first_row + i,  # a missing neighbour (before chunk 0, after the last): the own chunk,
                    -1: first_row + i - jnp.asarray(chunk > 0, jnp.int32),  # masked by the step
                    1: first_row + i + jnp.asarray(chunk < launch.chunks - 1, jnp.int32)}
            for j, ((_, placement), g) in enumerate(zip(launch.inputs, in_g)):
                for offset, part in PLACEMENTS[placement]:
                    plgpu.copy_gmem_to_smem(g.at[rows[offset]], stage_s.at[slot, j, half * part:half * (part + 1)],
                                            in_bars.at[slot])

        fetch(0, 0)
        for i in range(n_const + 2):
            plgpu.barrier_wait(bars.at[i])
        ops = _Ops(const_s, spec_s, planes_s, inv_s, tiles_s, launch.dtype, launch.resident_constants,
                   rows_in=ROWS if launch.window else half)
        if launch.accumulates:  # zeros in the accumulator's register layout (a splat cannot be stored there)
            acc_s[0] = acc_s[1] = ops.tw_re * 0.0

        def item(i, carry):
            slot = i % 2
            plgpu.barrier_wait(in_bars.at[slot])

            @pl.when(i + 1 < items)
            def _():
                fetch(i + 1, 1 - slot)

            def tile(name, placement=None):
                j = next(j for j, (n, p) in enumerate(launch.inputs) if n == name and placement in (None, p))
                return stage_s[slot, j].astype(jnp.float32)

            results = step(ops, tile, acc_s, i % launch.chunks)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous outputs have left out_s
            for j, (name, _) in enumerate(launch.outputs):
                out_s[j] = results[name].astype(out_s.dtype)
            plgpu.commit_smem()
            for j, ((_, part), g) in enumerate(zip(launch.outputs, out_g)):
                plgpu.copy_smem_to_gmem(out_s.at[j, half * part:half * (part + 1)], g.at[first_row + i])
            return carry

        jax.lax.fori_loop(0, items, item, 0)
        if launch.accumulates:
            plgpu.commit_smem()
            for part in range(2):
                plgpu.copy_smem_to_gmem(acc_s.at[part],
                                        acc_g.at[2 * (h * (launch.batch // launch.seqs) + tile) + part])
        plgpu.wait_smem_to_gmem(0)

    return body


class _Ops:
    """The transforms of one sequence, on (64, n2) fp32 register tiles, with shared memory as scratch."""

    def __init__(self, const_s, spec_s, planes_s, inv_s, tiles_s, dtype, resident: bool, rows_in: int):
        self.first, self.cols_re, self.cols_im, self.cols_im_neg, self.last = const_s[:5]
        elementwise = (*const_s[5:7], spec_s.at[0], spec_s.at[1], *const_s[7:])  # tw_re, tw_im, K̂, [mask]
        if resident:  # loaded once, held in registers
            values = [ref[...] for ref in elementwise]
            self._get = values.__getitem__
        else:         # read from shared memory at each use
            self._get = lambda i: elementwise[i][...]
        self.planes_s, self.inv_s, self.tiles_s, self.dtype = planes_s, inv_s, tiles_s, dtype
        self.rows_in = rows_in

    tw_re = property(lambda self: self._get(0))
    tw_im = property(lambda self: self._get(1))
    k_re = property(lambda self: self._get(2))
    k_im = property(lambda self: self._get(3))
    second_half = property(lambda self: self._get(4))  # windows only: 1 on rows 32..63

    @staticmethod
    def _dot(pairs, rows, cols):
        def run(acc):
            for a, b in pairs:
                plgpu.wgmma(acc, a, b)
            return acc[...]
        return pl.run_scoped(run, plgpu.ACC((rows, cols), jnp.float32))

    def transform(self, index: int, x):
        """FFT_N of the real tile x (its first `rows_in` rows; the rest is zero) via tiles_s[index]: (Re, Im)
        at [k1, k2]."""
        n2, dt = x.shape[1], self.dtype
        self.tiles_s[index] = x.astype(dt)
        plgpu.commit_smem()
        a = self._dot([(self.first, self.tiles_s.at[index, :self.rows_in])], 2 * ROWS, n2)  # F₆₄·X, (Re; Im)
        a_re, a_im = a[:ROWS], a[ROWS:]
        self.planes_s[0] = (a_re * self.tw_re - a_im * self.tw_im).astype(dt)         # ⊙ T
        self.planes_s[1] = (a_re * self.tw_im + a_im * self.tw_re).astype(dt)
        plgpu.commit_smem()
        b_re, b_im = self.planes_s.at[0], self.planes_s.at[1]
        return (self._dot([(b_re, self.cols_re), (b_im, self.cols_im_neg)], ROWS, n2),  # ·F_n2
                self._dot([(b_re, self.cols_im), (b_im, self.cols_re)], ROWS, n2))

    def inverse(self, z_re, z_im):
        """Re IFFT_N of the spectrum (z_re, z_im) at [k1, k2]: (64, n2), its first 32 rows the output."""
        n2, dt = z_re.shape[1], self.dtype
        self.planes_s[0] = z_re.astype(dt)
        self.planes_s[1] = z_im.astype(dt)
        plgpu.commit_smem()
        b_re, b_im = self.planes_s.at[0], self.planes_s.at[1]
        w_re = self._dot([(b_re, self.cols_re), (b_im, self.cols_im)], ROWS, n2)           # ·conj(F_n2)
        w_im = self._dot([(b_im, self.cols_re), (b_re, self.cols_im_neg)], ROWS, n2)
        self.inv_s[:ROWS] = (w_re * self.tw_re + w_im * self.tw_im).astype(dt)         # ⊙ conj(T)
        self.inv_s[ROWS:] = (w_im * self.tw_re - w_re * self.tw_im).astype(dt)
        plgpu.commit_smem()
        return self._dot([(self.last, self.inv_s)], ROWS, n2)                          # Re(conj(F₆₄)·W)/N

    def filtered(self, re, im, conjugate: bool = False):
        """(re + i·im)·K̂, or ·conj(K̂)."""
        k_im = -self.k_im if conjugate else self.k_im
        return re * self.k_re - im * k_im, re * k_im + im * self.k_re


def _forward_step(pre: bool, post: bool):
    """y = post ⊙ IFFT(FFT(pre ⊙ u)·K̂) for one sequence, or for one overlap-save window."""
    def step(ops, tile, acc_s, chunk):
        del acc_s
        x = tile("u") * tile("pre") if pre else tile("u")
        if ops.rows_in == ROWS:  # an overlap-save window [previous; own]: chunk 0 has no previous chunk
            x = x * jnp.maximum(ops.second_half, (chunk > 0).astype(jnp.float32))
        y = ops.inverse(*ops.filtered(*ops.transform(0, x)))
        return {"y": y * tile("post") if post else y}
    return step


def _accumulate(acc_s, x_re, x_im, dz_re, dz_im):
    """acc_s += conj(X)·DZ (the spectrum of Σ_t x_t dz_{t+j}: the filter's gradient at lag j)."""
    acc_s[0] = acc_s[0] + (x_re * dz_re + x_im * dz_im)
    acc_s[1] = acc_s[1] + (x_re * dz_im - x_im * dz_re)


def _backward_step(pre: bool, post: bool):
    """du, dpre, dpost for one sequence (dz = post ⊙ dy, dx = IFFT(conj(K̂)·DZ)); adds conj(X)·DZ to acc_s."""
    def step(ops, tile, acc_s, chunk):
        del chunk
        u, dy = tile("u"), tile("dy")
        x = u * tile("pre") if pre else u
        x_re, x_im = ops.transform(0, x)
        out = {}
        if post:
            out["dpost"] = dy * ops.inverse(*ops.filtered(x_re, x_im))      # dy ⊙ (k ∗ x + bias·x)
        dz_re, dz_im = ops.transform(1, dy * tile("post") if post else dy)
        _accumulate(acc_s, x_re, x_im, dz_re, dz_im)
        dx = ops.inverse(*ops.filtered(dz_re, dz_im, conjugate=True))
        out["du"] = dx * tile("pre") if pre else dx
        if pre:
            out["dpre"] = dx * u
        return out
    return step


def _window_backward_step(pre: bool, post: bool, chunks: int):
    """Overlap-save gradients of chunk c (K ≤ C): with dz = post ⊙ dy, the window [dz_c; dz_c+1] gives
    dx_c = the first half of IFFT(conj(K̂)·DZ) and, against [x_c; 0], conj(X)·DZ for dk (lags < K ≤ C
    reach only dz_c+1); dpost_c = dy_c ⊙ the second half of IFFT(K̂·FFT([x_c-1; x_c]))."""
    def step(ops, tile, acc_s, chunk):
        first_half = 1.0 - ops.second_half
        u = tile("u", "own twice")
        x = u * tile("pre", "own twice") if pre else u
        x_re, x_im = ops.transform(0, x * first_half)                          # [x_c; 0]
        dz = tile("dy", "ahead") * tile("post", "ahead") if post else tile("dy", "ahead")
        dz = dz * jnp.maximum(first_half, (chunk < chunks - 1).astype(jnp.float32))  # [dz_c; dz_c+1]
        dz_re, dz_im = ops.transform(1, dz)
        _accumulate(acc_s, x_re, x_im, dz_re, dz_im)
        dx = ops.inverse(*ops.filtered(dz_re, dz_im, conjugate=True))          # rows 0-31: dx_c
        out = {"du": dx * tile("pre", "own twice") if pre else dx}
        if pre:
            out["dpre"] = dx * u
        if post:
            window = tile("u", "window") * tile("pre", "window") if pre else tile("u", "window")
            window = window * jnp.maximum(ops.second_half, (chunk > 0).astype(jnp.float32))
            y = ops.inverse(*ops.filtered(*ops.transform(2, window)))          # rows 32-63: (k ∗ x)_c + bias·x_c
            out["dpost"] = tile("dy", "high") * y
        return out
    return step


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a (L, K) conv maps onto the kernel: FFT size N = 64·n2 per item; `chunks` items per sequence of
    `padded` samples (dense: one item, the zero-padded sequence; overlap-save: chunks of C = N/2 samples,
    each transformed as the window [previous chunk; chunk])."""
    n2: int
    chunks: int
    padded: int

    @property
    def window(self) -> bool:
        return self.chunks > 1


OVERLAP_SAVE_MAX_CHUNK = 1024  # C; its 2C-point windows keep n2 <= 32 (shared memory, registers)


def geometry(seqlen: int, ksize: int) -> Geometry:
    """Overlap-save for a short filter (C = max(512, next_pow2(K)) <= 1024 and 4C <= L: any L), else
    the dense conv of the whole sequence (L <= 2048); ValueError otherwise."""
    chunk = max(MIN_LEN, 1 << (ksize - 1).bit_length())
    if chunk <= OVERLAP_SAVE_MAX_CHUNK and 4 * chunk <= seqlen:
        chunks = -(-seqlen // chunk)
        return Geometry(n2=2 * chunk // ROWS, chunks=chunks, padded=chunks * chunk)
    if seqlen > MAX_LEN:
        raise ValueError(f"impl='mosaic' runs L <= {MAX_LEN}, or any L with a filter of K <= "
                         f"{OVERLAP_SAVE_MAX_CHUNK} and K <= L/4 (overlap-save); got L={seqlen}, K={ksize}")
    padded = padded_length(seqlen)
    return Geometry(n2=2 * padded // ROWS, chunks=1, padded=padded)


def _launch(kind: str, geo: Geometry, batch: int, precision: str, io_dtype, pre: bool, post: bool,
            tuning: Tuning = TUNING) -> _Launch:
    gates = ("pre",) * pre + ("post",) * post
    if kind == "forward":
        inputs = [("u", "window"), ("pre", "window"), ("post", "high")] if geo.window else \
                 [("u", "own"), ("pre", "own"), ("post", "own")]
        fields = dict(inputs=tuple((n, p) for n, p in inputs if n == "u" or n in gates),
                      outputs=(("y", 1 if geo.window else 0),), transforms=1)
    elif geo.window:
        inputs = [("u", "own twice"), ("pre", "own twice"), ("dy", "ahead"), ("post", "ahead")]
        inputs += [("u", "window"), ("pre", "window"), ("dy", "high")] if post else []
        fields = dict(inputs=tuple((n, p) for n, p in inputs if n in ("u", "dy") or n in gates),
                      outputs=(("du", 0),) + (("dpre", 0),) * pre + (("dpost", 1),) * post, transforms=2 + post)
    else:
        fields = dict(inputs=tuple((n, "own") for n in ("u", *gates, "dy")),
                      outputs=tuple((n, 0) for n in ("du",) + ("dpre",) * pre + ("dpost",) * post), transforms=2)
    resident = tuning.constants_in_registers
    return _Launch(n2=geo.n2, batch=batch, seqs=_batch_tile(batch, tuning.seqs_per_program),
                   dtype=_OPERAND[precision], io_dtype=jnp.dtype(io_dtype), accumulates=kind == "backward",
                   resident_constants=geo.n2 <= 32 if resident is None else resident,
                   chunks=geo.chunks, **fields)


def _interpret_params():
    """Mosaic GPU interpret mode (CPU): simulated shared memory, TMA and barriers (a private JAX API)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


def _batch_tile(batch: int, target: int) -> int:
    """Largest divisor of `batch` not above `target` (sequences per program)."""
    return max(d for d in range(1, min(batch, target) + 1) if batch % d == 0)


SHARED_MEMORY_LIMIT = 227 * 1024  # bytes of dynamic shared memory one block may use on H100/H200


def shared_memory_bytes(seqlen: int, ksize: int, precision: str, in_dtype, gates: int = 2,
                        kind: str = "forward") -> int:
    """Shared memory one program of the `kind` kernel uses (a launch's occupancy: 227 KiB per SM)."""
    launch = _launch(kind, geometry(seqlen, ksize), 1, precision, in_dtype, gates > 0, gates > 1)
    return launch.shared_memory_bytes()


def unsupported(seqlen: int, precision: str, in_dtype, gates: int = 2, kind: str = "forward",
                ksize: int | None = None) -> str | None:
    """Why the `kind` kernel cannot run the case (None if it can): precision, lengths or shared memory."""
    if precision not in PRECISIONS:
        return f"impl='mosaic' runs 16-bit tensor-core operands: precision 'bf16' or 'fp16', not {precision!r}"
    ksize = seqlen if ksize is None else ksize
    try:
        need = shared_memory_bytes(seqlen, ksize, precision, in_dtype, gates, kind)
    except ValueError as err:
        return str(err)
    if need > SHARED_MEMORY_LIMIT:
        return (f"impl='mosaic' ({kind}) at L={seqlen} with {jnp.dtype(in_dtype).name} input and {gates} gate(s) "
                f"needs {need // 1024} KiB of shared memory (limit {SHARED_MEMORY_LIMIT // 1024} KiB)")
    return None


def _run(launch: _Launch, step, tiles: dict, spec, *, channels: int, interpret: bool):
    """Launch over (channels, batch tiles): tiles name -> (H·B·chunks, 32, n2) arrays; returns the output tiles
    (and the per-program Σ conj(X)·DZ, (H, tiles, 2, 64, n2), when the launch accumulates)."""
    n2, half = launch.n2, ROWS // 2
    consts = _dft_constants(n2, launch.window)
    constants = ([jnp.asarray(consts[name], launch.dtype) for name in _MATRICES]
                 + [jnp.asarray(consts[name], jnp.float32) for name in _elementwise(launch.window)])
    swizzle = min(n2, ROWS // 2) * jnp.dtype(launch.dtype).itemsize  # one swizzle for all dot operands

    def smem(shape, dt):  # tiled and swizzled: register tiles move in and out in the accumulator's layout
        dt_swizzle = min(n2 * 4, 128) if dt == jnp.float32 else swizzle
        return plgpu.SMEM(shape, dt, transforms=_transforms(shape[-2:], dt, dt_swizzle))

    buffers = [smem(shape, dt) for shape, dt in launch.buffers()]
    scratch = [*buffers,
               plgpu.Barrier(num_barriers=len(constants) + 2),
               plgpu.Barrier(num_arrivals=launch.copies, num_barriers=2)]  # one arrival per copy
    rows = channels * launch.batch * launch.chunks
    programs = launch.batch // launch.seqs
    out_type = [jax.ShapeDtypeStruct((rows, half, n2), launch.io_dtype) for _ in launch.outputs]
    if launch.accumulates:
        out_type.append(jax.ShapeDtypeStruct((channels * programs * 2, ROWS, n2), jnp.float32))
    kernel = plgpu.kernel(
        _program(launch, step), out_type=tuple(out_type),
        grid=(channels, programs), grid_names=("h", "b"),
        scratch_types=scratch, compiler_params=plgpu.CompilerParams(),
        interpret=_interpret_params() if interpret else None)
    outs = kernel(*[tiles[name] for name, _ in launch.inputs], spec.reshape(channels * 2, ROWS, n2), *constants)
    if launch.accumulates:
        *outs, acc = outs
        return list(outs), acc.reshape(channels, programs, 2, ROWS, n2)
    return list(outs)


def _hbl_tiles(layout: str, seqlen: int, geo: Geometry, dtype, **arrays) -> dict:
    """name -> (H·B·chunks, 32, n2) tiles of each (layout-ordered) array, zero-padded to `geo.padded`."""
    tiles = {}
    for name, a in arrays.items():
        if a is not None:
            a = a if layout == "hbl" else jnp.transpose(a, (2, 0, 1))
            a = jnp.pad(a.astype(dtype), ((0, 0), (0, 0), (0, geo.padded - seqlen)))
            tiles[name] = a.reshape(-1, ROWS // 2, geo.n2)
    return tiles


def _from_tiles(t, like_hbl: tuple[int, int, int], seqlen: int, layout: str):
    channels, batch, _ = like_hbl
    y = t.reshape(channels, batch, -1)[..., :seqlen]
    return y if layout == "hbl" else jnp.transpose(y, (1, 2, 0))


def _shape_hbl(u, layout: str) -> tuple[int, int, int]:
    return u.shape if layout == "hbl" else (u.shape[2], u.shape[0], u.shape[1])


def _forward(u, k, bias, pre, post, precision, layout, interpret, tuning):
    seqlen = u.shape[_conv.seq_axis(layout)]
    geo = geometry(seqlen, k.shape[0])
    shape = _shape_hbl(u, layout)
    launch = _launch("forward", geo, shape[1], precision, u.dtype, pre is not None, post is not None, tuning)
    tiles = _hbl_tiles(layout, seqlen, geo, u.dtype, u=u, pre=pre, post=post)
    (y,) = _run(launch, _forward_step(pre is not None, post is not None), tiles,
                spectrum(k, bias, ROWS * geo.n2), channels=shape[0], interpret=interpret)
    return _from_tiles(y, shape, seqlen, layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _mosaic_conv(u, k, bias, pre, post, precision, layout, interpret, tuning):
    return _forward(u, k, bias, pre, post, precision, layout, interpret, tuning)


def _conv_fwd(u, k, bias, pre, post, precision, layout, interpret, tuning):
    return _forward(u, k, bias, pre, post, precision, layout, interpret, tuning), (u, k, bias, pre, post)


def _conv_bwd(precision, layout, interpret, tuning, res, dy):
    u, k, bias, pre, post = res
    seqlen = u.shape[_conv.seq_axis(layout)]
    gates = (pre is not None) + (post is not None)
    if unsupported(seqlen, precision, u.dtype, gates, "backward", k.shape[0]):
        from kernels.fftconv.api import fftconv  # the public op (it imports this module on first use)

        def xla(u, k, bias, pre, post):
            return fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl="xla", layout=layout)

        _, vjp = jax.vjp(xla, *res)
        return vjp(dy)
    geo = geometry(seqlen, k.shape[0])
    n = ROWS * geo.n2
    shape = _shape_hbl(u, layout)
    launch = _launch("backward", geo, shape[1], precision, u.dtype, pre is not None, post is not None, tuning)
    tiles = _hbl_tiles(layout, seqlen, geo, u.dtype, u=u, pre=pre, post=post, dy=dy)
    step = (_window_backward_step(pre is not None, post is not None, geo.chunks) if geo.window
            else _backward_step(pre is not None, post is not None))
    outs, acc = _run(launch, step, tiles, spectrum(k, bias, n), channels=shape[0], interpret=interpret)
    grads = {name: _from_tiles(t, shape, seqlen, layout) for (name, _), t in zip(launch.outputs, outs)}
    dspec = acc.sum(axis=1)                                                   # (H, 2, k1, k2)
    dspec = (dspec[:, 0] + 1j * dspec[:, 1]).transpose(0, 2, 1).reshape(shape[0], n)  # natural frequency order
    dk_full = jnp.fft.ifft(dspec, axis=1).real                               # (H, N): Σ_b corr(x_b, dz_b)
    dk = dk_full[:, :k.shape[0]].T.astype(k.dtype)
    dbias = None if bias is None else dk_full[:, 0].astype(bias.dtype)       # bias adds δ to the filter
    return grads["du"], dk, dbias, grads.get("dpre"), grads.get("dpost")


_mosaic_conv.defvjp(_conv_fwd, _conv_bwd)


def fftconv_mosaic(u, k, bias=None, pre_gate=None, post_gate=None, *, precision: str, layout: str = "blh",
                   interpret: bool | None = None, tuning: Tuning | None = None):
    """The gated causal conv of `kernels.fftconv.api` on the Mosaic GPU kernel (arguments validated there).

    ``precision``: "bf16" or "fp16" operands; ValueError (`unsupported`) for a case it cannot run.
    ``interpret``: None = on CPU."""
    reason = unsupported(u.shape[_conv.seq_axis(layout)], precision, u.dtype,
                         (pre_gate is not None) + (post_gate is not None), ksize=k.shape[0])
    if reason:
        raise ValueError(reason)
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    return _mosaic_conv(u, k, bias, pre_gate, post_gate, precision, layout, interpret, tuning or TUNING)
