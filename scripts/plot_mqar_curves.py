"""Test accuracy per epoch of MQAR runs made with different settings, side by side: a markdown table and a plot.

Each ``LABEL=DIR`` names a sweep's output directory (its ``results.jsonl``); the latest record of every run of
``--mixer`` at the given learning rates is one line (colour per label, line style per learning rate), with
Zoology's Figure 2 value for the point as a dashed line. Cut runs end where they were cut.

    python scripts/plot_mqar_curves.py --mixer baseconv --out results/mqar/zoology_cpu_checks/curves_baseconv \
        "2 layers, earlier config=results/mqar/zoology_cpu" "4 layers=results/mqar/zoology_cpu_checks/4layers"

Writes ``<out>.png`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TABLE_EPOCHS = (4, 8, 12, 16, 20, 24, 32, 40, 48, 56, 64)


def latest_runs(results_dir: pathlib.Path, mixer: str, lrs: list[float] | None) -> list[dict]:
    """The last record of each run of ``mixer`` in ``results_dir/results.jsonl``, highest learning rate first."""
    from lm.mqar.runner import read_results

    path = results_dir / "results.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: no results.jsonl in {results_dir}")
    latest = {r["key"]: r for r in read_results(path) if r.get("mixer") == mixer}
    runs = [r for r in latest.values() if lrs is None or any(abs(r["lr"] / lr - 1) < 1e-3 for lr in lrs)]
    return sorted(runs, key=lambda r: -r["lr"])


def markdown(series: list[tuple[str, list[dict]]]) -> str:
    head = "| setting | lr | " + " | ".join(f"epoch {e}" for e in TABLE_EPOCHS) + " | best (epochs run) |"
    lines = [head, "|---|---|" + "---|" * (len(TABLE_EPOCHS) + 1)]
    for label, runs in series:
        for r in runs:
            acc = {round(h["epoch"]): h["test_acc"] for h in r["history"]}
            cells = " | ".join(f"{acc[e]:.3f}" if e in acc else "" for e in TABLE_EPOCHS)
            lines.append(f"| {label} | {r['lr']:.3g} | {cells} | {r['acc']:.3f} ({r['epochs']:.1f}) |")
    return "\n".join(lines) + "\n"


def plot(series: list[tuple[str, list[dict]]], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lm.mqar.report import published

    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = ["-", "--", ":", "-."]
    lrs = sorted({r["lr"] for _, runs in series for r in runs}, reverse=True)
    for i, (label, runs) in enumerate(series):
        for r in runs:
            h = r["history"]
            ax.plot([x["epoch"] for x in h], [x["test_acc"] for x in h], color=f"C{i}",
                    linestyle=styles[lrs.index(r["lr"]) % len(styles)], label=f"{label}, lr {r['lr']:.3g}")
    first = series[0][1][0]
    ref = published(first["mixer"], first["seq_len"], first["num_kv_pairs"], first["d_model"])
    if ref is not None:
        ax.axhline(ref, color="k", linestyle="--", linewidth=0.8, label=f"Zoology Figure 2: {ref:.2f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("series", nargs="+", help="LABEL=DIR: a label and a sweep output directory")
    ap.add_argument("--mixer", required=True, help="mixer label of the runs to show")
    ap.add_argument("--lrs", type=float, nargs="*", help="only these learning rates (default: all)")
    ap.add_argument("--out", required=True, help="output path without suffix (.png and .md are written)")
    args = ap.parse_args()
    series = []
    for item in args.series:
        label, sep, directory = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {item!r} is not LABEL=DIR")
        runs = latest_runs(pathlib.Path(directory), args.mixer, args.lrs)
        if not runs:
            raise SystemExit(f"error: no {args.mixer} runs in {directory}")
        series.append((label, runs))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    first = series[0][1][0]
    title = f"MQAR {args.mixer}, d_model {first['d_model']}, L {first['seq_len']}, {first['num_kv_pairs']} pairs"
    table = markdown(series)
    out.with_suffix(".md").write_text(f"# {title}: test accuracy per epoch\n\n{table}")
    plot(series, out.with_suffix(".png"), title)
    print(table, end="")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
