"""``longconv mqar``: a resumable MQAR sweep (Zoology, Figure 2) over mixer × d_model × (L, P) × lr × seed.

    longconv mqar --config configs/mqar/quick.yaml [key=value ...] [--out DIR] [--time-budget SECONDS]
                  [--report-only] [--dry-run]

For every grid point a small LM (`lm.model.LM`, ``n_layers`` 2 by default, mixer-only blocks) is trained
on MQAR rows from `lm.mqar.generator` with AdamW + cosine decay (no warmup), evaluated on the held-out
test rows after every epoch (or every ``train.eval_every_steps``), and stopped early once the test
accuracy exceeds ``train.early_stop_acc``. Accuracy is Zoology's: per row, the fraction of its P query
positions whose argmax prediction is the right value, averaged over rows.

Many runs per step: the learning rates and seeds of one (L, P), mixer and d_model form a group, trained
by one jitted step over their stacked parameters and optimizer states on one shared batch (the batch order
depends on ``data.train_seed`` only); ``train.member_loop`` vmaps the members on accelerators and runs them
one after another inside the step on CPU, where that is faster. Each member stops early on its own and then leaves
the stacked step; the best learning rate is picked in the report.

Speed: the loss only needs the P labelled positions per row, so the hidden states are gathered at those
positions *before* the tied vocab head (same loss and accuracy, several times cheaper). The training rows
live on the device and each step gathers its batch there; parameter and optimizer buffers are donated.
On glibc, `keep_freed_memory` stops XLA's CPU buffers from being unmapped and page-faulted in again on
every step.

Parallel groups: on a CPU host, config key ``workers: N`` trains N groups at once, each in a worker process
pinned to its own share of the cores (`lm.mqar.workers`): small steps (the quick sweep's) use one core better
than two; large ones (the paper's batch 512) do not, and train faster one group at a time.

Stopping: ``train.max_run_seconds`` caps a group's wall time (checked every step; stop ``time_limit``,
final). ``--time-budget SECONDS`` stops the whole command before SECONDS (stop ``time_budget``) and
Ctrl-C stops it at once (stop ``interrupted``): both write a record for every cut run and keep the
group's state in ``<out>/checkpoints/``, so rerunning the same command resumes exactly where it stopped
(exit status 75 while a time budget leaves runs to do, 130 after Ctrl-C).

Results go to ``<out>/results.jsonl``, one line per ended or cut run (a later line of a run supersedes an
earlier one); a restarted sweep skips runs whose key and settings fingerprint have a final record.
``table.md`` (cut runs marked ``[cut]``, early stops ``[e]``) and ``plot.png`` are (re)written at the end
and the table is printed. Each evaluation prints one plain line with every member's test accuracy (and,
without progress bars, the training rate in tokens/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import sys
import time
from typing import Any, Iterable, Literal

import numpy as np

from lm.config import ConfigError, apply_overrides, from_dict, read_yaml, save_config, to_dict
from lm.host_memory import keep_freed_memory
from lm.mqar.generator import MQARError, check_params, multiquery_ar, scored_positions
from lm.signals import interrupts_deferred, interrupts_kept
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
    """Model settings shared by all mixers (a mixer entry may override n_layers, mlp, dropout,
    embed_dropout). See `lm.model.ModelConfig`."""

    n_layers: int = 2
    mlp: Literal["glu", "mlp", "none", "identity"] = "identity"  # Zoology: identity state mixer (quirk)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    tie_embeddings: bool = True
    dropout: float = 0.0
    embed_dropout: float | None = None  # None: ``dropout`` (Zoology: 0.1 on the embeddings only)
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
    embed_dropout: float | None = None


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
    weight_decay_on: Literal["matrices", "all"] = "matrices"  # "all": every tensor, as Zoology's torch AdamW
    b1: float = 0.9  # torch AdamW defaults (Zoology)
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = None
    min_lr_ratio: float = 0.0  # cosine to 0 over max_epochs, no warmup
    warmup_steps: int = 0
    max_run_seconds: float | None = None  # wall-clock cap per group of runs, checked every step (stop "time_limit")
    member_loop: Literal["auto", "vmap", "map"] = "auto"  # how one step runs a group's members; see member_loop_for
    checkpoint_every_s: float = 600.0  # also checkpoint a group at the first evaluation this long after the last save

    def validate(self) -> None:
        if self.max_epochs < 1:
            raise ConfigError(f"config key 'train.max_epochs' must be >= 1, got {self.max_epochs}")
        if self.checkpoint_every_s <= 0:
            raise ConfigError(f"config key 'train.checkpoint_every_s' must be > 0, got {self.checkpoint_every_s}")
        if self.weight_decay_on not in ("matrices", "all"):
            raise ConfigError(f"config key 'train.weight_decay_on' must be matrices or all, got {self.weight_decay_on!r}")
        if self.member_loop not in ("auto", "vmap", "map"):
            raise ConfigError(f"config key 'train.member_loop' must be auto, vmap or map, got {self.member_loop!r}")


@dataclasses.dataclass
class MQARConfig:
    name: str = "mqar"
    out_dir: str | None = None  # see OUTPUT_DIR_RULE
    workers: int = 1  # CPU backend: processes training groups at once, each on its own cores (lm.mqar.workers)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelDefaults = dataclasses.field(default_factory=ModelDefaults)
    mixers: list[MixerRun] = dataclasses.field(default_factory=list)
    grid: GridConfig = dataclasses.field(default_factory=GridConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"config key 'workers' must be >= 1, got {self.workers}")
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
    def group_key(self) -> str:
        """The runs with the same group key are trained together (see `group_runs`)."""
        return f"{self.mixer.label}|L{self.point.seq_len}|P{self.point.num_kv_pairs}|d{self.d_model}"

    @property
    def key(self) -> str:
        return f"{self.group_key}|lr{self.lr:.3g}|s{self.seed}"


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
        embed_dropout=m.embed_dropout if m.embed_dropout is not None else md.embed_dropout,
        init_std=md.init_std,
        dtype=md.dtype,
    )


NOT_FINGERPRINTED = ("checkpoint_every_s",)  # train keys added later that leave a run's result as it is
DEFAULTS_NOT_FINGERPRINTED = {"weight_decay_on": "matrices"}  # train keys added later, left out at these values


def _fingerprinted_model(cfg: MQARConfig, run: Run) -> dict:
    """The run's model settings in one form per model: ``embed_dropout`` (added later) is left out where it
    is unset or equals the ``dropout`` it replaces, so records made before it existed keep their fingerprints
    and an explicit ``embed_dropout`` equal to ``dropout`` is the same run."""
    model = to_dict(model_config_for(cfg, run))
    if model["embed_dropout"] in (None, model["dropout"]):
        del model["embed_dropout"]
    return model


def run_fingerprint(cfg: MQARConfig, run: Run) -> str:
    """Hash of everything that determines a run's result (data, model, training, point, lr, seed)."""
    train = {k: v for k, v in to_dict(cfg.train).items()
             if k not in NOT_FINGERPRINTED and DEFAULTS_NOT_FINGERPRINTED.get(k, object()) != v}
    blob = json.dumps(
        {"data": to_dict(cfg.data), "model": _fingerprinted_model(cfg, run), "train": train,
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
# Training: the learning rates and seeds of one (point, mixer, d_model) trained together
# ---------------------------------------------------------------------------------------------------

FINAL_STOPS = ("early_stop", "max_epochs", "time_limit")  # a run with one of these is done
RESUMABLE_STOPS = ("time_budget", "interrupted")  # cut from outside; a rerun resumes it from its checkpoint
SYNC_EVERY = 10  # steps between host syncs (progress, step timing, time-budget checks)
SAVE_RESERVE_S = 2.0  # seconds kept free before a time budget for the checkpoint and records


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Consecutive runs sharing (L, P), mixer and d_model (see `expand_grid`): each list is trained in one
    step (its members differ only in learning rate and seed)."""
    groups: list[list[Run]] = []
    for r in runs:
        if groups and groups[-1][0].group_key == r.group_key:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def epoch_orders(train_seed: int, n_rows: int, reshuffle: bool, first_epoch: int = 0):
    """Row orders of epochs ``first_epoch``, ``first_epoch + 1``, ...: permutations drawn in turn from one
    generator seeded by ``train_seed`` (the earlier epochs' draws are replayed, so a resumed run sees the
    same batches as an uninterrupted one)."""
    rng = np.random.default_rng(7919 * train_seed + 1)
    epoch = 0
    while True:
        order = rng.permutation(n_rows) if reshuffle else np.arange(n_rows)
        if epoch >= first_epoch:
            yield order
        epoch += 1


def member_loop_for(setting: str) -> str:
    """The member loop ``auto`` resolves to: ``map`` on CPU, ``vmap`` on accelerators.

    ``vmap`` batches the members into one wider computation (what fills a GPU); ``map`` (`jax.lax.map`)
    runs them one after another inside the same jitted step, each as the plain single-run computation.
    On XLA:CPU the vmapped step is slower per member than a run alone (the member axis turns the tied
    head's gradient into a strided transpose of the (rows, vocab) logits gradient; results/mqar/speed_cpu.md).
    """
    import jax

    if setting != "auto":
        return setting
    return "map" if jax.default_backend() == "cpu" else "vmap"


def _build_steps(graphdef_train, graphdef_eval, tx, member_loop: str = "vmap"):
    """(train_step, eval_step), jitted over the members' stacked state (``member_loop``: vmap or map).

    ``train_step(params, opt_state, rest, lrs, data, idx)`` gathers the batch rows ``idx`` of the device
    arrays ``data = (inputs, positions, targets)`` once and updates every member on it; ``tx`` is built with
    peak learning rate 1, so each member's update is scaled by its own ``lrs[m]`` (the AdamW update,
    weight decay included, is linear in the learning rate). Returns the new state and the per-member loss
    of the batch (no batch accuracy: its argmax over the vocabulary cost ~10 % of a paper-cell step on CPU,
    XLA fusing the head's matmul into it, and the sweep reads only test accuracy).
    ``eval_step(params, rest, x, pos, y, w)`` returns per-member sums of the row accuracy and loss weighted
    by ``w``.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    def forward(model, x, pos):
        h = model.hidden(x)  # (B, L, D) final-normed
        hq = jnp.take_along_axis(h, pos[:, :, None], axis=1)  # (B, P, D): gather BEFORE the head
        return model.logits(hq)  # (B, P, V) fp32

    def loss_fn(model, x, pos, y):
        return optax.softmax_cross_entropy_with_integer_labels(forward(model, x, pos), y).mean()

    def member_train_step(params, opt_state, rest, lr, x, pos, y):
        model = nnx.merge(graphdef_train, params, rest)
        # nnx.value_and_grad differentiates the nnx.Param state and carries RNG (dropout) updates
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, pos, y)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
        return params, opt_state, rest, loss

    def over_members(fn, stacked: tuple, *shared):
        """``fn(*member_state, *shared)`` for every member of the stacked state, by vmap or lax.map."""
        if member_loop == "map":
            return jax.lax.map(lambda member: fn(*member, *shared), stacked)
        return jax.vmap(lambda *member: fn(*member, *shared))(*stacked)

    def train_step(params, opt_state, rest, lrs, data, idx):
        x, pos, y = (a[idx] for a in data)
        return over_members(member_train_step, (params, opt_state, rest, lrs), x, pos, y)

    def member_eval_step(params, rest, x, pos, y, w):
        model = nnx.merge(graphdef_eval, params, rest)
        logits = forward(model, x, pos)
        row_acc = (jnp.argmax(logits, -1) == y).mean(axis=1)  # per-row fraction of correct queries
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(axis=1)
        return (row_acc * w).sum(), (loss * w).sum()

    def eval_step(params, rest, x, pos, y, w):
        return over_members(member_eval_step, (params, rest), x, pos, y, w)

    return jax.jit(train_step, donate_argnums=(0, 1, 2)), jax.jit(eval_step)


def eval_batches(split: MQARSplit, batch_size: int) -> list[tuple]:
    """The split as fixed-shape device batches ``(x, pos, y, w)``; the last one is padded with rows of
    weight 0 (no recompilation)."""
    import jax.numpy as jnp

    n = split.inputs.shape[0]
    bs = min(batch_size, n)
    out = []
    for start in range(0, n, bs):
        x, pos, y = (a[start:start + bs] for a in (split.inputs, split.positions, split.targets))
        m = x.shape[0]
        w = np.ones(bs, np.float32)
        if m < bs:
            pad = bs - m
            x, pos, y = (np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) for a in (x, pos, y))
            w[m:] = 0.0
        out.append(tuple(jnp.asarray(a) for a in (x, pos, y, w)))
    return out


def evaluate(eval_step, params, rest, batches: list[tuple], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-member (accuracy, loss) over evaluation batches: the mean over rows of the per-row fraction of
    correct queries, and of the per-row mean cross-entropy."""
    acc_sum = loss_sum = 0.0
    for batch in batches:
        a, l = eval_step(params, rest, *batch)
        acc_sum, loss_sum = acc_sum + a, loss_sum + l
    return np.asarray(acc_sum, np.float64) / n_rows, np.asarray(loss_sum, np.float64) / n_rows


def _stack(trees: list):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _take_members(tree, keep: list[int]):
    """The state of members ``keep`` (indices into the stacked leading axis)."""
    import jax

    idx = np.asarray(keep)
    return jax.tree.map(lambda a: a[idx], tree)


def _is_key(a) -> bool:
    import jax

    return jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def save_checkpoint(path: pathlib.Path, state, meta: dict) -> None:
    """Write the stacked training state (a pytree; PRNG keys as their raw data) and a JSON ``meta`` to one
    ``.npz`` file, atomically (a temporary file renamed over ``path``)."""
    import jax

    leaves = [np.asarray(jax.random.key_data(a) if _is_key(a) else a) for a in jax.tree.leaves(state)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **{f"leaf{i}": a for i, a in enumerate(leaves)})
    tmp.replace(path)


def load_checkpoint(path: pathlib.Path, template) -> tuple[Any, dict]:
    """(state, meta) from `save_checkpoint`; ``template`` is a state of the same structure (fresh members)
    whose shapes the saved arrays must match (else MQARError naming the leaf)."""
    import jax
    import jax.numpy as jnp

    with np.load(path) as f:
        meta = json.loads(str(f["meta"]))
        saved = [f[f"leaf{i}"] for i in range(len(f.files) - 1)]
    leaves, treedef = jax.tree.flatten(template)
    if len(saved) != len(leaves):
        raise MQARError(f"checkpoint {path}: {len(saved)} arrays, the model has {len(leaves)}")
    out = []
    for i, (t, s) in enumerate(zip(leaves, saved)):
        want = jax.random.key_data(t).shape if _is_key(t) else t.shape
        if tuple(s.shape) != tuple(want):
            raise MQARError(f"checkpoint {path}: array {i} has shape {s.shape}, the model needs {want}")
        out.append(jax.random.wrap_key_data(s, impl=jax.random.key_impl(t)) if _is_key(t) else jnp.asarray(s, t.dtype))
    return jax.tree.unflatten(treedef, out), meta


def checkpoint_path(out_dir: pathlib.Path, runs: list[Run]) -> pathlib.Path:
    """Where a cut group keeps its state: ``<out_dir>/checkpoints/<group key>.npz``."""
    name = runs[0].group_key.replace("|", "_")
    return out_dir / "checkpoints" / f"{name}.npz"


def _say(msg: str, pbar=None) -> None:
    """A plain stderr line that does not glue onto an active progress bar."""
    if pbar is not None:
        pbar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


def optimizer_config(tc: TrainConfig, lr: float):
    """The `lm.optim.OptimizerConfig` of a run's training settings at peak learning rate ``lr``: with
    ``weight_decay_on: all`` every tensor decays, the long-filter parameters too (one torch AdamW group)."""
    from lm.optim import OptimizerConfig

    return OptimizerConfig(lr=lr, min_lr_ratio=tc.min_lr_ratio, warmup_steps=tc.warmup_steps, b1=tc.b1, b2=tc.b2,
                           eps=tc.eps, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip,
                           weight_decay_on=tc.weight_decay_on,
                           filter_weight_decay=tc.weight_decay if tc.weight_decay_on == "all" else 0.0)


def init_group(cfg: MQARConfig, runs: list[Run], total_steps: int):
    """``(train_step, eval_step, (params, opt_state, rest), n_params)`` for the runs of one group: each
    member's model is initialised from its seed and the states are stacked along a leading member axis
    (see `_build_steps`; ``total_steps`` sets the cosine schedule's length)."""
    import jax
    from flax import nnx

    from lm.model import LM
    from lm.optim import make_optimizer, model_label_map
    from lm.params import count_params

    tc = cfg.train
    mcfg = model_config_for(cfg, runs[0])
    models = [LM(mcfg, rngs=nnx.Rngs(params=r.seed, dropout=r.seed + 1)) for r in runs]
    models[0].eval()
    graphdef_eval, _, _ = nnx.split(models[0], nnx.Param, ...)
    models[0].train()
    splits = [nnx.split(m, nnx.Param, ...) for m in models]
    tx = make_optimizer(optimizer_config(tc, lr=1.0), total_steps, model_label_map(models[0]))
    params = _stack([s[1] for s in splits])
    rest = _stack([s[2] for s in splits])
    train_step, eval_step = _build_steps(splits[0][0], graphdef_eval, tx, member_loop_for(tc.member_loop))
    return train_step, eval_step, (params, jax.vmap(tx.init)(params), rest), count_params(models[0])


def train_group(cfg: MQARConfig, runs: list[Run], train: MQARSplit, test: MQARSplit, *,
                checkpoint: pathlib.Path | None = None, deadline: float | None = None, progress: bool = True,
                verbose: bool = False, on_record=None) -> list[dict]:
    """Train the runs of one group (same point, mixer, d_model; see `group_runs`) together and return one
    record per run (see `run_record`); ``on_record(record)`` is called as soon as a run ends.

    Every member sees the same batches (order from `epoch_orders`), is evaluated after every epoch (or
    ``train.eval_every_steps``) and stops once its test accuracy exceeds ``train.early_stop_acc``: with the
    ``map`` member loop it leaves the stacked state; with ``vmap`` it stays in, frozen at learning rate 0, so
    that the step never recompiles (a compile costs ~40 s on an H200, more than the member's compute).
    ``train.max_run_seconds`` caps the group's wall time (checked every step; stop ``time_limit``).
    ``deadline`` (a ``time.perf_counter()`` value) stops the group before it, with room for the queued steps,
    an evaluation and the checkpoint (stop ``time_budget``); Ctrl-C stops it with stop ``interrupted`` and
    re-raises KeyboardInterrupt. In both cases the members' state is saved to
    ``checkpoint`` (if given) and a later call with the same runs resumes from it exactly. It is also saved
    at the first evaluation ``train.checkpoint_every_s`` after the last save, so that a killed process
    loses at most that much (plus an evaluation interval) of training.
    """
    import jax
    import jax.numpy as jnp

    t_entry = time.perf_counter()
    tc = cfg.train
    mcfg = model_config_for(cfg, runs[0])
    bs = runs[0].point.batch_size
    n_train = train.inputs.shape[0]
    steps_per_epoch = n_train // bs  # the last partial batch is dropped (fixed shapes, no recompiles)
    total_steps = steps_per_epoch * tc.max_epochs
    train_step, eval_step, (params, opt_state, rest), n_params = init_group(cfg, runs, total_steps)
    data = tuple(jnp.asarray(a) for a in (train.inputs, train.positions, train.targets))
    test_batches = eval_batches(test, tc.eval_batch_size)
    n_test = int(test.inputs.shape[0])

    active = list(range(len(runs)))  # indices into `runs` of the members still training, in stack order
    slot = list(range(len(runs)))  # slot[m]: member m's index in the stacked state
    drop_stopped = member_loop_for(tc.member_loop) == "map"
    history: list[list[dict]] = [[] for _ in runs]
    best, final = [0.0] * len(runs), [0.0] * len(runs)
    step, elapsed_before, train_time, cpu_before = 0, 0.0, 0.0, 0.0
    keys = [r.key for r in runs]
    if checkpoint is not None and checkpoint.is_file():
        (saved, meta) = load_checkpoint(checkpoint, (params, opt_state, rest))
        if meta["keys"] == keys and meta["fingerprints"] == [run_fingerprint(cfg, r) for r in runs]:
            params, opt_state, rest = saved
            step, elapsed_before, train_time, cpu_before = (meta[k] for k in ("step", "wall_s", "train_s", "cpu_s"))
            history, best, final = meta["history"], meta["best"], meta["final"]
            _say(f"{runs[0].group_key}: resumed {len(runs)} runs at step {step} from {checkpoint}")
        else:
            _say(f"{runs[0].group_key}: {checkpoint} holds other runs or settings; starting afresh")
    lrs = jnp.asarray([r.lr for r in runs], jnp.float32)

    records: list[dict] = []
    t0 = time.perf_counter() - elapsed_before
    cpu0 = time.process_time() - cpu_before
    tokens_per_step = bs * runs[0].point.seq_len

    def finish(members: list[int], stop: str) -> None:
        for m in members:
            rec = run_record(cfg, runs[m], mcfg, n_params, n_train=n_train, n_test=n_test, best=best[m],
                             final=final[m], steps=step, steps_per_epoch=steps_per_epoch, stop=stop,
                             wall=time.perf_counter() - t0, cpu=time.process_time() - cpu0,
                             tokens_per_s=tokens_per_step * step / max(train_time, 1e-9),
                             history=history[m], group_size=len(runs), startup=startup or 0.0)
            records.append(rec)
            if on_record is not None:
                on_record(rec)

    def save() -> None:
        """Checkpoint the members still training: state, step, clocks and evaluation histories."""
        state = (params, opt_state, rest)
        jax.block_until_ready(state)
        if len(active) < len(runs) and not drop_stopped:  # frozen members are not saved
            state = _take_members(state, [slot[m] for m in active])
        save_checkpoint(checkpoint, state, {
            "keys": [keys[m] for m in active],
            "fingerprints": [run_fingerprint(cfg, runs[m]) for m in active],
            "step": step, "wall_s": time.perf_counter() - t0, "train_s": train_time,
            "cpu_s": time.process_time() - cpu0, "history": [history[m] for m in active],
            "best": [best[m] for m in active], "final": [final[m] for m in active]})

    def postfix() -> str:
        accs = "/".join(f"{final[m]:.2f}" for m in active) if history[active[0]] else "-"
        return f"test acc {accs}, {tokens_per_step * step / max(train_time, 1e-9):,.0f} tok/s"

    eval_every = tc.eval_every_steps if tc.eval_every_steps > 0 else steps_per_epoch
    show_seed = len({r.seed for r in runs}) > 1
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total_steps, initial=step, desc=runs[0].group_key, leave=False, dynamic_ncols=True,
                    file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                    "[{elapsed}<up to {remaining}{postfix}]")  # early stop usually ends it sooner
    stop = "max_epochs"
    orders, order, order_epoch = None, None, -1
    step_time = eval_time = startup = None  # startup: entry to the first synced step (setup, compilation)
    evaluated = False
    seg_start, seg_steps = time.perf_counter(), 0
    saved_at = seg_start
    try:
        while step < total_steps and active:
            epoch, i = divmod(step, steps_per_epoch)
            now = time.perf_counter()
            if tc.max_run_seconds is not None and now - t0 > tc.max_run_seconds:
                stop = "time_limit"
                break
            if deadline is not None and step_time is not None and (
                    now + (SYNC_EVERY + 1) * step_time + (eval_time or 0.0) + SAVE_RESERVE_S > deadline):
                stop = "time_budget"
                break
            if order_epoch != epoch:
                if orders is None:
                    orders = epoch_orders(cfg.data.train_seed, n_train, cfg.data.reshuffle, first_epoch=epoch)
                order, order_epoch = next(orders), epoch
            # the step donates the state, so Ctrl-C acts once it has the new one; an evaluation the step
            # ends runs first too (the resumed run would not evaluate that step again)
            with interrupts_deferred():
                params, opt_state, rest, loss = train_step(params, opt_state, rest, lrs, data,
                                                              order[i * bs:(i + 1) * bs])
                step += 1
                seg_steps += 1
                ends_eval = step % eval_every == 0 or i == steps_per_epoch - 1
                # the first step is timed alone (it compiles: start-up), then the second (the step time for the
                # time budget's checks), then every SYNC_EVERY steps
                if seg_steps == SYNC_EVERY or ends_eval or step == total_steps or step_time is None:
                    loss_v = np.asarray(loss)  # waits for the queued steps
                    now = time.perf_counter()
                    if startup is None:
                        startup = now - t_entry
                    else:
                        step_time = (now - seg_start) / seg_steps
                        train_time += now - seg_start
                    if pbar is not None:
                        pbar.update(seg_steps)
                        pbar.set_postfix_str(postfix())
                    seg_start, seg_steps = now, 0
                if not ends_eval:
                    continue
                te = time.perf_counter()
                accs, losses = evaluate(eval_step, params, rest, test_batches, n_test)
                # the call's first evaluation compiles the evaluation step: its time would overstate the next ones
                eval_time, evaluated = (time.perf_counter() - te if evaluated else None), True
                parts = []
                for m in active:
                    j = slot[m]
                    final[m] = float(accs[j])
                    best[m] = max(best[m], final[m])
                    history[m].append({"step": step, "epoch": round(step / steps_per_epoch, 3),
                                       "train_loss": round(float(loss_v[j]), 4), "test_acc": round(final[m], 4),
                                       "test_loss": round(float(losses[j]), 4)})
                    name = f"lr {runs[m].lr:.3g}" + (f" s{runs[m].seed}" if show_seed else "")
                    parts.append(f"{name}: {final[m]:.3f}" + (
                        f" (test loss {losses[j]:.3f}, batch loss {loss_v[j]:.3f})" if verbose else ""))
                rate = "" if pbar is not None else f"; {tokens_per_step * step / max(train_time, 1e-9):,.0f} tok/s"
                _say(f"{runs[0].group_key} epoch {step / steps_per_epoch:.2f} (step {step}) test acc  "
                     + ", ".join(parts) + rate, pbar)
                if pbar is not None:
                    pbar.set_postfix_str(postfix())
                done = [m for m in active if final[m] > tc.early_stop_acc]
                if done:
                    finish(done, "early_stop")
                    active = [m for m in active if m not in done]
                    if active and drop_stopped:  # leave the stacked step (recompiles once per size)
                        keep = [slot[m] for m in active]
                        params, opt_state, rest = _take_members((params, opt_state, rest), keep)
                        lrs = lrs[np.asarray(keep)]
                        for j, m in enumerate(active):
                            slot[m] = j
                    elif active:  # stay in, frozen: a zero learning rate leaves the parameters as they are
                        lrs = lrs.at[np.asarray([slot[m] for m in done])].set(0.0)
                if checkpoint is not None and active and time.perf_counter() - saved_at >= tc.checkpoint_every_s:
                    save()  # a killed process (out of memory, a lost machine) resumes from here
                    saved_at = time.perf_counter()
                seg_start = time.perf_counter()
    except KeyboardInterrupt:
        stop = "interrupted"
    if pbar is not None:
        pbar.close()
    if active and stop in RESUMABLE_STOPS and checkpoint is not None:
        try:
            save()
        except RuntimeError as e:  # a deleted (donated) buffer: stopped at once inside a step, or an error there
            kept = "resumes from the last checkpoint" if checkpoint.is_file() else "restarts these runs"
            _say(f"{runs[0].group_key}: no checkpoint of this step ({e}); a rerun {kept}")
    elif checkpoint is not None and checkpoint.is_file():
        checkpoint.unlink()
    finish(active, stop)
    if stop == "interrupted":
        raise KeyboardInterrupt
    return records


def run_record(cfg: MQARConfig, run: Run, mcfg, n_params: int, *, n_train: int, n_test: int, best: float,
               final: float, steps: int, steps_per_epoch: int, stop: str, wall: float, cpu: float,
               tokens_per_s: float, history: list[dict], group_size: int, startup: float) -> dict:
    """The results.jsonl line of one run. ``wall_s``/``cpu_s``/``tokens_per_s`` are those of its group
    (``group_size`` runs trained in one step; ``startup_s``: model set-up, compilation and the first
    steps); ``acc`` is the best test accuracy, ``final_acc`` the last."""
    import jax

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
        "dropout": mcfg.dropout,
        "embed_dropout": mcfg.embed_dropout_rate,
        "weight_decay_on": cfg.train.weight_decay_on,
        "params": n_params,
        "vocab_size": cfg.data.vocab_size,
        "num_train_examples": n_train,
        "num_test_examples": n_test,
        "batch_size": run.point.batch_size,
        "random_non_queries": cfg.data.random_non_queries,
        "acc": round(best, 4),
        "final_acc": round(final, 4),
        "steps": steps,
        "epochs": round(steps / steps_per_epoch, 3),
        "stop": stop,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),  # process CPU time (all threads)
        "tokens_per_s": round(tokens_per_s),
        "group_size": group_size,
        "startup_s": round(startup, 2),
        "history": history,
        "fingerprint": run_fingerprint(cfg, run),
        "backend": jax.default_backend(),
    }


