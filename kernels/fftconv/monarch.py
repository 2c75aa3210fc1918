"""FFT-as-matmul ("Monarch" / blocked Cooley-Tukey) factorisation used by the matmul implementations.

A length-N DFT (N a power of two) is split as N = f[0]·f[1]·…·f[p-1] (p = 2, 3 or 4 stages, every
factor 16…64, a power of two). Time is read row-major, n = n_0·R_0 + n_rest with R_j = Π f[j+1:],
and each stage j is

    A[k_j, n_rest] = Σ_{n_j} F_{f_j}[k_j, n_j] · x[n_j, n_rest]     (a small DFT matrix, one matmul)
    A[k_j, n_rest] *= T_j[k_j, n_rest] = exp(-2πi k_j n_rest / (f_j R_j))   (twiddle)

followed by the same on n_rest. The output is left in digit-reversed ("permuted") order: axis j holds
frequency digit k_j with k = k_0 + f_0·(k_1 + f_1·(k_2 + …)). The filter spectrum is computed in that
order by the same code (no permutation anywhere), the product is pointwise, and the inverse applies the
conjugate stages in reverse order and lands in natural time order (1/N: see Scaling below).

Real input / causal padding: the signal is real and zero beyond L_in, so stage 0 only reads the first
`rows_in = ceil(L_in / R_0)` time rows (real × complex: 2 matmuls instead of 4) and the last inverse
stage computes only the first `rows_out = ceil(n_out / R_0)` rows and only their real part.

Frequency-sparse (block skipping): a boolean block mask over the grid (k_0, k_{p-1}) of the first and
last frequency digits (see `expand_freq_mask`). Outer rows k_0 whose blocks are all zero are dropped
from every stage (the inner transforms of those rows are never computed); last-digit columns k_{p-1}
that are zero for every kept row are dropped from the last forward and first inverse matmul; blocks
that are zero inside the kept rectangle are multiplied by 0.

Scaling: with f_j = 2^b_j, each stage of the signal transform ("scaled") carries 2^-floor(b_j/2) and
each inverse stage 2^-ceil(b_j/2) (together the 1/N of the inverse; `forward_scale`). The stages are
within √2 of unitary, so every matmul operand stays O(|x|) (fp16-safe at every N), and the scales are
powers of two, so bf16/fp16 DFT matrices round exactly like unscaled ones. The filter transform is
unscaled.

Complex values are carried as separate fp32 (re, im) planes; matmuls run at a `precision` setting
(`kernels.fftconv.precision`: fp32 HIGHEST by default, or bf16/fp16/tf32/bf16x3 operands) with fp32
accumulation; twiddles and pointwise products are fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from kernels.fftconv import precision as _precision
from kernels.fftconv.reference import next_power_of_two

MIN_FFT_SIZE = 256  # smallest plan
MAX_FFT_SIZE = 1 << 24  # largest plan (4 stages of 64)


# ----------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def plan_factors(n: int) -> tuple[int, ...]:
    """DFT factor sizes for an FFT of size n (power of two in [256, 2^24]); the last factor is largest.

    2 stages up to 4096 (16·16 … 64·64), 3 stages up to 2^18, 4 stages up to 2^24; bits split evenly.
    """
    if n < MIN_FFT_SIZE or n > MAX_FFT_SIZE or n & (n - 1):
        raise ValueError(f"no FFT plan for size {n}: need a power of two in [{MIN_FFT_SIZE}, {MAX_FFT_SIZE}]")
    bits = n.bit_length() - 1
    stages = 2 if bits <= 12 else 3 if bits <= 18 else 4
    base, extra = divmod(bits, stages)
    split = [base] * (stages - extra) + [base + 1] * extra  # larger factors last
    return tuple(1 << b for b in split)


def fft_size(total: int) -> int:
    """FFT size used for a linear convolution whose full output has `total` = L_in + K - 1 samples."""
    return max(MIN_FFT_SIZE, next_power_of_two(total))


@dataclass(frozen=True)
class Plan:
    """A static (hashable) description of one FFT convolution problem in the factorised domain."""

    n: int  # FFT size
    factors: tuple[int, ...]
    rows_in: int  # stage-0 time rows read (signal)
    rows_out: int  # stage-0 time rows produced by the inverse
    n_out: int  # output samples kept
    keep_rows: tuple[int, ...]  # kept first frequency digits k_0 (all of them when dense)
    keep_cols: tuple[int, ...]  # kept last frequency digits k_{p-1}
    mask: tuple[tuple[bool, ...], ...] | None  # residual block mask over (kept rows, kept cols), or None

    @property
    def stages(self) -> int:
        return len(self.factors)

    @property
    def rest0(self) -> int:  # R_0 = N / f_0
        return self.n // self.factors[0]

    @property
    def spectrum_shape(self) -> tuple[int, ...]:
        """Shape of one channel's stored spectrum: (kept k_0, f_1, …, f_{p-2}, kept k_{p-1})."""
        return (len(self.keep_rows), *self.factors[1:-1], len(self.keep_cols))

    @property
    def dense(self) -> bool:
        return self.mask is None and len(self.keep_rows) == self.factors[0] and len(self.keep_cols) == self.factors[-1]

    @property
    def kept_fraction(self) -> float:
        return len(self.keep_rows) * len(self.keep_cols) / (self.factors[0] * self.factors[-1])


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# Smallest M, N and K of a kernel dot: Triton's tensor-core tl.dot needs 16 (an 8-wide bf16 dot compiled, ran
# and gave wrong results on an H200), so the Pallas path pads time rows and rounds sparse digits up to it.
MIN_DOT = 16


