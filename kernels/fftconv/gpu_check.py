"""One prepared device run: correctness against float64 and the benchmark table (`scripts/gpu_check.py`).

1. Correctness: every impl × precision (valid for the input dtype) × mode (`bench.modes`: dense,
   partial K = L/16, 25 % frequency-sparse as a low-pass band and as a comb) against a float64 NumPy FFT
   conv; pass = finite and rel. L2 error within
   `precision.ERROR_BOUNDS` plus the output dtype's rounding (`OUTPUT_ROUNDING`).
2. Benchmark, in priority order until the time budget is spent (later rows are recorded as skipped):
   bf16 gated forward at every L, forward+backward, partial / sparse modes, fp32. jnp.fft ("xla") is
   re-measured in the same process at every L; inputs rotate over enough buffer sets to exceed
   `--rotate-mb` (default 4× the H200's 50 MB L2), so no call hits in L2; `jax.clear_caches()` runs
   between variants. Time = median over 5 batches of back-to-back calls (wall clock, block_until_ready).
3. Writes <out>/bench_<device>.jsonl (machine row, then one row per check/variant), .md and .png;
   `--write-table` also records the fastest impl per (FFT size, dtype, mode: dense or partial) at the
   dtype's default precision (only impls that passed correctness) in the table `impl="auto"` reads
   (`kernels.fftconv.tuned`).

`--smoke` runs the same code on tiny sizes (Pallas in interpret mode on CPU) in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels.fftconv import fftconv, monarch, mosaic, tuned
from kernels.fftconv import precision as prec
from kernels.fftconv.bench import machine_info, modes

OUTPUT_ROUNDING = {"float32": 0.0, "float16": 4e-4, "bfloat16": 3e-3}  # rel. L2 added by the output cast
DTYPE_PRECISIONS = {  # precisions checked per input dtype (the default first)
    "float32": ("fp32", "bf16x3", "tf32", "fp16", "bf16"),
    "bfloat16": ("bf16", "fp16", "fp32"),
}
FULL_SHAPES = {1024: (16, 768), 4096: (16, 768), 16384: (8, 768), 65536: (2, 768), 262144: (1, 384),
               1048576: (1, 96)}  # L: (B, H), the sizes of ../shared/measurements/h200-2026-11-28.md
SMOKE_SHAPES = {256: (1, 2)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU-friendly (interpret mode)")
    parser.add_argument("--max-len", type=int, default=65536, help="longest L benchmarked (<= 1048576)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting variants after this")
    parser.add_argument("--rotate-mb", type=float, default=200.0, help="input bytes rotated over per variant")
    parser.add_argument("--out", default="results/fftconv")
    parser.add_argument("--check-lens", type=int, nargs="+", default=[1024, 16384],
                        help="lengths of the correctness checks (a 2-stage and a 3-stage plan by default)")
    parser.add_argument("--write-table", action="store_true", help="record the winners in tuned.json")
    parser.add_argument("--table", default=None, help="table path (default kernels/fftconv/tuned.json)")


def device_name(info: dict) -> str:
    """File-name tag of the device, e.g. 'NVIDIA_H200' or 'cpu'."""
    kind = info["device_kind"] if info["backend"] != "cpu" else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", kind).strip("_")


def make_inputs(batch, seqlen, channels, ksize, dtype, seed=0):
    """Unit-scale u, gates, bias and a long non-decaying filter (fp32), as in the tests."""
    rng = np.random.default_rng(seed)
    u, pre, post = (rng.standard_normal((batch, seqlen, channels)) for _ in range(3))
    k = rng.standard_normal((ksize, channels)) / np.sqrt(ksize)
    bias = rng.standard_normal(channels)
    return (jnp.asarray(u, dtype), jnp.asarray(k, jnp.float32), jnp.asarray(bias, jnp.float32),
            jnp.asarray(pre, dtype), jnp.asarray(post, dtype))


def reference(u, k, bias, pre, post, freq_mask=None):
    """float64 NumPy FFT conv of the (rounded) inputs, with the same frequency mask."""
    u, k, bias, pre, post = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (u, k, bias, pre, post))
    seqlen = u.shape[1]
    n = monarch.fft_size(seqlen + k.shape[0] - 1)
    x = u * pre
    spec = np.fft.fft(x, n, axis=1) * np.fft.fft(k, n, axis=0)[None]
    if freq_mask is not None:
        spec = spec * monarch.expand_freq_mask(freq_mask, n)[None, :, None]
    return (np.real(np.fft.ifft(spec, axis=1))[:, :seqlen] + x * bias) * post


def variants(dtype: str, smoke: bool = False):
    """(impl, precision) pairs checked for this input dtype; "xla" ignores precision, "mosaic" takes the
    16-bit settings only. Smoke: pallas and mosaic, at the default precision (and bf16x3 for fp32)."""
    out = [("xla", None)]
    for impl in ("pallas", "mosaic") if smoke else ("xla-matmul", "pallas", "mosaic"):
        for p in DTYPE_PRECISIONS[dtype][: (2 if dtype == "float32" else 1) if smoke else None]:
            gpu_only = p in prec.GPU_ONLY and jax.default_backend() == "tpu"
            if gpu_only or (impl == "mosaic" and p not in mosaic.PRECISIONS):
                continue
            out.append((impl, p))
    return out


def runs(impl: str, p, seqlen: int, ksize: int, mask, dtype: str) -> bool:
    """Whether `impl` computes this case (impl="mosaic": no freq_mask, L <= 2048 or K <= min(1024, L/4),
    what fits its shared memory)."""
    return impl != "mosaic" or (mask is None and mosaic.unsupported(seqlen, p, getattr(jnp, dtype),
                                                                    ksize=ksize) is None)


def correctness(seqlens, batch, channels, log, smoke=False):
    rows = []
    for seqlen in seqlens:
        for dtype in DTYPE_PRECISIONS:
            for mode, ksize, mask in modes(seqlen):
                u, k, bias, pre, post = make_inputs(batch, seqlen, channels, ksize, getattr(jnp, dtype), seed=seqlen)
                ref = reference(u, k, bias, pre, post, mask)
                for impl, p in variants(dtype, smoke):
                    if (mode != "dense" and p != prec.default_for(dtype) and impl != "xla") or not runs(
                            impl, p, seqlen, ksize, mask, dtype):
                        continue  # modes at the default precision; every precision is checked dense
                    jax.clear_caches()
                    y = fftconv(u, k, bias, pre_gate=pre, post_gate=post, freq_mask=mask, impl=impl, precision=p)
                    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
                    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                    bound = prec.ERROR_BOUNDS[p or "fp32"] + OUTPUT_ROUNDING[dtype]
                    row = dict(kind="correctness", impl=impl, precision=p, mode=mode, dtype=dtype, L=seqlen,
                               K=ksize, B=batch, H=channels, rel_l2=err, bound=bound,
                               ok=bool(np.isfinite(y).all() and err <= bound))
                    rows.append(row)
                    log(f"check {impl:>10} {str(p):>6} {mode:>8} {dtype:>8} L={seqlen:>6}  "
                        f"err {err:.2e} (bound {bound:.1e}) {'ok' if row['ok'] else 'FAIL'}")
    return rows


def device_inputs(batch, seqlen, channels, ksize, dtype, seed):
    """Benchmark inputs drawn on the device (host NumPy draws would dominate the run at B·H·L ~ 10^8)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    u, pre, post = (jax.random.normal(key, (batch, seqlen, channels), dtype) for key in keys[:3])
    k = jax.random.normal(keys[3], (ksize, channels), jnp.float32) / np.sqrt(ksize)
    return u, k, jax.random.normal(keys[4], (channels,), jnp.float32), pre, post


