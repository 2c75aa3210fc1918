"""Modal filters: materialisation, prefill and the O(1) recurrent step.

Convention (Laughing-Hyena / savanna, "read before update"). A modal filter of order ``d`` for ``C``
channels holds, per channel c, ``d`` complex modes (pole λ, residue R) and a feedthrough tap h0:

    ĥ_0 = h0,        ĥ_t = Re Σ_{n<d} R_n λ_n^{t-1}    (t >= 1).

``d`` counts *complex* modes: the state is d complex (2d real) numbers per channel, and the real
system it represents has McMillan degree <= 2d (a conjugate pair costs one mode, the factor 2 is
absorbed in R). A real pole is a mode with Im λ = 0.

The recurrence that realises ĥ (state s ∈ ℂ^d per channel, s_0 = 0):

    y_t     = Re <R, s_t> + h0 · x_t
    s_{t+1} = λ ⊙ s_t + x_t

so after a T-token prompt s_T = Σ_{j<T} λ^{T-1-j} x_j. Everything is stored and computed as real fp32
planes (``pole_re, pole_im, res_re, res_im``); no complex dtype is needed. The step treats each mode as
the 2x2 real block [[a, -b], [b, a]] (λ = a + ib) and computes BOTH new planes from the OLD state:

    Re s' = a·Re s − b·Im s + x,      Im s' = b·Re s + a·Im s.

(Overwriting Re s first and reading it back in the Im update is the StripedHyena/vortex bug; see
`tests/test_distill_modal.py`.)

Prefill methods for the final state (all parallel, no Python loop over tokens):
``vandermonde`` (one einsum with λ^{T-1-t}), ``chunked`` (scan over chunks, bounded memory),
``scan`` (`jax.lax.associative_scan`, all states), ``fft`` (FFT convolution with λ^t, read index T-1).
Shapes: x (B, T, C); parameters (C, d); state planes (B, C, d).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PREFILL_METHODS = ("vandermonde", "chunked", "scan", "fft")


class ModalParams(NamedTuple):
    """A bank of C modal filters of order d, as real fp32 planes (a JAX pytree).

    pole_re, pole_im, res_re, res_im: (C, d); h0: (C,) the filter's own tap 0 (a mixer's D skip is
    added separately by the caller).
    """

    pole_re: jax.Array
    pole_im: jax.Array
    res_re: jax.Array
    res_im: jax.Array
    h0: jax.Array

    @property
    def channels(self) -> int:
        return int(self.pole_re.shape[0])

    @property
    def order(self) -> int:
        return int(self.pole_re.shape[1])

    @classmethod
    def from_complex(cls, poles, residues, h0, dtype=jnp.float32) -> "ModalParams":
        """Build from complex (C, d) poles/residues and (C,) h0 (NumPy or JAX, any precision)."""
        poles = np.asarray(poles)
        residues = np.asarray(residues)
        h0 = np.asarray(h0)
        if poles.ndim != 2 or poles.shape != residues.shape:
            raise ValueError(f"poles and residues must both be (channels, order); got {poles.shape}, {residues.shape}")
        if h0.shape != poles.shape[:1]:
            raise ValueError(f"h0 must be (channels,) = {poles.shape[:1]}; got {h0.shape}")
        return cls(
            jnp.asarray(poles.real, dtype), jnp.asarray(poles.imag, dtype),
            jnp.asarray(residues.real, dtype), jnp.asarray(residues.imag, dtype), jnp.asarray(h0.real, dtype),
        )

    def to_complex(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(poles, residues, h0) as complex128/float64 NumPy arrays."""
        p = np.asarray(self.pole_re, np.float64) + 1j * np.asarray(self.pole_im, np.float64)
        r = np.asarray(self.res_re, np.float64) + 1j * np.asarray(self.res_im, np.float64)
        return p, r, np.asarray(self.h0, np.float64)


def _log_polar(params: ModalParams):
    """(log |λ|, arg λ) in fp32; a zero pole gets log|λ| = -inf-safe large negative value."""
    mag = jnp.sqrt(params.pole_re**2 + params.pole_im**2)
    log_r = jnp.log(jnp.maximum(mag, 1e-30))
    theta = jnp.arctan2(params.pole_im, params.pole_re)
    return log_r, theta


def _powers(params: ModalParams, exponents):
    """Re and Im of λ^e for a vector of non-negative exponents e: arrays (C, d, len(e))."""
    log_r, theta = _log_polar(params)
    e = jnp.asarray(exponents, jnp.float32)
    mag = jnp.exp(log_r[..., None] * e)
    ang = theta[..., None] * e
    return mag * jnp.cos(ang), mag * jnp.sin(ang)


