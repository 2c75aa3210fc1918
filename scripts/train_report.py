"""Training summary of runs: wall time, tokens/s and the validation-loss curve, from their metrics.jsonl.

    python scripts/train_report.py --runs runs/ts_hyena_2k runs/ts_multihyena_2k --wall-s 2196 1900 \
        --out results/distill --tag train_2k --note "shared 2-core VM, load 4-7"

``--wall-s`` (one per run) is the command's measured wall time (e.g. `/usr/bin/time`), compile and
evaluations included; without it the span between the first and last logged records is used. Writes
TAG.json, TAG.md and TAG.png (validation loss against step, and training loss).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def summarize(run_dir: pathlib.Path, wall_s: float | None) -> dict:
    from lm.tracking import read_metrics

    train = read_metrics(run_dir, "train")
    evals = read_metrics(run_dir, "eval")
    if not train:
        raise SystemExit(f"{run_dir}: no training metrics")
    span = train[-1]["time"] - train[0]["time"]
    tokens = train[-1]["tokens"]
    tok_s = [r["tokens_per_s"] for r in train[1:]]  # the first logged window includes compilation
    curve = [{"step": r["step"], "loss": r["loss"], "whole_split": bool(r.get("whole_split")),
              "tokens": r.get("tokens")} for r in evals]
    subset = [r for r in curve if not r["whole_split"]]  # comparable points (the same batches)
    best = min(subset or curve, key=lambda r: r["loss"]) if curve else None
    return {"run": str(run_dir), "steps": train[-1]["step"], "tokens_trained": tokens,
            "wall_s": wall_s if wall_s is not None else span, "wall_source": "measured" if wall_s else "log span",
            "tokens_per_s_median": sorted(tok_s)[len(tok_s) // 2] if tok_s else None,
            "train_loss_final": train[-1]["loss"], "val_curve": curve, "val_best": best,
            "val_final": curve[-1] if curve else None,
            "train_curve": [{"step": r["step"], "loss": r["loss"]} for r in train]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--wall-s", type=float, nargs="*", default=None, help="measured wall seconds, one per run")
    ap.add_argument("--machine", default="2-core AMD EPYC VM (CPU, JAX on cpu)")
    ap.add_argument("--note", default="", help="load / sharing note for the machine")
    ap.add_argument("--out", default="results/distill")
    ap.add_argument("--tag", default="train")
    args = ap.parse_args(argv)
    if args.wall_s and len(args.wall_s) != len(args.runs):
        raise SystemExit(f"--wall-s needs one value per run ({len(args.runs)}), got {len(args.wall_s)}")

    rows = [summarize(pathlib.Path(r), args.wall_s[i] if args.wall_s else None) for i, r in enumerate(args.runs)]
    result = {"machine": args.machine, "note": args.note, "runs": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Training the distillation models ({args.tag})", "",
             f"Machine: {args.machine}. {args.note}".strip(), "",
             "| run | steps | tokens | wall time | median tokens/s | final train loss | best val loss on the subset (step) | final val loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, f = r["val_best"], r["val_final"]
        lines.append(f"| `{r['run']}` | {r['steps']} | {r['tokens_trained']:,} | {r['wall_s'] / 60:.1f} min "
                     f"({r['wall_source']}) | {r['tokens_per_s_median']:,.0f} | {r['train_loss_final']:.4f} | "
                     f"{b['loss']:.4f} ({b['step']}) | {f['loss']:.4f} ({'whole split' if f['whole_split'] else 'subset'}) |")
    lines += ["", "Validation-loss curve (nats/token; 'subset' = the first `trainer.eval_steps` validation batches, "
              "'whole' = the whole split, logged at the last step):", ""]
    for r in rows:
        pts = ", ".join(f"{p['step']}: {p['loss']:.3f}{' (whole)' if p['whole_split'] else ''}" for p in r["val_curve"])
        lines.append(f"- `{r['run']}`: {pts}")
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        sub = [p for p in r["val_curve"] if not p["whole_split"]]
        line = ax.plot([p["step"] for p in sub], [p["loss"] for p in sub], "o-", label=f"{r['run']} val (subset)")[0]
        whole = [p for p in r["val_curve"] if p["whole_split"]]
        ax.plot([p["step"] for p in whole], [p["loss"] for p in whole], "*", ms=12, color=line.get_color(),
                label=f"{r['run']} val (whole split)")
        ax.plot([p["step"] for p in r["train_curve"]], [p["loss"] for p in r["train_curve"]], ":", color=line.get_color(),
                alpha=0.6, label=f"{r['run']} train")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_ylim(top=3.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(args.machine, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{args.tag}.png", dpi=120)
    print(f"wrote {out / args.tag}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
