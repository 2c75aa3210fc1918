"""Train-step speed of the 153M Hyena and matched attention LMs: tokens/s, MFU and peak memory.

For each model (configs/lm/hyena_153m_pile.yaml, configs/lm/attention_153m_pile.yaml) and context length
(2K and 8K), one process builds the model in bf16 compute (fp32 parameters and AdamW state, as
``trainer.precision: bf16``), measures the device's bf16 matmul peak with a large square matmul, compiles
the real train step (`lm.train.make_train_step`, one jit with the state donated) and times ``--steps``
steps on random tokens after ``--warmup`` steps. MFU = `lm.flops.train_step_flops` / step time / measured
peak; peak memory = ``device.memory_stats()["peak_bytes_in_use"]``, per row because every row runs in its
own process. A row that runs out of memory is recorded as such. ``--fftconv-impls`` repeats the Hyena
rows per convolution implementation (`kernels.fftconv.auto_impl`: every mixer's ``fftconv`` runs on it),
e.g. issue 9's model-level table: Hyena on xla / xla-matmul / pallas against attention at 4K-64K;
``--hyena-layouts blh,hbl`` repeats them per Hyena activation layout (``model.mixer.layout``: "hbl" feeds
the fused Pallas kernels with no transposes). Writes
``bench_lm_gpu.jsonl`` (one row per model x length x impl, plus the machine) and ``bench_lm_gpu.md``
(a table) under ``--out``.

    python scripts/bench_lm_gpu.py --out results/lm_gpu        # one GPU (H100/H200): ~3-5 minutes
    python scripts/bench_lm_gpu.py --tiny --out /tmp/bench     # CPU smoke test: tiny models, seconds
    python scripts/bench_lm_gpu.py --seqlens 4096,16384,65536 --fftconv-impls xla,pallas --out results/lm_step
    python scripts/bench_lm_gpu.py --seqlens 1024,2048 --fftconv-impls xla,pallas --hyena-layouts blh,hbl --out results/lm_step
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = {"hyena": "configs/lm/hyena_153m_pile.yaml", "attention": "configs/lm/attention_153m_pile.yaml"}
# --tiny: the same configs shrunk to a CPU-sized model, lengths, batch and matmul.
TINY = ["model.d_model=48", "model.n_layers=2", "model.vocab_size=256"]
TINY_MIXER = {"hyena": ["model.mixer.filter_order=16", "model.mixer.emb_dim=5"], "attention": ["model.mixer.num_heads=4"]}


def measure_bf16_peak(size: int, repeats: int = 10, trials: int = 3) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) bf16 matmul on the default device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        outs = [matmul(a, b) for _ in range(repeats)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 2.0 * size**3 / best


def model_config(name: str, seqlen: int, tiny: bool, layout: str = "blh"):
    from lm.train import load_train_config

    overrides = [f"model.max_len={seqlen}", f"data.block_size={seqlen}", "trainer.precision=bf16"]
    if name == "hyena" and layout != "blh":
        overrides.append(f"model.mixer.layout={layout}")
    if tiny:
        overrides += TINY + TINY_MIXER[name]
    cfg = load_train_config(REPO / MODELS[name], overrides)
    cfg.validate()
    return cfg


def bench_row(name: str, seqlen: int, batch: int, steps: int, warmup: int, matmul_size: int, tiny: bool,
              impl: str = "auto", layout: str = "blh") -> dict:
    """One model x length (x fftconv ``impl`` and activation ``layout`` for Hyena) in this process: see the
    module docstring."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from kernels.fftconv.api import auto_impl, default_impl
    from lm.flops import forward_flops, train_step_flops
    from lm.model import LM
    from lm.optim import lr_schedule, make_optimizer, model_label_map
    from lm.train import make_train_step

    cfg = model_config(name, seqlen, tiny, layout)
    device = jax.devices()[0]
    row = {"model": name, "config": MODELS[name], "seqlen": seqlen, "batch": batch, "tokens_per_step": batch * seqlen,
           "device": device.device_kind, "backend": jax.default_backend(),
           "fftconv_impl": None if name != "hyena" else (
               impl if impl != "auto" else default_impl(seqlen, jax.default_backend(), seqlen, jnp.bfloat16)),
           "hyena_layout": layout if name == "hyena" else None}
    row["peak_bf16_flops"] = measure_bf16_peak(matmul_size)

    def build():
        model = LM(cfg.model, rngs=nnx.Rngs(0))
        tx = make_optimizer(cfg.optimizer, cfg.trainer.steps, model_label_map(model))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = build()
    row["params"] = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    graphdef_model, state_model = nnx.split(model)
    graphdef_opt, state_opt = nnx.split(optimizer)
    state = {"model": state_model, "optimizer": state_opt}
    step = jax.jit(make_train_step(graphdef_model, graphdef_opt, 1, lr_schedule(cfg.optimizer, cfg.trainer.steps)),
                   donate_argnums=(0,))
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(0, cfg.model.vocab_size, (batch, seqlen + 1), dtype=np.int32))
               for _ in range(2)]
    t0 = time.perf_counter()
    try:
        with auto_impl(impl) if impl != "auto" else contextlib.nullcontext():  # traced here
            compiled = step.lower(state, batches[0]).compile()
        row["compile_s"] = time.perf_counter() - t0
        for i in range(warmup):
            state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready(metrics["loss"])
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = compiled(state, batches[i % 2])
        loss = float(metrics["loss"])  # waits for the last step
        step_s = (time.perf_counter() - t0) / steps
    except Exception as err:  # noqa: BLE001 - XLA reports out-of-memory as a runtime error
        if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
            raise
        row["error"] = "out of memory: " + str(err).splitlines()[0][:300]
        return row
    flops = train_step_flops(cfg.model, batch, seqlen)
    stats = device.memory_stats() or {}
    row.update({
        "loss": loss, "step_s": step_s, "tokens_per_s": batch * seqlen / step_s,
        "train_flops_per_step": flops, "forward_flops_by_part": forward_flops(cfg.model, batch, seqlen),
        "model_tflops_per_s": flops / step_s / 1e12, "mfu": flops / step_s / row["peak_bf16_flops"],
        "peak_memory_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
    })
    return row


