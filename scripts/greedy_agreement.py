"""Greedy agreement of distilled (recurrent) models with the original convolution model.

    python scripts/greedy_agreement.py --run runs/ts_hyena_2k --distilled runs/ts_hyena_2k-dl0.01 runs/ts_hyena_2k-d16 \
        --prompts 32 --prompt-len 1024 --tokens 256 --out results/distill --tag agreement_hyena_2k

Prompts: ``--prompts`` validation sequences evenly spaced over the split, their first ``--prompt-len``
tokens. From each prompt the original model (convolution over a cache of past filter inputs, its own
filters) and each distilled run (modal filters, O(1) recurrent decoding) generate ``--tokens`` tokens
greedily, each free-running on its own output (not teacher-forced). Reported per distilled run: the
fraction of generated positions where the two tokens agree, and the median over prompts of the first
position where they differ (``--tokens`` if never). Writes TAG.json and TAG.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="original (trained) run directory")
    ap.add_argument("--distilled", nargs="+", required=True, help="distilled run directories of --run")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", default="results/distill")
    ap.add_argument("--tag", default="agreement")
    args = ap.parse_args(argv)

    from distill_quality import machine_name
    from lm.checkpoint import load_run
    from lm.distill.convert import load_distilled
    from lm.distill.quality import greedy_agreement, validation_batches, validation_prompts
    from lm.distill.recurrent import Decoder

    load_start = [round(x, 1) for x in os.getloadavg()]
    cfg, lm, tok, step = load_run(args.run)
    prompts = validation_prompts(validation_batches(cfg, tok), args.prompts, args.prompt_len)
    original = Decoder(lm, "convcache")
    rows = []
    for run in args.distilled:
        _, dlm, _, dstep, modal, meta = load_distilled(run)
        if dstep != step:
            print(f"warning: {run} was distilled from step {dstep}, the original is step {step}", file=sys.stderr)
        res = greedy_agreement(original, Decoder(dlm, "recurrent", modal), prompts, args.tokens)
        orders = {i: {n: p.order for n, p in layer.items()} for i, layer in modal.items()}
        row = {"distilled": run, "orders": orders, "settings": meta.get("settings", {}),
               **{k: v for k, v in res.items() if not k.endswith("_ids")},
               "sample": {"prompt_tail": tok.decode(prompts[0][-80:].tolist()),
                          "original": tok.decode(res["reference_ids"][0][:120]),
                          "distilled": tok.decode(res["candidate_ids"][0][:120])}}
        rows.append(row)
        print(f"{run}: agreement {row['agreement']:.3f}, median first divergence {row['first_divergence_median']:.0f}",
              flush=True)
    result = {"run": args.run, "step": step, "prompts": args.prompts, "prompt_len": args.prompt_len,
              "tokens": args.tokens, "machine": machine_name(), "loadavg_start": load_start,
              "loadavg_end": [round(x, 1) for x in os.getloadavg()], "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Greedy agreement with the original model: `{args.run}` (step {step})", "",
             f"{args.prompts} validation prompts of {args.prompt_len} tokens (evenly spaced over the split); each model "
             f"generates {args.tokens} tokens greedily from each prompt on its own output (free-running, not "
             "teacher-forced). Original: convolution with its own filters over a cache; distilled: recurrent modal "
             f"decoding. Machine: {result['machine']}.", "",
             "| distilled run | orders per layer | agreement (fraction of tokens) | median first divergence | "
             "prompts never diverging |", "|---|---|---|---|---|"]
    for r in rows:
        orders = ", ".join(f"{i}: {'/'.join(str(d) for d in layer.values())}" for i, layer in r["orders"].items())
        never = sum(f == args.tokens for f in r["first_divergence"])
        lines.append(f"| `{r['distilled']}` | {orders} | {r['agreement']:.3f} | {r['first_divergence_median']:.0f} | "
                     f"{never}/{r['prompts']} |")
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
