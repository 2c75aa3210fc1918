"""Benchmark the fftconv implementations against the jnp.fft baseline (`longconv bench`).

Times jit-compiled forward and forward+backward (grad of sum(y·w) w.r.t. u, k and the gates) for every
implementation, FFT length, dtype, plus the partial (K = L/16) and frequency-sparse (25 %: low-pass and comb, `modes`)
modes against the same implementation's dense run. Batch × channels are scaled down for long L so
B·H·L stays under a budget (every row records its B and H; nothing is rescaled). Achieved bandwidth is
the ideal traffic (read u, gates and k, write y; ×~2.5 for fwd+bwd is not counted) over the time,
shown against a peak: pass --peak-gbps, or a known GPU's datasheet peak is used.

Writes <out>/bench_<backend>.json and .png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels.fftconv import monarch

PEAK_GBPS = {  # datasheet HBM bandwidth
    "H100 80GB HBM3": 3350.0,
    "H100": 3350.0,
    "H200": 4800.0,
    "A100-SXM4-80GB": 2039.0,
    "A100": 1555.0,
    "L4": 300.0,
    "RTX 4090": 1008.0,
    "TPU v5 lite": 819.0,
    "TPU v4": 1200.0,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--impls", default=None, help="comma list (default: xla,xla-matmul; +pallas off CPU)")
    parser.add_argument("--min-len", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=None, help="default 16384 on CPU, 1M elsewhere")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--budget", type=int, default=None, help="max B·H·L (default 2^20 CPU, 2^27 else)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--no-modes", action="store_true", help="skip the partial / freq-sparse rows")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth for the %% column")
    parser.add_argument("--out", default="results/fftconv")


def cpu_name(cpuinfo: str) -> str:
    """The host CPU from /proc/cpuinfo's text: model name, x86 family/model and widest vector ISA, e.g.
    "AMD EPYC (family 26 model 2, AVX-512)" (VMs often hide the generation behind a bare "AMD EPYC",
    and CPU timings differ by generation). Empty if the text has no model name."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "")
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    details = [f"family {fields['cpu family']} model {fields.get('model', '?')}"] if "cpu family" in fields else []
    details += [isa] if isa else []
    return f"{name} ({', '.join(details)})" if name and details else name


