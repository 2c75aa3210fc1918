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

_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) [^\n]*", re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)^\}", re.M | re.S)
_RUNTIME_EVENTS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjRt", "TfrtCpu")


def hlo_ops(compiled_text: str) -> dict[str, tuple[str, str]]:
    """Map each HLO instruction of a compiled module's text to (result shape, source).

    The source is the instruction's ``op_name``; for a fusion (or any op that ``calls`` a computation) the
    JAX ops inside it follow in brackets, e.g. ``jit(f)/reduce_sum [dot_general+tanh+reduce_sum]``.
    """
    inner: dict[str, list[str]] = {}
    for block in _COMPUTATION.finditer(compiled_text):
        kinds = [op.rsplit("/", 1)[-1] for op in _OP_NAME.findall(block.group(2))]
        inner[block.group(1)] = list(dict.fromkeys(kinds))
    out = {}
    for m in _HLO_LINE.finditer(compiled_text):
        line = m.group(0)
        op = _OP_NAME.search(line)
        source = op.group(1) if op else ""
        called = _CALLS.search(line)
        if called and inner.get(called.group(1)):
            source += " [" + "+".join(inner[called.group(1)]) + "]"
        out[m.group(1)] = (m.group(2), source)
    return out


def profile_ops(fn, steps: int, compiled_text: str = "") -> list[dict]:
    """Call ``fn()`` ``steps`` times under the profiler; per op: total µs, calls, shape and source op.

    ``fn`` must block until its work is done (e.g. end with `jax.block_until_ready`). With
    ``compiled_text`` only the ops of that module are kept (runtime events such as dispatch are dropped).
    Rows are sorted by time, largest first.
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
    ops = hlo_ops(compiled_text)
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and (name in ops if ops else not name.startswith(_RUNTIME_EVENTS)):
            total[name] += e.get("dur", 0)
            calls[name] += 1
    return [{"op": name, "us": us, "calls": calls[name], "shape": ops.get(name, ("", ""))[0],
             "source": ops.get(name, ("", ""))[1]} for name, us in total.most_common()]


def ops_table(rows: list[dict], steps: int, top: int = 20, total_us: float | None = None) -> list[str]:
    """Markdown lines: the ``top`` ops by time per step, with their share of all traced op time
    (``total_us``, default: the sum over ``rows``)."""
    all_us = total_us or sum(r["us"] for r in rows) or 1
    lines = ["| op | ms/step | share | result shape | from |", "|---|---|---|---|---|"]
    for r in rows[:top]:
        source = r["source"].replace("jit(", "").replace("|", "/")[-80:]
        lines.append(f"| {r['op']} | {r['us'] / 1e3 / steps:.1f} | {100 * r['us'] / all_us:.0f} % | "
                     f"`{r['shape']}` | `{source}` |")
    lines.append(f"| (all traced ops) | {all_us / 1e3 / steps:.1f} | 100 % | | |")
    return lines


_KIND_PRIORITY = ("fft", "conv_general_dilated", "dot_general", "scatter-add", "gather", "reduce", "transpose")


def time_by_kind(rows: list[dict]) -> dict[str, float]:
    """Traced µs summed by the main JAX op of each row: the first of fft, conv_general_dilated,
    dot_general, scatter-add, gather, reduce*, transpose found in its source, else ``elementwise/other``."""
    out: dict[str, float] = collections.Counter()
    for r in rows:
        ops = r["source"]
        kind = next((k for k in _KIND_PRIORITY if k in ops), "elementwise/other")
        out[kind] += r["us"]
    return dict(out.most_common())
