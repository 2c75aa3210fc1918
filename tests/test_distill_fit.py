"""Golden tests for fitting (reference/distill.md §8, items 5, 6) and order selection."""

from __future__ import annotations

import numpy as np
import pytest

from lm.distill import fit, modal


def synthetic_filter(rng, pairs=4, length=1024, r=(0.95, 0.999)):
    poles = rng.uniform(*r, pairs) * np.exp(1j * rng.uniform(0.05, 3.0, pairs))
    res = rng.normal(size=pairs) + 1j * rng.normal(size=pairs)
    h0 = rng.normal()
    h = modal.materialize_np(poles[None], res[None], np.array([h0]), length)[:, 0]
    return h, poles, res, h0


def test_exact_low_order_filter_is_recovered():
    """§8.5: a real filter built from 4 conjugate pairs (real order 8) is recovered to < 1e-10 (fp64)."""
    rng = np.random.default_rng(0)
    h, poles, res, h0 = synthetic_filter(rng)
    sv = fit.hankel_singular_values(h)
    assert sv[8] / sv[7] < 1e-10  # the Hankel spectrum drops after the true real order
    p, r, h0_fit, rep = fit.fit_filter(h, order=4)
    assert rep.order == 4 and h0_fit == h0
    assert rep.rel_error < 1e-10
    np.testing.assert_allclose(np.sort_complex(p), np.sort_complex(poles), atol=1e-8)


def test_fit_filters_bank_and_real_poles():
    """A bank with a real pole and a mixed filter; fp32 ModalParams reproduce it (< 1e-5 in fp32)."""
    rng = np.random.default_rng(1)
    length = 512
    h1, *_ = synthetic_filter(rng, pairs=3, length=length)
    t = np.arange(length - 1)
    h2 = np.r_[0.3, 0.8 * 0.97**t - 0.5 * 0.9**t]  # two real poles
    bank = np.stack([h1, h2], axis=1)
    params, reports = fit.fit_filters(bank, order=3)
    assert params.order == 3 and params.channels == 2
    assert all(r.rel_error < 1e-8 for r in reports), [r.rel_error for r in reports]
    h32 = np.asarray(modal.materialize(params, length))
    assert np.linalg.norm(h32 - bank) / np.linalg.norm(bank) < 1e-5


def test_hankel_bound_sanity():
    """§8.6: the fit's H∞ error is >= σ_{2d+1} (AAK lower bound), through σ_1 of the error Hankel."""
    rng = np.random.default_rng(2)
    t = np.arange(383)
    # a filter that is not low order: decaying noise-modulated oscillation
    h = np.r_[1.0, np.exp(-t / 100) * np.cos(0.05 * t + 0.002 * t**1.5) + 0.05 * rng.normal(size=383) * np.exp(-t / 50)]
    sv = fit.hankel_singular_values(h)
    for d in (2, 8):
        p, r, h0, rep = fit.fit_filter(h, order=d)
        hhat = modal.materialize_np(p[None], r[None], np.array([h0]), len(h))[:, 0]
        sigma_err = fit.hankel_singular_values(h - hhat)[0]
        hinf = fit.hinf_error(h, hhat)
        assert rep.hankel_next == pytest.approx(sv[2 * d])
        assert sv[2 * d] <= sigma_err * (1 + 1e-9)  # Weyl: rank(𝓗_ĥ) <= 2d
        assert sigma_err <= hinf * (1 + 1e-6)
        assert hinf <= rep.l1_error * (1 + 1e-9)


def test_order_selection_target_and_hankel():
    rng = np.random.default_rng(3)
    h, *_ = synthetic_filter(rng, pairs=4, length=512)
    _, _, _, rep = fit.fit_filter(h, target=1e-8, candidates=(1, 2, 4, 8))
    assert rep.order == 4 and rep.rel_error < 1e-8
    _, _, _, rep = fit.fit_filter(h, hankel_tol=1e-10, max_order=16)
    assert rep.order == 4
    params, reports = fit.fit_filters(np.stack([h, h[:]], 1), target=1e-8, candidates=(2, 4, 8))
    assert params.order == 4
    # max_order itself is tried even when it is not a candidate (`longconv distill`: {1, 2, 4, …, max-order})
    _, _, _, rep = fit.fit_filter(h, target=1e-8, candidates=(1, 2, 8), max_order=5)
    assert rep.requested_order == 5 and rep.order == 4 and rep.rel_error < 1e-8


def test_refinement_improves_and_keeps_stability():
    rng = np.random.default_rng(4)
    t = np.arange(511)
    h = np.r_[0.0, np.exp(-t / 80.0) * np.sin(0.2 * t) * (1 + 0.3 * np.sin(0.011 * t))]
    h = np.stack([h, 0.5 * h[::-1].copy() * 0 + h], 1)
    params0, rep0 = fit.fit_filters(h, order=2)
    params1, rep1 = fit.fit_filters(h, order=2, refine_steps=300, lr=5e-3)
    for a, b in zip(rep0, rep1):
        assert b.rel_error <= a.rel_error + 1e-12
    poles, _, _ = params1.to_complex()
    assert np.all(np.abs(poles) < 1.0)


def test_esprit_reflects_unstable_poles():
    t = np.arange(255)
    h = np.r_[0.0, 1.01**t * np.cos(0.4 * t)]
    poles = fit.esprit_poles(h, 2)
    assert np.all(np.abs(poles) < 1.0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, None])
def test_bad_order_is_a_clear_error(bad):
    h = np.r_[1.0, 0.9 ** np.arange(63)]
    with pytest.raises(fit.DistillError, match="order must be a positive integer|give an order"):
        fit.fit_filter(h, order=bad) if bad is not None else fit.fit_filter(h)
    if bad is not None:
        with pytest.raises(fit.DistillError, match="order must be a positive integer"):
            fit.fit_filters(h[:, None], order=bad)


def test_bad_filter_shapes():
    with pytest.raises(fit.DistillError, match="length >= 4"):
        fit.fit_filter(np.ones(2), order=1)
    with pytest.raises(fit.DistillError, match="NaN"):
        fit.fit_filter(np.r_[1.0, np.nan, 1.0, 1.0, 1.0], order=1)
    with pytest.raises(fit.DistillError, match="length, channels"):
        fit.fit_filters(np.ones(16), order=1)


def test_hard_filters_give_usable_fp32_modes():
    """Random-init Hyena filters (w = 14, not low order): the fit stays finite in fp32 (no huge residues
    from tiny or near-real poles), and the fp32 ĥ equals the float64 ĥ of the same modes."""
    from flax import nnx

    from lm.mixers.filters import HyenaImplicitFilter

    bank = np.asarray(HyenaImplicitFilter(4, 512, emb_dim=33, width=64, w=14.0, rngs=nnx.Rngs(0))(512), np.float64)
    params, reports = fit.fit_filters(bank, order=32)
    poles, res, h0 = params.to_complex()
    assert np.isfinite(res).all() and np.abs(res).max() < 1e6 * np.abs(bank).max()
    assert np.all(np.abs(poles) < 1.0)
    h32 = np.asarray(modal.materialize(params, 512))
    h64 = modal.materialize_np(poles, res, h0, 512)
    assert np.linalg.norm(h32 - h64) / np.linalg.norm(h64) < 1e-4
    assert all(r.rel_error < 1.0 for r in reports)
