"""Pretraining: `TrainConfig`, the `Trainer`, `train(cfg, run_dir)` and the `longconv train` command.

    longconv train --config configs/lm/tinyshakespeare_hyena.yaml --run-dir runs/ts_hyena trainer.steps=2000

A run directory holds ``config.yaml``, ``tokenizer/``, ``metrics.jsonl`` and ``checkpoints/``. Running
`longconv train` on a directory that already has checkpoints resumes from the latest one (parameters,
optimizer state, step, dropout RNG state and data-loader position), so an interrupted run continues on
the identical loss trajectory; without ``--config`` the run's own ``config.yaml`` is used.

The step is one `jax.jit` over the split NNX state ``{"model": ..., "optimizer": ...}`` with the state
donated and explicit in/out shardings from `lm.sharding` (data parallel over ("data", "fsdp"), parameters
and optimizer moments sharded over "fsdp"). Gradient accumulation: the global batch
(``data.batch_size`` rows) is split into ``trainer.grad_accum`` micro-batches whose gradients are
summed in a ``lax.scan`` and averaged before a single optimizer update, so accumulation changes memory,
not the math (accum 2 with batch 2b equals accum 1 with batch 2b up to float round-off).
``trainer.precision: bf16`` computes activations in bfloat16 while parameters, optimizer state, the
loss and long convolutions stay fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import time
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm.checkpoint import Checkpointer, CheckpointError, find_checkpoint_dir
from lm.config import ConfigError, from_dict, load_config, read_yaml, apply_overrides, save_config, to_dict
from lm.data.config import DataConfig, DataError
from lm.model import LM, ModelConfig
from lm.optim import OptimizerConfig, lr_schedule, make_optimizer, model_label_map
from lm.sharding import MeshConfig, batch_divisor, batch_sharding, describe, make_mesh, replicated, state_shardings
from lm.tracking import Tracker, TrackerConfig, read_metrics


class NonFiniteError(FloatingPointError):
    """The training loss or gradient norm became NaN/inf; no checkpoint is written for that state."""


@dataclasses.dataclass
class TrainerConfig:
    """Loop settings. ``eval_every``/``checkpoint_every``/``log_every``/``hooks_every`` of 0 disable the
    periodic action (eval and a checkpoint still happen at the end)."""

    steps: int = 1000
    eval_every: int = 500
    eval_steps: int = 50  # validation batches per evaluation (0 = the whole validation set)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    hooks_every: int = 100
    grad_accum: int = 1
    seed: int = 0
    precision: str | None = None  # "fp32" | "bf16" (bf16 compute, fp32 params); null = model.dtype
    async_checkpointing: bool = True
    progress: bool = True  # tqdm bar on process 0

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"config key 'trainer.steps' must be >= 1, got {self.steps}")
        for key in ("eval_every", "eval_steps", "checkpoint_every", "log_every", "hooks_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'trainer.{key}' must be >= 0, got {getattr(self, key)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"config key 'trainer.keep_checkpoints' must be >= 1, got {self.keep_checkpoints}")
        if self.grad_accum < 1:
            raise ConfigError(f"config key 'trainer.grad_accum' must be >= 1, got {self.grad_accum}")
        if self.precision not in (None, "fp32", "bf16"):
            raise ConfigError(f"config key 'trainer.precision' must be 'fp32' or 'bf16', got {self.precision!r}")


@dataclasses.dataclass
class TrainConfig:
    """A whole pretraining run (the YAML file of `longconv train`)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(source="(unset)"))
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    tracker: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    initialize_from: str | None = None  # a run dir / checkpoints dir: load its weights only

    def validate(self) -> None:
        if self.data.source == "(unset)":
            raise ConfigError("config key 'data.source' is required (a local text file/directory or a hub dataset name)")
        if self.data.block_size > self.model.max_len:
            raise ConfigError(
                f"config key 'data.block_size' ({self.data.block_size}) exceeds 'model.max_len' ({self.model.max_len})")
        if self.data.batch_size % self.trainer.grad_accum:
            raise ConfigError(f"config key 'data.batch_size' ({self.data.batch_size}) must be divisible by "
                              f"'trainer.grad_accum' ({self.trainer.grad_accum})")
        if self.trainer.precision is not None:
            self.model.dtype = "bfloat16" if self.trainer.precision == "bf16" else "float32"


