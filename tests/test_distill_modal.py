"""Golden tests for the modal filter math (reference/distill.md §8, items 1, 2, 4, 7)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.fftconv.reference import direct_causal_conv_np
from lm.distill import modal
from lm.distill.modal import ModalParams, ModalState


def random_modal(rng, channels=3, order=4, r_lo=0.97, r_hi=0.999, theta_hi=0.5, theta_lo=0.0):
    """Poles with |λ| in [r_lo, r_hi] and phases in [theta_lo, theta_hi]; at least one phase >= 0.3."""
    mag = rng.uniform(r_lo, r_hi, (channels, order))
    theta = rng.uniform(theta_lo, theta_hi, (channels, order))
    theta[:, 0] = max(0.3, theta_lo) + (theta_hi - max(0.3, theta_lo)) * rng.uniform(size=channels)
    poles = mag * np.exp(1j * theta)
    res = (rng.normal(size=(channels, order)) + 1j * rng.normal(size=(channels, order))) / order
    h0 = rng.normal(size=channels)
    return poles, res, h0


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def buggy_inplace_update(params: ModalParams, state: ModalState, x_t) -> ModalState:
    """The StripedHyena/vortex pattern: Re s is overwritten, then Im s reads the NEW Re s. Wrong."""
    a, b = params.pole_re, params.pole_im
    re = a * state.re - b * state.im + x_t[..., None]
    im = b * re + a * state.im  # reads the updated real plane
    return ModalState(re, im)


def test_materialize_matches_numpy_and_definition():
    rng = np.random.default_rng(0)
    poles, res, h0 = random_modal(rng)
    p = ModalParams.from_complex(poles, res, h0)
    h32 = np.asarray(modal.materialize(p, 300))
    h64 = modal.materialize_np(poles, res, h0, 300)
    assert h32.shape == (300, 3)
    # definition: ĥ_0 = h0, ĥ_t = Re Σ R λ^{t-1}
    np.testing.assert_allclose(h64[0], h0)
    np.testing.assert_allclose(h64[5], np.real(np.sum(res * poles**4, -1)), rtol=1e-12)
    assert rel(h32, h64) < 1e-5


def test_fft_conv_of_materialized_filter_equals_recurrence():
    """§8.1: ĥ through an FFT conv == step-by-step recurrence (fp64 exact, fp32 < 1e-5 relative)."""
    rng = np.random.default_rng(1)
    poles, res, h0 = random_modal(rng, channels=4, order=6)
    x = rng.normal(size=(2, 257, 4))
    # float64: direct conv with ĥ vs complex128 recurrence
    h64 = modal.materialize_np(poles, res, h0, x.shape[1])
    y_conv64 = direct_causal_conv_np(x, h64)
    y_rec64, _ = modal.recurrence_complex_np(poles, res, h0, x)
    assert rel(y_conv64, y_rec64) < 1e-12
    # float32: FFT conv of the materialised filter vs the real-pair recurrence (lax.scan)
    p = ModalParams.from_complex(poles, res, h0)
    y_fft = modal.modal_conv(p, jnp.asarray(x, jnp.float32))
    y_rec, _ = modal.recurrence(p, jnp.asarray(x, jnp.float32))
    assert rel(y_fft, y_rec64) < 1e-5
    assert rel(y_rec, y_rec64) < 1e-5


@pytest.mark.parametrize("r_range", [(0.97, 0.97), (0.97, 0.999)])
def test_prefill_methods_agree_fp32(r_range):
    """§8.2: fft / vandermonde / chunked / scan final states agree < 1e-5 relative in fp32, |λ| near 1,
    phases up to 0.5 rad (and at least one >= 0.3 per channel)."""
    rng = np.random.default_rng(2)
    poles, res, h0 = random_modal(rng, channels=5, order=4, r_lo=r_range[0], r_hi=r_range[1])
    x = rng.normal(size=(2, 256, 5))
    _, s_ref = modal.recurrence_complex_np(poles, res, h0, x)  # complex128 ground truth
    p = ModalParams.from_complex(poles, res, h0)
    xj = jnp.asarray(x, jnp.float32)
    states = {m: modal.prefill_state(p, xj, m) for m in modal.PREFILL_METHODS}
    states["chunked_ragged"] = modal.prefill_chunked(p, xj, chunk=100)  # T not a multiple of the chunk
    _, states["recurrence"] = modal.recurrence(p, xj)
    ref = np.concatenate([s_ref.real, s_ref.imag])
    for name, s in states.items():
        got = np.concatenate([np.asarray(s.re), np.asarray(s.im)])
        assert rel(got, ref) < 1e-5, name
    # pairwise agreement
    for a in states:
        for b in states:
            sa = np.concatenate([np.asarray(states[a].re), np.asarray(states[a].im)])
            sb = np.concatenate([np.asarray(states[b].re), np.asarray(states[b].im)])
            assert rel(sa, sb) < 1e-5, (a, b)


def test_inplace_real_imag_bug_is_caught():
    """§7.1: the in-place update (Im reads the new Re) is far off; the correct one is not."""
    rng = np.random.default_rng(3)
    mag = np.full((1, 4), 0.97)
    theta = rng.uniform(0, 0.5, (1, 4))
    theta[0, 0] = 0.45
    poles = mag * np.exp(1j * theta)
    res = np.ones((1, 4), complex)
    x = rng.normal(size=(1, 256, 1))
    _, s_ref = modal.recurrence_complex_np(poles, res, np.zeros(1), x)
    ref = np.concatenate([s_ref.real, s_ref.imag])
    p = ModalParams.from_complex(poles, res, np.zeros(1))
    good = modal.init_state(1, p)
    bad = modal.init_state(1, p)
    for t in range(x.shape[1]):
        xt = jnp.asarray(x[:, t], jnp.float32)
        good = modal.update(p, good, xt)
        bad = buggy_inplace_update(p, bad, xt)
    err_good = rel(np.concatenate([good.re, good.im]), ref)
    err_bad = rel(np.concatenate([bad.re, bad.im]), ref)
    assert err_good < 1e-5
    assert err_bad > 0.05, err_bad  # the buggy order is wrong by O(10%) or more
    # the vectorised prefill matches the correct recurrence, not the buggy one
    s_v = modal.prefill_vandermonde(p, jnp.asarray(x, jnp.float32))
    assert rel(np.concatenate([s_v.re, s_v.im]), ref) < 1e-5


def test_real_pairs_equal_complex128_reference():
    """§8.4: the real 2x2 step equals the complex128 recurrence (outputs and states)."""
    rng = np.random.default_rng(4)
    poles, res, h0 = random_modal(rng, channels=3, order=8, r_lo=0.5, r_hi=0.999, theta_hi=np.pi)
    x = rng.normal(size=(2, 200, 3))
    y_ref, s_ref = modal.recurrence_complex_np(poles, res, h0, x)
    p = ModalParams.from_complex(poles, res, h0)
    state = modal.init_state(2, p)
    ys = []
    step = jax.jit(modal.step)
    for t in range(x.shape[1]):
        y, state = step(p, state, jnp.asarray(x[:, t], jnp.float32))
        ys.append(np.asarray(y))
    assert rel(np.stack(ys, 1), y_ref) < 1e-5
    assert rel(np.concatenate([state.re, state.im]), np.concatenate([s_ref.real, s_ref.imag])) < 1e-5


def test_prefill_then_step_continues_exactly():
    """Prefill state + steps reproduce the outputs of the full sequence."""
    rng = np.random.default_rng(5)
    poles, res, h0 = random_modal(rng, channels=3, order=4)
    x = rng.normal(size=(1, 150, 3))
    y_ref, _ = modal.recurrence_complex_np(poles, res, h0, x)
    p = ModalParams.from_complex(poles, res, h0)
    xj = jnp.asarray(x, jnp.float32)
    y_pre, state = modal.prefill(p, xj[:, :100], method="chunked", chunk=32)
    assert rel(y_pre, y_ref[:, :100]) < 1e-5
    ys = []
    for t in range(100, 150):
        y, state = modal.step(p, state, xj[:, t])
        ys.append(np.asarray(y))
    assert rel(np.stack(ys, 1), y_ref[:, 100:]) < 1e-5


def test_feedthrough_convention():
    """§8.7: with feedthrough h0 + D the first output is exactly (h0 + D) x_0; h0 is ĥ_0."""
    rng = np.random.default_rng(6)
    poles, res, h0 = random_modal(rng, channels=4, order=3)
    d_skip = rng.normal(size=4).astype(np.float32)
    p = ModalParams.from_complex(poles, res, h0)
    x = rng.normal(size=(2, 1, 4)).astype(np.float32)
    y, _ = modal.step(p, modal.init_state(2, p), jnp.asarray(x[:, 0]), feedthrough=jnp.asarray(d_skip))
    np.testing.assert_array_equal(np.asarray(y), (np.asarray(p.h0) + d_skip) * x[:, 0])
    h = np.asarray(modal.materialize(p, 8))
    np.testing.assert_array_equal(h[0], np.asarray(p.h0))
    # parallel path with the skip equals the recurrent path
    x = rng.normal(size=(2, 64, 4)).astype(np.float32)
    y_par = modal.modal_conv(p, jnp.asarray(x), feedthrough=jnp.asarray(d_skip))
    y_rec, _ = modal.recurrence(p, jnp.asarray(x), feedthrough=jnp.asarray(d_skip))
    assert rel(y_par, y_rec) < 1e-5


def test_bad_inputs():
    rng = np.random.default_rng(7)
    poles, res, h0 = random_modal(rng)
    p = ModalParams.from_complex(poles, res, h0)
    with pytest.raises(ValueError, match="unknown prefill method"):
        modal.prefill_state(p, jnp.zeros((1, 4, 3)), "bogus")
    with pytest.raises(ValueError, match="channels, order"):
        ModalParams.from_complex(poles[0], res[0], h0)
    with pytest.raises(ValueError, match="length"):
        modal.materialize(p, 0)
