"""Speed of the MQAR paper cell on this machine: the training step, its pieces, evaluation, and an epoch.

The cell is Zoology's smallest Figure-2 point with the paper config (configs/mqar/zoology.yaml):
attention, d_model 64, 2 layers, L 64, 4 pairs, V 8192, batch 512, learned positions, init std 0.02,
100k training rows (195 steps an epoch) and 3k test rows. Each piece is timed over ``--steps`` calls
after one compiling call, with wall, user and system CPU time and minor page faults per call:

- ``train step``: the runner's jitted step (`lm.mqar.runner.init_group`), for each ``--members`` count
  (learning rates trained together in one step; the epoch column is per member) and each
  ``--member-loops`` setting (``vmap``: one batched computation; ``map``: the members one after another
  inside the step);
- ``body fwd+bwd``: embeddings and the two blocks up to the gathered hidden states, no head;
- ``head+loss fwd+bwd``: the tied vocabulary head and cross-entropy on the 4 labelled positions per row;
- the rest of a 1-member step (AdamW update, batch gather) is its time minus these two;
- ``evaluation``: one pass over the 3k test rows;
- with ``--full-epoch``, one real epoch through `lm.mqar.runner.train_group` (host loop and evaluation
  included).

``--mixer`` times another mixer of the config in the same cell (its paper settings), and
``--fftconv-impl`` runs every long convolution on one `kernels.fftconv` impl (`auto_impl`) for an A/B:

    python scripts/bench_mqar_step.py --mixer baseconv --members 1 --member-loops map --profile-loops \
        --fftconv-impl xla --out /tmp/baseconv_xla      # then --fftconv-impl direct, back to back

The "before" reference is issue 10's measurement on this machine kind (2-vCPU AMD EPYC): 107 s per
epoch, against Zoology's own PyTorch code at about 50 s; the target is at most 25 s. Writes
``<out>.json`` and ``<out>.md`` (default results/mqar/speed_cpu) naming the machine and the load average.

    python scripts/bench_mqar_step.py --full-epoch                 # on a quiet machine
    python scripts/bench_mqar_step.py --steps 3 --members 1 --rows 2048 --out /tmp/speed   # smoke test
    python scripts/bench_mqar_step.py --glibc-malloc ...           # without `keep_freed_memory` (to compare)
    python scripts/bench_mqar_step.py --profile-loops vmap map      # per-op profile of 5 steps of each (lm.profile)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import resource
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BEFORE_S_PER_EPOCH = 107.0  # issue 10: this runner before the change, paper cell, 2-vCPU AMD EPYC
ZOOLOGY_S_PER_EPOCH = 50.0  # issue 10: Zoology's PyTorch code, same cell and machine kind
TARGET_S_PER_EPOCH = 25.0
CELL = ["grid.d_models=[64]", "grid.lrs=[4.6415888e-4]", "grid.points=[{seq_len: 64, num_kv_pairs: 4, batch_size: 512}]"]


def usage() -> tuple[float, float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def timed(name: str, fn, steps: int, per_epoch: int | None = None, members: int = 1) -> dict:
    """Call ``fn`` once (compilation), then ``steps`` times; per-call wall/user/sys seconds and minor faults."""
    import jax

    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    u0 = usage()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    wall, user, sys_s, faults = ((b - a) / steps for a, b in zip(u0, usage()))
    row = {"piece": name, "wall_ms": wall * 1e3, "user_ms": user * 1e3, "sys_ms": sys_s * 1e3,
           "minor_faults": round(faults), "first_call_s": round(first, 2), "members": members}
    if per_epoch:
        row["s_per_epoch_per_member"] = wall * per_epoch / members
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed calls per piece")
    ap.add_argument("--members", type=int, nargs="+", default=[1, 4], help="learning rates per step")
    ap.add_argument("--member-loops", nargs="+", default=["vmap", "map"], choices=["vmap", "map"],
                    help="how the step runs its members (train.member_loop)")
    ap.add_argument("--rows", type=int, default=100_000, help="training rows (the paper: 100k, 195 steps/epoch)")
    ap.add_argument("--full-epoch", action="store_true", help="also train one real epoch through train_group")
    ap.add_argument("--glibc-malloc", action="store_true", help="keep glibc's malloc defaults (no keep_freed_memory)")
    ap.add_argument("--profile-loops", nargs="*", default=["vmap", "map"],
                    help="member loops whose 1-member step is profiled per XLA op (5 steps each)")
    ap.add_argument("--mixer", default="attention", help="mixer label of configs/mqar/zoology.yaml")
    ap.add_argument("--fftconv-impl", default="auto", help="impl of every long convolution (kernels.fftconv)")
    ap.add_argument("--out", default=str(REPO / "results" / "mqar" / "speed_cpu"), help="output path without suffix")
    args = ap.parse_args()
    cell = [f"grid.mixers=[{args.mixer}]", *CELL]

    from lm.mqar import runner

    malloc = "glibc defaults" if args.glibc_malloc else f"keep_freed_memory() = {runner.keep_freed_memory()}"
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import lm.mixers  # noqa: F401
    from kernels.fftconv import auto_impl
    from kernels.fftconv.bench import machine_info
    from lm.model import LM
    from lm.profile import ops_table, profile_ops

    scope = contextlib.ExitStack()  # every trace below (steps, pieces, epoch) sees the chosen impl
    if args.fftconv_impl != "auto":
        scope.enter_context(auto_impl(args.fftconv_impl))
    load_before = os.getloadavg()
    cfg = runner.load_mqar_config(REPO / "configs" / "mqar" / "zoology.yaml",
                                  cell + [f"data.num_train_examples={args.rows}"])
    base = runner.expand_grid(cfg)[0]
    t = time.perf_counter()
    train = runner.make_split(cfg, base.point, True)
    test = runner.make_split(cfg, base.point, False)
    gen_s = time.perf_counter() - t
    bs = base.point.batch_size
    spe = train.inputs.shape[0] // bs
    data = tuple(jnp.asarray(a) for a in (train.inputs, train.positions, train.targets))
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    profiles: dict[str, list[dict]] = {}

    for m, loop in [(m, loop) for m in args.members for loop in args.member_loops]:
        runs = [runner.Run(base.mixer, base.point, base.d_model, base.lr * (1 + i), base.seed) for i in range(m)]
        cfg.train.member_loop = loop
        train_step, eval_step, state, n_params = runner.init_group(cfg, runs, spe * cfg.train.max_epochs)
        lrs = jnp.asarray([r.lr for r in runs], jnp.float32)
        holder = {"state": state}

        def step():
            idx = rng.integers(0, train.inputs.shape[0], bs)
            *new, loss = train_step(*holder["state"], lrs, data, idx)
            holder["state"] = tuple(new)
            return loss

        rows.append(timed(f"train step ({loop})", step, args.steps, spe, m))
        print(rows[-1], flush=True)
        if m == args.members[0] and loop == args.member_loops[-1]:
            batches = runner.eval_batches(test, cfg.train.eval_batch_size)
            rows.append(timed("evaluation (3k rows)", lambda: runner.evaluate(
                eval_step, holder["state"][0], holder["state"][2], batches, test.inputs.shape[0]), max(1, args.steps // 5),
                members=m))
            print(rows[-1], flush=True)
        if m == 1 and loop in args.profile_loops:
            idx0 = np.arange(bs)
            hlo = train_step.lower(*holder["state"], lrs, data, idx0).compile().as_text()
            profiles[loop] = profile_ops(lambda: jax.block_until_ready(step()), 5, hlo)

    # pieces of one member's step
    mcfg = runner.model_config_for(cfg, base)
    model = LM(mcfg, rngs=nnx.Rngs(params=0, dropout=1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, pos, y = (a[:bs] for a in data)
    hq_fixed = jax.random.normal(jax.random.key(0), (bs, base.point.num_kv_pairs, base.d_model))

    def body(model):
        h = model.hidden(x)
        return jnp.square(jnp.take_along_axis(h, pos[:, :, None], axis=1)).mean()

    def head(model):
        return optax.softmax_cross_entropy_with_integer_labels(model.logits(hq_fixed), y).mean()

    for name, loss_fn in (("body fwd+bwd (no head)", body), ("head+loss fwd+bwd", head)):
        grad = jax.jit(lambda p, r, f=loss_fn: nnx.grad(f)(nnx.merge(graphdef, p, r)))
        rows.append(timed(name, lambda g=grad: g(params, rest), args.steps))
        print(rows[-1], flush=True)

    epoch = None
    if args.full_epoch:
        one_epoch = runner.load_mqar_config(REPO / "configs" / "mqar" / "zoology.yaml",
                                            cell + [f"data.num_train_examples={args.rows}", "train.max_epochs=1"])
        t = time.perf_counter()
        rec = runner.train_group(one_epoch, runner.expand_grid(one_epoch), train, test, progress=False)[0]
        epoch = {"wall_s": round(time.perf_counter() - t, 1), "startup_s": rec["startup_s"], "cpu_s": rec["cpu_s"],
                 "steps": rec["steps"], "test_acc": rec["acc"]}
        print("full epoch:", epoch, flush=True)

    info = machine_info()
    result = {"cell": f"{args.mixer} d64 L64 P4 V8192 batch 512, 2 layers, init 0.02"
                      + (", learned positions" if args.mixer == "attention" else ""),
              "fftconv_impl": args.fftconv_impl,
              "machine": info, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "malloc": malloc, "data_generation_s": round(gen_s, 2), "steps_per_epoch": spe, "params": n_params,
              "pieces": rows,
              "profiles": {k: v[:40] for k, v in profiles.items()}, "full_epoch": epoch,
              "command": " ".join(sys.argv)}
    if args.mixer == "attention":  # issue 10's references are for this cell
        result.update(before_s_per_epoch=BEFORE_S_PER_EPOCH, zoology_s_per_epoch=ZOOLOGY_S_PER_EPOCH,
                      target_s_per_epoch=TARGET_S_PER_EPOCH)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# MQAR paper-cell speed ({info['backend']})", "",
             f"Machine: {info['cpu']}, {info['cpu_count']} logical cores, jax {info['jax']}, {info['time']}; "
             f"load average {load_before[0]:.1f} before, {result['load_average_after'][0]:.1f} after; malloc: {malloc}.",
             f"Cell: {result['cell']}; long convolutions: fftconv impl {args.fftconv_impl}; {spe} steps an epoch."
             + (f" Before: {BEFORE_S_PER_EPOCH:g} s/epoch (issue 10); Zoology: ~{ZOOLOGY_S_PER_EPOCH:g} s/epoch; "
                f"target <= {TARGET_S_PER_EPOCH:g} s/epoch." if args.mixer == "attention" else ""), "",
             "| piece | members | wall ms | user ms | sys ms | minor faults | s/epoch per member |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ep = r.get("s_per_epoch_per_member")
        lines.append(f"| {r['piece']} | {r['members']} | {r['wall_ms']:.1f} | {r['user_ms']:.1f} | {r['sys_ms']:.1f} | "
                     f"{r['minor_faults']:,} | {'' if ep is None else f'{ep:.1f}'} |")
    by_piece = {(r["piece"], r["members"]): r["wall_ms"] for r in rows}
    for loop in args.member_loops:
        if (f"train step ({loop})", 1) in by_piece:
            rest_ms = (by_piece[(f"train step ({loop})", 1)] - by_piece[("body fwd+bwd (no head)", 1)]
                       - by_piece[("head+loss fwd+bwd", 1)])
            lines.append(f"\nRest of the 1-member {loop} step (optimizer, batch gather, member axis): {rest_ms:.1f} ms.")
    for loop, prof in profiles.items():
        lines += ["", f"Profile of the 1-member `{loop}` step (5 steps, `lm.profile`; op times summed over threads):", ""]
        lines += ops_table(prof, steps=5, top=15)
    if epoch:
        lines += ["", f"One real epoch through `train_group` (host loop, compilation and evaluation included): "
                      f"{epoch['wall_s']} s wall ({epoch['startup_s']} s start-up), {epoch['cpu_s']} s CPU."]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