def time_rotating(fn, arg_sets, batches=5, min_batch_s=0.02):
    """Median seconds per call over `batches` batches; each batch cycles through all arg sets."""
    jax.block_until_ready(fn(*arg_sets[0]))  # compile
    t0 = time.perf_counter()
    jax.block_until_ready([fn(*args) for args in arg_sets])
    per_call = (time.perf_counter() - t0) / len(arg_sets)
    cycles = max(1, math.ceil(min_batch_s / (per_call * len(arg_sets))))
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(cycles):
            for args in arg_sets:
                out = fn(*args)  # in-order device stream: the last result is ready only after all others
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / (cycles * len(arg_sets)))
    return statistics.median(times)


def bench_plan(shapes, smoke):
    """Benchmark variants in priority order: (group, L, dtype, mode, impl, precision)."""
    lens = sorted(shapes)
    plan = []
    headline = (("xla", None), ("pallas", "bf16")) + (() if smoke else (("xla-matmul", "bf16"), ("pallas", "fp16")))
    mosaic_row = {seqlen: (("mosaic", "bf16"),) if runs("mosaic", "bf16", seqlen, seqlen, None, "bfloat16") else ()
                  for seqlen in lens}  # the Mosaic kernels where they run
    for seqlen in lens:  # 1. the headline: bf16 gated forward
        plan += [("fwd", seqlen, "bfloat16", "dense", impl, p) for impl, p in headline + mosaic_row[seqlen]]
    for seqlen in lens:  # 2. forward + backward
        plan += [("fwdbwd", seqlen, "bfloat16", "dense", impl, p) for impl, p in headline[:2] + mosaic_row[seqlen]]
    mode_lens = lens[:1] if smoke else [s for s in lens if s in (4096, 16384)]
    mode_impls = ("pallas",) if smoke else ("pallas", "xla-matmul")
    for seqlen in mode_lens:  # 3. partial and frequency-sparse against the same impl's dense row
        plan += [("fwd", seqlen, "bfloat16", mode, impl, "bf16") for mode, ksize, mask in modes(seqlen)[1:]
                 for impl in mode_impls + ("mosaic",) if runs(impl, "bf16", seqlen, ksize, mask, "bfloat16")]
        plan += [] if smoke else [("fwd", seqlen, "bfloat16", "partial", "xla", None)]
    fp32 = () if smoke else (("xla", None), ("pallas", "fp32"), ("pallas", "bf16x3"), ("pallas", "tf32"))
    for seqlen in lens:  # 4. fp32 inputs: the fp32-accurate candidates
        plan += [("fwd", seqlen, "float32", "dense", impl, p) for impl, p in fp32
                 if not (p in prec.GPU_ONLY and jax.default_backend() == "tpu")]
    return plan


