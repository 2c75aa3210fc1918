"""Public causal long-convolution op: validation and implementation dispatch.

    y = fftconv(u, k, bias, pre_gate=..., post_gate=..., freq_mask=None, impl="auto")

Layout: u (B, L, H) in bf16/fp16/fp32; k (K, H) with 1 <= K <= L (K < L is a partial filter);
bias (H,) the D skip; gates (B, L, H). `layout="hbl"` takes u, the gates and the result as (H, B, L)
instead: the fused Pallas kernels' own order (no transposes around them; a mixer's projections to and
from (H, B·L) can be GEMMs with no separate transpose pass); other paths transpose internally.
Computes, in fp32,
    y = post ⊙ (k ∗ (pre ⊙ u) + bias ⊙ (pre ⊙ u)),   (k ∗ x)_t = Σ_{s<=min(t, K-1)} k_s x_{t-s},
and returns u's dtype. Bad shapes, dtypes and lengths raise `FFTConvError` naming the problem.

Non-finite inputs: the FFT mixes every position of a channel, so one NaN or inf in u or pre_gate at
position t, or anywhere in k, makes EVERY output of that channel non-finite, positions before t
included (a direct causal conv would keep them finite); in the block-Toeplitz partial mode the damage
is limited to t's chunk of C samples and the next one. A non-finite bias[h] poisons channel h; a
non-finite post_gate entry only its own output. `fftconv(..., check_finite=True)` raises instead,
naming the argument (see `raise_if_non_finite`).

Implementations (all compute the same function; see kernels/fftconv/conv.py and monarch.py):
  "xla"         jnp.fft rfft/irfft with zero padding (fp32);
  "xla-matmul"  the FFT written as 2-4 stages of small DFT-matrix matmuls + twiddles (plain XLA);
  "pallas"      the same factorisation as a fused Pallas kernel (interpret mode on CPU);
  "direct"      no FFT: one (L, L) Toeplitz matmul per channel, O(L²) (kernels/fftconv/toeplitz.py), for
                short sequences; no freq_mask.
  "mosaic"      Hopper wgmma kernels in Pallas Mosaic GPU (kernels/fftconv/mosaic.py): L <= 2048 forward and
                backward in one pass each; any L with K <= min(1024, L/4) as overlap-save windows (forward
                and backward kernels); bf16/fp16 operands only, no freq_mask.
Precision (`precision=`, matmul impls only; see kernels/fftconv/precision.py for the error bounds):
"fp32" (alias "highest"), "bf16x3", "tf32" (GPU only), "fp16", "bf16"; None = the input dtype's own
(bf16 → "bf16", fp16 → "fp16", fp32 → "fp32"). "xla" always computes an fp32 FFT (within every bound).
Modes: K < L is a partial filter (block-Toeplitz chunking when K <= L/4 on the matmul impls);
`freq_mask` (static (G0, G1) bool block mask) keeps only some frequency blocks of the plan's FFT:
y = Re IFFT(FFT(x) FFT(k) M) with M = monarch.expand_freq_mask(freq_mask, N), N = monarch.fft_size(L+K-1).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels.fftconv import conv as _conv
from kernels.fftconv import monarch as _monarch
from kernels.fftconv import precision as _precision
from kernels.fftconv import toeplitz as _toeplitz
from kernels.fftconv import tuned as _tuned
from kernels.fftconv.reference import fftconv_xla


class FFTConvError(ValueError):
    """Invalid input to `fftconv`; the message names the argument and the problem."""


_INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _xla(u, k, bias=None, pre_gate=None, post_gate=None, *, freq_mask=None, precision=None, layout="blh"):
    del precision  # jnp.fft is fp32 at every setting
    if layout != "blh":  # the jnp.fft path works in (B, L, H)
        u, pre_gate, post_gate = (_conv.as_blh(a, layout) for a in (u, pre_gate, post_gate))
        return _conv.from_blh(_xla(u, k, bias, pre_gate, post_gate, freq_mask=freq_mask), layout)
    if freq_mask is None:
        return fftconv_xla(u, k, bias, pre_gate, post_gate)
    return _conv.fftconv_xla_masked(u, k, bias, pre_gate, post_gate, freq_mask=freq_mask)


def _xla_matmul(u, k, bias=None, pre_gate=None, post_gate=None, *, freq_mask=None, precision=None, layout="blh"):
    return _conv.fftconv_matmul(u, k, bias, pre_gate, post_gate, freq_mask=freq_mask, impl="xla-matmul",
                                precision=precision, layout=layout)


def _pallas(u, k, bias=None, pre_gate=None, post_gate=None, *, freq_mask=None, precision=None, layout="blh"):
    return _conv.fftconv_matmul(u, k, bias, pre_gate, post_gate, freq_mask=freq_mask, impl="pallas",
                                precision=precision, layout=layout)


def _direct(u, k, bias=None, pre_gate=None, post_gate=None, *, freq_mask=None, precision=None, layout="blh"):
    del precision  # fp32 at every setting
    if freq_mask is not None:
        raise FFTConvError("fftconv: impl='direct' computes the plain causal conv; a freq_mask needs an FFT impl "
                           "('xla', 'xla-matmul' or 'pallas')")
    sizes = dict(zip(layout, u.shape))
    need = _toeplitz.matrix_bytes(sizes["l"], sizes["h"])
    if need > _toeplitz.MAX_MATRIX_BYTES:
        raise FFTConvError(f"fftconv: impl='direct' needs an (H, L, L) = ({sizes['h']}, {sizes['l']}, {sizes['l']}) "
                           f"fp32 Toeplitz matrix ({need / 2**30:.1f} GiB, over its {_toeplitz.MAX_MATRIX_BYTES >> 30} "
                           f"GiB limit); use an FFT impl for long sequences")
    return _toeplitz.toeplitz_conv(u, k, bias, pre_gate, post_gate, layout=layout)


def _mosaic(u, k, bias=None, pre_gate=None, post_gate=None, *, freq_mask=None, precision=None, layout="blh"):
    from kernels.fftconv import mosaic  # Mosaic GPU lowering: imported only when asked for

    if freq_mask is not None:
        raise FFTConvError("fftconv: impl='mosaic' computes the dense conv; a freq_mask needs 'xla', 'xla-matmul' "
                           "or 'pallas'")
    precision = _precision.resolve(precision, u.dtype)
    reason = mosaic.unsupported(u.shape[_conv.seq_axis(layout)], precision, u.dtype,
                                (pre_gate is not None) + (post_gate is not None), ksize=k.shape[0])
    if reason:
        default = " (the default for fp32 input)" if precision == "fp32" and u.dtype == jnp.float32 else ""
        raise FFTConvError(f"fftconv: {reason}{default}")
    return mosaic.fftconv_mosaic(u, k, bias, pre_gate, post_gate, precision=precision, layout=layout)


# name -> implementation with the signature of `fftconv_xla` plus keyword-only `freq_mask`, `precision`,
# `layout`.
IMPLEMENTATIONS: dict[str, Callable] = {"xla": _xla, "xla-matmul": _xla_matmul, "pallas": _pallas,
                                        "direct": _direct, "mosaic": _mosaic}

# "auto" picks Pallas on GPU for FFT sizes up to this, overriding the measured table (tuned.json).
# 0 = never: set the environment variable LONGCONV_PALLAS_AUTO_MAX_FFT (e.g. 4096) to opt in globally.
PALLAS_AUTO_MAX_FFT = int(os.environ.get("LONGCONV_PALLAS_AUTO_MAX_FFT", "0"))


def _check_float(name: str, x, allowed=_INPUT_DTYPES) -> None:
    if not any(x.dtype == jnp.dtype(d) for d in allowed):
        names = ", ".join(jnp.dtype(d).name for d in allowed)
        raise FFTConvError(f"fftconv: {name} has dtype {x.dtype}; expected one of {names}")


def _check_array(name: str, x) -> None:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise FFTConvError(f"fftconv: {name} must be a jax or numpy array, got {type(x).__name__}")


_LAYOUT_NAMES = {"blh": "(batch, length, channels)", "hbl": "(channels, batch, length)"}  # one per conv.LAYOUTS


def validate(u, k, bias=None, pre_gate=None, post_gate=None, freq_mask=None, precision=None, layout="blh") -> None:
    """Raise FFTConvError unless the arguments have the documented shapes and dtypes."""
    for name, x in (("u", u), ("k", k), ("bias", bias), ("pre_gate", pre_gate), ("post_gate", post_gate)):
        if x is not None:
            _check_array(name, x)
    if layout not in _conv.LAYOUTS:
        raise FFTConvError(f"fftconv: unknown layout {layout!r}; choose one of {sorted(_conv.LAYOUTS)}")
    if getattr(u, "ndim", None) != 3:
        raise FFTConvError(f"fftconv: u must have shape {_LAYOUT_NAMES[layout]}; got shape {jnp.shape(u)}")
    if getattr(k, "ndim", None) != 2:
        raise FFTConvError(f"fftconv: k must have shape (filter_length, channels); got shape {jnp.shape(k)}")
    sizes = dict(zip(layout, u.shape))
    batch, seqlen, channels = sizes["b"], sizes["l"], sizes["h"]
    ksize, k_channels = k.shape
    if seqlen < 1 or channels < 1 or batch < 1:
        raise FFTConvError(f"fftconv: u has an empty dimension: shape {u.shape}")
    if k_channels != channels:
        raise FFTConvError(f"fftconv: k has {k_channels} channels but u has {channels} (k is (K, H), u is "
                           f"{_LAYOUT_NAMES[layout]})")
    if ksize < 1:
        raise FFTConvError("fftconv: k has filter length 0")
    if ksize > seqlen:
        raise FFTConvError(
            f"fftconv: filter length K={ksize} exceeds sequence length L={seqlen}; slice the filter to k[:L]"
        )
    _check_float("u", u)
    _check_float("k", k)
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (channels,):
            raise FFTConvError(f"fftconv: bias must have shape ({channels},); got {bias.shape}")
    for name, gate in (("pre_gate", pre_gate), ("post_gate", post_gate)):
        if gate is not None:
            _check_float(name, gate)
            if gate.shape != u.shape:
                raise FFTConvError(f"fftconv: {name} must have u's shape {u.shape}; got {gate.shape}")
    fft_n = _monarch.fft_size(seqlen + ksize - 1)
    if fft_n > _monarch.MAX_FFT_SIZE:
        raise FFTConvError(f"fftconv: L + K - 1 = {seqlen + ksize - 1} needs an FFT larger than {_monarch.MAX_FFT_SIZE}")
    if freq_mask is not None:
        if isinstance(freq_mask, jax.core.Tracer):
            raise FFTConvError("fftconv: freq_mask must be a concrete (NumPy) boolean array, not a traced value")
        try:
            _conv._check_mask(freq_mask, seqlen, ksize)
        except ValueError as err:
            n, f0, fl = _monarch.freq_grid(seqlen, ksize)
            raise FFTConvError(f"fftconv: {err} (L={seqlen}, K={ksize}: N={n}, grid ({f0}, {fl}))") from None
    try:
        _precision.resolve(precision, u.dtype)
    except ValueError as err:
        raise FFTConvError(f"fftconv: {err}") from None


_CHECKED_ARGS = ("u", "k", "bias", "pre_gate", "post_gate")


def _raise_on_false(names: tuple[str, ...], finite) -> None:
    bad = [name for name, ok in zip(names, np.asarray(finite)) if not ok]
    if bad:
        raise FFTConvError(f"fftconv: {bad[0]} holds a non-finite value (NaN or inf) (check_finite=True)")


def raise_if_non_finite(u, k, bias=None, pre_gate=None, post_gate=None) -> None:
    """Raise FFTConvError naming the first of u, k, bias, pre_gate, post_gate holding a NaN or inf.

    Concrete arrays: raises here. Traced arrays (inside jax.jit / nnx.jit / grad): the reduction runs
    on the device and a `jax.debug.callback` raises when the computation executes; JAX surfaces it as a
    `JaxRuntimeError` whose message contains the FFTConvError text. Cost: one pass over each argument.
    """
    named = [(name, x) for name, x in zip(_CHECKED_ARGS, (u, k, bias, pre_gate, post_gate)) if x is not None]
    names = tuple(name for name, _ in named)
    finite = jnp.stack([jnp.all(jnp.isfinite(x)) for _, x in named])
    if isinstance(finite, jax.core.Tracer):
        jax.debug.callback(functools.partial(_raise_on_false, names), finite)
    else:
        _raise_on_false(names, finite)


_AUTO_OVERRIDE: list[str] = []  # innermost `auto_impl` scope last


@contextlib.contextmanager
def auto_impl(impl: str):
    """Within this scope (at trace time), ``impl="auto"`` means ``impl``: run a whole model, whose mixers
    call `fftconv` with the default, on one implementation (e.g. to time an LM step per implementation)::

        with auto_impl("pallas"):
            loss = jax.jit(loss_fn)(params)   # traced here: every mixer's fftconv is the Pallas kernel
    """
    if impl not in IMPLEMENTATIONS:
        raise FFTConvError(f"auto_impl: unknown impl {impl!r}; choose one of {sorted(IMPLEMENTATIONS)}")
    _AUTO_OVERRIDE.append(impl)
    try:
        yield
    finally:
        _AUTO_OVERRIDE.pop()


def default_impl(seqlen: int, backend: str | None = None, ksize: int | None = None, dtype=None,
                 device_kind: str | None = None, freq_mask=None, channels: int = 1, batch: int = 1) -> str:
    """The implementation `impl="auto"` picks for this backend, device, length and input dtype.

    The measured winner from the committed table `kernels/fftconv/tuned.json` (filled on the device by
    `scripts/gpu_check.py --write-table`) for (backend, device kind, FFT size, dtype, mode: "partial" for a
    filter that runs as chunks, `conv.chunk_size`, else "dense"); "xla" where the
    table has no row (on CPU the Pallas kernel only runs interpreted, and the matmul factorisation does
    O(N·Σf) work against pocketfft's O(N log N)). On CPU, "direct" (the Toeplitz matmul) for
    L ≤ `toeplitz.AUTO_MAX_LEN` and batch ≥ `toeplitz.AUTO_MIN_BATCH_PER_LEN`·L without a freq_mask, where
    it was measured faster than jnp.fft (and its (channels, L, L) matrix fits `toeplitz.MAX_MATRIX_BYTES`).
    On GPU, LONGCONV_PALLAS_AUTO_MAX_FFT=N forces "pallas" for FFT sizes <= N regardless of the table.
    """
    backend = backend or jax.default_backend()
    ksize = seqlen if ksize is None else ksize
    if (backend == "cpu" and freq_mask is None and seqlen <= _toeplitz.AUTO_MAX_LEN
            and batch >= _toeplitz.AUTO_MIN_BATCH_PER_LEN * seqlen
            and _toeplitz.matrix_bytes(seqlen, channels) <= _toeplitz.MAX_MATRIX_BYTES):
        return "direct"
    n = _monarch.fft_size(seqlen + ksize - 1)
    if backend == "gpu" and n <= PALLAS_AUTO_MAX_FFT:
        return "pallas"
    if dtype is not None:
        device_kind = jax.devices(backend)[0].device_kind if device_kind is None else device_kind
        partial = freq_mask is None and _conv.chunk_size(seqlen, ksize) is not None
        return _tuned.lookup(backend, device_kind, n, jnp.dtype(dtype).name, "partial" if partial else "dense") or "xla"
    return "xla"


def fftconv(u, k, bias=None, *, pre_gate=None, post_gate=None, freq_mask=None, impl: str = "auto",
            precision: str | None = None, check_finite: bool = False, layout: str = "blh"):
    """Causal long convolution (see module docstring). ``impl``: "auto" or a key of IMPLEMENTATIONS.

    ``layout``: "blh" (u, gates and result (B, L, H)) or "hbl" ((H, B, L), the fused kernels' order).
    ``freq_mask``: None (dense) or a static boolean (G0, G1) block mask over the plan's frequency grid
    (`kernels.fftconv.monarch.freq_grid(L, K)` gives (N, f0, f_last); G0 | f0, G1 | f_last).
    ``precision``: matmul operand setting of "xla-matmul"/"pallas" (module docstring); None = per dtype.
    A NaN/inf at one position of u makes the whole channel's output non-finite (module docstring);
    ``check_finite=True`` raises FFTConvError naming the argument instead (`raise_if_non_finite`:
    eagerly, or under jit when the computation runs).
    """
    validate(u, k, bias, pre_gate, post_gate, freq_mask, precision, layout)
    if check_finite:
        raise_if_non_finite(u, k, bias, pre_gate, post_gate)
    if impl == "auto":
        seqlen = u.shape[_conv.seq_axis(layout)]
        impl = _AUTO_OVERRIDE[-1] if _AUTO_OVERRIDE else default_impl(seqlen, jax.default_backend(), k.shape[0],
                                                                      u.dtype, freq_mask=freq_mask, channels=k.shape[1],
                                                                      batch=u.shape[layout.index("b")])
    if impl not in IMPLEMENTATIONS:
        raise FFTConvError(f"fftconv: unknown impl {impl!r}; choose 'auto' or one of {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[impl](u, k, bias, pre_gate, post_gate, freq_mask=freq_mask, precision=precision,
                                 layout=layout)
