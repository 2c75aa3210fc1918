"""``longconv mqar``: a resumable MQAR sweep (Zoology, Figure 2) over mixer × d_model × (L, P) × lr × seed.

    longconv mqar --config configs/mqar/quick.yaml [key=value ...] [--out DIR] [--report-only] [--dry-run]

For every grid point a small LM (`lm.model.LM`, ``n_layers`` 2 by default, mixer-only blocks) is trained
on MQAR rows from `lm.mqar.generator` with AdamW + cosine decay (no warmup), evaluated on the held-out
test rows after every epoch (or every ``train.eval_every_steps``), and stopped early once the test
accuracy exceeds ``train.early_stop_acc``. Accuracy is Zoology's: per row, the fraction of its P query
positions whose argmax prediction is the right value, averaged over rows.

Speed: the loss only needs the P labelled positions per row, so the hidden states are gathered at those
positions *before* the tied vocab head (same loss and accuracy, several times cheaper). Train and eval
steps are ``jax.jit``-compiled functions of split NNX state with the parameter and optimizer buffers
donated.

Results go to ``<out_dir>/results.jsonl``, one line per finished run; a restarted sweep skips runs whose
key and settings fingerprint are already there. ``table.md`` and ``plot.png`` are (re)written at the end
and the table is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import sys
import time
from typing import Any, Literal

import numpy as np

from lm.config import ConfigError, apply_overrides, from_dict, read_yaml, save_config, to_dict
from lm.mqar.generator import MQARError, check_params, multiquery_ar, scored_positions
from lm.tracking import read_jsonl

# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskPoint:
    """One (sequence length, key-value pairs) point of the grid, with its batch size."""

    seq_len: int
    num_kv_pairs: int
    batch_size: int = 512  # Zoology: 512 for L <= 128, 256 at 256, 128 at 512


@dataclasses.dataclass
class DataConfig:
    """MQAR data; see `lm.mqar.generator` for the meaning of each option (Zoology names)."""

    vocab_size: int = 8192
    num_train_examples: int = 100_000
    num_test_examples: int = 3_000
    power_a: float = 0.01
    num_passes: int = 1
    random_non_queries: bool = False  # Figure 2 grid: False (the generator's own default is True)
    train_seed: int = 0  # paper tag: data seeds 0 (train) and 10 (test)
    test_seed: int = 10
    reshuffle: bool = True  # reshuffle the training rows every epoch (paper-tag trainer)

    def validate(self) -> None:
        if self.train_seed == self.test_seed:
            raise ConfigError("config keys 'data.train_seed' and 'data.test_seed' must differ")
        if self.num_train_examples < 1 or self.num_test_examples < 1:
            raise ConfigError("config keys 'data.num_train_examples'/'data.num_test_examples' must be >= 1")


@dataclasses.dataclass
class ModelDefaults:
    """Model settings shared by all mixers (a mixer entry may override n_layers, mlp, dropout)."""

    n_layers: int = 2
    mlp: Literal["glu", "mlp", "none", "identity"] = "identity"  # Zoology: identity state mixer (quirk)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass
class MixerRun:
    """A named mixer setting of the sweep. ``mixer``/``layer_mixers`` are `lm.model.ModelConfig` specs."""

    label: str
    mixer: dict[str, Any]  # string values "$seq_len" / "$num_kv_pairs" / "$d_model" are filled in per run
    layer_mixers: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    pos_embedding: Literal["none", "learned"] = "none"  # Zoology: learned absolute positions for attention only
    n_layers: int | None = None
    mlp: Literal["glu", "mlp", "none", "identity"] | None = None
    dropout: float | None = None


@dataclasses.dataclass
class GridConfig:
    points: list[TaskPoint] = dataclasses.field(default_factory=list)
    d_models: list[int] = dataclasses.field(default_factory=lambda: [64])
    lrs: list[float] = dataclasses.field(default_factory=lambda: [1e-3])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    mixers: list[str] | None = None  # run only these mixer labels (null = all entries of `mixers`)

    def validate(self) -> None:
        if not self.points:
            raise ConfigError("config key 'grid.points' must list at least one {seq_len, num_kv_pairs}")
        for name in ("d_models", "lrs", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"config key 'grid.{name}' must not be empty")
        if any(lr <= 0 for lr in self.lrs):
            raise ConfigError("config key 'grid.lrs': learning rates must be > 0")
        bad = [d for d in self.d_models if d < 1]
        if bad:
            raise ConfigError(f"config key 'grid.d_models': every d_model must be >= 1, got {bad[0]}")


@dataclasses.dataclass
class TrainConfig:
    max_epochs: int = 64
    early_stop_acc: float = 0.99  # stop once test accuracy > this
    eval_every_steps: int = 0  # 0: evaluate at the end of every epoch (Zoology)
    eval_batch_size: int = 512
    weight_decay: float = 0.1
    b1: float = 0.9  # torch AdamW defaults (Zoology)
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = None
    min_lr_ratio: float = 0.0  # cosine to 0 over max_epochs, no warmup
    warmup_steps: int = 0
    max_run_seconds: float | None = None  # optional wall-clock cap per run (recorded if hit)

    def validate(self) -> None:
        if self.max_epochs < 1:
            raise ConfigError(f"config key 'train.max_epochs' must be >= 1, got {self.max_epochs}")


@dataclasses.dataclass
class MQARConfig:
    name: str = "mqar"
    out_dir: str | None = None  # default runs/mqar/<name> (committed results live in results/mqar/)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelDefaults = dataclasses.field(default_factory=ModelDefaults)
    mixers: list[MixerRun] = dataclasses.field(default_factory=list)
    grid: GridConfig = dataclasses.field(default_factory=GridConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> None:
        if not self.mixers:
            raise ConfigError("config key 'mixers' must list at least one {label, mixer}")
        labels = [m.label for m in self.mixers]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"config key 'mixers': labels must be unique, got {labels}")
        if self.grid.mixers is not None:
            unknown = sorted(set(self.grid.mixers) - set(labels))
            if unknown:
                raise ConfigError(f"config key 'grid.mixers': unknown mixer label {unknown[0]!r}; have {labels}")
        d = self.data
        for i, pt in enumerate(self.grid.points):
            try:
                check_params(d.vocab_size, pt.seq_len, pt.num_kv_pairs, d.num_passes, d.power_a)
            except MQARError as e:
                raise ConfigError(f"config key 'grid.points[{i}]': {e}") from None
            if pt.batch_size < 1:
                raise ConfigError(f"config key 'grid.points[{i}].batch_size' must be >= 1")
            if pt.batch_size > d.num_train_examples:
                raise ConfigError(f"config key 'grid.points[{i}].batch_size' exceeds data.num_train_examples")

    def selected_mixers(self) -> list[MixerRun]:
        if self.grid.mixers is None:
            return list(self.mixers)
        return [m for m in self.mixers if m.label in self.grid.mixers]


def load_mqar_config(path: str | pathlib.Path | None, overrides: list[str] | tuple[str, ...] = ()) -> MQARConfig:
    """Read an MQAR sweep config (YAML) with dotted ``key=value`` overrides; errors name the key."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(MQARConfig, apply_overrides(data, list(overrides)))


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    mixer: MixerRun
    point: TaskPoint
    d_model: int
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return (f"{self.mixer.label}|L{self.point.seq_len}|P{self.point.num_kv_pairs}|d{self.d_model}"
                f"|lr{self.lr:.3g}|s{self.seed}")


