"""The committed table of measured winners that `impl="auto"` reads (kernels/fftconv/tuned.json).

Each row names the fastest implementation measured by `scripts/gpu_check.py --write-table` for one
(backend, device kind, FFT size, input dtype, mode), at that dtype's default precision (so "auto" never
trades accuracy for speed). The FFT size is the dense one of (L, K) (`monarch.fft_size(L + K - 1)`); mode
is "dense" (the default of a row without one) or "partial" (K ≤ L/4, run as chunks: `conv.chunk_size`),
which a kernel can win or lose apart from the dense conv of the same size. No row for a case means "xla"
(jnp.fft). File format:

    {"rows": [{"backend": "gpu", "device_kind": "NVIDIA H200", "fft_n": 2048, "dtype": "bfloat16",
               "mode": "dense", "impl": "pallas", "precision": "bf16", "speedup_vs_xla": 3.1,
               "source": "results/..."}]}
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("tuned.json")
KEY = ("backend", "device_kind", "fft_n", "dtype")
MODES = ("dense", "partial")


@functools.lru_cache(maxsize=8)
def _load_cached(path: str) -> tuple[dict, ...]:
    return tuple(load(Path(path)))


def load(path: Path | None = None) -> list[dict]:
    """The table's rows; a missing file is an empty table."""
    path = TABLE_PATH if path is None else Path(path)
    if not path.exists():
        return []
    rows = json.loads(path.read_text()).get("rows", [])
    for row in rows:
        missing = [key for key in (*KEY, "impl") if key not in row]
        if missing:
            raise ValueError(f"{path}: row {row} lacks {missing}")
        if _mode(row) not in MODES:
            raise ValueError(f"{path}: row {row} has mode {_mode(row)!r}; expected one of {MODES}")
    return rows


def _mode(row: dict) -> str:
    return row.get("mode", "dense")


def lookup(backend: str, device_kind: str, fft_n: int, dtype: str, mode: str = "dense",
           path: Path | None = None) -> str | None:
    """The measured winner for this case, or None when the table has no row for it."""
    rows = _load_cached(str(TABLE_PATH if path is None else path))
    want = (backend, device_kind, int(fft_n), dtype)
    for row in rows:
        if tuple(row[key] for key in KEY) == want and _mode(row) == mode:
            return row["impl"]
    return None


def write(rows: list[dict], path: Path | None = None) -> Path:
    """Replace the rows of the devices in `rows` (by backend and device kind), keep the others."""
    path = TABLE_PATH if path is None else Path(path)
    devices = {(row["backend"], row["device_kind"]) for row in rows}
    kept = [row for row in load(path) if (row["backend"], row["device_kind"]) not in devices]
    merged = sorted(kept + list(rows), key=lambda row: (*(str(row[key]) for key in KEY), _mode(row)))
    path.write_text(json.dumps({"rows": merged}, indent=1) + "\n")
    _load_cached.cache_clear()
    return path