def materialize(params: ModalParams, length: int) -> jax.Array:
    """The impulse response ĥ of every channel: (length, C), fp32 (layout of `kernels.fftconv` filters)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    p_re, p_im = _powers(params, jnp.arange(length - 1))  # λ^{t-1}, t = 1..L-1
    tail = jnp.einsum("cd,cdt->tc", params.res_re, p_re) - jnp.einsum("cd,cdt->tc", params.res_im, p_im)
    return jnp.concatenate([params.h0[None, :].astype(jnp.float32), tail], axis=0)


def materialize_np(poles, residues, h0, length: int) -> np.ndarray:
    """float64 NumPy ĥ for complex (C, d) poles/residues and (C,) h0: (length, C)."""
    poles = np.asarray(poles, np.complex128)
    residues = np.asarray(residues, np.complex128)
    t = np.arange(length - 1)
    pw = poles[..., None] ** t  # (C, d, L-1)
    tail = np.real(np.einsum("cd,cdt->tc", residues, pw))
    return np.concatenate([np.asarray(h0, np.float64)[None, :], tail], axis=0)


# ----------------------------------------------------------------------------------------------------
# State, step
# ----------------------------------------------------------------------------------------------------


class ModalState(NamedTuple):
    """Modal state planes, each (B, C, d) fp32."""

    re: jax.Array
    im: jax.Array


def init_state(batch: int, params: ModalParams) -> ModalState:
    z = jnp.zeros((batch, params.channels, params.order), jnp.float32)
    return ModalState(z, z)


def readout(params: ModalParams, state: ModalState, x_t, feedthrough=None) -> jax.Array:
    """y_t = Re<R, s_t> + (h0 [+ feedthrough]) x_t for x_t (B, C) (read before update)."""
    y = jnp.sum(params.res_re * state.re - params.res_im * state.im, axis=-1)
    h0 = params.h0 if feedthrough is None else params.h0 + feedthrough
    return y + h0 * x_t


def update(params: ModalParams, state: ModalState, x_t) -> ModalState:
    """s' = λ s + x_t as real 2x2 blocks; both planes computed from the OLD state."""
    a, b = params.pole_re, params.pole_im
    re, im = state.re, state.im
    new_re = a * re - b * im + x_t[..., None]
    new_im = b * re + a * im
    return ModalState(new_re, new_im)


def step(params: ModalParams, state: ModalState, x_t, feedthrough=None) -> tuple[jax.Array, ModalState]:
    """One token: x_t (B, C) -> (y_t (B, C), new state). O(C·d), independent of history length."""
    x_t = x_t.astype(jnp.float32)
    y = readout(params, state, x_t, feedthrough)
    return y, update(params, state, x_t)


def recurrence(params: ModalParams, x, state: ModalState | None = None, feedthrough=None):
    """Run `step` over x (B, T, C) with `lax.scan` (a sequential reference): (y (B, T, C), final state)."""
    x = jnp.asarray(x, jnp.float32)
    if state is None:
        state = init_state(x.shape[0], params)

    def body(s, xt):
        y, s = step(params, s, xt, feedthrough)
        return s, y

    state, ys = jax.lax.scan(body, state, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1), state


def recurrence_complex_np(poles, residues, h0, x) -> tuple[np.ndarray, np.ndarray]:
    """complex128 NumPy sequential reference: x (B, T, C) -> (y (B, T, C) float64, state (B, C, d) complex)."""
    poles = np.asarray(poles, np.complex128)
    residues = np.asarray(residues, np.complex128)
    x = np.asarray(x, np.float64)
    b, t_len, c = x.shape
    s = np.zeros((b, c, poles.shape[1]), np.complex128)
    ys = np.zeros((b, t_len, c))
    for t in range(t_len):
        ys[:, t] = np.real(np.sum(residues * s, -1)) + np.asarray(h0) * x[:, t]
        s = poles * s + x[:, t, :, None]
    return ys, s


# ----------------------------------------------------------------------------------------------------
# Prefill: the exact state after a prompt, computed in parallel
# ----------------------------------------------------------------------------------------------------


def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


def prefill_vandermonde(params: ModalParams, x) -> ModalState:
    """s_T = Σ_t x_t λ^{T-1-t}: one einsum against the (C, d, T) Vandermonde planes. Memory O(C·d·T)."""
    x = jnp.asarray(x, jnp.float32)
    t_len = x.shape[1]
    p_re, p_im = _powers(params, jnp.arange(t_len - 1, -1, -1))
    hi = jax.lax.Precision.HIGHEST
    return ModalState(jnp.einsum("btc,cdt->bcd", x, p_re, precision=hi),
                      jnp.einsum("btc,cdt->bcd", x, p_im, precision=hi))