def load_train_config(path: str | pathlib.Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                      base: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from a YAML file (or ``base`` dict) with dotted overrides; errors are ConfigError."""
    data = read_yaml(path) if path is not None else dict(base or {})
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)))


# ---------------------------------------------------------------------------------------------
# Hooks


class Hook(Protocol):
    """Called every ``every`` steps (default ``trainer.hooks_every``) with the latest train metrics."""

    def __call__(self, step: int, metrics: dict[str, float], trainer: "Trainer") -> None: ...


# ---------------------------------------------------------------------------------------------
# Loss and steps


def _unpack(batch):
    """(inputs, targets, mask-or-None) from a data-layer batch dict, a pair, or a (B, L+1) block array."""
    if isinstance(batch, dict):
        return batch["inputs"], batch["targets"], batch.get("mask")
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1], None
    return batch[:, :-1], batch[:, 1:], None


def token_losses(model: LM, inputs, targets):
    logits = model(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def _micro_split(x, accum: int):
    """(B, ...) -> (accum, B/accum, ...) with micro-batch i = rows i::accum (keeps each device's rows)."""
    b = x.shape[0]
    return x.reshape((b // accum, accum) + x.shape[1:]).swapaxes(0, 1)


def make_train_step(graphdef_model, graphdef_opt, accum: int, schedule):
    """step(state, batch) -> (state, metrics) for the split state {"model", "optimizer"}."""

    def step(state, batch):
        model = nnx.merge(graphdef_model, state["model"])
        model.train()
        optimizer = nnx.merge(graphdef_opt, state["optimizer"])
        gdef, params, rest = nnx.split(model, nnx.Param, ...)
        inputs, targets, _ = _unpack(batch)  # training rows are all real (mask is 1)

        def loss_fn(p, r, x, y):
            # Fresh Variable objects at this trace level (merging the outer ones would make dropout's
            # RNG counter update fail with a TraceContextError).
            p, r = jax.tree.map(lambda a: a, (p, r))
            m = nnx.merge(gdef, p, r)
            loss = token_losses(m, x, y).mean()
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:
            (loss, rest), grads = grad_fn(params, rest, inputs, targets)
        else:
            xs = (_micro_split(inputs, accum), _micro_split(targets, accum))
            zeros = jax.tree.map(jnp.zeros_like, params)

            def body(carry, xy):
                r, gsum, lsum = carry
                (l, r), g = grad_fn(params, r, *xy)
                return (r, jax.tree.map(jnp.add, gsum, g), lsum + l), None

            (rest, grads, loss), _ = jax.lax.scan(body, (rest, zeros, jnp.zeros((), jnp.float32)), xs)
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss = loss / accum
        model = nnx.merge(gdef, params, rest)
        grad_norm = optax.tree.norm(grads)
        lr = schedule(optimizer.step[...])
        optimizer.update(model, grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr}
        return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, metrics

    return step


def make_eval_step(graphdef_model):
    """eval(model_state, batch) -> (sum of token losses, number of tokens)."""

    def step(model_state, batch):
        model = nnx.merge(graphdef_model, model_state)
        model.eval()
        inputs, targets, mask = _unpack(batch)
        losses = token_losses(model, inputs, targets)
        if mask is None:
            mask = jnp.ones_like(losses)
        return (losses * mask).sum(), mask.sum()

    return step


# ---------------------------------------------------------------------------------------------
# Trainer


def _resolve_path(p: str) -> str:
    """Relative local paths: as given if they exist from the CWD, else relative to the repo root."""
    if not p or p.startswith("/") or "://" in p:
        return p
    cand = pathlib.Path(p).expanduser()
    if cand.exists():
        return str(cand)
    alt = pathlib.Path(__file__).resolve().parent.parent / p
    return str(alt) if alt.exists() else p


def resolve_data_paths(data: DataConfig) -> DataConfig:
    """A copy of ``data`` with its local source / validation / tokenizer paths resolved (`_resolve_path`)."""
    out = dataclasses.replace(data, source=_resolve_path(data.source))
    if out.val_split:
        out.val_split = _resolve_path(out.val_split)
    if out.tokenizer.path:
        out.tokenizer = dataclasses.replace(out.tokenizer, path=_resolve_path(out.tokenizer.path))
    return out


class Trainer:
    """Builds data, model, optimizer, mesh and checkpoints for ``cfg`` in ``run_dir``; `fit()` trains.

    If ``run_dir/checkpoints`` holds a checkpoint, the trainer resumes from its latest step; otherwise
    it starts fresh (from ``cfg.initialize_from``'s weights when set). Nothing in ``run_dir`` is
    written until data, model and any checkpoint have loaded successfully.
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | pathlib.Path, hooks: list | tuple = (),
                 resume: bool = True, data: Any = None):
        self.cfg = cfg
        self.run_dir = pathlib.Path(run_dir)
        self.is_main = jax.process_index() == 0
        self.hooks: list[tuple[int, Callable]] = []
        for h in hooks:
            self.add_hook(*(h if isinstance(h, tuple) else (h,)))
        tc = cfg.trainer

        # Mesh and data (errors here leave the run dir untouched).
        self.mesh = make_mesh(cfg.mesh)
        div = batch_divisor(self.mesh)
        if cfg.data.batch_size % div or (cfg.data.batch_size // tc.grad_accum) % div:
            raise ConfigError(
                f"config key 'data.batch_size' ({cfg.data.batch_size}) / grad_accum ({tc.grad_accum}) must be a "
                f"multiple of the data x fsdp mesh size ({div})")
        self.batch_sharding = batch_sharding(self.mesh)
        tok_dir = self.run_dir / "tokenizer"
        data_cfg = resolve_data_paths(cfg.data)
        if data is None:
            from lm.data import build_data  # the data layer (loader, tokenizer, validation)

            data = build_data(data_cfg, sharding=self.batch_sharding,
                              tokenizer_path=tok_dir if (tok_dir / "tokenizer.json").exists() else None)
        self.data = data
        self.tokenizer = self.data.tokenizer
        if cfg.model.vocab_size != self.tokenizer.vocab_size:
            # The model's vocabulary follows the tokenizer (recorded in the saved config.yaml).
            cfg.model.vocab_size = int(self.tokenizer.vocab_size)

        # Model + optimizer, created directly with their shardings.
        seed = tc.seed

        def build_model():
            return LM(cfg.model, rngs=nnx.Rngs(seed))

        abs_model = nnx.eval_shape(build_model)
        self.label_map = model_label_map(abs_model)
        self.tx = make_optimizer(cfg.optimizer, tc.steps, self.label_map)
        self.schedule = lr_schedule(cfg.optimizer, tc.steps)

        def build():
            model = build_model()
            opt = nnx.Optimizer(model, self.tx, wrt=nnx.Param)
            return model, opt

        abs_model, abs_opt = nnx.eval_shape(build)
        self.graphdef_model, abs_mstate = nnx.split(abs_model)
        self.graphdef_opt, abs_ostate = nnx.split(abs_opt)
        abstract = {"model": abs_mstate, "optimizer": abs_ostate}
        self.state_shardings = state_shardings(abstract, self.mesh, cfg.mesh.min_shard_size)
        self.abstract_state = abstract
        self.n_params = int(sum(x.size for x in jax.tree.leaves(nnx.state(abs_model, nnx.Param))))

        # The step takes and returns the state as its flat list of arrays (`state` rebuilds the tree):
        # flattening the NNX Variables on the host every call costs milliseconds on a tiny model.
        step = make_train_step(self.graphdef_model, self.graphdef_opt, tc.grad_accum, self.schedule)
        leaf_shardings = jax.tree.leaves(self.state_shardings)

        def flat_step(leaves, batch):
            state, metrics = step(jax.tree.unflatten(self._state_def, leaves), batch)
            return jax.tree.leaves(state), metrics

        self._train_step = jax.jit(
            flat_step,
            in_shardings=(leaf_shardings, self.batch_sharding),
            out_shardings=(leaf_shardings, replicated(self.mesh)),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            make_eval_step(self.graphdef_model),
            in_shardings=(self.state_shardings["model"], self.batch_sharding),
            out_shardings=replicated(self.mesh),
        )

        # Checkpoints: resume, initialise from another run, or start fresh.
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", keep=tc.keep_checkpoints,
                                 async_save=tc.async_checkpointing)
        self.step = 0
        latest = self.ckpt.latest_step() if resume else None
        try:
            with jax.set_mesh(self.mesh):
                if latest is not None:
                    self.state, meta = self.ckpt.restore(abstract, step=latest, shardings=self.state_shardings)
                    self.step = int(meta["step"])
                    if "data" in meta:
                        self.data.restore(meta["data"])
                    self.resumed_from = self.step
                else:
                    init = jax.jit(lambda: dict(zip(("model", "optimizer"), (nnx.state(x) for x in build()))),
                                   out_shardings=self.state_shardings)
                    self.state = init()
                    self.resumed_from = None
                    if cfg.initialize_from:
                        self._initialize_from(cfg.initialize_from)
        except BaseException:
            self.ckpt.close()
            raise

        # Data-loader position matching self.step (the loader runs one batch ahead while a step is in
        # flight, so checkpoints record this, not the loader's live position).
        self._data_state = self.data.state()

        # Only now write into the run directory.
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            if not (tok_dir / "tokenizer.json").exists():
                self.tokenizer.save(tok_dir)
        self.tracker = Tracker(self.run_dir, cfg.tracker, to_dict(cfg))
        if self.resumed_from is not None:
            self.tracker.truncate_after(self.step)
        self._pending: list[tuple[int, dict]] = []
        self.last_metrics: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}

    # -- pieces ------------------------------------------------------------------------------
    def add_hook(self, fn: Callable, every: int | None = None) -> None:
        """Register ``fn(step, metrics, trainer)`` to run every ``every`` steps (default hooks_every)."""
        self.hooks.append((every, fn))

    def _initialize_from(self, path: str) -> None:
        src = Checkpointer(find_checkpoint_dir(_resolve_path(path)), keep=None, read_only=True)
        target = nnx.state(nnx.merge(self.graphdef_model, self.state["model"]), nnx.Param)
        try:
            params, meta = src.restore(target, prefix="model.", strict=False)  # keeps target's shardings
        finally:
            src.close()
        model = nnx.merge(self.graphdef_model, self.state["model"])
        nnx.update(model, params)
        self.state = {"model": nnx.state(model), "optimizer": self.state["optimizer"]}
        self.log(f"initialized weights from {path} (step {meta['step']})")

    @property
    def state(self) -> dict[str, Any]:
        """The split NNX state {"model": ..., "optimizer": ...} (stored as the step's flat leaves)."""
        return jax.tree.unflatten(self._state_def, self._state_leaves)

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self._state_leaves, self._state_def = jax.tree.flatten(value)

    @property
    def model(self) -> LM:
        """The current model (a view on the train state; call .eval() before inference)."""
        return nnx.merge(self.graphdef_model, self.state["model"])

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[longconv train] {msg}", file=sys.stderr, flush=True)

    def _flush(self) -> dict[str, float] | None:
        """Fetch pending step metrics, check them, log them; returns the latest."""
        if not self._pending:
            return None
        fetched = jax.device_get(self._pending)
        self._pending = []
        for step, m in fetched:
            m = {k: float(v) for k, v in m.items()}
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                last = self.ckpt.latest_step()
                raise NonFiniteError(
                    f"non-finite training loss/gradient at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
                    f"stopping without saving. Last good checkpoint: "
                    f"{'step ' + str(last) if last is not None else 'none'} in {self.ckpt.directory}. "
                    "Try a lower optimizer.lr, optimizer.grad_clip, or trainer.precision=fp32.")
            self.last_metrics = m
        return self.last_metrics

    def save(self) -> None:
        """Checkpoint the current state (after checking the pending metrics are finite)."""
        self._flush()
        if self.ckpt.latest_step() == self.step:
            return
        self.ckpt.save(self.step, self.state, {"data": self._data_state, "n_params": self.n_params})

    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Validation loss (nats/token), perplexity and bits per byte / char."""
        max_batches = self.cfg.trainer.eval_steps if max_batches is None else max_batches
        total = count = 0.0
        with jax.set_mesh(self.mesh):
            for batch in self.data.val_batches(max_batches=max_batches or None, pad=True):
                s, c = self._eval_step(self.state["model"], batch)
                total, count = total + float(s), count + float(c)
        if count == 0:
            return {}
        loss = total / count
        out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}
        bpt = getattr(self.data, "val_bytes_per_token", None)
        cpt = getattr(self.data, "val_chars_per_token", None)
        if bpt:
            out["bits_per_byte"] = loss / math.log(2) / bpt
        if cpt:
            out["bits_per_char"] = loss / math.log(2) / cpt
        return out

    # -- loop --------------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until ``trainer.steps`` (or stop early at step ``max_steps``, checkpointing there)."""
        tc = self.cfg.trainer
        end = tc.steps if max_steps is None else min(max_steps, tc.steps)
        tokens_per_step = self.cfg.data.batch_size * self.cfg.data.block_size
        self.log(f"{describe(self.mesh)}; {self.n_params:,} parameters; "
                 f"{'resuming at step ' + str(self.step) if self.resumed_from is not None else 'fresh start'}; "
                 f"run dir {self.run_dir}")
        bar = None
        if tc.progress and self.is_main and self.step < end:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.step, desc="train", dynamic_ncols=True, leave=True)
        t_last, steps_last = time.perf_counter(), self.step
        t_start = time.perf_counter()
        try:
            with jax.set_mesh(self.mesh):
                while self.step < end:
                    batch = self.data.next_batch()
                    new_leaves, metrics = self._train_step(self._state_leaves, batch)
                    # One statement: an interrupt never leaves the state, step and data position apart.
                    self._state_leaves, self.step, self._data_state = new_leaves, self.step + 1, self.data.state()
                    self._pending.append((self.step, metrics))
                    s = self.step
                    if (tc.log_every and s % tc.log_every == 0) or s == end:
                        m = self._flush()
                        now = time.perf_counter()
                        tps = tokens_per_step * (s - steps_last) / max(now - t_last, 1e-9)
                        t_last, steps_last = now, s
                        self.tracker.log(s, {**m, "tokens_per_s": tps, "tokens": s * tokens_per_step})
                        if bar is not None:
                            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
                    if bar is not None:
                        bar.update(1)
                    if (tc.eval_every and s % tc.eval_every == 0) or s == tc.steps:
                        ev = self.evaluate()
                        if ev:
                            self.last_eval = ev
                            self.tracker.log(s, ev, split="eval")
                            if bar is not None:
                                bar.write(f"step {s}: val loss {ev['loss']:.4f}"
                                          + (f", bpc {ev['bits_per_char']:.3f}" if "bits_per_char" in ev else ""))
                    if (tc.checkpoint_every and s % tc.checkpoint_every == 0) or s == end:
                        self.save()
                    for every, fn in self.hooks:
                        every = every or tc.hooks_every
                        if every and s % every == 0:
                            fn(s, self._flush() or self.last_metrics, self)
        except KeyboardInterrupt:
            self.log(f"interrupted at step {self.step}; saving a checkpoint")
            self.save()
            self.ckpt.wait()
            raise
        finally:
            if bar is not None:
                bar.close()
            self.ckpt.wait()
        wall = time.perf_counter() - t_start
        return {"step": self.step, "train": self.last_metrics, "eval": self.last_eval, "wall_s": wall}

    def close(self) -> None:
        self.ckpt.close()
        self.tracker.close()


def train(cfg: TrainConfig, run_dir: str | pathlib.Path, hooks=(), max_steps: int | None = None) -> dict[str, Any]:
    """Build a Trainer for ``cfg`` in ``run_dir`` (resuming if it has checkpoints) and train it."""
    trainer = Trainer(cfg, run_dir, hooks=hooks)
    try:
        return trainer.fit(max_steps=max_steps)
    finally:
        trainer.close()


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML run config (default: RUN_DIR/config.yaml when resuming)")
    parser.add_argument("--run-dir", "-o", help="run directory (default: runs/<config name>)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop (with a checkpoint) at this step without changing the schedule")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host; auto-detects SLURM/TPU/MPI "
                             "clusters, otherwise give the three options below)")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (with --distributed)")
    parser.add_argument("--num-processes", type=int, default=None, help="number of processes/hosts")
    parser.add_argument("--process-id", type=int, default=None, help="this process's index, 0-based")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=100 optimizer.lr=1e-3")


def main(args: argparse.Namespace) -> int:
    if args.distributed or args.coordinator:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    run_dir = pathlib.Path(args.run_dir) if args.run_dir else None
    config_path = args.config
    if config_path is None:
        if run_dir is None or not (run_dir / "config.yaml").exists():
            print("error: give --config FILE (or --run-dir of an existing run)", file=sys.stderr)
            return 2
        config_path = run_dir / "config.yaml"
    if run_dir is None:
        run_dir = pathlib.Path("runs") / pathlib.Path(config_path).stem
    try:
        cfg = load_train_config(config_path, args.overrides)
        result = train(cfg, run_dir, max_steps=args.stop_at)
    except (ConfigError, DataError, CheckpointError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        ev = result["eval"]
        msg = f"done: step {result['step']}, train loss {result['train'].get('loss', float('nan')):.4f}"
        if ev:
            msg += f", val loss {ev['loss']:.4f} (ppl {ev['ppl']:.2f})"
        print(msg)
    return 0