def machine_info() -> dict:
    dev = jax.devices()[0]
    try:
        cpu = cpu_name(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = ""
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def peak_for(kind: str, given: float | None) -> float | None:
    if given:
        return given
    for name, gbps in PEAK_GBPS.items():
        if name.lower() in kind.lower():
            return gbps
    return None


def _time(fn, args, repeats) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _make(batch, seqlen, channels, ksize, dtype, seed=0):
    rng = np.random.default_rng(seed)
    u = jnp.asarray(rng.standard_normal((batch, seqlen, channels)), dtype)
    k = jnp.asarray(rng.standard_normal((ksize, channels)) / np.sqrt(ksize), jnp.float32)
    pre = jnp.asarray(rng.standard_normal((batch, seqlen, channels)), dtype)
    post = jnp.asarray(rng.standard_normal((batch, seqlen, channels)), dtype)
    return u, k, pre, post


def modes(seqlen):
    """(name, filter length, freq_mask) of the benchmarked modes: dense; partial, K = L/16; two 25 %
    frequency-sparse masks: "sparse25", a low-pass band (only the last forward and first inverse stage
    shrink), and "sparse25-comb", every 4th bin (3 of 4 outer groups dropped, inner transforms and all)."""
    return [("dense", seqlen, None), ("partial", max(1, seqlen // 16), None),
            ("sparse25", seqlen, monarch.lowpass_mask(seqlen, seqlen, 0.25)),
            ("sparse25-comb", seqlen, monarch.comb_mask(seqlen, seqlen, 0.25))]


def _fns(impl, freq_mask=None):
    from kernels.fftconv import fftconv

    def fwd(u, k, pre, post):
        return fftconv(u, k, pre_gate=pre, post_gate=post, freq_mask=freq_mask, impl=impl)

    def loss(u, k, pre, post):
        return jnp.sum(fwd(u, k, pre, post).astype(jnp.float32))

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def run(args) -> dict:
    backend = jax.default_backend()
    cpu = backend == "cpu"
    impls = args.impls.split(",") if args.impls else (["xla", "xla-matmul"] + ([] if cpu else ["pallas"]))
    max_len = args.max_len or (16384 if cpu else 1 << 20)
    budget = args.budget or ((1 << 20) if cpu else (1 << 27))
    dtypes = [getattr(jnp, d) for d in args.dtypes.split(",")]
    info = machine_info()
    peak = peak_for(info["device_kind"], args.peak_gbps)
    rows = []
    seqlen = args.min_len
    while seqlen <= max_len:
        batch, channels = args.batch, args.channels
        while batch * channels * seqlen > budget and batch > 1:
            batch //= 2
        while batch * channels * seqlen > budget and channels > 1:
            channels //= 2
        for dtype in dtypes:
            u, k, pre, post = _make(batch, seqlen, channels, seqlen, dtype)
            for impl in impls:
                for mode, ksize, mask in modes(seqlen)[: 1 if args.no_modes else None]:
                    if mask is not None and impl == "xla":
                        continue  # masked jnp.fft does the same work as dense
                    kk = k[:ksize]
                    fwd, bwd = _fns(impl, mask)
                    nbytes = u.size * u.dtype.itemsize * 4 + kk.size * 4  # u, pre, post in; y out; filter
                    row = dict(impl=impl, mode=mode, L=seqlen, K=int(kk.shape[0]), B=batch, H=channels,
                               dtype=jnp.dtype(dtype).name)
                    row["fwd_ms"] = 1e3 * _time(fwd, (u, kk, pre, post), args.repeats)
                    if not args.no_backward:
                        row["fwdbwd_ms"] = 1e3 * _time(bwd, (u, kk, pre, post), args.repeats)
                    row["fwd_gbps"] = nbytes / (row["fwd_ms"] * 1e-3) / 1e9
                    row["fwd_peak_frac"] = None if peak is None else row["fwd_gbps"] / peak
                    rows.append(row)
                    print(_fmt(row), flush=True)
        seqlen *= 2
    _add_speedups(rows)
    return {"machine": info, "peak_gbps": peak, "budget_BHL": budget, "rows": rows}


def _add_speedups(rows):
    base = {(r["L"], r["dtype"]): r for r in rows if r["impl"] == "xla" and r["mode"] == "dense"}
    dense = {(r["impl"], r["L"], r["dtype"]): r for r in rows if r["mode"] == "dense"}
    for r in rows:
        b = base.get((r["L"], r["dtype"]))
        d = dense.get((r["impl"], r["L"], r["dtype"]))
        for key in ("fwd_ms", "fwdbwd_ms"):
            if key in r:
                tag = key.split("_")[0]
                r[f"{tag}_vs_jnpfft"] = None if b is None or key not in b else b[key] / r[key]
                r[f"{tag}_vs_dense"] = None if d is None or key not in d else d[key] / r[key]


def _fmt(r) -> str:
    bwd = f"{r['fwdbwd_ms']:9.2f}" if "fwdbwd_ms" in r else "        -"
    return (f"{r['impl']:>10} {r['mode']:>8} {r['dtype']:>8} L={r['L']:>7} K={r['K']:>7} B={r['B']:>3} "
            f"H={r['H']:>4}  fwd {r['fwd_ms']:9.2f} ms  fwd+bwd {bwd} ms  {r['fwd_gbps']:7.2f} GB/s")


def table(result) -> str:
    lines = ["| impl | mode | dtype | L | B×H | fwd ms | fwd+bwd ms | fwd × vs jnp.fft | fwd × vs dense | GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        def f(v, p=2):
            return "-" if v is None else f"{v:.{p}f}"
        lines.append(
            f"| {r['impl']} | {r['mode']} | {r['dtype']} | {r['L']} | {r['B']}×{r['H']} | {f(r['fwd_ms'])} | "
            f"{f(r.get('fwdbwd_ms'))} | {f(r.get('fwd_vs_jnpfft'))} | {f(r.get('fwd_vs_dense'))} | "
            f"{f(r['fwd_gbps'])} |"
        )
    return "\n".join(lines)


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.2), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        for impl in sorted({r["impl"] for r in rows}):
            for mode, style in (("dense", "-"), ("partial", ":"), ("sparse25", "--"), ("sparse25-comb", "-.")):
                sel = [r for r in rows if r["impl"] == impl and r["mode"] == mode and r["dtype"] == dt]
                if not sel:
                    continue
                xs = [r["L"] for r in sel]
                ys = [r["fwd_ms"] / (r["B"] * r["H"]) * 1e3 for r in sel]
                ax.plot(xs, ys, style, marker="o", label=f"{impl} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L (FFT size 2L)")
        ax.set_ylabel("forward µs per sequence (time / (B·H))")
        m = result["machine"]
        ax.set_title(f"{dt} — {m['backend']}: {m['device_kind']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench_{result['machine']['backend']}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(
        f"Machine: {json.dumps(result['machine'])}\n\npeak GB/s: {result['peak_gbps']}\n\n{table(result)}\n"
    )
    plot(result, out / f"{name}.png")
    print(table(result))
    print(f"wrote {out / name}.json, .md, .png")
    return 0