def prefill_chunked(params: ModalParams, x, chunk: int = 256, state: ModalState | None = None) -> ModalState:
    """Chunked prefill: s ← λ^K s + Σ_{j<K} λ^{K-1-j} x_{start+j} per chunk (`lax.scan` over chunks).

    Memory O(C·d·K) for the chunk Vandermonde; the prompt is zero-padded at the front to a multiple
    of K (leading zeros do not change the state). ``state`` continues from a previous state.
    """
    x = jnp.asarray(x, jnp.float32)
    b, t_len, c = x.shape
    chunk = max(1, min(int(chunk), t_len))
    n_chunks = -(-t_len // chunk)
    pad = n_chunks * chunk - t_len
    if pad:
        x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0)))
    xs = jnp.swapaxes(x.reshape(b, n_chunks, chunk, c), 0, 1)  # (n, B, K, C)
    p_re, p_im = _powers(params, jnp.arange(chunk - 1, -1, -1))  # λ^{K-1-j}
    lk_re, lk_im = _powers(params, jnp.array([chunk]))  # λ^K
    lk_re, lk_im = lk_re[..., 0], lk_im[..., 0]
    hi = jax.lax.Precision.HIGHEST
    if state is None:
        state = init_state(b, params)

    def body(s, xc):
        re, im = _cmul(lk_re, lk_im, s.re, s.im)
        re = re + jnp.einsum("btc,cdt->bcd", xc, p_re, precision=hi)
        im = im + jnp.einsum("btc,cdt->bcd", xc, p_im, precision=hi)
        return ModalState(re, im), None

    state, _ = jax.lax.scan(body, state, xs)
    return state


def scan_states(params: ModalParams, x) -> ModalState:
    """All states s_1..s_T by `jax.lax.associative_scan` (S5-style): planes (B, T, C, d), O(log T) depth.

    Elements are (a, b) = (λ, x_t); (a1, b1)∘(a2, b2) = (a1 a2, a2 b1 + b2), in real planes.
    """
    x = jnp.asarray(x, jnp.float32)
    b, t_len, c = x.shape
    a_re = jnp.broadcast_to(params.pole_re, (b, t_len, c, params.order))
    a_im = jnp.broadcast_to(params.pole_im, (b, t_len, c, params.order))
    b_re = jnp.broadcast_to(x[..., None], a_re.shape)
    b_im = jnp.zeros_like(a_re)

    def combine(e1, e2):
        a1r, a1i, b1r, b1i = e1
        a2r, a2i, b2r, b2i = e2
        ar, ai = _cmul(a1r, a1i, a2r, a2i)
        br, bi = _cmul(a2r, a2i, b1r, b1i)
        return ar, ai, br + b2r, bi + b2i

    _, _, s_re, s_im = jax.lax.associative_scan(combine, (a_re, a_im, b_re, b_im), axis=1)
    return ModalState(s_re, s_im)


def prefill_scan(params: ModalParams, x) -> ModalState:
    """Final state from `scan_states` (use only when every per-token state is needed)."""
    s = scan_states(params, x)
    return ModalState(s.re[:, -1], s.im[:, -1])


def prefill_fft(params: ModalParams, x) -> ModalState:
    """FFT route (StripedHyena's default): s_T = (λ^t ∗ x)_{T-1}, one real FFT conv per plane.

    Memory O(B·C·d·T) (the product spectrum), time O(B·C·d·T log T).
    """
    x = jnp.asarray(x, jnp.float32)
    t_len = x.shape[1]
    n = 1 << (2 * t_len - 1).bit_length()
    p_re, p_im = _powers(params, jnp.arange(t_len))  # (C, d, T): λ^t
    x_f = jnp.fft.rfft(x, n=n, axis=1)  # (B, F, C)
    out = []
    for plane in (p_re, p_im):
        k_f = jnp.fft.rfft(plane, n=n, axis=-1)  # (C, d, F)
        y_f = jnp.einsum("bfc,cdf->bcdf", x_f, k_f)
        y = jnp.fft.irfft(y_f, n=n, axis=-1)[..., t_len - 1]  # only index T-1 of the conv is the state
        out.append(y)
    return ModalState(out[0], out[1])


def prefill_state(params: ModalParams, x, method: str = "chunked", **kwargs) -> ModalState:
    """Exact state after the prompt x (B, T, C) by one of PREFILL_METHODS."""
    fns = {"vandermonde": prefill_vandermonde, "chunked": prefill_chunked, "scan": prefill_scan, "fft": prefill_fft}
    if method not in fns:
        raise ValueError(f"unknown prefill method {method!r}; choose one of {PREFILL_METHODS}")
    if x.shape[1] < 1:
        raise ValueError("prefill needs a prompt of at least one token")
    return fns[method](params, x, **kwargs)


def modal_conv(params: ModalParams, x, feedthrough=None) -> jax.Array:
    """Parallel outputs y = ĥ ∗ x (+ feedthrough ⊙ x) by FFT with the materialised ĥ: x (B, T, C)."""
    from kernels.fftconv.reference import fftconv_xla

    x = jnp.asarray(x, jnp.float32)
    h = materialize(params, x.shape[1])
    return fftconv_xla(x, h, feedthrough)


def prefill(params: ModalParams, x, method: str = "chunked", feedthrough=None, **kwargs):
    """Outputs for the whole prompt (FFT conv with the same ĥ the recurrence realises) and the state."""
    return modal_conv(params, x, feedthrough), prefill_state(params, x, method, **kwargs)