def expand_grid(cfg: MQARConfig) -> list[Run]:
    """All runs, ordered (L, P) → mixer → d_model → lr → seed (data is generated once per (L, P))."""
    runs = []
    for pt in cfg.grid.points:
        for m in cfg.selected_mixers():
            for d in cfg.grid.d_models:
                for lr in cfg.grid.lrs:
                    for s in cfg.grid.seeds:
                        runs.append(Run(m, pt, d, float(lr), int(s)))
    return runs


PLACEHOLDERS = ("$seq_len", "$num_kv_pairs", "$d_model")


def _substitute(spec: Any, run: "Run") -> Any:
    """Replace the strings "$seq_len", "$num_kv_pairs", "$d_model" in a mixer spec by the run's values
    (e.g. Zoology's H3 uses ``d_state: $seq_len``)."""
    if isinstance(spec, dict):
        return {k: _substitute(v, run) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_substitute(v, run) for v in spec]
    if spec == "$seq_len":
        return run.point.seq_len
    if spec == "$num_kv_pairs":
        return run.point.num_kv_pairs
    if spec == "$d_model":
        return run.d_model
    return spec


def model_config_for(cfg: MQARConfig, run: Run):
    """The `lm.model.ModelConfig` of one run (max_len = L: Zoology's l_max / position-table size)."""
    from lm.model import ModelConfig

    m = run.mixer
    md = cfg.model
    return ModelConfig(
        vocab_size=cfg.data.vocab_size,
        d_model=run.d_model,
        n_layers=m.n_layers if m.n_layers is not None else md.n_layers,
        max_len=run.point.seq_len,
        mixer=_substitute(dict(m.mixer), run),
        layer_mixers={int(k): _substitute(dict(v), run) for k, v in m.layer_mixers.items()},
        mlp=m.mlp if m.mlp is not None else md.mlp,
        norm=md.norm,
        tie_embeddings=md.tie_embeddings,
        pos_embedding=m.pos_embedding,
        dropout=m.dropout if m.dropout is not None else md.dropout,
        init_std=md.init_std,
        dtype=md.dtype,
    )