def _round_out(kept: tuple[int, ...], size: int, minimum: int) -> tuple[int, ...]:
    """`kept` digits plus the lowest others until there are min(minimum, size) (sorted)."""
    extra = [i for i in range(size) if i not in kept][: max(0, min(minimum, size) - len(kept))]
    return tuple(sorted((*kept, *extra)))


def make_plan(len_in: int, ksize: int, n_out: int, freq_mask=None, n: int | None = None,
              min_keep: tuple[int, int] = (1, 1)) -> Plan:
    """Plan for y = (x ∗ k)[0:n_out], x of length len_in, k of length ksize, optional block mask.

    ``min_keep``: a frequency-sparse plan keeps at least this many (first, last) digits, where they are a
    kernel's matmul dimension (16 for tensor-core dots in the Pallas kernels: `pallas.sparse_min_keep`).
    Digits added to reach it are zeroed by the residual mask, so the result is the same; only less of the
    work is skipped."""
    n = fft_size(len_in + ksize - 1) if n is None else n
    if n_out > n:
        raise ValueError(f"n_out={n_out} exceeds the FFT size {n}")
    factors = plan_factors(n)
    f0, fl = factors[0], factors[-1]
    rest0 = n // f0
    rows = tuple(range(f0))
    cols = tuple(range(fl))
    mask = None
    if freq_mask is not None:
        grid = np.asarray(freq_mask, dtype=bool)
        dense = expand_block_mask(grid, f0, fl)  # (f0, fl) over (k_0, k_{p-1})
        rows = _round_out(tuple(int(r) for r in np.flatnonzero(dense.any(axis=1))), f0, min_keep[0])
        cols = _round_out(tuple(int(c) for c in np.flatnonzero(dense.any(axis=0))), fl, min_keep[1])
        sub = dense[np.ix_(rows, cols)]
        if not sub.all():
            mask = tuple(tuple(bool(v) for v in row) for row in sub)
    return Plan(
        n=n,
        factors=factors,
        rows_in=_ceil_div(len_in, rest0),
        rows_out=_ceil_div(n_out, rest0),
        n_out=n_out,
        keep_rows=rows,
        keep_cols=cols,
        mask=mask,
    )