# ---------------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------------


OUTPUT_DIR_RULE = ("Output directory: --out DIR if given, else the config's out_dir, else runs/mqar/<config name>/ "
                   "(results/mqar/<name>/ holds committed results, made with --out).")
EXIT_INCOMPLETE = 75  # `longconv mqar` exit status when a time budget stopped it with runs left (rerun to continue)


def output_dir(cfg: MQARConfig, out: str | None = None) -> pathlib.Path:
    """See OUTPUT_DIR_RULE."""
    return pathlib.Path(out or cfg.out_dir or f"runs/mqar/{cfg.name}")


def latest_records(cfg: MQARConfig, runs: list[Run], results_path: pathlib.Path) -> dict[str, dict]:
    """{run key: the run's last record in results.jsonl with its current settings fingerprint}; a later line
    (e.g. a resumed run's) supersedes an earlier one (e.g. its ``interrupted`` record)."""
    wanted = {r.key: run_fingerprint(cfg, r) for r in runs}
    return {rec["key"]: rec for rec in read_results(results_path)
            if rec.get("key") in wanted and rec.get("fingerprint") == wanted[rec["key"]]}


def is_finished(record: dict | None) -> bool:
    """Whether a run's record ends it (else the run is still to train or to resume)."""
    return record is not None and record.get("stop") in FINAL_STOPS


