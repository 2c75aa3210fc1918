"""`longconv mixers`: list every registered mixer with its parameter count at a given width."""

from __future__ import annotations

import argparse
import json


def mixer_rows(d_model: int, max_len: int) -> list[dict]:
    """One row per mixer: name, trainable parameters of one layer at this width, summary."""
    from flax import nnx

    from lm.mixers import MIXERS, build_mixer
    from lm.params import count_params

    rows = []
    for name, entry in MIXERS.items():
        mixer = build_mixer({"name": name}, d_model=d_model, max_len=max_len, rngs=nnx.Rngs(0))
        rows.append({"mixer": name, "params": count_params(mixer), "summary": entry.summary})
    return rows


def format_table(rows: list[dict], d_model: int, max_len: int) -> str:
    width = max(len(r["mixer"]) for r in rows) + 2
    lines = [f"mixers at d_model={d_model}, max_len={max_len} (parameters of one layer, default options)",
             f"{'mixer':<{width}}{'params':>12}  summary"]
    lines += [f"{r['mixer']:<{width}}{r['params']:>12,}  {r['summary']}" for r in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-model", type=int, default=256, help="model width (default 256)")
    parser.add_argument("--max-len", type=int, default=1024, help="longest sequence / filter length (default 1024)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args: argparse.Namespace) -> int:
    if args.d_model < 1 or args.max_len < 1:
        raise SystemExit("longconv mixers: --d-model and --max-len must be positive")
    rows = mixer_rows(args.d_model, args.max_len)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows, args.d_model, args.max_len))
    return 0
