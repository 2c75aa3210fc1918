"""Fitting modal filters to long-convolution impulse responses.

Pipeline per filter (float64 NumPy, then an optional optax refinement in fp32):

1. Hankel SVD of the strictly causal part, 𝓗_ij = h_{i+j+1} (square, n = min(L//2, max_hankel)). Its
   singular values σ_1 ≥ σ_2 ≥ … bound every approximant: a real system of McMillan degree m has
   H∞ error ≥ σ_{m+1} (AAK). An order-d modal filter (d complex modes) has degree ≤ 2d, so the
   "first neglected Hankel singular value" reported for order d is σ_{2d+1}.
2. Poles by ESPRIT / matrix pencil on the dominant left singular subspace (shift invariance), with any
   |λ| ≥ 1 reflected inside the unit circle (λ → 1/λ̄) and clipped to |λ| ≤ r_max.
3. Residues by linear least squares on Re Σ R_n λ_n^{t-1} (real unknowns Re R, Im R).
4. Gradient refinement (optax Adam) of the relative squared error with the stable parameterisation
   λ = exp(-exp(ν)) e^{iθ}; a channel keeps the refined fit only if it improved.

Order selection: a fixed ``order``; or ``target`` (smallest order in ``candidates`` up to ``max_order``,
plus ``max_order`` itself, whose relative ℓ2 error ≤ target; the largest if none reaches it); or ``hankel_tol`` (smallest order with σ_{2d+1}/σ_1 ≤ tol). Modes a filter does not
need are padded with zero residues so that a layer's bank has one order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from lm.distill.modal import ModalParams, materialize_np

R_MAX = 0.99999
R_MIN = 1e-3  # poles smaller than this become λ = 0 (a pure tap at t = 1): a tiny complex λ would need Im R ~ h/|λ|
MAX_RESIDUE_RATIO = 1e6  # residues beyond this × max|h| are dropped as ill-conditioned
PAD_POLE = 0.5


class DistillError(ValueError):
    """Bad input to distillation (order, shapes, a model without long filters, ...)."""


def _check_order(order) -> int:
    if order is None or isinstance(order, bool) or int(order) != order or int(order) <= 0:
        raise DistillError(f"order must be a positive integer (number of complex modes); got {order!r}")
    return int(order)


def hankel_matrix(h, size: int | None = None) -> np.ndarray:
    """Square Hankel matrix 𝓗_ij = h_{i+j+1}, i, j < n, n = min(len(h)//2, size)."""
    h = np.asarray(h, np.float64)
    n = len(h) // 2 if size is None else min(len(h) // 2, int(size))
    if n < 1:
        raise DistillError(f"filter too short for a Hankel matrix: length {len(h)}")
    idx = np.arange(n)[:, None] + np.arange(n)[None, :] + 1
    return h[idx]


def hankel_singular_values(h, max_size: int = 1024) -> np.ndarray:
    """Singular values of `hankel_matrix(h, max_size)`, descending (h includes tap 0, which is not used).

    The square Hankel matrix is symmetric, so σ = |eigenvalues| (`numpy.linalg.eigvalsh`)."""
    return np.sort(np.abs(np.linalg.eigvalsh(hankel_matrix(h, max_size))))[::-1]


def hankel_svd(h, max_size: int = 1024, keep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(u (n, keep) leading left singular vectors, σ (n,) descending) of `hankel_matrix(h, max_size)`.

    The square Hankel matrix is symmetric: its singular vectors are its eigenvectors ordered by
    |eigenvalue| and σ = |eigenvalue| (`numpy.linalg.eigh`, several times faster than an SVD at n = 1024).
    ``keep`` (default all) limits the stored vectors; ESPRIT for real order m needs m + 1.
    """
    w, v = np.linalg.eigh(hankel_matrix(h, max_size))
    idx = np.argsort(-np.abs(w), kind="stable")
    return v[:, idx[:keep]], np.abs(w)[idx]


def _reflect(poles: np.ndarray, r_max: float = R_MAX) -> np.ndarray:
    poles = poles[np.isfinite(poles)]
    mag = np.abs(poles)
    with np.errstate(divide="ignore", invalid="ignore"):
        poles = np.where(mag > 1.0, 1.0 / np.conj(poles), poles)
    mag = np.abs(poles)
    poles = np.where(mag > r_max, poles * (r_max / np.maximum(mag, 1e-300)), poles)
    return np.where(np.abs(poles) < R_MIN, 0.0, poles)


def esprit_poles(h, real_order: int, max_size: int = 1024, u: np.ndarray | None = None) -> np.ndarray:
    """`real_order` poles of h[1:] by ESPRIT on the Hankel column space, reflected into |λ| < 1.

    ``u``: the left singular vectors of `hankel_matrix(h, max_size)` if already computed.
    """
    if u is None:
        u, _ = hankel_svd(h, max_size, keep=int(real_order) + 1)
    m = min(int(real_order), u.shape[1] - 1, len(u) - 1)
    if m < 1:
        return np.zeros(0, np.complex128)
    um = u[:, :m]
    a, *_ = np.linalg.lstsq(um[:-1], um[1:], rcond=None)
    return _reflect(np.linalg.eigvals(a))


def select_modes(poles: np.ndarray, order: int) -> np.ndarray:
    """One mode per conjugate pair (Im ≥ 0) plus each real pole; at most ``order`` of them."""
    tol = 1e-9
    pos = poles[poles.imag > tol]
    real = poles[np.abs(poles.imag) <= tol].real.astype(np.complex128)
    modes = np.concatenate([pos, real])
    return modes[:order]


def modal_basis(poles: np.ndarray, length: int) -> np.ndarray:
    """Real design matrix (length-1, 2d): columns Re λ^{t-1}, -Im λ^{t-1} for t = 1..length-1."""
    t = np.arange(length - 1)
    pw = poles[None, :] ** t[:, None]
    return np.concatenate([pw.real, -pw.imag], axis=1)


def least_squares_residues(h, poles, rcond: float = 1e-7) -> np.ndarray:
    """Complex residues minimising ‖h[1:] − Re Σ R λ^{t-1}‖₂ for the given poles.

    Truncated-SVD least squares on the column-normalised design (``rcond`` relative to the largest
    singular value): nearly collinear modes would otherwise get huge cancelling residues that an fp32
    recurrence cannot reproduce.
    """
    h = np.asarray(h, np.float64)
    poles = np.asarray(poles, np.complex128)
    if poles.size == 0:
        return np.zeros(0, np.complex128)
    a = modal_basis(poles, len(h))
    # column scaling for conditioning
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    coef, *_ = np.linalg.lstsq(a / scale, h[1:], rcond=rcond)
    coef = coef / scale
    d = len(poles)
    res = coef[:d] + 1j * coef[d:]
    bound = MAX_RESIDUE_RATIO * max(float(np.abs(h[1:]).max()), 1e-30)
    bad = ~np.isfinite(res) | (np.abs(res) > bound)
    if bad.any():  # drop ill-conditioned modes (zero residue) and re-solve with the rest
        keep = ~bad
        res = np.zeros(d, np.complex128)
        if keep.any():
            res[keep] = least_squares_residues(h, poles[keep], rcond)
    return res


def rel_error(h, hhat) -> float:
    h = np.asarray(h, np.float64)
    den = np.linalg.norm(h)
    return float(np.linalg.norm(h - hhat) / (den if den > 0 else 1.0))


def _fit_exact_order(h: np.ndarray, order: int, max_size: int, u=None, sv=None) -> tuple[np.ndarray, np.ndarray]:
    """ESPRIT + LS with at most `order` complex modes (lowering the real order if real poles overflow).

    The real order is also capped at the numerical rank of the Hankel matrix (σ_k > 1e-12 σ_1), so a
    filter of lower order than asked gets no spurious noise poles (and ill-conditioned residues).
    """
    n_hankel = min(len(h) // 2, max_size)
    real_order = min(2 * order, max(n_hankel - 1, 0))
    if sv is not None:
        scale = max(float(sv[0]), 1e-300)
        real_order = min(real_order, int(np.sum(sv > max(1e-12 * scale, 1e-30))))
        if float(sv[0]) <= 1e-30:  # h[1:] is (numerically) zero: no modes needed
            real_order = 0
    best = None
    while real_order >= 1:
        poles = esprit_poles(h, real_order, max_size, u)
        modes = select_modes(poles, 10**9)
        if len(modes) <= order:
            best = modes
            break
        real_order -= 1
    if best is None:
        best = np.zeros(0, np.complex128)
    residues = least_squares_residues(h, best)
    return best, residues


def _pad(poles: np.ndarray, residues: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    k = order - len(poles)
    if k <= 0:
        return poles[:order], residues[:order]
    # distinct padding poles (zero residues) so refinement can use them
    pad_p = PAD_POLE * np.exp(1j * np.linspace(0.3, 2.8, k))
    return np.concatenate([poles, pad_p]), np.concatenate([residues, np.zeros(k, np.complex128)])


@dataclasses.dataclass
class FilterReport:
    """Per-filter fit summary."""

    channel: int
    order: int  # complex modes actually used (before padding); <= requested_order
    rel_error: float  # relative ℓ2 error of the whole filter (tap 0 is exact)
    hankel_next: float  # σ_{2·requested_order+1}, first neglected Hankel singular value (H∞ error lower bound)
    hankel_first: float  # σ_1
    l1_error: float  # ‖h − ĥ‖₁: bound on |y − ŷ| per unit ‖x‖∞
    mse: float = 0.0  # mean over the L taps of (h_t − ĥ_t)², in filter units (not normalised)
    hankel_d1: float = 0.0  # σ_{requested_order+1}: the bound if the order counted real poles (degree d)
    refined: bool = False
    requested_order: int = 0  # the order asked for (fixed, or picked by target / hankel_tol)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sigma(sv: np.ndarray, k: int) -> float:
    """σ_{k+1} (0-based index k), 0 beyond the Hankel size."""
    return float(sv[k]) if k < len(sv) else 0.0


def fit_filter(h, order: int | None = None, *, target: float | None = None, hankel_tol: float | None = None,
               candidates: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), max_order: int | None = None,
               max_hankel: int = 1024, svd: tuple[np.ndarray, np.ndarray] | None = None,
               ) -> tuple[np.ndarray, np.ndarray, float, FilterReport]:
    """Fit one filter h (length L, tap 0 = feedthrough) in float64.

    Returns (poles (d,), residues (d,), h0, report) with d = the selected order (no padding).
    Exactly one of ``order``, ``target``, ``hankel_tol`` is used (``order`` wins if given). ``svd``:
    `hankel_svd(h, max_hankel)` if already computed (with at least 2·order + 1 vectors).
    """
    h = np.asarray(h, np.float64)
    if h.ndim != 1 or len(h) < 4:
        raise DistillError(f"a filter must be 1-D with length >= 4; got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise DistillError("filter contains NaN or inf")
    u, sv = hankel_svd(h, max_hankel) if svd is None else svd
    if order is not None:
        orders = [_check_order(order)]
    elif hankel_tol is not None:
        ratio = sv / (sv[0] if sv[0] > 0 else 1.0)
        cap = _check_order(max_order or max(candidates))
        d = next((d for d in range(1, cap + 1) if (2 * d >= len(sv) or ratio[2 * d] <= hankel_tol)), cap)
        orders = [d]
    elif target is not None:
        cap = _check_order(max_order or max(candidates))
        orders = sorted({_check_order(c) for c in candidates if c <= cap} | {cap})
    else:
        raise DistillError("give an order, a target relative error, or a hankel_tol")
    best = None
    for d in orders:
        poles, res = _fit_exact_order(h, d, max_hankel, u, sv)
        hhat = materialize_np(poles[None], res[None], h[:1], len(h))[:, 0] if len(poles) else np.r_[h[0], np.zeros(len(h) - 1)]
        err = rel_error(h, hhat)
        best = (d, poles, res, hhat, err)
        if target is None or order is not None or err <= target:
            break
    d, poles, res, hhat, err = best
    report = FilterReport(channel=-1, order=len(poles), requested_order=d, rel_error=err,
                          hankel_next=_sigma(sv, 2 * d), hankel_d1=_sigma(sv, d), hankel_first=float(sv[0]),
                          l1_error=float(np.abs(h - hhat).sum()), mse=float(np.mean((h - hhat) ** 2)))
    return poles, res, float(h[0]), report


# ----------------------------------------------------------------------------------------------------
# Gradient refinement (optax), batched over channels
# ----------------------------------------------------------------------------------------------------


def refine(h, poles, residues, *, steps: int = 500, lr: float = 1e-2, weights=None):
    """Adam refinement of (λ, R) for a bank of filters: h (C, L) float64, poles/residues (C, d) complex.

    λ = exp(-exp(ν) + iθ) keeps |λ| < 1. Loss per channel: ‖h[1:] − ĥ[1:]‖² / ‖h[1:]‖² (summed over
    channels, so channels do not interact). Returns the refined (poles, residues) as complex128.
    """
    import jax
    import jax.numpy as jnp
    import optax

    h = np.asarray(h, np.float64)
    c, length = h.shape
    tail = jnp.asarray(h[:, 1:], jnp.float32)
    norm2 = jnp.maximum(jnp.sum(tail**2, axis=1), 1e-30)
    mag = np.clip(np.abs(poles), 1e-6, R_MAX)
    params = {
        "nu": jnp.asarray(np.log(-np.log(mag)), jnp.float32),
        "theta": jnp.asarray(np.angle(poles), jnp.float32),
        "r_re": jnp.asarray(residues.real, jnp.float32),
        "r_im": jnp.asarray(residues.imag, jnp.float32),
    }
    t = jnp.arange(length - 1, dtype=jnp.float32)

    def loss_fn(p):
        log_r = -jnp.exp(p["nu"])
        mag_t = jnp.exp(log_r[..., None] * t)
        ang = p["theta"][..., None] * t
        hhat = jnp.einsum("cd,cdt->ct", p["r_re"], mag_t * jnp.cos(ang)) - jnp.einsum(
            "cd,cdt->ct", p["r_im"], mag_t * jnp.sin(ang))
        per = jnp.sum((hhat - tail) ** 2, axis=1) / norm2
        return jnp.sum(per), per

    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def run(params, state):
        def body(carry, _):
            p, s, best_p, best_l = carry
            (_, per), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
            better = per < best_l
            best_p = jax.tree.map(lambda b, q: jnp.where(better[:, None], q, b), best_p, p)
            best_l = jnp.minimum(best_l, per)
            upd, s = opt.update(g, s, p)
            return (optax.apply_updates(p, upd), s, best_p, best_l), None

        init_l = jnp.full((c,), jnp.inf)
        (p, s, best_p, best_l), _ = jax.lax.scan(body, (params, state, params, init_l), None, length=steps)
        _, per = loss_fn(p)
        better = per < best_l
        best_p = jax.tree.map(lambda b, q: jnp.where(better[:, None], q, b), best_p, p)
        return best_p

    best = jax.device_get(run(params, state))
    mag = np.exp(-np.exp(np.asarray(best["nu"], np.float64)))
    new_poles = mag * np.exp(1j * np.asarray(best["theta"], np.float64))
    new_res = np.asarray(best["r_re"], np.float64) + 1j * np.asarray(best["r_im"], np.float64)
    return new_poles, new_res


def fit_filters(h, order: int | None = None, *, target: float | None = None, hankel_tol: float | None = None,
                refine_steps: int = 0, lr: float = 1e-2, max_hankel: int = 1024,
                candidates: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), max_order: int | None = None,
                svds: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
                ) -> tuple[ModalParams, list[FilterReport]]:
    """Fit a bank of filters h (L, C) (the `kernels.fftconv` layout). Returns fp32 `ModalParams` of one
    order (the largest selected; smaller fits padded with zero residues) and a report per channel.
    ``svds``: per channel `hankel_svd` results to reuse (see `fit_filters_by_order`)."""
    h = np.asarray(h, np.float64)
    if h.ndim != 2:
        raise DistillError(f"filters must be (length, channels); got shape {h.shape}")
    if order is not None:
        _check_order(order)
    length, channels = h.shape
    fits = []
    for ch in range(channels):
        poles, res, h0, rep = fit_filter(h[:, ch], order, target=target, hankel_tol=hankel_tol,
                                         candidates=candidates, max_order=max_order, max_hankel=max_hankel,
                                         svd=None if svds is None else svds[ch])
        rep.channel = ch
        fits.append((poles, res, h0, rep))
    d = max(max(f[3].order for f in fits), 1)
    poles = np.stack([_pad(f[0], f[1], d)[0] for f in fits])
    res = np.stack([_pad(f[0], f[1], d)[1] for f in fits])
    h0 = np.array([f[2] for f in fits])
    reports = [f[3] for f in fits]
    if refine_steps > 0:
        new_p, new_r = refine(h.T, poles, res, steps=refine_steps, lr=lr)
        hh_old = materialize_np(poles, res, h0, length)
        hh_new = materialize_np(new_p, new_r, h0, length)
        for ch, rep in enumerate(reports):
            err_new = rel_error(h[:, ch], hh_new[:, ch])
            if err_new < rep.rel_error:
                poles[ch], res[ch] = new_p[ch], new_r[ch]
                rep.rel_error, rep.refined = err_new, True
                rep.order = int(np.count_nonzero(np.abs(new_r[ch]) > 0))  # padded modes may now be in use
                rep.l1_error = float(np.abs(h[:, ch] - hh_new[:, ch]).sum())
                rep.mse = float(np.mean((h[:, ch] - hh_new[:, ch]) ** 2))
            else:
                rep.l1_error = float(np.abs(h[:, ch] - hh_old[:, ch]).sum())
    return ModalParams.from_complex(poles, res, h0), reports


def fit_filters_by_order(h, orders: Sequence[int], *, refine_steps: Sequence[int] = (0,), lr: float = 1e-2,
                         max_hankel: int = 1024) -> dict[tuple[int, int], tuple[ModalParams, list[FilterReport]]]:
    """{(d, r): `fit_filters(h, d, refine_steps=r)`} for every order d in ``orders`` and refinement length r
    in ``refine_steps`` (h (L, C)), decomposing each channel's Hankel matrix once (`hankel_svd`, the
    dominant cost at L = 2048) for all of them."""
    h = np.asarray(h, np.float64)
    if h.ndim != 2:
        raise DistillError(f"filters must be (length, channels); got shape {h.shape}")
    orders = [_check_order(d) for d in orders]
    svds = [hankel_svd(h[:, ch], max_hankel, keep=2 * max(orders) + 1) for ch in range(h.shape[1])]
    return {(d, int(r)): fit_filters(h, d, refine_steps=int(r), lr=lr, max_hankel=max_hankel, svds=svds)
            for d in orders for r in refine_steps}


def summarize(reports: Sequence[FilterReport]) -> dict:
    """Aggregate statistics of a list of reports."""
    errs = np.array([r.rel_error for r in reports])
    return {
        "filters": len(reports),
        "order_max": int(max(r.order for r in reports)),
        "order_mean": float(np.mean([r.order for r in reports])),
        "rel_error_median": float(np.median(errs)),
        "rel_error_max": float(errs.max()),
        "rel_error_mean": float(errs.mean()),
        "hankel_next_rel_median": float(np.median([r.hankel_next / max(r.hankel_first, 1e-300) for r in reports])),
        "hankel_d1_rel_median": float(np.median([r.hankel_d1 / max(r.hankel_first, 1e-300) for r in reports])),
        "mse_median": float(np.median([r.mse for r in reports])),
        "mse_mean": float(np.mean([r.mse for r in reports])),
        "rel_mse_mean": float(np.mean(errs**2)),
    }


def hinf_error(h, hhat, oversample: int = 16) -> float:
    """max_ω |E(e^{iω})| of the truncated error e = h − ĥ on a grid of oversample·L frequencies."""
    e = np.asarray(h, np.float64) - np.asarray(hhat, np.float64)
    n = 1 << math.ceil(math.log2(max(len(e) * oversample, 2)))
    return float(np.abs(np.fft.rfft(e, n=n)).max())