def run_fingerprint(cfg: MQARConfig, run: Run) -> str:
    """Hash of everything that determines a run's result (data, model, training, point, lr, seed)."""
    mcfg = model_config_for(cfg, run)
    blob = json.dumps(
        {"data": to_dict(cfg.data), "model": to_dict(mcfg), "train": to_dict(cfg.train),
         "point": to_dict(run.point), "lr": run.lr, "seed": run.seed},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_results(path: pathlib.Path) -> list[dict]:
    """Records (JSON objects) of a results.jsonl; a line that is not one (e.g. a truncated last line
    from an interrupted write) is skipped."""
    return read_jsonl(path)


def append_result(path: pathlib.Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lead = ""
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:  # a run killed mid-write leaves no newline: start a fresh line
            f.seek(-1, 2)
            lead = "" if f.read(1) == b"\n" else "\n"
    with path.open("a") as f:
        f.write(lead + json.dumps(record) + "\n")
        f.flush()


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MQARSplit:
    inputs: np.ndarray  # (N, L) int32
    positions: np.ndarray  # (N, P) int32: the scored positions
    targets: np.ndarray  # (N, P) int32: their values


def make_split(cfg: MQARConfig, point: TaskPoint, train: bool) -> MQARSplit:
    d = cfg.data
    inputs, labels = multiquery_ar(
        vocab_size=d.vocab_size,
        num_examples=d.num_train_examples if train else d.num_test_examples,
        input_seq_len=point.seq_len,
        seed=d.train_seed if train else d.test_seed,
        power_a=d.power_a,
        num_kv_pairs=point.num_kv_pairs,
        random_non_queries=d.random_non_queries,
        num_passes=d.num_passes,
    )
    pos = scored_positions(labels, point.num_kv_pairs)
    return MQARSplit(inputs, pos, np.take_along_axis(labels, pos, axis=1))


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def _build_steps(graphdef_train, graphdef_eval, tx):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    def forward(model, x, pos):
        h = model.hidden(x)  # (B, L, D) final-normed
        hq = jnp.take_along_axis(h, pos[:, :, None], axis=1)  # (B, P, D): gather BEFORE the head
        return model.logits(hq)  # (B, P, V) fp32

    def loss_fn(model, x, pos, y):
        logits = forward(model, x, pos)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (jnp.argmax(logits, -1) == y).mean()

    def train_step(params, opt_state, rest, x, pos, y):
        model = nnx.merge(graphdef_train, params, rest)
        # nnx.value_and_grad differentiates the nnx.Param state and carries RNG (dropout) updates
        (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, pos, y)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, rest, loss, acc

    def eval_step(params, rest, x, pos, y, w):
        model = nnx.merge(graphdef_eval, params, rest)
        logits = forward(model, x, pos)
        row_acc = (jnp.argmax(logits, -1) == y).mean(axis=1)  # per-row fraction of correct queries
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(axis=1)
        return (row_acc * w).sum(), (loss * w).sum()

    return (jax.jit(train_step, donate_argnums=(0, 1, 2)), jax.jit(eval_step))


def evaluate(eval_step, params, rest, split: MQARSplit, batch_size: int) -> tuple[float, float]:
    """(accuracy, loss) over a split: mean over rows of the per-row fraction of correct queries."""
    n = split.inputs.shape[0]
    bs = min(batch_size, n)
    acc_sum = loss_sum = 0.0
    for start in range(0, n, bs):
        x, pos, y = (a[start:start + bs] for a in (split.inputs, split.positions, split.targets))
        m = x.shape[0]
        w = np.ones(bs, np.float32)
        if m < bs:  # pad the last batch to a fixed shape (no recompilation); padded rows weigh 0
            pad = bs - m
            x, pos, y = (np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) for a in (x, pos, y))
            w[m:] = 0.0
        a, l = eval_step(params, rest, x, pos, y, w)
        acc_sum += float(a)
        loss_sum += float(l)
    return acc_sum / n, loss_sum / n


def train_run(cfg: MQARConfig, run: Run, train: MQARSplit, test: MQARSplit, *, progress: bool = True,
              log=None) -> dict:
    """Train one grid point; returns its result record (see module docstring)."""
    import jax
    from flax import nnx

    from lm.model import LM
    from lm.optim import OptimizerConfig, make_optimizer, model_label_map
    from lm.params import count_params

    tc = cfg.train
    mcfg = model_config_for(cfg, run)
    model = LM(mcfg, rngs=nnx.Rngs(params=run.seed, dropout=run.seed + 1))
    n_params = count_params(model)
    label_map = model_label_map(model)

    bs = run.point.batch_size
    n_train = train.inputs.shape[0]
    steps_per_epoch = n_train // bs  # the last partial batch is dropped (fixed shapes, no recompiles)
    total_steps = steps_per_epoch * tc.max_epochs
    ocfg = OptimizerConfig(lr=run.lr, min_lr_ratio=tc.min_lr_ratio, warmup_steps=tc.warmup_steps, b1=tc.b1,
                           b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip,
                           filter_weight_decay=0.0)
    tx = make_optimizer(ocfg, total_steps, label_map)

    model.eval()
    graphdef_eval, _, _ = nnx.split(model, nnx.Param, ...)
    model.train()
    graphdef_train, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    train_step, eval_step = _build_steps(graphdef_train, graphdef_eval, tx)

    eval_every = tc.eval_every_steps if tc.eval_every_steps > 0 else steps_per_epoch
    rng = np.random.default_rng(run.seed + 7919 * cfg.data.train_seed + 1)
    history: list[dict] = []
    best_acc, final_acc, step = 0.0, 0.0, 0
    stop_reason = "max_epochs"
    tokens_per_step = bs * run.point.seq_len
    t0, cpu0 = time.perf_counter(), time.process_time()
    train_time = 0.0  # excludes evaluation
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total_steps, desc=run.key, leave=False, dynamic_ncols=True, file=sys.stderr)
    order = np.arange(n_train)
    done = False
    loss_v = acc_v = float("nan")
    for epoch in range(tc.max_epochs):
        if cfg.data.reshuffle:
            order = rng.permutation(n_train)
        for i in range(steps_per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            ts = time.perf_counter()
            params, opt_state, rest, loss, acc = train_step(
                params, opt_state, rest, train.inputs[idx], train.positions[idx], train.targets[idx])
            step += 1
            if step % 10 == 0 or step == 1:
                loss_v, acc_v = float(loss), float(acc)  # syncs; keeps the async queue short
            train_time += time.perf_counter() - ts
            if pbar is not None:
                pbar.update(1)
                if step % 10 == 0:
                    pbar.set_postfix(ep=epoch, loss=f"{loss_v:.3f}", acc=f"{acc_v:.2f}", best=f"{best_acc:.3f}",
                                     tok_s=f"{tokens_per_step * step / max(train_time, 1e-9):,.0f}")
            if step % eval_every == 0 or i == steps_per_epoch - 1:
                test_acc, test_loss = evaluate(eval_step, params, rest, test, tc.eval_batch_size)
                final_acc = test_acc
                best_acc = max(best_acc, test_acc)
                history.append({"step": step, "epoch": round(step / steps_per_epoch, 3),
                                "train_loss": round(float(loss), 4), "test_acc": round(test_acc, 4),
                                "test_loss": round(test_loss, 4)})
                if log is not None:
                    log(f"{run.key} step {step} epoch {step / steps_per_epoch:.2f} "
                        f"test_acc {test_acc:.4f} loss {float(loss):.3f}")
                if test_acc > tc.early_stop_acc:
                    stop_reason, done = "early_stop", True
                    break
                if tc.max_run_seconds is not None and time.perf_counter() - t0 > tc.max_run_seconds:
                    stop_reason, done = "time_limit", True
                    break
        if done:
            break
    if pbar is not None:
        pbar.close()
    jax.block_until_ready(params)
    wall = time.perf_counter() - t0
    m = run.mixer
    return {
        "key": run.key,
        "mixer": m.label,
        "mixer_spec": dict(m.mixer),
        "layer_mixers": {str(k): v for k, v in m.layer_mixers.items()},
        "seq_len": run.point.seq_len,
        "num_kv_pairs": run.point.num_kv_pairs,
        "d_model": run.d_model,
        "lr": run.lr,
        "seed": run.seed,
        "n_layers": mcfg.n_layers,
        "mlp": mcfg.mlp,
        "pos_embedding": mcfg.pos_embedding,
        "params": n_params,
        "vocab_size": cfg.data.vocab_size,
        "num_train_examples": n_train,
        "num_test_examples": int(test.inputs.shape[0]),
        "batch_size": bs,
        "random_non_queries": cfg.data.random_non_queries,
        "acc": round(best_acc, 4),
        "final_acc": round(final_acc, 4),
        "steps": step,
        "epochs": round(step / steps_per_epoch, 3),
        "stop": stop_reason,
        "wall_s": round(wall, 2),
        "cpu_s": round(time.process_time() - cpu0, 2),  # process CPU time (all threads)
        "tokens_per_s": round(tokens_per_step * step / max(train_time, 1e-9)),
        "history": history,
        "fingerprint": run_fingerprint(cfg, run),
        "backend": jax.default_backend(),
    }


# ---------------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------------


def output_dir(cfg: MQARConfig, out: str | None = None) -> pathlib.Path:
    return pathlib.Path(out or cfg.out_dir or f"runs/mqar/{cfg.name}")


def sweep(cfg: MQARConfig, out_dir: str | pathlib.Path, *, progress: bool = True, verbose: bool = False,
          report: bool = True) -> list[dict]:
    """Run every grid point not already in ``out_dir/results.jsonl``; write the report; return all records
    of this grid (finished earlier or now)."""
    import lm.mixers  # noqa: F401  (registers the mixers)

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    results_path = out_dir / "results.jsonl"
    runs = expand_grid(cfg)
    for r in runs:  # fail fast on bad mixer specs before any training
        model_config_for(cfg, r).validate()
    done = {(row.get("key"), row.get("fingerprint")): row for row in read_results(results_path)}
    todo = [r for r in runs if (r.key, run_fingerprint(cfg, r)) not in done]
    records = [done[(r.key, run_fingerprint(cfg, r))] for r in runs if (r.key, run_fingerprint(cfg, r)) in done]
    say = (lambda s: print(s, file=sys.stderr, flush=True))
    say(f"mqar: {len(runs)} runs in the grid, {len(runs) - len(todo)} already in {results_path}, "
        f"{len(todo)} to run")

    outer = None
    if progress and todo:
        from tqdm.auto import tqdm

        outer = tqdm(total=len(todo), desc="mqar grid", dynamic_ncols=True, file=sys.stderr)
    cache: dict = {}
    for run in todo:
        pkey = (run.point.seq_len, run.point.num_kv_pairs)
        if pkey not in cache:
            cache.clear()
            t = time.perf_counter()
            cache[pkey] = (make_split(cfg, run.point, True), make_split(cfg, run.point, False))
            say(f"mqar: generated L={pkey[0]} P={pkey[1]} data in {time.perf_counter() - t:.1f}s")
        train, test = cache[pkey]
        rec = train_run(cfg, run, train, test, progress=progress, log=say if verbose else None)
        append_result(results_path, rec)
        records.append(rec)
        msg = (f"{run.key}: acc {rec['acc']:.3f} ({rec['stop']}, {rec['epochs']:.2f} epochs, "
               f"{rec['wall_s']:.0f}s, {rec['tokens_per_s']:,} tok/s)")
        if outer is not None:
            outer.update(1)
            outer.write(msg, file=sys.stderr)
        else:
            say(msg)
    if outer is not None:
        outer.close()
    if report:
        write_report(cfg, out_dir, records)
    return records


def write_report(cfg: MQARConfig, out_dir: pathlib.Path, records: list[dict]) -> str:
    from lm.mqar import report as rep

    table = rep.markdown_table(records, title=f"MQAR: {cfg.name}")
    if records:
        table += "\n\n### Runs\n\n" + rep.runs_table(records)
    (out_dir / "table.md").write_text(table + "\n")
    try:
        rep.plot(records, out_dir / "plot.png", title=f"MQAR ({cfg.name})")
    except Exception as e:  # plotting is optional (matplotlib backend issues must not lose results)
        print(f"mqar: plot failed: {e}", file=sys.stderr)
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="sweep config YAML (e.g. configs/mqar/quick.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grid.d_models=[64,128] train.max_epochs=4")
    parser.add_argument("--out", default=None, help="output directory (default: out_dir or results/mqar/<name>)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild table.md/plot.png from results.jsonl")
    parser.add_argument("--dry-run", action="store_true", help="list the runs (and which are done) and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="log every evaluation")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_mqar_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = output_dir(cfg, args.out)
    if args.dry_run or args.report_only:
        import lm.mixers  # noqa: F401

        runs = expand_grid(cfg)
        done = {(r.get("key"), r.get("fingerprint")): r for r in read_results(out / "results.jsonl")}
        if args.dry_run:
            for r in runs:
                mark = "done" if (r.key, run_fingerprint(cfg, r)) in done else "todo"
                print(f"{mark}  {r.key}")
            return 0
        records = [done[(r.key, run_fingerprint(cfg, r))] for r in runs if (r.key, run_fingerprint(cfg, r)) in done]
        print(write_report(cfg, out, records))
        return 0
    try:
        records = sweep(cfg, out, progress=not args.no_progress, verbose=args.verbose)
    except (ConfigError, MQARError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "table.md").read_text())
    print(f"results: {out / 'results.jsonl'}  table: {out / 'table.md'}  plot: {out / 'plot.png'}")
    return 0
