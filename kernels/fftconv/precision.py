"""Matmul precision of the factorised FFT conv (impl "xla-matmul" and "pallas").

Every DFT stage is a real matmul on (re, im) planes. A precision setting says what the two operands
of those matmuls are (the DFT-matrix constant and the data); every setting accumulates in fp32
(`preferred_element_type=float32`), and the twiddles, the spectrum product, gates and bias are applied
in fp32 on the accumulator. The filter spectrum is computed in fp32 (once per call, H channels).

| setting  | matmul operands                                              | rel. L2 error bound vs float64 |
|----------|--------------------------------------------------------------|-------------------------------|
| "fp32"   | fp32 at `Precision.HIGHEST` (IEEE fp32 FMA on GPU: no tensor cores) | 2e-6                   |
| "bf16x3" | fp32 split a = hi + lo in bf16; hi·hi + hi·lo + lo·hi (3 bf16 dots) | 3e-5                   |
| "tf32"   | fp32 at `Precision.DEFAULT`: TF32 tensor cores on GPU (GPU only)    | 1e-3 (expected, GPU)   |
| "fp16"   | cast to float16                                              | 1e-3                          |
| "bf16"   | cast to bfloat16                                             | 8e-3                          |

The bounds are for the fp32 result of the conv (before casting to the output dtype) with unit-scale
inputs and long non-decaying filters, for every plan (2-4 stages) and mode (dense, partial,
frequency-sparse); rounding a bf16 output adds ≈ 1.6e-3, an fp16 output ≈ 2e-4. Measured on CPU
(tests/test_fftconv_precision.py; N = 256 … 2^19): bf16 3.4-5.2e-3, fp16 3.9-6.1e-4, bf16x3 5.5-7.7e-6,
fp32 1.6-3.2e-7. At N = 2048 (32×64 split) bf16 and fp16 give exactly the NumPy emulation of the same
rounding in ../shared/kernel-tools/emu.py (3.4e-3, 3.9e-4); more stages add a little. On CPU an
fp16/bf16 dot rounds its operands and accumulates in fp32, so interpret mode reproduces the GPU
operand rounding; a `Precision.DEFAULT` fp32 dot is exact fp32 on CPU, so "tf32" is only checked there
for its dots, and its bound is emu.py's tf32 figure (3.9e-4) with the same margin as fp16. On TPU
`Precision.DEFAULT` is a single bf16 pass, so "tf32" is rejected there.

Every stage is scaled within √2 of unitary by a power of two (`monarch`, Scaling), so matmul operands
stay O(|x|) at every N (fp16 range trouble needs |x| itself near fp16's limits, not a long N).

Defaults per input dtype (`default_for`): bf16 → "bf16", fp16 → "fp16", fp32 → "fp32".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PRECISIONS = ("fp32", "bf16x3", "tf32", "fp16", "bf16")
ALIASES = {"highest": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
ERROR_BOUNDS = {"fp32": 2e-6, "bf16x3": 3e-5, "tf32": 1e-3, "fp16": 1e-3, "bf16": 8e-3}
# dtype of the operands each setting hands to the dot (what the jaxpr shows)
OPERAND_DTYPES = {"fp32": jnp.float32, "bf16x3": jnp.bfloat16, "tf32": jnp.float32, "fp16": jnp.float16,
                  "bf16": jnp.bfloat16}
GPU_ONLY = ("tf32",)


def default_for(dtype) -> str:
    """Precision used when the caller passes none: the input dtype's own (fp32 stays fp32-accurate)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16:
        return "bf16"
    if dtype == jnp.float16:
        return "fp16"
    return "fp32"


def resolve(precision: str | None, dtype, backend: str | None = None) -> str:
    """Canonical setting name; raises ValueError naming the problem for an unknown or unsupported one."""
    if precision is None:
        return default_for(dtype)
    if not isinstance(precision, str):
        raise ValueError(f"precision must be a string or None; got {type(precision).__name__}")
    name = ALIASES.get(precision.lower(), precision.lower())
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS) + sorted(ALIASES)}")
    if name in GPU_ONLY and (backend or jax.default_backend()) == "tpu":
        raise ValueError(f"precision {precision!r} needs a GPU (TPU has no tf32); use 'bf16x3' or 'fp32'")
    return name


def plane_dtype(precision: str):
    """dtype of the (re, im) planes passed between the XLA outer stages and the inner kernels: the dot
    operand dtype for the 16-bit settings, fp32 otherwise. Forward planes are rounded there anyway by the
    next dot (no change); the inverse planes get one rounding more, before the outer twiddle (within the
    bounds above; tests/test_fftconv_precision.py)."""
    return OPERAND_DTYPES[precision] if precision in ("fp16", "bf16") else jnp.float32


def operand(a, precision: str):
    """Cast a matmul operand (e.g. a DFT-matrix constant) to the dtype `precision` feeds the dot."""
    if precision in ("fp16", "bf16"):
        return a.astype(OPERAND_DTYPES[precision])
    return a


def _split_bf16(a):
    """(hi, lo) bf16 with a ≈ hi + lo (|a − hi − lo| ≤ 2⁻¹⁷|a|): hi = a rounded to nearest-even bf16.

    hi is rounded with integer ops on the fp32 bits, not by a bf16 → fp32 convert round trip: with
    excess precision allowed (XLA's GPU default) XLA folds that round trip away, so lo became 0 and
    "bf16x3" was plain bf16 (rel. error 1.7e-3 on an H200)."""
    a = a.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
    hi = jax.lax.bitcast_convert_type(bits, jnp.float32)  # exactly representable in bf16
    return hi.astype(jnp.bfloat16), (a - hi).astype(jnp.bfloat16)


def dot(matmul, a, b, precision: str):
    """matmul(a, b, **kw) (jnp.dot or an einsum partial) at `precision`, accumulated in fp32."""
    f32 = dict(preferred_element_type=jnp.float32)
    if precision == "fp32":
        return matmul(a, b, precision=jax.lax.Precision.HIGHEST, **f32)
    if precision == "tf32":
        return matmul(a, b, precision=jax.lax.Precision.DEFAULT, **f32)
    if precision == "bf16x3":
        ah, al = _split_bf16(a)
        bh, bl = _split_bf16(b)
        return matmul(ah, bh, **f32) + (matmul(ah, bl, **f32) + matmul(al, bh, **f32))
    dtype = OPERAND_DTYPES[precision]
    return matmul(a.astype(dtype), b.astype(dtype), **f32)
