"""Where impl="direct" (the Toeplitz matmul) beats jnp.fft: the crossovers behind `toeplitz.AUTO_MAX_LEN`
and `toeplitz.AUTO_MIN_BATCH_PER_LEN`.

Times the gated conv y = post ⊙ (k ∗ (pre ⊙ u) + bias ⊙ pre ⊙ u), fp32, forward and forward+backward
(grad of sum(y²) w.r.t. u, k, bias and both gates), for impl "xla" and "direct", back to back per shape,
over L = 32 … 512 and H = 64, 256, each at three batches: B·L = 32,768 tokens (the MQAR paper cell's batch
512 × L 64), B = 2L (auto's threshold) and B = 4 (a small batch: the matrix is not amortised).
Time = best of 3 batches of calls (wall clock, block_until_ready). Writes <out>.json, .md and .png with
the machine and the load average before and after.

    python scripts/bench_direct_conv.py                       # on a quiet machine, ~5 min on 2 cores
    python scripts/bench_direct_conv.py --lens 32 --channels 64 --out /tmp/direct   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TOKENS = 32768


def best_ms(fn, args, calls: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / calls)
    return 1e3 * best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--channels", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--out", default=str(REPO / "results" / "fftconv" / "direct_vs_fft_cpu"))
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels.fftconv import fftconv
    from kernels.fftconv.bench import machine_info
    from kernels.fftconv.toeplitz import AUTO_MAX_LEN, AUTO_MIN_BATCH_PER_LEN

    load_before = os.getloadavg()
    rows = []
    shapes = []  # (L, H, B, which batch)
    for seqlen in args.lens:
        for channels in args.channels:
            batches = {}
            for rule, batch in ((f"B·L {TOKENS // 1024}k", max(1, TOKENS // seqlen)),
                                (f"B {AUTO_MIN_BATCH_PER_LEN}L", AUTO_MIN_BATCH_PER_LEN * seqlen), ("B 4", 4)):
                batches.setdefault(batch, rule)
            shapes += [(seqlen, channels, batch, rule) for batch, rule in batches.items()]
    for seqlen, channels, batch, rule in shapes:
        rng = np.random.default_rng(0)
        u, pre, post = (jnp.asarray(rng.standard_normal((batch, seqlen, channels)), jnp.float32) for _ in range(3))
        k = jnp.asarray(rng.standard_normal((seqlen, channels)) / np.sqrt(seqlen), jnp.float32)
        bias = jnp.asarray(rng.standard_normal(channels), jnp.float32)
        row = {"B": batch, "L": seqlen, "H": channels, "batch": rule}
        for impl in ("xla", "direct"):
            def conv(u, k, bias, pre, post, impl=impl):
                return fftconv(u, k, bias, pre_gate=pre, post_gate=post, impl=impl)

            grad = jax.grad(lambda *a, c=conv: jnp.sum(c(*a) ** 2), argnums=(0, 1, 2, 3, 4))
            calls = 3 if batch * seqlen * channels * seqlen > 2e9 else 10
            row[f"{impl}_fwd_ms"] = best_ms(jax.jit(conv), (u, k, bias, pre, post), calls)
            row[f"{impl}_fwdbwd_ms"] = best_ms(jax.jit(grad), (u, k, bias, pre, post), calls)
        row["direct_speedup_fwd"] = row["xla_fwd_ms"] / row["direct_fwd_ms"]
        row["direct_speedup_fwdbwd"] = row["xla_fwdbwd_ms"] / row["direct_fwdbwd_ms"]
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    info = machine_info()
    result = {"machine": info, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "tokens": TOKENS, "auto_max_len": AUTO_MAX_LEN, "auto_min_batch_per_len": AUTO_MIN_BATCH_PER_LEN,
              "rows": rows, "command": " ".join(sys.argv)}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# impl=\"direct\" (Toeplitz matmul) vs jnp.fft, gated fp32 conv ({info['backend']})", "",
             f"Machine: {info['cpu']}, {info['cpu_count']} logical cores, jax {info['jax']}, {info['time']}; load "
             f"average {load_before[0]:.1f} before, {result['load_average_after'][0]:.1f} after. Best of 3 batches "
             f"of calls. `auto` takes direct on CPU for L ≤ {AUTO_MAX_LEN} and B ≥ {AUTO_MIN_BATCH_PER_LEN}·L.", "",
             "| L | H | B | jnp.fft fwd ms | direct fwd ms | × | jnp.fft fwd+bwd ms | direct fwd+bwd ms | × |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['L']} | {r['H']} | {r['B']} ({r['batch']}) | {r['xla_fwd_ms']:.2f} | {r['direct_fwd_ms']:.2f} | "
                     f"{r['direct_speedup_fwd']:.2f} | {r['xla_fwdbwd_ms']:.2f} | {r['direct_fwdbwd_ms']:.2f} | "
                     f"{r['direct_speedup_fwdbwd']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, out.with_suffix(".png"), info)
    print("\n".join(lines))
    return 0


def plot(rows, path: pathlib.Path, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for channels, style in zip(sorted({r["H"] for r in rows}), ("-", "--", ":")):
        for rule in dict.fromkeys(r["batch"] for r in rows):
            pts = sorted((r["L"], r["direct_speedup_fwdbwd"]) for r in rows if r["H"] == channels and r["batch"] == rule)
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"H {channels}, {rule}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("L")
    ax.set_ylabel("jnp.fft time / direct time, forward+backward")
    ax.set_title(f"Toeplitz matmul vs jnp.fft — {info['cpu']}"[:70])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
