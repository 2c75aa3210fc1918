"""`longconv distill`: fit every long filter of a trained run with a modal SSM and write a distilled run.

    longconv distill --run runs/ts_hyena --order 16                 # -> runs/ts_hyena-d16
    longconv distill --run runs/ts_hyena --target 1e-3 --max-order 64 --out runs/ts_hyena-auto
    longconv distill --run runs/ts_hyena --hankel-tol 1e-4 --refine-steps 300
    longconv distill --run runs/ts_hyena_2k --target-delta 0.01     # order per layer from a loss budget

``--order`` is the number of complex modes per filter channel (state size d; a real system of degree
≤ 2d). ``--target`` picks, per filter, the smallest order in {1, 2, 4, …, max-order} whose relative ℓ2
error is below it; ``--hankel-tol`` the smallest order with σ_{2d+1}/σ_1 below it. ``--target-delta``
picks one order per layer from ``--orders`` so that the validation loss of the distilled model (whole
split unless ``--max-batches``) is at most that many nats/token above the original's
(`lm.distill.quality.select_orders_for_delta`: greedy over layers, bisection within a layer), and
reports the total recurrent state against order 16 everywhere. The distilled run decodes with
`longconv generate --run OUT --path recurrent`.
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
    sel.add_argument("--target-delta", type=float, default=None,
                     help="per-layer orders so that validation loss rises by at most this (nats/token)")
    parser.add_argument("--orders", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64],
                        help="candidate orders for --target-delta (capped by --max-order)")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="validation batches for --target-delta (default: the whole split)")
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
    if order is None and args.target is None and args.hankel_tol is None and args.target_delta is None:
        order = 16
    src = pathlib.Path(args.run)
    cfg, lm, tokenizer, step = load_run(src, args.step)
    if args.target_delta is not None:
        return run_target_delta(args, src, cfg, lm, tokenizer, step)
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


def run_target_delta(args: argparse.Namespace, src: pathlib.Path, cfg, lm, tokenizer, step: int) -> dict:
    """`--target-delta`: fit every candidate order, choose per layer on the validation split, write the run."""
    from lm.distill.convert import distill_model_by_order, write_distilled_run
    from lm.distill.fit import DistillError, summarize
    from lm.distill.quality import HeldOutEvaluator, distill_for_delta, validation_batches

    cands = sorted({d for d in args.orders if d <= args.max_order})
    if not cands or cands[0] < 1:
        raise DistillError(f"--orders must hold positive orders <= --max-order {args.max_order}; got {args.orders}")
    evaluator = HeldOutEvaluator(lm, validation_batches(cfg, tokenizer, args.max_batches))
    fits = {d: fit for (d, _), fit in distill_model_by_order(lm, cands, refine_steps=(args.refine_steps,),
                                                             lr=args.lr).items()}
    modal, reports, selection = distill_for_delta(lm, evaluator, fits, args.target_delta)
    out = pathlib.Path(args.out) if args.out else src.with_name(f"{src.name}-dl{args.target_delta:g}")
    settings = {"target_delta": args.target_delta, "orders": cands, "refine_steps": args.refine_steps, "lr": args.lr,
                "max_batches": args.max_batches, "selection": selection}
    write_distilled_run(src, out, step, modal, reports, settings, cfg.model.max_len)
    return {"out": str(out), "source_step": step, "selection": selection,
            "layers": {str(i): {n: summarize(r) for n, r in layer.items()} for i, layer in reports.items()}}


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
    if "selection" in summary:
        sel = summary["selection"]
        verdict = "reached" if sel["reached"] else "NOT reached even with the largest order everywhere"
        print(f"target Δ loss {sel['target_delta']:g} nats/token {verdict}: orders per layer {sel['orders']}, "
              f"Δ loss {sel['delta_loss']:+.4f} (base {sel['base_loss']:.4f}, {sel['val_tokens']:,} tokens), "
              f"KL {sel['kl']:.2e}; recurrent state {sel['state_complex']:,} complex numbers per sequence vs "
              f"{sel['state_complex_order16']:,} at order 16 everywhere "
              f"({sel['state_complex'] / sel['state_complex_order16']:.2f}×)")
    print(f"{'layer':>5} {'filter':<10} {'order':>5} {'rel err median':>15} {'rel err max':>12} {'σ_2d+1/σ_1':>11}")
    for i, layer in summary["layers"].items():
        for name, s in layer.items():
            print(f"{i:>5} {name:<10} {s['order_max']:>5} {s['rel_error_median']:>15.3e} {s['rel_error_max']:>12.3e} "
                  f"{s['hankel_next_rel_median']:>11.2e}")
    return 0