def freq_grid(len_in: int, ksize: int) -> tuple[int, int, int]:
    """(N, f_0, f_{p-1}) for a dense causal conv of length len_in with a ksize-tap filter.

    A `freq_mask` of shape (G0, G1) needs G0 | f_0 and G1 | f_{p-1}.
    """
    n = fft_size(len_in + ksize - 1)
    factors = plan_factors(n)
    return n, factors[0], factors[-1]


def expand_block_mask(grid: np.ndarray, f0: int, fl: int) -> np.ndarray:
    """Expand a (G0, G1) block mask to the (f0, fl) digit grid (G0 | f0, G1 | fl)."""
    grid = np.asarray(grid, dtype=bool)
    if grid.ndim != 2:
        raise ValueError(f"freq_mask must be a 2-D boolean block mask (G0, G1); got shape {grid.shape}")
    g0, g1 = grid.shape
    if g0 < 1 or g1 < 1 or f0 % g0 or fl % g1:
        raise ValueError(
            f"freq_mask shape {grid.shape} does not tile the plan's frequency grid ({f0}, {fl}): "
            f"need G0 dividing {f0} and G1 dividing {fl}"
        )
    if not grid.any():
        raise ValueError("freq_mask keeps no frequency block")
    return np.repeat(np.repeat(grid, f0 // g0, axis=0), fl // g1, axis=1)


def expand_freq_mask(freq_mask, n: int) -> np.ndarray:
    """The per-bin (n,) 0/1 mask that a block `freq_mask` applies to an FFT of size n.

    Bin k is kept iff dense[k mod f_0, k // (n / f_{p-1})], dense = the mask expanded to (f_0, f_{p-1}):
    rows are residue classes of k mod f_0, columns are contiguous bands of n / f_{p-1} bins.
    """
    factors = plan_factors(n)
    f0, fl = factors[0], factors[-1]
    dense = expand_block_mask(freq_mask, f0, fl)
    k = np.arange(n)
    return dense[k % f0, k // (n // fl)].astype(np.float64)


def lowpass_mask(len_in: int, ksize: int, keep: float = 0.25) -> np.ndarray:
    """A (1, f_{p-1}) band mask keeping ≈ `keep` of the bins nearest 0 and their mirror (near N)."""
    _, _, fl = freq_grid(len_in, ksize)
    bands = max(1, int(round(keep * fl / 2)))
    grid = np.zeros((1, fl), dtype=bool)
    grid[0, :bands] = True
    grid[0, fl - bands :] = True
    return grid


def comb_mask(len_in: int, ksize: int, keep: float = 0.25) -> np.ndarray:
    """A (f_0, 1) mask keeping every (1/keep)-th first digit: the bins k ≡ 0 (mod 1/keep), a filter that is
    periodic with period N·keep. Its zero blocks are whole outer groups, so their inner transforms are skipped."""
    _, f0, _ = freq_grid(len_in, ksize)
    stride = int(round(1 / keep))
    if stride < 1 or f0 % stride:
        raise ValueError(f"comb_mask: keep={keep} needs 1/keep dividing f_0 = {f0}")
    grid = np.zeros((f0, 1), dtype=bool)
    grid[::stride] = True
    return grid


# ----------------------------------------------------------------------------------------------------
# Constants (numpy float64 at trace time, stored fp32)
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _dft64(m: int) -> np.ndarray:
    j = np.arange(m)
    return np.exp(-2j * np.pi * np.outer(j, j) / m)


@functools.lru_cache(maxsize=None)
def _twiddle64(factors: tuple[int, ...], level: int) -> np.ndarray:
    f = factors[level]
    rest = int(np.prod(factors[level + 1 :]))
    return np.exp(-2j * np.pi * np.outer(np.arange(f), np.arange(rest)) / (f * rest))


def forward_scale(plan: Plan) -> float:
    """The factor a `scaled` forward transform applies (a power of two; the inverse applies 1/(N·it))."""
    return 2.0 ** -sum((f.bit_length() - 1) // 2 for f in plan.factors)


def _planes(z: np.ndarray):
    return jnp.asarray(z.real, jnp.float32), jnp.asarray(z.imag, jnp.float32)


def stage_constants(plan: Plan, level: int, *, scaled: bool = False, inverse: bool = False):
    """(F, T) planes for one level; rows/cols restricted to the plan's kept digits and time rows.

    Forward: F (k_j, n_j) and T (k_j, n_rest). Inverse: conj F as (n_j, k_j) and conj T.
    `scaled` forward: F · 2^-floor(b_j/2); inverse: conj F · 2^-ceil(b_j/2) (module doc, Scaling).
    """
    f = plan.factors
    p = len(f)
    dft = _dft64(f[level])
    bits = f[level].bit_length() - 1
    if inverse:
        dft = dft * 2.0 ** -((bits + 1) // 2)
    elif scaled:
        dft = dft * 2.0 ** -(bits // 2)
    tw = _twiddle64(f, level) if level < p - 1 else None
    if not inverse:
        if level == 0:
            dft = dft[np.ix_(plan.keep_rows, range(plan.rows_in))]
            tw = tw[list(plan.keep_rows)]
        if level == p - 1:
            dft = dft[:, list(plan.keep_cols)]  # used as x @ F (n, k)
    else:
        dft = np.conj(dft)
        tw = None if tw is None else np.conj(tw)
        if level == 0:
            dft = dft[np.ix_(range(plan.rows_out), plan.keep_rows)]
            tw = tw[list(plan.keep_rows)]
        if level == p - 1:
            dft = dft[list(plan.keep_cols), :]  # used as y @ G (k, n)
    return _planes(dft), (None if tw is None else _planes(tw))


# ----------------------------------------------------------------------------------------------------
# Complex helpers on planes
# ----------------------------------------------------------------------------------------------------


def _mm(spec: str, a, b, precision: str = "fp32"):
    return _precision.dot(functools.partial(jnp.einsum, spec), a, b, precision)


def cmatmul(spec: str, a, b, precision: str = "fp32"):
    """Complex einsum on (re, im) planes; either side may be real (im None). 4, 2 or 1 real matmuls."""
    ar, ai = a
    br, bi = b
    mm = functools.partial(_mm, spec, precision=precision)
    rr = mm(ar, br)
    if ai is None and bi is None:
        return rr, None
    if ai is None:
        return rr, mm(ar, bi)
    if bi is None:
        return rr, mm(ai, br)
    return rr - mm(ai, bi), mm(ar, bi) + mm(ai, br)


def cmul(a, b):
    ar, ai = a
    br, bi = b
    if ai is None:
        return ar * br, ar * bi
    return ar * br - ai * bi, ar * bi + ai * br


# ----------------------------------------------------------------------------------------------------
# Transforms (XLA einsums). Arrays carry arbitrary leading axes "…" and the transform on the trailing ones.
# ----------------------------------------------------------------------------------------------------


def pad_rows(x, plan: Plan, rows: int | None = None):
    """(…, L_in) real → (…, rows, R_0), zero-filled past L_in."""
    rows = plan.rows_in if rows is None else rows
    length = x.shape[-1]
    total = rows * plan.rest0
    if length < total:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, total - length)])
    elif length > total:
        x = x[..., :total]
    return x.reshape(*x.shape[:-1], rows, plan.rest0)


def forward_levels(z, plan: Plan, start: int, stop: int, *, scaled: bool, precision: str = "fp32"):
    """Forward levels start..stop-1 on planes z. Input layout at level j: (…, f_j-or-rows, R_j)."""
    f = plan.factors
    p = len(f)
    for level in range(start, stop):
        (fr, fi), tw = stage_constants(plan, level, scaled=scaled)
        if level == p - 1:
            z = cmatmul("...n,nk->...k", z, (fr, fi), precision)
        else:
            z = cmatmul("kn,...nm->...km", (fr, fi), z, precision)
            z = cmul(z, tw)
            if level + 1 < p - 1:
                shape = z[0].shape
                rest_next = int(np.prod(f[level + 2 :]))
                z = tuple(c.reshape(*shape[:-1], f[level + 1], rest_next) for c in z)
    return z


def inverse_levels(z, plan: Plan, start: int, stop: int, *, real_out: bool = False, precision: str = "fp32"):
    """Inverse levels start down to stop (start > stop-1), e.g. (p-1 … 0). Returns merged rest axis.

    Input layout: (…, k_0, …, k_start) (spectrum layout); output after level j: (…, k_0..k_{j-1}, R_{j-1}).
    """
    f = plan.factors
    p = len(f)
    for level in range(start, stop - 1, -1):
        (gr, gi), tw = stage_constants(plan, level, inverse=True)
        if level == p - 1:
            z = cmatmul("...k,kn->...n", z, (gr, gi), precision)
        else:
            z = cmul(z, tw)
            if level == 0 and real_out:
                zr, zi = z
                mm = functools.partial(_mm, "nk,...km->...nm", precision=precision)
                z = (mm(gr, zr) - mm(gi, zi), None)
            else:
                z = cmatmul("nk,...km->...nm", (gr, gi), z, precision)
        shape = z[0].shape
        if level < p - 1:
            merged = shape[-2] * shape[-1]
            z = tuple(None if c is None else c.reshape(*shape[:-2], merged) for c in z)
    return z


def forward_real(x, plan: Plan, *, scaled: bool, rows: int | None = None, precision: str = "fp32"):
    """Spectrum planes (…, *plan.spectrum_shape) of real x (…, L) (zero-padded to N)."""
    xr = pad_rows(x.astype(jnp.float32), plan, rows)
    if rows is not None and rows != plan.rows_in:
        plan = _with_rows_in(plan, rows)
    return forward_levels((xr, None), plan, 0, plan.stages, scaled=scaled, precision=precision)


def _with_rows_in(plan: Plan, rows: int) -> Plan:
    return dataclasses.replace(plan, rows_in=rows)


def inverse_real(z, plan: Plan, n_out: int | None = None, precision: str = "fp32"):
    """Real time signal (…, n_out) from spectrum planes in the plan's layout."""
    n_out = plan.n_out if n_out is None else n_out
    if n_out != plan.n_out:
        plan = dataclasses.replace(plan, rows_out=_ceil_div(n_out, plan.rest0), n_out=n_out)
    out, _ = inverse_levels(z, plan, plan.stages - 1, 0, real_out=True, precision=precision)
    return out[..., :n_out]


def mask_array(plan: Plan):
    """Residual 0/1 mask broadcastable to the spectrum layout (rows, 1, …, 1, cols), or None."""
    if plan.mask is None:
        return None
    m = np.asarray(plan.mask, np.float32)
    shape = (m.shape[0],) + (1,) * (plan.stages - 2) + (m.shape[1],)
    return jnp.asarray(m.reshape(shape))


def filter_spectrum(k, plan: Plan):
    """Filter spectrum planes (H, *spectrum_shape) of k (K, H), masked, computed by our DFT matmuls."""
    kt = jnp.swapaxes(k.astype(jnp.float32), 0, 1)  # (H, K)
    rows = _ceil_div(k.shape[0], plan.rest0)
    kr, ki = forward_real(kt, plan, scaled=False, rows=rows)
    m = mask_array(plan)
    if m is not None:
        kr, ki = kr * m, ki * m
    return kr, ki


def conv_xla_matmul(x_bhl, spec, plan: Plan, precision: str = "fp32"):
    """(x ∗ k)[0:n_out] for x (B, H, L_in) fp32 and a spectrum from `filter_spectrum`; (B, H, n_out)."""
    z = forward_real(x_bhl, plan, scaled=True, precision=precision)
    z = cmul(z, spec)
    return inverse_real(z, plan, precision=precision)
