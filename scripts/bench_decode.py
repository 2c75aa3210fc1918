"""Decode throughput and state memory vs prompt length: recurrent (distilled), conv-cache and attention KV cache.

    python scripts/bench_decode.py --lengths 1024 2048 4096 8192 16384 32768 65536 --out results/distill

Models (matched width/depth): a Hyena LM (order 2, safari) and an attention LM (RoPE) with the same
d_model, n_layers and MLP; max_len = longest prompt + generated tokens. Paths:

- recurrent: the Hyena LM with modal filters of order d (random stable poles; the timing does not
  depend on the fit), prompt prefilled for real in parallel (FFT outputs + chunked state), then steps.
- conv: the same Hyena LM with its own filters; every step recomputes the convolution over the cache
  of past filter inputs (capacity prompt + generated).
- attention: the attention LM with a KV cache (capacity prompt + generated).

For conv and attention the per-token cost depends only on the cache capacity and position, not on the
cached values, so their caches are allocated at capacity T + n and the position set to T without
running the quadratic/large prefill (prefill time is reported for the recurrent path only). Reported:
median seconds per generated token (batch 1, after warm-up), tokens/s, and the decode-state bytes
(everything carried between steps).
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


def build(mixer, d_model, n_layers, max_len, seed=0):
    from lm.config import from_dict
    from lm.model import LM, ModelConfig

    cfg = from_dict(ModelConfig, {"vocab_size": 256, "d_model": d_model, "n_layers": n_layers, "max_len": max_len,
                                  "mixer": mixer, "mlp": "mlp", "mlp_ratio": 4.0})
    lm = LM(cfg, rngs=nnx.Rngs(seed))
    lm.eval()
    return lm


def random_modal(lm, order, seed=0):
    from lm.distill.modal import ModalParams

    rng = np.random.default_rng(seed)
    modal = {}
    for i, b in enumerate(lm.blocks):
        modal[i] = {}
        for name, h in b.mixer.long_filters(2).items():
            c = h.shape[1]
            poles = rng.uniform(0.9, 0.999, (c, order)) * np.exp(1j * rng.uniform(0, np.pi, (c, order)))
            res = 0.01 * (rng.normal(size=(c, order)) + 1j * rng.normal(size=(c, order)))
            modal[i][name] = ModalParams.from_complex(poles, res, np.zeros(c))
    return modal


def pos_params(model) -> int:
    """Scalars in implicit-filter positional tables (max_len × emb_dim per layer; they grow with max_len)."""
    from lm.mixers.filters import PositionalParam

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, PositionalParam))))


def time_steps(decoder, cache, n_tokens, warmup=2):
    tok = jnp.zeros((1,), jnp.int32)
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
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens timed per point")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--order", type=int, default=16)
    ap.add_argument("--paths", nargs="+", default=["recurrent", "conv", "attention"])
    ap.add_argument("--out", default="results/distill")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    max_len = max(args.lengths) + args.tokens + 8
    hyena = build({"name": "hyena"}, args.d_model, args.layers, max_len)
    attn = build({"name": "attention", "num_heads": 4}, args.d_model, args.layers, max_len)
    decoders = {}
    if "recurrent" in args.paths:
        decoders["recurrent"] = Decoder(hyena, "recurrent", random_modal(hyena, args.order))
    if "conv" in args.paths:
        decoders["conv"] = Decoder(hyena, "convcache")
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
    rows = []
    for t_len in args.lengths:
        for path, dec in decoders.items():
            row = {"path": path, "prompt_len": t_len}
            try:
                if path == "recurrent":
                    prompt = jax.random.randint(jax.random.key(0), (1, t_len), 0, 256)
                    t0 = time.perf_counter()
                    lg, cache = dec.prefill(prompt)
                    jax.block_until_ready(lg)
                    row["prefill_s_incl_compile"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    lg, cache = dec.prefill(prompt)
                    jax.block_until_ready(lg)
                    row["prefill_s"] = time.perf_counter() - t0
                else:
                    cache = synthetic_cache(dec, t_len, args.tokens)
                nbytes = cache_nbytes(cache)
                med, mean = time_steps(dec, cache, args.tokens)
                row.update({"s_per_token": med, "s_per_token_mean": mean, "tokens_per_s": 1.0 / med,
                            "state_bytes": nbytes})
            except Exception as e:  # noqa: BLE001 - record OOM / failures honestly
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            del cache
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "d_model": args.d_model, "n_layers": args.layers, "order": args.order,
              "batch": 1, "tokens_timed": args.tokens, "max_len": max_len,
              "params": {"hyena": count_params(hyena), "attention": count_params(attn),
                         "hyena_excl_positional_tables": count_params(hyena) - pos_params(hyena)}, "rows": rows}
    tag = f"_{args.tag}" if args.tag else ""
    (out / f"bench_decode{tag}.json").write_text(json.dumps(result, indent=1))
    write_report(result, out, tag)
    return 0


def write_report(result, out: pathlib.Path, tag: str = "") -> None:
    rows = result["rows"]
    paths = sorted({r["path"] for r in rows}, key=["recurrent", "conv", "attention"].index)
    lengths = sorted({r["prompt_len"] for r in rows})
    get = {(r["path"], r["prompt_len"]): r for r in rows}
    lines = [f"# Decode benchmark{(' (' + tag.strip('_') + ')') if tag else ''}", "",
             f"Machine: {result['machine']}. Load average (1/5/15 min) at start "
             f"{'/'.join(f'{x:.1f}' for x in result.get('loadavg_start', []))}, at end "
             f"{'/'.join(f'{x:.1f}' for x in result.get('loadavg_end', []))}: the 2 cores were shared with other "
             "jobs, so absolute numbers are noisy; the trends are the point.", "",
             f"Models: d_model {result['d_model']}, {result['n_layers']} layers, batch 1; Hyena "
             f"{result['params']['hyena']:,} params ({result['params']['hyena_excl_positional_tables']:,} without the "
             f"implicit filters' max_len × emb_dim positional tables; recurrent: order {result['order']} modal filters), attention "
             f"{result['params']['attention']:,} params; median over {result['tokens_timed']} generated tokens.", "",
             "| prompt | " + " | ".join(f"{p} tok/s" for p in paths) + " | "
             + " | ".join(f"{p} state" for p in paths) + " | recurrent / attention |",
             "|---|" + "---|" * (2 * len(paths) + 1)]

    def fmt_bytes(b):
        return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"

    for t in lengths:
        cells, mem = [], []
        for p in paths:
            r = get.get((p, t), {})
            cells.append(f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else r.get("error", "—")[:30])
            mem.append(fmt_bytes(r["state_bytes"]) if "state_bytes" in r else "—")
        ratio = "—"
        if "tokens_per_s" in get.get(("recurrent", t), {}) and "tokens_per_s" in get.get(("attention", t), {}):
            ratio = f"{get[('recurrent', t)]['tokens_per_s'] / get[('attention', t)]['tokens_per_s']:.1f}×"
        lines.append(f"| {t:,} | " + " | ".join(cells) + " | " + " | ".join(mem) + f" | {ratio} |")
    pre = [r for r in rows if r["path"] == "recurrent" and "prefill_s" in r]
    if pre:
        lines += ["", "Recurrent prefill (parallel, whole model, after compile): "
                  + ", ".join(f"{r['prompt_len']:,}: {r['prefill_s']:.2f} s" for r in pre) + "."]
    (out / f"bench_decode{tag}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for p in paths:
            pts = [(t, get[(p, t)]) for t in lengths if "tokens_per_s" in get.get((p, t), {})]
            axes[0].plot([t for t, _ in pts], [r["tokens_per_s"] for _, r in pts], "o-", label=p)
            axes[1].plot([t for t, _ in pts], [r["state_bytes"] / 2**20 for _, r in pts], "o-", label=p)
        for ax, yl in zip(axes, ("generated tokens / s (batch 1)", "decode state (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("prompt length")
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(result["machine"][:110], fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"bench_decode{tag}.png", dpi=120)
    except Exception as e:  # noqa: BLE001
        print(f"plot skipped: {e}")


if __name__ == "__main__":
    sys.exit(main())
