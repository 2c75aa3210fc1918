"""MQAR sweep report: best-over-learning-rate table (markdown) and a Figure-2-style plot.

Each grid point (mixer, L, P, d_model) is summarised by the best test accuracy over learning rates
(and seeds), as Zoology reports it. Zoology's published Figure 2 values (read off the figure, ±0.02;
"~" = a partly hidden marker) are in `ZOOLOGY_FIGURE2` for side-by-side tables.
"""

from __future__ import annotations

import pathlib
from collections import defaultdict

# (L, P, d_model) -> {mixer: accuracy}; read off the published Figure 2 plot (not a table in the
# repository); best of four learning rates. Source: ../shared/reference/mqar.md (relative to the repository root).
_FIG2_ROWS = """
64 4 64 1.00 0.52 0.77 0.92 0.70
64 4 128 1.00 0.75 0.92 0.98 0.94
64 4 256 1.00 0.84 0.95 0.97 0.96
64 4 512 1.00 0.86 0.96 0.96 0.99
128 8 64 1.00 0.19 0.17 0.25 0.37
128 8 128 1.00 0.63 0.50 0.74 0.61
128 8 256 1.00 0.72 0.75 0.91 0.84
128 8 512 1.00 0.84 0.91 0.76 0.96
256 16 64 1.00 0.06 0.05 0.08 0.14
256 16 128 1.00 0.14 0.06 0.64 0.34
256 16 256 1.00 0.53 0.67 0.61 0.81
256 16 512 1.00 0.69 0.79 0.66 0.93
512 64 64 1.00 0.02 0.01 0.02 0.02
512 64 128 1.00 0.04 0.02 0.03 0.03
512 64 256 1.00 0.09 0.15 0.02 0.05
512 64 512 1.00 0.17 0.37 0.09 0.71
"""
_FIG2_MIXERS = ("attention", "hyena", "rwkv", "h3", "baseconv")
ZOOLOGY_FIGURE2: dict[tuple[int, int, int], dict[str, float]] = {}
for _line in _FIG2_ROWS.strip().splitlines():
    _v = _line.split()
    ZOOLOGY_FIGURE2[(int(_v[0]), int(_v[1]), int(_v[2]))] = dict(zip(_FIG2_MIXERS, map(float, _v[3:])))


def best_over_lr(records: list[dict]) -> dict[tuple[str, int, int, int], dict]:
    """{(mixer, L, P, d_model): best record} — the run with the highest accuracy over lrs and seeds."""
    best: dict[tuple[str, int, int, int], dict] = {}
    for r in records:
        k = (r["mixer"], r["seq_len"], r["num_kv_pairs"], r["d_model"])
        if k not in best or r["acc"] > best[k]["acc"]:
            best[k] = r
    return best


def _mixer_order(records: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in records:
        if r["mixer"] not in seen:
            seen.append(r["mixer"])
    return seen


def published(mixer: str, seq_len: int, num_kv_pairs: int, d_model: int) -> float | None:
    """Zoology's Figure 2 value for a point, matching on the mixer name's first word (None if absent)."""
    row = ZOOLOGY_FIGURE2.get((seq_len, num_kv_pairs, d_model))
    if row is None:
        return None
    base = mixer.split("-")[0].split("_")[0].lower()
    return row.get(base)


def markdown_table(records: list[dict], title: str | None = None, compare: bool = True) -> str:
    """Best-over-lr accuracy per (L, P, d_model) row and mixer column; Zoology's figure value in
    parentheses where the point is in its Figure 2."""
    if not records:
        return (f"## {title}\n\n" if title else "") + "(no finished runs)"
    best = best_over_lr(records)
    mixers = _mixer_order(records)
    rows = sorted({(k[1], k[2], k[3]) for k in best})
    lines = []
    if title:
        lines += [f"## {title}", ""]
    any_pub = False
    header = "| L (pairs) | d_model | " + " | ".join(mixers) + " |"
    lines += [header, "|" + "---|" * (2 + len(mixers))]
    for L, P, d in rows:
        cells = []
        for m in mixers:
            r = best.get((m, L, P, d))
            if r is None:
                cells.append("–")
                continue
            cell = f"{r['acc']:.3f}"
            pub = published(m, L, P, d) if compare else None
            if pub is not None:
                any_pub = True
                cell += f" ({pub:.2f})"
            cells.append(cell)
        lines.append(f"| {L} ({P}) | {d} | " + " | ".join(cells) + " |")
    some = next(iter(best.values()))
    lrs = sorted({r["lr"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    layers = sorted({r["n_layers"] for r in records})
    lines += [
        "",
        f"Test accuracy (fraction of query positions predicted exactly, per row, averaged), best over "
        f"learning rates {', '.join(f'{x:.3g}' for x in lrs)}"
        + (f" and seeds {seeds}" if len(seeds) > 1 else "")
        + f"; n_layers {'/'.join(map(str, layers))}; V {some['vocab_size']}, {some['num_train_examples']:,} train / "
        f"{some['num_test_examples']:,} test rows.",
    ]
    if any_pub:
        lines.append("In parentheses: Zoology Figure 2, read off the published plot (±0.02), same (L, P, d_model).")
    return "\n".join(lines)


def runs_table(records: list[dict]) -> str:
    """Every run: accuracy, epochs, stop reason, time, throughput."""
    lines = ["| run | n_layers | params | acc | final | steps | epochs | stop | wall s | CPU s | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        cpu = r.get("cpu_s")
        lines.append(f"| {r['key'].replace('|', ' · ')} | {r['n_layers']} | {r['params']:,} | {r['acc']:.3f} | {r['final_acc']:.3f} | "
                     f"{r.get('steps', '')} | {r['epochs']:.2f} | {r['stop']} | {r['wall_s']:.0f} | "
                     f"{'' if cpu is None else f'{cpu:.0f}'} | {r['tokens_per_s']:,} |")
    return "\n".join(lines)


def plot(records: list[dict], path: str | pathlib.Path, title: str | None = None) -> None:
    """Accuracy vs d_model, one line per mixer, one panel per (L, P) — like Zoology's Figure 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_over_lr(records)
    points = sorted({(k[1], k[2]) for k in best})
    mixers = _mixer_order(records)
    fig, axes = plt.subplots(1, max(1, len(points)), figsize=(3.6 * max(1, len(points)), 3.2), squeeze=False,
                             sharey=True)
    for ax, (L, P) in zip(axes[0], points):
        for m in mixers:
            ds = sorted(k[3] for k in best if k[0] == m and k[1] == L and k[2] == P)
            if not ds:
                continue
            ax.plot(ds, [best[(m, L, P, d)]["acc"] for d in ds], marker="o", label=m)
        ax.set_xscale("log", base=2)
        dvals = sorted({k[3] for k in best if k[1] == L and k[2] == P})
        ax.set_xticks(dvals)
        ax.set_xticklabels([str(d) for d in dvals])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"L={L}, {P} pairs")
        ax.set_xlabel("model dimension")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
