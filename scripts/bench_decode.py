"""Decode throughput and state memory vs prompt length: recurrent (distilled), conv-cache and attention KV cache.

    python scripts/bench_decode.py --run runs/ts_hyena_2k-dl0.01 \
        --lengths 1024 2048 4096 8192 16384 32768 65536 --mem-cap-gib 16 --max-batch 256 --out results/distill

Models: the distilled run ``--run`` (written by `longconv distill`) and two baselines of the same width,
depth and MLP, built at max_len = longest prompt + generated tokens:

- recurrent: the distilled run's own model and modal filters (O(1) state per token); the prompt is
  prefilled for real at batch 1 (FFT outputs + chunked state);
- conv: the run's architecture with its own implicit filters (fresh weights: a ≥ 64K-tap filter does not
  exist in the 2048-tap run); every step recomputes the convolution over the cache of past filter inputs;
- attention: an attention LM (``--heads``, RoPE) with a KV cache; each step is one
  `jax.nn.dot_product_attention` call over the cache (`Attention.attend`; XLA's implementation on CPU,
  cuDNN is not requested for this fp32 masked single-query step).

For conv and attention the per-token cost depends only on the cache capacity and position, not on the
cached values, so their caches are allocated at capacity T + n and the position set to T without
running the quadratic/large prefill (prefill time is reported for the recurrent path only). Each path
runs at batch 1 and at the largest batch whose decode state (everything carried between steps) fits
``--mem-cap-gib`` (at most ``--max-batch``): the batch-1 state is tiled along the batch (values do not
change the cost). Reported: median seconds per step, tokens/s (= batch / s per step) and state bytes.
The cap bounds the carried state only, not the step's temporaries or the weights.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402


def build(base_cfg, max_len, seed=0, **changes):
    """A fresh LM (eval mode) with ``base_cfg``'s architecture, max_len and the given config changes."""
    import dataclasses

    from lm.model import LM

    cfg = dataclasses.replace(base_cfg, max_len=max_len, **changes)
    cfg.validate()
    lm = LM(cfg, rngs=nnx.Rngs(seed))
    lm.eval()
    return lm


def tile_batch(cache, batch: int):
    """The batch-1 decoder cache repeated ``batch`` times along the batch axis (new arrays: steps donate them)."""
    return jax.tree.map(lambda x: jnp.repeat(x, batch, axis=0) if x.ndim else jnp.array(x), cache)


def largest_batch(state_bytes_1: int, cap_bytes: float, max_batch: int) -> int:
    """Largest power-of-two batch ≤ max_batch whose state (batch × the batch-1 state) fits cap_bytes (≥ 1)."""
    b = 1
    while b * 2 <= max_batch and b * 2 * state_bytes_1 <= cap_bytes:
        b *= 2
    return b


def pos_params(model) -> int:
    """Scalars in implicit-filter positional tables (max_len × emb_dim per layer; they grow with max_len)."""
    from lm.mixers.filters import PositionalParam

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, PositionalParam))))


def time_steps(decoder, cache, n_tokens, warmup=2):
    tok = jnp.zeros((jax.tree.leaves(cache["layers"])[0].shape[0],), jnp.int32)
    c = cache
    for _ in range(warmup):
        lg, c = decoder.step(tok, c)
        jax.block_until_ready(lg)
    times = []
    for _ in range(n_tokens):
        t0 = time.perf_counter()
        lg, c = decoder.step(tok, c)
        jax.block_until_ready(lg)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.mean(times))


def synthetic_cache(decoder, prompt_len, n_tokens):
    """Cache at capacity prompt_len + n_tokens with position prompt_len (values irrelevant to cost)."""
    _, cache = decoder.prefill(jnp.zeros((1, 1), jnp.int32), cap=prompt_len + n_tokens + 4)
    cache["pos"] = jnp.asarray(prompt_len - 2, jnp.int32)  # 2 warm-up steps, then timing from position T
    return cache