def worker_shares(workers: int, n_groups: int) -> list[list[int]]:
    """The CPU share of each worker process for config key ``workers`` (see `lm.mqar.workers`), or [] to
    train the groups one after another in this process: on a non-CPU backend, with one group, one worker or
    one CPU."""
    if workers < 2 or n_groups < 2:
        return []
    import jax

    if jax.default_backend() != "cpu":
        _say(f"mqar: workers {workers} ignored on the {jax.default_backend()} backend (one group at a time)")
        return []
    from lm.mqar.workers import cpu_shares

    shares = cpu_shares(min(workers, n_groups))
    if len(shares) < min(workers, n_groups):
        _say(f"mqar: workers {workers} reduced to {len(shares)}, the CPUs this process may use")
    return shares if len(shares) > 1 else []


def train_groups(cfg: MQARConfig, groups: Iterable[list[Run]], out_dir: pathlib.Path, *,
                 deadline: float | None = None, progress: bool = True, verbose: bool = False, on_record=None) -> None:
    """Train ``groups`` (lists of runs, see `group_runs`) one after another in this process with
    `train_group`, generating each (L, P)'s data once. Stops before a group when less than the slowest
    start-up so far is left before ``deadline`` (a ``time.perf_counter()`` value), and after a group cut by
    it."""
    with interrupts_kept():  # a Ctrl-C dropped by a gc callback stops the sweep at the next step
        cache: dict = {}
        startup_s = 0.0  # the slowest group start-up so far (data generation excluded)
        for group in groups:
            pkey = (group[0].point.seq_len, group[0].point.num_kv_pairs)
            if deadline is not None and time.perf_counter() + startup_s + SAVE_RESERVE_S > deadline:
                _say(f"mqar: time budget reached before {group[0].group_key}")
                return
            if pkey not in cache:
                cache.clear()
                t = time.perf_counter()
                cache[pkey] = (make_split(cfg, group[0].point, True), make_split(cfg, group[0].point, False))
                _say(f"mqar: generated L={pkey[0]} P={pkey[1]} data in {time.perf_counter() - t:.1f}s")
            recs = train_group(cfg, group, *cache[pkey], checkpoint=checkpoint_path(out_dir, group),
                               deadline=deadline, progress=progress, verbose=verbose, on_record=on_record)
            startup_s = max([startup_s] + [r["startup_s"] for r in recs])
            if any(r["stop"] == "time_budget" for r in recs):
                _say(f"mqar: time budget reached in {group[0].group_key}")
                return


