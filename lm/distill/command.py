"""`longconv distill`: fit every long filter of a trained run with a modal SSM and write a distilled run.

    longconv distill --run runs/ts_hyena --order 16                 # -> runs/ts_hyena-d16
    longconv distill --run runs/ts_hyena --target 1e-3 --max-order 64 --out runs/ts_hyena-auto
    longconv distill --run runs/ts_hyena --hankel-tol 1e-4 --refine-steps 300

``--order`` is the number of complex modes per filter channel (state size d; a real system of degree
≤ 2d). ``--target`` picks, per filter, the smallest order in {1, 2, 4, …, max-order} whose relative ℓ2
error is below it; ``--hankel-tol`` the smallest order with σ_{2d+1}/σ_1 below it. The distilled run
decodes with `longconv generate --run OUT --path recurrent`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="trained run directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    sel = parser.add_mutually_exclusive_group()
    sel.add_argument("--order", type=int, default=None, help="complex modes per filter (default 16)")
    sel.add_argument("--target", type=float, default=None, help="per-filter target relative l2 error")
    sel.add_argument("--hankel-tol", type=float, default=None, help="per-filter sigma_{2d+1}/sigma_1 tolerance")
    parser.add_argument("--max-order", type=int, default=64, help="largest order tried by --target/--hankel-tol")
    parser.add_argument("--refine-steps", type=int, default=0, help="Adam refinement steps after ESPRIT+LS")
    parser.add_argument("--lr", type=float, default=1e-2, help="refinement learning rate")
    parser.add_argument("--out", default=None, help="output run directory (default: RUN-d<order>)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> dict:
    from lm.checkpoint import load_run
    from lm.distill.convert import distill_model, write_distilled_run
    from lm.distill.fit import summarize

    order = args.order
    if order is None and args.target is None and args.hankel_tol is None:
        order = 16
    src = pathlib.Path(args.run)
    cfg, lm, _, step = load_run(src, args.step)
    modal, reports = distill_model(lm, order, target=args.target, hankel_tol=args.hankel_tol,
                                   refine_steps=args.refine_steps, lr=args.lr, max_order=args.max_order)
    tag = f"d{order}" if order is not None else ("t" + f"{args.target:g}" if args.target is not None
                                                  else "h" + f"{args.hankel_tol:g}")
    out = pathlib.Path(args.out) if args.out else src.with_name(f"{src.name}-{tag}")
    settings = {"order": order, "target": args.target, "hankel_tol": args.hankel_tol, "max_order": args.max_order,
                "refine_steps": args.refine_steps, "lr": args.lr}
    write_distilled_run(src, out, step, modal, reports, settings, cfg.model.max_len)
    summary = {"out": str(out), "source_step": step,
               "layers": {str(i): {n: summarize(r) for n, r in layer.items()} for i, layer in reports.items()}}
    return summary


def main(args: argparse.Namespace) -> int:
    from lm.checkpoint import CheckpointError
    from lm.config import ConfigError
    from lm.distill.fit import DistillError

    try:
        summary = run(args)
    except (DistillError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"distilled run written to {summary['out']} (from step {summary['source_step']})")
    print(f"{'layer':>5} {'filter':<10} {'order':>5} {'rel err median':>15} {'rel err max':>12} {'σ_2d+1/σ_1':>11}")
    for i, layer in summary["layers"].items():
        for name, s in layer.items():
            print(f"{i:>5} {name:<10} {s['order_max']:>5} {s['rel_error_median']:>15.3e} {s['rel_error_max']:>12.3e} "
                  f"{s['hankel_next_rel_median']:>11.2e}")
    return 0
