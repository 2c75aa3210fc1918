"""Host time per training batch of the grain loader (`lm.data.BatchLoader`) against the step time.

The batch shape comes from a training config (default configs/lm/hyena_153m_pile.yaml: 256 rows of
2048 + 1 tokens); the token stream is synthetic (random int32 tokens, ``--tokens`` long; no network).
Three host paths are timed per batch, in one process, alternating:

- ``hand``: the previous hand-written loader's work on the main thread (numpy permutation per epoch,
  gather, inputs/targets/mask arrays, device transfer), as a baseline;
- ``grain-sync``: `BatchLoader(prefetch=0)`: grain builds each batch when asked, on the main thread;
- ``grain-prefetch``: `BatchLoader(prefetch=2)` while the main thread spends ``--step-ms`` per step
  (a stand-in for the device step; give the measured step time): the time the step loop waits for a batch.

Batches are global `jax.Array`s on the default device's data sharding, as in training. Writes
``OUT.json`` and ``OUT.md``:

    python scripts/bench_loader.py --step-ms 1500 --out results/pretrain/loader
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def hand_batches(data, batch_size: int, seed: int, sharding):
    """The pre-grain loader's per-batch work: a numpy permutation per epoch, then `_assemble`."""
    from lm.data.loader import _assemble

    steps = data.num_blocks // batch_size
    j = 0
    while True:
        epoch, step = divmod(j, steps)
        if step == 0:
            perm = np.random.default_rng([seed, epoch]).permutation(data.num_blocks)
        rows = perm[step * batch_size:(step + 1) * batch_size]
        yield _assemble(data.blocks, rows, np.ones(batch_size, np.float32), data.block_size, sharding)
        j += 1


def time_batches(batches, n: int, step_s: float) -> list[float]:
    """Seconds the loop waits for each of ``n`` batches (ready on device), spending ``step_s`` per step."""
    import jax

    waits = []
    for _ in range(n):
        t = time.perf_counter()
        batch = next(batches)
        jax.block_until_ready(batch)
        waits.append(time.perf_counter() - t)
        if step_s:
            time.sleep(step_s)
    return waits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/lm/hyena_153m_pile.yaml")
    ap.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the config's)")
    ap.add_argument("--block-size", type=int, default=None, help="tokens per row (default: the config's)")
    ap.add_argument("--tokens", type=int, default=64 * 2**20, help="length of the synthetic token stream")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per path and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--step-ms", type=float, default=100.0,
                    help="device step time to compare against (and to spend per step in the prefetch test)")
    ap.add_argument("--out", default=str(REPO / "results" / "pretrain" / "loader"))
    args = ap.parse_args()

    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from bench_pretrain import machine  # scripts/ is on sys.path when run as a script
    from lm.data import BatchLoader, PackedTokens
    from lm.train import load_train_config

    cfg = load_train_config(REPO / args.config if not pathlib.Path(args.config).is_absolute() else args.config)
    batch_size = args.batch_size or cfg.data.batch_size
    block_size = args.block_size or cfg.data.block_size
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, args.tokens, dtype=np.int32)
    data = PackedTokens(tokens, block_size, args.tokens, args.tokens)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    step_s = args.step_ms / 1e3
    paths = {
        "hand": lambda: (hand_batches(data, batch_size, 0, sharding), 0.0),
        "grain-sync": lambda: (iter(BatchLoader(data, batch_size, seed=0, sharding=sharding, prefetch=0)), 0.0),
        "grain-prefetch": lambda: (iter(BatchLoader(data, batch_size, seed=0, sharding=sharding, prefetch=2)), step_s),
    }
    waits: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.rounds):
        for name, make in paths.items():
            batches, spend = make()
            next(batches)  # warm-up (thread start, first permutation)
            waits[name] += time_batches(batches, args.batches, spend)
    rows = []
    for name, w in waits.items():
        ms = [x * 1e3 for x in w]
        rows.append({"path": name, "median_ms": statistics.median(ms), "p90_ms": float(np.percentile(ms, 90)),
                     "max_ms": max(ms), "fraction_of_step": statistics.median(ms) / args.step_ms})
    meta = {
        "command": "python scripts/bench_loader.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "config": args.config, "batch_size": batch_size, "block_size": block_size,
        "batch_mib": batch_size * block_size * 12 / 2**20, "stream_tokens": args.tokens,
        "step_ms": args.step_ms, "batches_per_path": args.batches * args.rounds,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = "\n".join(f"| {r['path']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['max_ms']:.2f} | "
                      f"{100 * r['fraction_of_step']:.2f}% |" for r in rows)
    out.with_suffix(".md").write_text(f"""# Host time per batch vs step time

`{meta['command']}` on {meta['date']}; {meta['machine']}.

Batch of `{args.config}`: {batch_size} rows x {block_size} tokens (inputs, targets int32 + mask fp32 =
{meta['batch_mib']:.0f} MiB), synthetic stream of {args.tokens:,} tokens, global arrays on the data
sharding of {jax.device_count()} device(s). Step time compared against: {args.step_ms:g} ms. `hand` and
`grain-sync` build the batch on the main thread; `grain-prefetch` is the wait of a loop that spends the
step time per step while grain's reader thread builds the next batches.

| path | median ms/batch | p90 ms | max ms | median / step |
|---|---|---|---|---|
{table}
""")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
