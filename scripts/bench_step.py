"""CPU training speed of the tiny tinyshakespeare configs: tokens/s through `Trainer.fit`, and where a step goes.

For each model (configs/lm/tinyshakespeare_{hyena,attention}.yaml at ``--batch-size`` 12, block 64)
the trainer runs as a user runs it (`longconv train`: loader, jitted step, metrics every
``trainer.log_every`` steps; no eval or checkpoints inside the timed window). Models alternate within
one process, ``--rounds`` times, and the median of the per-interval tokens/s (the rate `longconv train`
logs) is reported. A breakdown per model, timed in isolation: forward+backward, optimizer update, one
loader batch, and the host (main-thread) CPU time per step.

The "before" column is the issue-13 measurement on the same kind of machine (2-core AMD EPYC, jax
0.10.2): Hyena 7.4k, attention 10.2k tokens/s, against 13.6k for a PyTorch reference GPT of the same
size, batch and block. Writes ``OUT.json`` and ``OUT.md``:

    python scripts/bench_step.py --out results/pretrain/speed_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = {"hyena": "configs/lm/tinyshakespeare_hyena.yaml", "attention": "configs/lm/tinyshakespeare_attention.yaml"}
BEFORE = {"hyena": 7400.0, "attention": 10200.0}  # issue 13, tokens/s
REFERENCE_TOKENS_PER_S = 13600.0  # PyTorch reference GPT, same size/batch/block (issue 13)


def make_trainer(name: str, run_dir: pathlib.Path, batch_size: int, steps: int, log_every: int):
    from lm.train import Trainer, load_train_config

    cfg = load_train_config(REPO / MODELS[name], [
        f"data.batch_size={batch_size}", f"trainer.steps={steps}", f"trainer.log_every={log_every}",
        "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.progress=false"])
    return Trainer(cfg, run_dir)


def timed_fit(trainer, n_steps: int) -> list[float]:
    """Train ``n_steps`` more steps; the tokens/s of each logging interval (as `longconv train` logs them)."""
    from lm.tracking import read_metrics

    start = trainer.step
    trainer.fit(max_steps=start + n_steps)
    return [r["tokens_per_s"] for r in read_metrics(trainer.run_dir, "train")
            if start < r["step"] <= start + n_steps and r.get("tokens_per_s") is not None]


def seconds(fn, n: int = 20) -> tuple[float, float]:
    """(wall, main-thread CPU) seconds per call of ``fn`` (blocked until ready), best of 3 runs of n."""
    import jax

    jax.block_until_ready(fn())
    best = (float("inf"), float("inf"))
    for _ in range(3):
        t, c = time.perf_counter(), time.thread_time()
        for _ in range(n):
            out = fn()
        jax.block_until_ready(out)
        best = min(best[0], (time.perf_counter() - t) / n), min(best[1], (time.thread_time() - c) / n)
    return best


def breakdown(trainer) -> dict[str, float]:
    """Milliseconds per step of the pieces of a training step, each timed alone."""
    import jax
    from flax import nnx

    from lm.profile import profile_ops, time_by_kind
    from lm.train import token_losses

    batch = trainer.data.next_batch()
    model = nnx.merge(trainer.graphdef_model, jax.tree.map(lambda a: a.copy(), trainer.state["model"]))
    gdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return token_losses(nnx.merge(gdef, p, rest), batch["inputs"], batch["targets"]).mean()

    grad = jax.jit(jax.value_and_grad(loss))
    _, grads = grad(params)
    opt_state = trainer.tx.init(params)
    update = jax.jit(lambda g, s, p: trainer.tx.update(g, s, p))
    profile = profile_ops(lambda: jax.block_until_ready(grad(params)), 10, grad.lower(params).compile().as_text())
    ms = {
        "profile_top": profile[:15], "profile_total_us": sum(r["us"] for r in profile) / 10,
        "profile_by_kind_us": {k: v / 10 for k, v in time_by_kind(profile).items()},
        "forward_backward_ms": seconds(lambda: grad(params))[0] * 1e3,
        "optimizer_update_ms": seconds(lambda: update(grads, opt_state, params))[0] * 1e3,
        "loader_batch_ms": seconds(trainer.data.next_batch)[0] * 1e3,
    }
    with jax.set_mesh(trainer.mesh):
        leaves = [a.copy() for a in trainer._state_leaves]

        def step():
            nonlocal leaves
            leaves, _ = trainer._train_step(leaves, batch)
            return leaves

        wall, host = seconds(step)
    ms.update(step_ms=wall * 1e3, step_host_cpu_ms=host * 1e3)
    return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per model and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--models", default="hyena,attention")
    ap.add_argument("--out", default=str(REPO / "results" / "pretrain" / "speed_cpu"))
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="keep glibc's malloc defaults (`longconv train` calls lm.host_memory.keep_freed_memory)")
    args = ap.parse_args()
    from lm.host_memory import keep_freed_memory

    malloc = "glibc defaults" if args.glibc_malloc else f"keep_freed_memory() = {keep_freed_memory()}"

    from bench_pretrain import machine  # scripts/ is on sys.path when run as a script

    from lm.profile import ops_table

    names = args.models.split(",")
    total = args.steps * args.rounds + args.log_every
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_step_"))
    trainers = {n: make_trainer(n, tmp / n, args.batch_size, total, args.log_every) for n in names}
    rates: dict[str, list[float]] = {n: [] for n in names}
    for t in trainers.values():
        timed_fit(t, args.log_every)  # compile + warm-up
    for _ in range(args.rounds):
        for n, t in trainers.items():
            rates[n] += timed_fit(t, args.steps)
    rows = []
    for n, t in trainers.items():
        tps = statistics.median(rates[n])
        rows.append({"model": n, "params": t.n_params, "tokens_per_s_before": BEFORE[n], "tokens_per_s": tps,
                     "speedup": tps / BEFORE[n], "vs_reference": tps / REFERENCE_TOKENS_PER_S,
                     "intervals": rates[n], **breakdown(t)})
        t.close()
    meta = {
        "command": "python scripts/bench_step.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "load_avg": os.getloadavg(), "batch_size": args.batch_size, "block_size": 64, "malloc": malloc,
        "reference_tokens_per_s": REFERENCE_TOKENS_PER_S,
        "targets": {"attention": REFERENCE_TOKENS_PER_S, "hyena": 0.8 * REFERENCE_TOKENS_PER_S},
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = "\n".join(
        f"| {r['model']} | {r['params']:,} | {r['tokens_per_s_before']:,.0f} | {r['tokens_per_s']:,.0f} | "
        f"{r['speedup']:.2f}x | {r['vs_reference']:.2f} | {meta['targets'][r['model']] / REFERENCE_TOKENS_PER_S:.1f} |"
        for r in rows)
    pieces = "\n".join(
        f"| {r['model']} | {r['step_ms']:.1f} | {r['forward_backward_ms']:.1f} | {r['optimizer_update_ms']:.1f} | "
        f"{r['loader_batch_ms']:.2f} | {r['step_host_cpu_ms']:.2f} |" for r in rows)
    profiles = ""
    for r in rows:
        kinds = r["profile_by_kind_us"]
        total = sum(kinds.values()) or 1.0
        profiles += (f"\n`{r['model']}` forward+backward, traced op time by main JAX op (ms/step, summed over "
                     "threads): " + ", ".join(f"{k} {v / 1e3:.1f} ({100 * v / total:.0f} %)" for k, v in kinds.items())
                     + "\n\n" + "\n".join(ops_table(r["profile_top"], steps=10, top=10,
                                                      total_us=10 * r["profile_total_us"])) + "\n")
    out.with_suffix(".md").write_text(f"""# CPU training speed: tiny tinyshakespeare models, batch {args.batch_size}, block 64

`{meta['command']}` on {meta['date']}; {meta['machine']}; load average {meta['load_avg'][0]:.1f}; malloc: {malloc}.

Tokens/s through `Trainer.fit` (loader, jitted step, metrics every {args.log_every} steps; median of
{args.rounds} x {args.steps // args.log_every} logging intervals, models alternating in one process). "Before": the
issue-13 measurement on the same kind of machine; reference: a PyTorch GPT of the same size, batch and
block at {REFERENCE_TOKENS_PER_S:,.0f} tokens/s there. Target: attention >= 1.0, Hyena >= 0.8 of the reference.

| model | params | before tok/s | after tok/s | speedup | after / reference | target |
|---|---|---|---|---|---|---|
{table}

Where a step goes (ms, each piece timed alone; host CPU = main-thread CPU time per step call):

| model | train step | forward+backward | optimizer update | loader batch | host CPU per step |
|---|---|---|---|---|---|
{pieces}

## Profile (`lm.profile`, 10 calls of the jitted forward+backward)
{profiles}""")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
