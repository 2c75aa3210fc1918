#!/usr/bin/env python
"""Launch-setting sweep of the Pallas fftconv kernels on a GPU (<= 5 minutes): which knob moves the time.

For each L (default 1K: the fused 2-stage kernel, and the Mosaic GPU wgmma kernel, impl="mosaic", with its
`kernels.fftconv.mosaic.Tuning` variants; 4K and 16K: the inner kernel after XLA's outer stage, and at 4K also
the 3-level fused kernel, `Tuning.fused3_max_fft`; at 4K and 16K the partial conv K = L/16 as the one
overlap-save kernel against the overlap-add chunks, `Tuning.overlap_save`),
bf16 gated forward at the B x H of `scripts/gpu_check.py`, times jnp.fft ("xla", re-measured here) and
impl="pallas" under each `kernels.fftconv.pallas.Tuning` variant and activation layout ("blh", or "hbl" =
the kernels' own order, no transposes), inputs rotated beyond L2, `jax.clear_caches()` between variants.
Each variant is also checked against the default variant's output (rel. L2 < 1e-2: a launch setting
must not change the result). Writes <out>/kernel_sweep_<device>.{jsonl,md,png}.

    python scripts/gpu_kernel_sweep.py --out results/fftconv            # on the GPU
    python scripts/gpu_kernel_sweep.py --smoke --out /tmp/sweep          # CPU, interpret mode, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels.fftconv import fftconv, mosaic, pallas  # noqa: E402
from kernels.fftconv.bench import machine_info  # noqa: E402
from kernels.fftconv.conv import overlap_save_chunk  # noqa: E402
from kernels.fftconv.gpu_check import FULL_SHAPES, device_inputs, device_name, time_rotating  # noqa: E402

# (label, Tuning changes); the first is the default every other variant is compared with.
VARIANTS = [  # the most promising first: a time budget cuts the tail
    ("default", {}),
    ("3-level fused", {"fused3_max_fft": 16384}),
    ("fused stack 4, 8 warps", {"fused_stack": 4, "num_warps": 8}),
    ("fused stack 2", {"fused_stack": 2}),
    ("fp32 planes", {"low_precision_planes": False}),
    ("8 warps", {"num_warps": 8}),
    ("fused stack 2, 8 warps", {"fused_stack": 2, "num_warps": 8}),
    ("3-level fused, 16 warps", {"fused3_max_fft": 16384, "num_warps": 16}),
    ("2 stages", {"num_stages": 2}),
    ("fused ch 1", {"fused_channels": 1}),
    ("fused ch 2", {"fused_channels": 2}),
    ("fused ch 16", {"fused_channels": 16}),
    ("inner ch 1", {"inner_channels": 1}),
    ("inner ch 8", {"inner_channels": 8}),
    ("inner rows 1", {"inner_rows": 1}),
    ("inner rows 2", {"inner_rows": 2}),
    ("inner rows 32", {"inner_rows": 32}),
]
# The Mosaic GPU wgmma kernels (impl="mosaic", L <= 2048; `kernels.fftconv.mosaic.Tuning` changes): forward,
# and the first also forward+backward.
MOSAIC_VARIANTS = [("mosaic", {}), ("mosaic 16 seqs", {"seqs_per_program": 16}),
                   ("mosaic 2 seqs", {"seqs_per_program": 2}),
                   ("mosaic constants in smem", {"constants_in_registers": False})]
# Also timed as forward+backward (grad w.r.t. u, k, bias and both gates), at the lengths where the 3-level
# fused kernels apply.
GRAD_VARIANTS = ("xla", "default", "3-level fused")
# The partial conv (K = L/16; groups "partial" and "partial fwdbwd") where the overlap-save kernels apply.
PARTIAL_VARIANTS = [("xla", None), ("default", {}), ("overlap-add partial", {"overlap_save": False}),
                    ("mosaic", {})]  # the Mosaic overlap-save kernels
FUSED_ONLY = ("fused ",)  # variants that change nothing on >= 3-stage plans, and vice versa
INNER_ONLY = ("inner ", "fp32 planes")


def applies(label: str, seqlen: int) -> bool:
    fused = seqlen <= 2048  # dense conv of L <= 2048: FFT size <= 4096, a 2-stage plan
    if label.startswith("mosaic"):
        return seqlen <= mosaic.MAX_LEN
    if label.startswith("3-level"):
        return 2048 < seqlen <= 8192  # FFT sizes 8192 and 16384: 3-stage plans the fused kernel can take
    if label.startswith(FUSED_ONLY):
        return fused
    if label.startswith(INNER_ONLY):
        return not fused
    return True


def to_layout(a, layout):
    return jnp.transpose(a, (2, 0, 1)) if layout == "hbl" else a  # (B, L, H) -> (H, B, L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--layouts", nargs="+", default=["hbl", "blh"])
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting variants after this")
    ap.add_argument("--rotate-mb", type=float, default=200.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpret mode)")
    ap.add_argument("--out", default="results/fftconv")
    args = ap.parse_args()
    t_start = time.perf_counter()
    info = machine_info()
    shapes = {256: (1, 8), 4096: (1, 2)} if args.smoke else {L: FULL_SHAPES.get(L, (8, 768)) for L in args.lens}
    rows = []

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    for layout in args.layouts:  # every length in the first layout before the second (budget cuts the tail)
        for seqlen, (batch, channels) in shapes.items():
            set_bytes = 3 * batch * seqlen * channels * 2
            count = 2 if args.smoke else max(2, math.ceil(args.rotate_mb * 1e6 / set_bytes))
            base_sets = [device_inputs(batch, seqlen, channels, seqlen, jnp.bfloat16, seed) for seed in range(count)]
            sets = [(to_layout(u, layout), k, bias, to_layout(pre, layout), to_layout(post, layout))
                    for u, k, bias, pre, post in base_sets]
            reference = {}  # group -> the default variant's output (fwd) or gradients (fwdbwd), flattened
            every = [("xla", None)] + VARIANTS
            runs = [("fwd", label, changes) for label, changes in every[:3] + MOSAIC_VARIANTS]  # jnp.fft, default,
            # 3-level, the Mosaic kernel
            if applies("3-level", seqlen):
                runs += [("fwdbwd", label, changes) for label, changes in every if label in GRAD_VARIANTS]
            if applies("mosaic", seqlen):  # its backward kernel against the Triton one and jnp.fft's
                runs += [("fwdbwd", label, changes) for label, changes in every[:2] + MOSAIC_VARIANTS[:1]]
            if overlap_save_chunk(seqlen, seqlen // 16):
                runs += [("partial", label, changes) for label, changes in PARTIAL_VARIANTS]
                runs += [("partial fwdbwd", label, changes) for label, changes in PARTIAL_VARIANTS]
            runs += [("fwd", label, changes) for label, changes in every[3:]]
            for group, label, changes in runs:
                if label != "xla" and not group.startswith("partial") and not applies(label, seqlen):
                    continue
                ksize = seqlen // 16 if group.startswith("partial") else seqlen
                row = dict(L=seqlen, K=ksize, B=batch, H=channels, layout=layout, group=group, variant=label,
                           tuning=changes)
                if label.startswith("mosaic"):
                    reason = mosaic.unsupported(seqlen, "bf16", jnp.bfloat16, ksize=ksize)
                    if reason:
                        rows.append({**row, "skipped": reason})
                        continue
                    row["smem_kib"] = {kind: mosaic.shared_memory_bytes(seqlen, ksize, "bf16", jnp.bfloat16, 2,
                                                                        kind) / 1024  # programs per SM ≤ 227 / this
                                       for kind in ("forward", "backward")}
                if time.perf_counter() - t_start > args.budget_s:
                    rows.append({**row, "skipped": "time budget"})
                    continue
                impl = "xla" if changes is None else "mosaic" if label.startswith("mosaic") else "pallas"
                jax.clear_caches()
                def conv(u, k, b, pre, post, impl=impl, layout=layout, ksize=ksize, changes=changes):
                    if impl == "mosaic":
                        return mosaic.fftconv_mosaic(u, k[:ksize], b, pre, post, precision="bf16", layout=layout,
                                                     tuning=mosaic.Tuning(**changes))
                    return fftconv(u, k[:ksize], b, pre_gate=pre, post_gate=post, impl=impl, layout=layout)

                fn = jax.jit(conv if not group.endswith("fwdbwd") else jax.grad(
                    lambda *a: jnp.sum(conv(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4)))
                try:
                    with pallas.tuning(**(changes if impl == "pallas" else {})):
                        y = np.concatenate([np.asarray(jnp.asarray(a, jnp.float32)).ravel()
                                            for a in jax.tree.leaves(fn(*sets[0]))])
                        ms = 1e3 * time_rotating(fn, sets, batches=2 if args.smoke else 5)
                except Exception as err:  # noqa: BLE001 - a variant that fails to compile is a result
                    rows.append({**row, "error": f"{type(err).__name__}: {str(err)[:300]}"})
                    log(f"L={seqlen} {layout} {label}: ERROR {rows[-1]['error']}")
                    continue
                if label == "default":
                    reference[group] = y
                ref = reference.get(group)
                err = None if ref is None else float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                rows.append({**row, "ms": ms, "rel_l2_vs_default": err, "ok": err is None or err < 1e-2})
                versus = "" if err is None else f"  (vs default {err:.1e})"
                log(f"L={seqlen:>6} {layout} {group:>6} {label:>24}: {ms:8.3f} ms{versus}")
    for r in rows:  # speed relative to jnp.fft at the same L and layout
        base = next((b["ms"] for b in rows if b["variant"] == "xla" and "ms" in b
                     and (b["L"], b["layout"], b["group"]) == (r["L"], r["layout"], r["group"])), None)
        r["speed_vs_jnpfft"] = base / r["ms"] if base and "ms" in r else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kernel_sweep_{device_name(info)}{'_smoke' if args.smoke else ''}"
    with open(f"{stem}.jsonl", "w") as fh:
        fh.write(json.dumps({"kind": "machine", **info, "wall_s": time.perf_counter() - t_start}) + "\n")
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    lines = [f"# Pallas launch-setting sweep on {info['device_kind']} ({info['backend']})", "",
             f"Machine: `{json.dumps(info)}`. bf16 gated conv, forward (fwd), forward+backward (fwdbwd), the "
             "partial conv K = L/16 (partial, partial fwdbwd); × jnp.fft = jnp.fft time / this time; SMEM: "
             "shared memory of one Mosaic program, forward/backward.", "",
             "| L | K | B×H | layout | group | variant | ms | × jnp.fft | rel. L2 vs default | SMEM KiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("skipped") or r.get("error")
        ms = f"{r['ms']:.3f}" if note is None else note[:60]
        speed = f"{r['speed_vs_jnpfft']:.2f}" if r.get("speed_vs_jnpfft") else "-"
        err = f"{r['rel_l2_vs_default']:.1e}" if r.get("rel_l2_vs_default") is not None else "-"
        smem = "/".join(f"{v:.0f}" for v in r["smem_kib"].values()) if "smem_kib" in r else "-"
        lines.append(f"| {r['L']} | {r['K']} | {r['B']}×{r['H']} | {r['layout']} | {r['group']} | {r['variant']} | "
                     f"{ms} | {speed} | {err} | {smem} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(rows, info, Path(f"{stem}.png"))
    log(f"wrote {stem}.jsonl, .md, .png")
    print("\n".join(lines))
    return 0 if all(r.get("ok", True) for r in rows) else 1


def plot(rows, info, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "ms" in r and r["variant"] != "xla"]
    groups = sorted({(r["L"], r["layout"], r["group"]) for r in done})
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4 * max(1, len(groups)), 4), squeeze=False)
    for ax, (seqlen, layout, group) in zip(axes[0], groups):
        sel = [r for r in done if (r["L"], r["layout"], r["group"]) == (seqlen, layout, group)]
        ax.barh([r["variant"] for r in sel], [r["speed_vs_jnpfft"] or 0 for r in sel])
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_title(f"L {seqlen}, {layout}, {group}", fontsize=9)
        ax.set_xlabel("speed vs jnp.fft (×)")
        ax.tick_params(labelsize=7)
    fig.suptitle(f"pallas fftconv launch settings, {info['device_kind']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
