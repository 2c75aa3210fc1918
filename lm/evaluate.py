"""`longconv eval --run DIR`: validation loss, perplexity and bits per byte/char of a trained run.

    longconv eval --run runs/ts_hyena                 # newest readable checkpoint, whole validation split
    longconv eval --run runs/ts_hyena --step 500 --max-batches 20 --json

Uses the run's own config and tokenizer (`lm.checkpoint.load_run`) and the data layer's validation
split (``data.val_split`` or the held-out tail), evaluated on a single device. Every target position of
the split is scored once (the last partial block padded and masked); the output says how many.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
from flax import nnx


def evaluate_run(run_dir, step: int | None = None, max_batches: int | None = None) -> dict:
    """{"step", "loss", "ppl", "tokens", "batches", "whole_split", "bits_per_byte"?, "bits_per_char"?} for
    ``run_dir`` (`lm.train.evaluate_batches`: every target position of the validation split is scored
    once, the last partial block padded and masked; "tokens" counts them)."""
    from lm.checkpoint import load_run
    from lm.data import build_data
    from lm.train import evaluate_batches, make_eval_step, resolve_data_paths

    cfg, model, tokenizer, step = load_run(run_dir, step)
    data = build_data(resolve_data_paths(cfg.data), tokenizer=tokenizer)
    graphdef, state = nnx.split(model)
    out = evaluate_batches(jax.jit(make_eval_step(graphdef)), state, data, max_batches or 0)
    if not out:
        raise ValueError(f"run {run_dir} has no validation data (data.val_fraction=0 and no data.val_split)")
    return {"step": step, **out}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory (from `longconv train`)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    from lm.checkpoint import CheckpointError
    from lm.config import ConfigError
    from lm.data import DataError

    try:
        out = evaluate_run(args.run, args.step, args.max_batches)
    except (CheckpointError, ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
    else:
        extra = "".join(f", {k.replace('_', ' ')} {out[k]:.4f}" for k in ("bits_per_byte", "bits_per_char") if k in out)
        scope = "the whole split" if out["whole_split"] else f"the first {out['batches']} batches"
        print(f"{args.run} step {out['step']}: val loss {out['loss']:.4f} nats/token, ppl {out['ppl']:.3f}{extra} "
              f"({out['tokens']:,} positions scored: {scope})")
    return 0