def benchmark(shapes, args, log, t_start):
    rows = []
    input_sets = {}  # (B, L, H, K, dtype) -> rotating input sets, shared by the variants of one shape
    for group, seqlen, dtype, mode, impl, p in bench_plan(shapes, args.smoke):
        batch, channels = shapes[seqlen]
        name, ksize, mask = next(m for m in modes(seqlen) if m[0] == mode)
        row = dict(kind="bench", group=group, impl=impl, precision=p, mode=mode, dtype=dtype, L=seqlen, K=ksize,
                   B=batch, H=channels, fft_n=monarch.fft_size(seqlen + ksize - 1))
        if time.perf_counter() - t_start > args.budget_s:
            rows.append({**row, "skipped": "time budget"})
            continue
        jax.clear_caches()

        def fwd(u, k, bias, pre, post):
            return fftconv(u, k, bias, pre_gate=pre, post_gate=post, freq_mask=mask, impl=impl, precision=p)

        if group == "fwd":
            fn = jax.jit(fwd)
        else:
            fn = jax.jit(jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4)))
        itemsize = jnp.dtype(dtype).itemsize
        set_bytes = 3 * batch * seqlen * channels * itemsize
        shape = (batch, seqlen, channels, ksize, dtype)
        if shape not in input_sets:
            count = max(2, math.ceil(args.rotate_mb * 1e6 / set_bytes))
            input_sets[shape] = [device_inputs(*shape[:4], getattr(jnp, dtype), seed) for seed in range(count)]
        arg_sets = input_sets[shape]
        try:
            ms = 1e3 * time_rotating(fn, arg_sets, batches=2 if args.smoke else 5)
        except Exception as err:  # a variant that fails to compile/run is a result, not the end of the run
            rows.append({**row, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            log(f"bench {group} {impl} {p} {mode} L={seqlen}: ERROR {rows[-1]['error']}")
            continue
        ideal = set_bytes + batch * seqlen * channels * itemsize  # read u, pre, post; write y
        rows.append({**row, "ms": ms, "buffer_sets": len(arg_sets), "ideal_gbps": ideal / (ms * 1e-3) / 1e9})
        log(f"bench {group:>6} {impl:>10} {str(p):>6} {mode:>8} {dtype:>8} L={seqlen:>7} B×H={batch}×{channels}"
            f"  {ms:9.3f} ms")
    _add_speedups(rows)
    return rows


def _add_speedups(rows):
    done = [r for r in rows if "ms" in r]
    base = {(r["group"], r["L"], r["dtype"]): r["ms"] for r in done if r["impl"] == "xla" and r["mode"] == "dense"}
    dense = {(r["group"], r["L"], r["dtype"], r["impl"], r["precision"]): r["ms"] for r in done if r["mode"] == "dense"}
    for r in done:
        b = base.get((r["group"], r["L"], r["dtype"]))
        d = dense.get((r["group"], r["L"], r["dtype"], r["impl"], r["precision"]))
        r["speed_vs_jnpfft"] = None if b is None or r["mode"] != "dense" else b / r["ms"]
        r["speed_vs_dense"] = None if d is None or r["mode"] == "dense" else d / r["ms"]


def winners(bench_rows, check_rows, info):
    """Fastest forward impl per (FFT size, dtype, mode) for the dense and partial modes, at the dtype's
    default precision, among those that passed their correctness checks; only where jnp.fft was timed
    for the same case (the speed-up is against it)."""
    passed = {(r["impl"], r["precision"], r["dtype"]) for r in check_rows if r["ok"]}
    failed = {(r["impl"], r["precision"], r["dtype"]) for r in check_rows if not r["ok"]}
    best, xla_ms = {}, {}
    for r in bench_rows:
        if "ms" not in r or r["group"] != "fwd" or r["mode"] not in tuned.MODES:
            continue
        key = (r["impl"], r["precision"], r["dtype"])
        if r["impl"] != "xla" and (r["precision"] != prec.default_for(r["dtype"]) or key not in passed or key in failed):
            continue
        slot = (r["fft_n"], r["dtype"], r["mode"])
        if r["impl"] == "xla":
            xla_ms[slot] = r["ms"]
        if slot not in best or r["ms"] < best[slot]["ms"]:
            best[slot] = r
    return [dict(backend=info["backend"], device_kind=info["device_kind"], fft_n=n, dtype=dtype, mode=mode,
                 impl=r["impl"], precision=r["precision"],
                 speedup_vs_xla=xla_ms[(n, dtype, mode)] / r["ms"])
            for (n, dtype, mode), r in sorted(best.items()) if (n, dtype, mode) in xla_ms]


def table_md(info, check_rows, bench_rows) -> str:
    def f(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    bad = [r for r in check_rows if not r["ok"]]
    lines = [f"# fftconv on {info['device_kind']} ({info['backend']})", "", f"Machine: `{json.dumps(info)}`", "",
             f"Correctness: {len(check_rows) - len(bad)}/{len(check_rows)} checks within bound "
             f"(impl × precision × mode × dtype vs float64)."]
    lines += [f"- FAIL {r['impl']} {r['precision']} {r['mode']} {r['dtype']} L={r['L']}: {r['rel_l2']:.2e} > "
              f"{r['bound']:.1e}" for r in bad]
    lines += ["", "| group | impl | precision | mode | dtype | L | B×H | ms | × jnp.fft | × dense | ideal GB/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in bench_rows:
        ms = r.get("ms")
        note = r.get("skipped") or r.get("error")
        lines.append(f"| {r['group']} | {r['impl']} | {r['precision'] or '-'} | {r['mode']} | {r['dtype']} | {r['L']} | "
                     f"{r['B']}×{r['H']} | {f(ms) if note is None else note[:60]} | {f(r.get('speed_vs_jnpfft'), '.2f')} | "
                     f"{f(r.get('speed_vs_dense'), '.2f')} | {f(r.get('ideal_gbps'), '.0f')} |")
    return "\n".join(lines) + "\n"


def plot(info, bench_rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, group in zip(axes, ("fwd", "fwdbwd")):
        sel = [r for r in bench_rows if r["group"] == group and r["mode"] == "dense" and r.get("speed_vs_jnpfft")]
        for label in sorted({(r["impl"], r["precision"], r["dtype"]) for r in sel}, key=str):
            pts = sorted((r["L"], r["speed_vs_jnpfft"]) for r in sel if (r["impl"], r["precision"], r["dtype"]) == label)
            ax.plot(*zip(*pts), marker="o", label=f"{label[0]} {label[1] or ''} ({label[2]})")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L")
        ax.set_ylabel("speed vs jnp.fft (×)")
        ax.set_title(f"{group}, gated conv — {info['device_kind']}")
        if sel:
            ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    t_start = time.perf_counter()
    info = machine_info()
    smoke = args.smoke
    shapes = SMOKE_SHAPES if smoke else {L: bh for L, bh in FULL_SHAPES.items() if L <= args.max_len}
    if smoke:
        args.rotate_mb = min(args.rotate_mb, 0.02)  # a few sets: the Mosaic interpreter takes ~0.1 s a call

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    check_lens = sorted(SMOKE_SHAPES) if smoke else args.check_lens
    check_rows = correctness(check_lens, 1 if smoke else 2, 2 if smoke else 16, log, smoke)
    bench_rows = benchmark(shapes, args, log, t_start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_{device_name(info)}{'_smoke' if smoke else ''}"
    with open(f"{stem}.jsonl", "w") as fh:
        fh.write(json.dumps({"kind": "machine", **info, "smoke": smoke, "wall_s": time.perf_counter() - t_start}) + "\n")
        for row in check_rows + bench_rows:
            fh.write(json.dumps(row) + "\n")
    Path(f"{stem}.md").write_text(table_md(info, check_rows, bench_rows))
    plot(info, bench_rows, Path(f"{stem}.png"))
    log(f"wrote {stem}.jsonl, .md, .png")
    if args.write_table:
        rows = [{**row, "source": f"{stem.name}.jsonl"} for row in winners(bench_rows, check_rows, info)]
        log(f"table: {tuned.write(rows, args.table)} ({len(rows)} rows for {info['device_kind']})")
    failed = [r for r in check_rows if not r["ok"]]
    return 1 if failed else 0