def sweep(cfg: MQARConfig, out_dir: str | pathlib.Path, *, progress: bool = True, verbose: bool = False,
          report: bool = True, time_budget: float | None = None) -> list[dict]:
    """Train every run of the grid that ``out_dir/results.jsonl`` does not hold as finished, one group of
    runs (`group_runs`) at a time (or config ``workers`` groups at once in CPU worker processes, see
    `lm.mqar.workers`); write the report; return the latest record of every run that has one.

    A run cut by ``time_budget`` (seconds from now) or Ctrl-C gets a ``time_budget``/``interrupted`` record
    and its group's state is kept in ``out_dir/checkpoints/``, so the next call resumes it; Ctrl-C
    re-raises KeyboardInterrupt after the records and the report are written. A group is not started when
    the remaining budget is shorter than the slowest start-up (data, compilation, first steps) seen so far.
    """
    import lm.mixers  # noqa: F401  (registers the mixers)

    start = time.perf_counter()
    deadline = None if time_budget is None else start + time_budget
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    results_path = out_dir / "results.jsonl"
    runs = expand_grid(cfg)
    for r in runs:  # fail fast on bad mixer specs before any training
        model_config_for(cfg, r).validate()
    latest = latest_records(cfg, runs, results_path)
    todo = [r for r in runs if not is_finished(latest.get(r.key))]
    _say(f"mqar: {len(runs)} runs in the grid, {len(runs) - len(todo)} finished in {results_path}, "
         f"{len(todo)} to run in {len(group_runs(todo))} group(s) of runs sharing one step")

    def record(rec: dict) -> None:
        append_result(results_path, rec)
        latest[rec["key"]] = rec
        _say(f"{rec['key']}: acc {rec['acc']:.3f} ({rec['stop']}, {rec['epochs']:.2f} epochs, "
             f"{rec['wall_s']:.0f}s for its group of {rec['group_size']}, {rec['tokens_per_s']:,} tok/s)")

    groups = group_runs(todo)
    shares = worker_shares(cfg.workers, len(groups))
    try:
        if len(shares) > 1:
            from lm.mqar.workers import train_in_workers

            train_in_workers(cfg, groups, out_dir, shares=shares, deadline=deadline, verbose=verbose, on_record=record)
        else:
            train_groups(cfg, groups, out_dir, deadline=deadline, progress=progress, verbose=verbose,
                         on_record=record)
    finally:
        records = [latest[r.key] for r in runs if r.key in latest]
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
    parser.add_argument("--out", default=None, help=OUTPUT_DIR_RULE)
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop cleanly before SECONDS of wall time (checked every few steps); cut runs are "
                             f"checkpointed and a rerun resumes them (exit status {EXIT_INCOMPLETE} while runs remain)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild table.md/plot.png from results.jsonl")
    parser.add_argument("--dry-run", action="store_true", help="list the runs (and which are done) and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="add test and batch loss to the per-evaluation lines")


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
        latest = latest_records(cfg, runs, out / "results.jsonl")
        if args.dry_run:
            for r in runs:
                rec = latest.get(r.key)
                mark = "done" if is_finished(rec) else ("cut " if rec is not None else "todo")
                print(f"{mark}  {r.key}")
            return 0
        print(write_report(cfg, out, [latest[r.key] for r in runs if r.key in latest]))
        return 0
    if args.time_budget is not None and args.time_budget <= 0:
        print(f"error: --time-budget must be > 0 seconds, got {args.time_budget}", file=sys.stderr)
        return 2
    keep_freed_memory()
    try:
        records = sweep(cfg, out, progress=not args.no_progress, verbose=args.verbose, time_budget=args.time_budget)
    except (ConfigError, MQARError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the cut runs are recorded (stop 'interrupted') in {out / 'results.jsonl'}; "
              "rerun the same command to resume them", file=sys.stderr)
        return 130
    print((out / "table.md").read_text())
    print(f"results: {out / 'results.jsonl'}  table: {out / 'table.md'}  plot: {out / 'plot.png'}")
    left = len(expand_grid(cfg)) - sum(is_finished(r) for r in records)
    if left:
        print(f"time budget reached: {left} runs left; rerun the same command to continue", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0