def markdown(rows: list[dict], machine: str) -> str:
    lines = [f"# Train-step speed, 153M Hyena vs attention ({machine})", "",
             "Written by `scripts/bench_lm_gpu.py`; MFU = model FLOPs (`lm.flops`, PaLM convention) / step time / "
             "the bf16 matmul peak measured in the same process.", "",
             "| model | fftconv | context | batch | tokens/s | step (ms) | model TFLOP/s | MFU | peak memory (GiB) | "
             "measured bf16 peak (TFLOP/s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        conv = r.get("fftconv_impl") or ""
        if r.get("hyena_layout") not in (None, "blh"):
            conv += f" ({r['hyena_layout']})"
        if "error" in r:
            lines.append(f"| {r['model']} | {conv} | {r['seqlen']} | {r['batch']} | {r['error'][:120]} | | | | | |")
            continue
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        lines.append(f"| {r['model']} | {conv} | {r['seqlen']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                     f"{1e3 * r['step_s']:.1f} | {r['model_tflops_per_s']:.1f} | {100 * r['mfu']:.1f}% | {mem} | "
                     f"{r['peak_bf16_flops'] / 1e12:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/lm_gpu", help="output folder (JSONL + markdown)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, lengths 64/128, in-process")
    parser.add_argument("--models", default="hyena,attention")
    parser.add_argument("--seqlens", default=None, help="comma-separated context lengths (default 2048,8192)")
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help="batch = this / context length (default 32768; --tiny 256)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=None, help="peak matmul size (default 8192; --tiny 256)")
    parser.add_argument("--fftconv-impls", default="auto",
                        help="comma-separated fftconv impls for the Hyena rows "
                             "(auto, xla, xla-matmul, pallas; mosaic for L <= 2048)")
    parser.add_argument("--hyena-layouts", default="blh",
                        help="comma-separated Hyena activation layouts (model.mixer.layout: blh, hbl)")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = parser.parse_args(argv)
    seqlens = [int(s) for s in (args.seqlens or ("64,128" if args.tiny else "2048,8192")).split(",")]
    tokens = args.tokens_per_step or (256 if args.tiny else 32768)
    steps = args.steps or (2 if args.tiny else 10)
    matmul_size = args.matmul_size or (256 if args.tiny else 8192)

    if args.row:
        name, seqlen, impl, layout = args.row.split(":")
        print(json.dumps(bench_row(name, int(seqlen), max(1, tokens // int(seqlen)), steps, args.warmup,
                                   matmul_size, args.tiny, impl, layout)))
        return 0

    from kernels.fftconv.bench import machine_info

    info = machine_info()
    machine = f"{info['device_kind']} ({info['backend']}), jax {info['jax']}, {info['time']}"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    impls = args.fftconv_impls.split(",")
    layouts = args.hyena_layouts.split(",")
    # Length outermost, so a run cut short (a time limit) still has every model at the first lengths.
    specs = [(name, seqlen, impl, layout) for seqlen in seqlens for name in args.models.split(",")
             for impl in (impls if name == "hyena" else ["auto"]) for layout in (layouts if name == "hyena" else ["blh"])]
    for name, seqlen, impl, layout in specs:
        if args.tiny:  # in-process: fast; peak memory is not per row (CPU reports none anyway)
            row = bench_row(name, seqlen, max(1, tokens // seqlen), steps, args.warmup, matmul_size, True, impl,
                            layout)
        else:  # own process: a fresh allocator, so peak_bytes_in_use is this row's
            cmd = [sys.executable, __file__, "--row", f"{name}:{seqlen}:{impl}:{layout}", "--tokens-per-step", str(tokens),
                   "--steps", str(steps), "--warmup", str(args.warmup), "--matmul-size", str(matmul_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            else:  # a failing row is a result; the others still run
                row = {"model": name, "seqlen": seqlen, "batch": max(1, tokens // seqlen),
                       "fftconv_impl": impl if name == "hyena" else None,
                       "hyena_layout": layout if name == "hyena" else None,
                       "error": "failed: " + " | ".join(proc.stderr.strip().splitlines()[-3:])[-500:]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "forward_flops_by_part"}), flush=True)
        with open(out / "bench_lm_gpu.jsonl", "w") as fh:  # rewritten per row: a cut run keeps its rows
            fh.write(json.dumps({"machine": info}) + "\n")
            for done in rows:
                fh.write(json.dumps(done) + "\n")
        (out / "bench_lm_gpu.md").write_text(markdown(rows, machine))
    print(f"wrote {out / 'bench_lm_gpu.jsonl'} and {out / 'bench_lm_gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
