"""Where a jitted step spends its time: a `jax.profiler` trace summed per XLA op, labelled by source op.

    rows = profile_ops(step_fn, steps=5, compiled_text=jitted.lower(*args).compile().as_text())
    print(ops_table(rows, steps=5, top=20))

On XLA:CPU every executed op (a fusion, a dot, a copy) is one trace event named after the op in the
compiled HLO; the HLO's ``metadata={op_name=...}`` says which JAX operation it came from (for example
``transpose(jvp())/add_any`` is part of a gradient). Times are summed over all threads, so on a
multi-threaded op the sum can exceed the wall time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

_HLO_LINE = re.compile(r"^\s*%?([\w.\-]+) = (\S+) [^\n]*", re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_RUNTIME_EVENTS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjRt", "TfrtCpu")


def hlo_ops(compiled_text: str) -> dict[str, tuple[str, str]]:
    """Map each HLO instruction name of a compiled module's text to (result shape, source op_name)."""
    out = {}
    for m in _HLO_LINE.finditer(compiled_text):
        op = _OP_NAME.search(m.group(0))
        out[m.group(1)] = (m.group(2), op.group(1) if op else "")
    return out


def profile_ops(fn, steps: int, compiled_text: str = "") -> list[dict]:
    """Call ``fn()`` ``steps`` times under the profiler; per op: total µs, calls, shape and source op.

    ``fn`` must block until its work is done (e.g. end with `jax.block_until_ready`). Rows are sorted by
    time, largest first.
    """
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            for _ in range(steps):
                fn()
        finally:
            jax.profiler.stop_trace()
        traces = sorted(glob.glob(os.path.join(tmp, "plugins", "profile", "*", "*.trace.json.gz")))
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no trace under {tmp}")
        with gzip.open(traces[-1]) as f:
            events = json.load(f)["traceEvents"]
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_RUNTIME_EVENTS):
            total[e["name"]] += e.get("dur", 0)
            calls[e["name"]] += 1
    ops = hlo_ops(compiled_text)
    return [{"op": name, "us": us, "calls": calls[name], "shape": ops.get(name, ("", ""))[0],
             "source": ops.get(name, ("", ""))[1]} for name, us in total.most_common()]


def ops_table(rows: list[dict], steps: int, top: int = 20) -> list[str]:
    """Markdown lines: the ``top`` ops by time per step, with their share of all traced op time."""
    all_us = sum(r["us"] for r in rows) or 1
    lines = ["| op | ms/step | share | result shape | from |", "|---|---|---|---|---|"]
    for r in rows[:top]:
        source = r["source"].replace("jit(", "").replace("|", "/")[-80:]
        lines.append(f"| {r['op']} | {r['us'] / 1e3 / steps:.1f} | {100 * r['us'] / all_us:.0f} % | "
                     f"`{r['shape']}` | `{source}` |")
    lines.append(f"| (all traced ops) | {all_us / 1e3 / steps:.1f} | 100 % | | |")
    return lines