def main(argv=None) -> int:
    from lm.distill.recurrent import Decoder, cache_nbytes
    from lm.params import count_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--run", required=True, help="distilled run directory (`longconv distill`)")
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens timed per point")
    ap.add_argument("--heads", type=int, default=4, help="attention heads of the KV-cache baseline")
    ap.add_argument("--mem-cap-gib", type=float, default=4.0, help="decode-state budget for the large batch")
    ap.add_argument("--max-batch", type=int, default=256, help="largest batch tried")
    ap.add_argument("--paths", nargs="+", default=["recurrent", "conv", "attention"])
    ap.add_argument("--out", default="results/distill")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    from lm.distill.convert import load_distilled

    _, distilled, _, _, modal, meta = load_distilled(args.run)
    max_len = max(args.lengths) + args.tokens + 8
    conv_model = build(distilled.cfg, max_len)
    attn = build(distilled.cfg, max_len, mixer={"name": "attention", "num_heads": args.heads}, layer_mixers={})
    decoders = {}
    if "recurrent" in args.paths:
        decoders["recurrent"] = Decoder(distilled, "recurrent", modal)
    if "conv" in args.paths:
        decoders["conv"] = Decoder(conv_model, "convcache")
    if "attention" in args.paths:
        decoders["attention"] = Decoder(attn, "convcache")
    machine = f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), {jax.device_count()} JAX device(s) " \
              f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
    try:
        import os

        machine += f", {os.cpu_count()} cores"
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        machine = model + "; " + machine if model else machine
    except OSError:
        pass
    import os

    load_start = os.getloadavg()
    cap_bytes = args.mem_cap_gib * 2**30
    rows = []
    for t_len in args.lengths:
        for path, dec in decoders.items():
            base = {"path": path, "prompt_len": t_len}
            try:
                if path == "recurrent":
                    prompt = jax.random.randint(jax.random.key(0), (1, t_len), 0, distilled.cfg.vocab_size)
                    t0 = time.perf_counter()
                    lg, cache = dec.prefill(prompt)
                    jax.block_until_ready(lg)
                    base["prefill_s_incl_compile"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    lg, cache = dec.prefill(prompt)
                    jax.block_until_ready(lg)
                    base["prefill_s"] = time.perf_counter() - t0
                else:
                    cache = synthetic_cache(dec, t_len, args.tokens)
                per_seq = cache_nbytes(cache)
                big = largest_batch(per_seq, cap_bytes, args.max_batch)
                batches = [(1, cache)] + ([(big, tile_batch(cache, big))] if big > 1 else [])
                for batch, c in batches:
                    row = {**base, "batch": batch, "largest": batch == big, "state_bytes": cache_nbytes(c)}
                    med, mean = time_steps(dec, c, args.tokens)
                    row.update({"s_per_step": med, "s_per_step_mean": mean, "tokens_per_s": batch / med})
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                del cache, batches, c
            except Exception as e:  # noqa: BLE001 - record OOM / failures honestly
                rows.append({**base, "batch": 1, "largest": True, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(json.dumps(rows[-1]), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    orders = {str(i): {n: p.order for n, p in layer.items()} for i, layer in modal.items()}
    result = {"machine": machine, "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "run": args.run,
              "d_model": distilled.cfg.d_model, "n_layers": distilled.cfg.n_layers, "mixer": distilled.cfg.mixer,
              "modal_orders": orders, "tokens_timed": args.tokens, "max_len": max_len, "mem_cap_gib": args.mem_cap_gib,
              "max_batch": args.max_batch,
              "params": {"distilled_run": count_params(distilled), "conv": count_params(conv_model),
                         "attention": count_params(attn),
                         "conv_excl_positional_tables": count_params(conv_model) - pos_params(conv_model)},
              "rows": rows}
    tag = f"_{args.tag}" if args.tag else ""
    (out / f"bench_decode{tag}.json").write_text(json.dumps(result, indent=1))
    write_report(result, out, tag)
    return 0


def fmt_bytes(b) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else (f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB")


def write_report(result, out: pathlib.Path, tag: str = "") -> None:
    rows = [r for r in result["rows"] if "error" not in r]
    paths = [p for p in ("recurrent", "conv", "attention") if any(r["path"] == p for r in result["rows"])]
    lengths = sorted({r["prompt_len"] for r in result["rows"]})
    errors = {(r["path"], r["prompt_len"]): r["error"] for r in result["rows"] if "error" in r}
    lines = [f"# Decode benchmark{(' (' + tag.strip('_') + ')') if tag else ''}", "",
             f"Machine: {result['machine']}. Load average (1/5/15 min) at start "
             f"{'/'.join(f'{x:.1f}' for x in result['loadavg_start'])}, at end "
             f"{'/'.join(f'{x:.1f}' for x in result['loadavg_end'])}.", "",
             f"Models: d_model {result['d_model']}, {result['n_layers']} layers. recurrent: the distilled run "
             f"`{result['run']}` ({result['params']['distilled_run']:,} params; modal orders per layer "
             f"{result['modal_orders']}); conv: the same architecture with fresh implicit filters at max_len "
             f"{result['max_len']:,} ({result['params']['conv_excl_positional_tables']:,} params without the "
             f"positional tables); attention: {result['params']['attention']:,} params, KV cache through "
             f"`jax.nn.dot_product_attention`. Median over {result['tokens_timed']} steps. Large batch: the largest "
             f"power of two ≤ {result['max_batch']} whose decode state fits {result['mem_cap_gib']:g} GiB.", ""]
    for title, pick in (("Batch 1", lambda r: r["batch"] == 1), ("Largest batch in the cap", lambda r: r["largest"])):
        get = {(r["path"], r["prompt_len"]): r for r in rows if pick(r)}
        lines += [f"## {title}", "", "| prompt | " + " | ".join(f"{p} tok/s (batch)" for p in paths) + " | "
                  + " | ".join(f"{p} state" for p in paths) + " | recurrent / attention |",
                  "|---|" + "---|" * (2 * len(paths) + 1)]
        for t in lengths:
            cells, mem = [], []
            for p in paths:
                r = get.get((p, t))
                cells.append(f"{r['tokens_per_s']:.1f} ({r['batch']})" if r else errors.get((p, t), "—")[:40])
                mem.append(fmt_bytes(r["state_bytes"]) if r else "—")
            ratio = "—"
            if get.get(("recurrent", t)) and get.get(("attention", t)):
                ratio = f"{get[('recurrent', t)]['tokens_per_s'] / get[('attention', t)]['tokens_per_s']:.1f}×"
            lines.append(f"| {t:,} | " + " | ".join(cells) + " | " + " | ".join(mem) + f" | {ratio} |")
        lines.append("")
    pre = [r for r in rows if r["path"] == "recurrent" and r["batch"] == 1 and "prefill_s" in r]
    if pre:
        lines += ["Recurrent prefill at batch 1 (parallel, whole model, after compile): "
                  + ", ".join(f"{r['prompt_len']:,}: {r['prefill_s']:.2f} s" for r in pre) + "."]
    (out / f"bench_decode{tag}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for p in paths:
            for kind, style, pick in (("batch 1", "o-", lambda r: r["batch"] == 1), ("largest", "s--", lambda r: r["largest"])):
                pts = sorted((r["prompt_len"], r) for r in rows if r["path"] == p and pick(r))
                axes[0].plot([t for t, _ in pts], [r["tokens_per_s"] for _, r in pts], style, label=f"{p} ({kind})")
                axes[1].plot([t for t, _ in pts], [r["state_bytes"] / 2**20 for _, r in pts], style, label=f"{p} ({kind})")
        for ax, yl in zip(axes, ("generated tokens / s", "decode state (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("prompt length")
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(result["machine"][:110], fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"bench_decode{tag}.png", dpi=120)
    except Exception as e:  # noqa: BLE001
        print(f"plot skipped: {e}")


if __name__ == "__main__":
    sys.exit(main())
