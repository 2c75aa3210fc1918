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
import contextlib
import dataclasses
import itertools
import math
import pathlib
import sys
import time
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.checkpoint import Checkpointer, CheckpointError, fallback_note, find_checkpoint_dir
from lm.config import ConfigError, save_config, to_dict
from lm.data.config import DataConfig, DataError
from lm.host_memory import keep_freed_memory
from lm.model import LM
from lm.optim import lr_schedule, make_optimizer, model_label_map
from lm.run_config import TrainConfig, TrainerConfig, load_train_config  # noqa: F401 (public names of lm.train)
from lm.sharding import (batch_divisor, batch_sharding, describe, make_mesh, replicated, state_shardings,
                         sync_processes)
from lm.signals import interrupts_deferred, interrupts_kept
from lm.tracking import Tracker


_BARRIER_IDS = itertools.count()  # unique barrier names; every process creates them in the same order


class NonFiniteError(FloatingPointError):
    """The training loss or gradient norm became NaN/inf; no checkpoint is written for that state."""


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
    """step(state, batch) -> (state, metrics) for the split state {"model", "optimizer"}.

    A step whose loss or gradient norm is not finite leaves the parameters and optimizer state as they
    were (only the dropout RNG advances), so the NaN guard can re-run the failing batch on the weights
    that produced it (`Trainer.locate_nonfinite`).
    """

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
        before = jax.tree.map(lambda a: a, (params, nnx.state(optimizer)))  # fresh Variables: not updated below
        model = nnx.merge(gdef, params, rest)
        grad_norm = optax.tree.norm(grads)
        lr = schedule(optimizer.step[...])
        optimizer.update(model, grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                            (nnx.state(model, nnx.Param), nnx.state(optimizer)), before)
        nnx.update(model, kept[0])
        nnx.update(optimizer, kept[1])
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


def evaluate_batches(eval_step, model_state, data, max_batches: int = 0) -> dict[str, Any]:
    """Token-weighted validation metrics of ``model_state`` on ``data``'s validation split.

    ``eval_step(model_state, batch) -> (loss sum, positions)`` (`make_eval_step`); batches come from
    ``data.val_batches(pad=True)``, which scores every target position of the split once. Returns {} when
    there is no validation data, else {"loss" (nats/token), "ppl", "tokens" (positions scored), "batches",
    "whole_split" (False when ``max_batches`` > 0 stopped it early), "bits_per_byte"?, "bits_per_char"?}.
    """
    total = count = 0.0
    batches, whole = 0, True
    for batch in data.val_batches(pad=True):
        if max_batches and batches == max_batches:
            whole = False
            break
        s, c = eval_step(model_state, batch)
        total, count, batches = total + float(s), count + float(c), batches + 1
    if count == 0:
        return {}
    loss = total / count
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(count), "batches": batches,
           "whole_split": whole}
    bytes_per_token = getattr(data, "val_bytes_per_token", None)
    chars_per_token = getattr(data, "val_chars_per_token", None)
    if bytes_per_token:
        out["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    if chars_per_token:
        out["bits_per_char"] = loss / math.log(2) / chars_per_token
    return out


def eval_summary(ev: dict[str, Any]) -> str:
    """"val loss 1.2345 (whole split, 11,153 positions), ppl 3.44, bpc 1.781" or "... (10 batches) ..."."""
    scope = (f"whole split, {ev['tokens']:,} positions" if ev["whole_split"]
             else f"{ev['batches']} batch{'es' if ev['batches'] != 1 else ''}, {ev['tokens']:,} positions")
    extra = f", bpc {ev['bits_per_char']:.3f}" if "bits_per_char" in ev else ""
    return f"val loss {ev['loss']:.4f} ({scope}), ppl {ev['ppl']:.2f}{extra}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class _Progress:
    """What `Trainer.fit` shows while training, and its clock.

    ``mode`` "bar": a tqdm bar (stderr is a terminal); "lines": one plain log line per log interval
    (step, loss, tokens/s, ETA); None: nothing. The clock starts when the first step has finished, so
    compilation stays out of tokens/s and the ETA, and time inside `paused()` (evaluation, checkpoints,
    hooks) is left out too.
    """

    def __init__(self, mode: str | None, end: int, tokens_per_step: int, log: Callable[[str], None]):
        self.mode, self.end, self.tokens_per_step, self.log = mode, end, tokens_per_step, log
        self.bar = None
        self.t_first = self.t_mark = None  # perf_counter at the end of the first step / of the last window
        self.s_first = self.s_mark = 0
        self.paused_s = self.paused_total_s = 0.0

    def start(self, step: int, first_step_s: float) -> None:
        """The first step (``step``) has finished after ``first_step_s`` seconds, compilation included."""
        self.t_first = self.t_mark = time.perf_counter()
        self.s_first = self.s_mark = step
        self.paused_s = 0.0
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.end, initial=step, desc="train", dynamic_ncols=True, leave=True)
        self.write(f"step {step}/{self.end}: first step took {first_step_s:.1f} s (compilation included)")

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent inside this block out of tokens/s and the ETA."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def interval_rate(self, step: int) -> float | None:
        """Tokens/s since the previous call (None before the clock starts or over no steps)."""
        if self.t_mark is None or step == self.s_mark:
            return None
        now = time.perf_counter()
        rate = self.tokens_per_step * (step - self.s_mark) / max(now - self.t_mark - self.paused_s, 1e-9)
        self.paused_total_s += self.paused_s
        self.t_mark, self.s_mark, self.paused_s = now, step, 0.0
        return rate

    def show(self, step: int, loss: float, tokens_per_s: float | None) -> None:
        if self.bar is not None:
            postfix = {"loss": f"{loss:.4f}"}
            if tokens_per_s is not None:
                postfix["tok_s"] = f"{tokens_per_s:,.0f}"
            self.bar.set_postfix(postfix, refresh=False)
        elif self.mode == "lines":
            msg = f"step {step}/{self.end}: loss {loss:.4f}"
            if tokens_per_s is not None:
                train_s = self.t_mark - self.t_first - self.paused_total_s
                eta = (self.end - step) * train_s / (self.s_mark - self.s_first)
                msg += f", {tokens_per_s:,.0f} tokens/s, ETA {_duration(eta)}"
            self.log(msg)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        elif self.mode == "lines":
            self.log(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
        damaged = []  # newer steps that could not be read (resuming falls back past them)
        try:
            with jax.set_mesh(self.mesh):
                if latest is not None:
                    self.state, meta, damaged = self.ckpt.restore_newest(abstract, shardings=self.state_shardings)
                    self.step = int(meta["step"])
                    if tc.steps < self.step:
                        raise ConfigError(f"config key 'trainer.steps' ({tc.steps}) is below the step the run in "
                                          f"{self.run_dir} is already at ({self.step}); give more steps or a new "
                                          "--run-dir")
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

        # Only now write into the run directory (damaged steps are renamed, never deleted, so that this
        # run can write those steps again and they do not count towards keep_checkpoints).
        if damaged:
            moved = self.ckpt.set_aside([e.step for e in damaged])
            self.log(fallback_note(damaged, self.step, kept="kept as " + ", ".join(p.name for p in moved)))
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            if not (tok_dir / "tokenizer.json").exists():
                self.tokenizer.save(tok_dir)
        self.tracker = Tracker(self.run_dir, cfg.tracker, to_dict(cfg))
        if self.resumed_from is not None:
            self.tracker.truncate_after(self.step)
        self._pending: list[tuple[int, dict, dict]] = []  # (step, metrics, loader position before it)
        self._programs: dict[str, Any] = {}  # name -> ahead-compiled step (multi-process only)
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
            params, meta, damaged = src.restore_newest(target, prefix="model.", strict=False)  # target's shardings
        finally:
            src.close()
        if damaged:
            self.log(f"initialize_from: {fallback_note(damaged, meta['step'])}")
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

    def _program(self, name: str, jitted, *args):
        """``jitted`` with one process. With several: compiled ahead, once per ``name``, for ``args``' shapes,
        after which all processes meet at a barrier, so none starts the program's collectives while another
        is still compiling it (JAX's CPU collectives give a late peer only 30 s)."""
        if jax.process_count() == 1:
            return jitted
        if name not in self._programs:
            self._programs[name] = jitted.lower(*args).compile()
            sync_processes(f"longconv_{name}_compiled_{next(_BARRIER_IDS)}")
        return self._programs[name]

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[longconv train] {msg}", file=sys.stderr, flush=True)

    def locate_nonfinite(self, step: int, data_state: dict) -> str:
        """Re-run step ``step``'s batch (drawn from loader position ``data_state``) on the current weights,
        checking each layer's activations (`LM.locate_nonfinite`); a phrase naming the first non-finite one.

        The train step keeps the weights of a non-finite step, so after a failure they are the weights
        that produced it (unless later finite steps have since updated them).
        """
        self.data.restore(data_state)
        inputs = _unpack(self.data.next_batch())[0]
        model = self.model
        model.eval()  # no dropout: a deterministic re-run
        with jax.set_mesh(self.mesh):
            where = model.locate_nonfinite(inputs)
        if where is not None:
            return f"first non-finite activation in {where} when re-running step {step}'s batch"
        return (f"re-running step {step}'s batch gives finite activations in every layer (so the non-finite value "
                "came from the backward pass or the update)")

    def _flush(self) -> dict[str, float] | None:
        """Fetch pending step metrics, check them, log them; returns the latest."""
        if not self._pending:
            return None
        fetched = jax.device_get(self._pending)
        self._pending = []
        for step, m, data_before in fetched:
            m = {k: float(v) for k, v in m.items()}
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                last = self.ckpt.latest_step()
                try:
                    where = self.locate_nonfinite(step, data_before)
                except Exception as e:  # noqa: BLE001 - the diagnosis must not hide the failure itself
                    where = f"could not re-run step {step}'s batch to locate it ({type(e).__name__}: {e})"
                raise NonFiniteError(
                    f"non-finite training loss/gradient at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
                    f"{where}; stopping without saving. Last good checkpoint: "
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

    def evaluate(self, max_batches: int | None = None) -> dict[str, Any]:
        """`evaluate_batches` of the current model on at most ``max_batches`` validation batches
        (default ``trainer.eval_steps``; 0 = the whole split)."""
        max_batches = self.cfg.trainer.eval_steps if max_batches is None else max_batches
        with jax.set_mesh(self.mesh):
            def eval_step(model_state, batch):
                return self._program("eval_step", self._eval_step, model_state, batch)(model_state, batch)

            return evaluate_batches(eval_step, self.state["model"], self.data, max_batches)

    # -- loop --------------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until ``trainer.steps`` (or stop early at step ``max_steps``, checkpointing there).

        The evaluation at ``trainer.steps`` covers the whole validation split; periodic ones use
        ``trainer.eval_steps`` batches and are labelled so. Raises ConfigError when the run is already
        past ``max_steps``.
        """
        tc = self.cfg.trainer
        if max_steps is not None and max_steps < self.step:
            raise ConfigError(f"cannot stop at step {max_steps} (--stop-at): the run in {self.run_dir} is already "
                              f"at step {self.step}; give a later step or a new --run-dir")
        end = tc.steps if max_steps is None else min(max_steps, tc.steps)
        self.log(f"{describe(self.mesh)}; {self.n_params:,} parameters; "
                 f"{'resuming at step ' + str(self.step) if self.resumed_from is not None else 'fresh start'}; "
                 f"run dir {self.run_dir}")
        mode = None
        if tc.progress and self.is_main:
            mode = "bar" if sys.stderr.isatty() else "lines"
        progress = _Progress(mode, end, self.cfg.data.batch_size * self.cfg.data.block_size, self.log)
        first_step = self.step + 1
        t_start = time.perf_counter()
        try:
            with jax.set_mesh(self.mesh), interrupts_kept():  # kept: a Ctrl-C dropped by a gc callback
                while self.step < end:
                    batch = self.data.next_batch()
                    # The step donates the state: an interrupt acts once the new state, step and data
                    # position are all set.
                    with interrupts_deferred():
                        new_leaves, metrics = self._program("train_step", self._train_step, self._state_leaves,
                                                            batch)(self._state_leaves, batch)
                        data_before = self._data_state
                        self._state_leaves, self.step, self._data_state = new_leaves, self.step + 1, self.data.state()
                    self._pending.append((self.step, metrics, data_before))
                    s = self.step
                    if s == first_step:  # compiled and ran: start the clock for tokens/s and the ETA here
                        jax.block_until_ready(self._state_leaves)
                        progress.start(s, time.perf_counter() - t_start)
                    if (tc.log_every and s % tc.log_every == 0) or s == end:
                        m = self._flush()
                        tps = progress.interval_rate(s)
                        self.tracker.log(s, {**m, **({"tokens_per_s": tps} if tps is not None else {}),
                                             "tokens": s * progress.tokens_per_step})
                        progress.show(s, m["loss"], tps)
                    progress.advance(s)
                    with progress.paused():  # evaluation, checkpoints and hooks stay out of tokens/s
                        final = s == tc.steps
                        if final or (tc.eval_every and s % tc.eval_every == 0):
                            ev = self.evaluate(max_batches=0 if final else None)
                            if ev:
                                self.last_eval = ev
                                self.tracker.log(s, ev, split="eval")
                                progress.write(f"step {s}: {eval_summary(ev)}")
                        if (tc.checkpoint_every and s % tc.checkpoint_every == 0) or s == end:
                            self.save()
                        for every, fn in self.hooks:
                            every = every or tc.hooks_every
                            if every and s % every == 0:
                                fn(s, self._flush() or self.last_metrics, self)
        except KeyboardInterrupt:
            if any(leaf.is_deleted() for leaf in jax.tree.leaves(self._state_leaves) if isinstance(leaf, jax.Array)):
                # stopped at once inside a step (a repeated signal): the state it was given was donated
                self.log(f"interrupted inside step {self.step + 1}; its input state is gone (donated), so no "
                         f"checkpoint: the last one (step {self.ckpt.latest_step()}) stays")
                raise
            self.log(f"interrupted at step {self.step}; saving a checkpoint")
            self.save()
            self.ckpt.wait()
            raise
        finally:
            progress.close()
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
    parser.add_argument("--heartbeat-timeout", type=int, default=None,
                        help="seconds without a heartbeat after which the other processes declare one dead "
                             "and abort (with --distributed; JAX's default is 100)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=100 optimizer.lr=1e-3")


def main(args: argparse.Namespace) -> int:
    if args.distributed or args.coordinator:
        timeouts = {} if args.heartbeat_timeout is None else {"heartbeat_timeout_seconds": args.heartbeat_timeout}
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, **timeouts)
    run_dir = pathlib.Path(args.run_dir) if args.run_dir else None
    config_path = args.config
    if config_path is None:
        if run_dir is None or not (run_dir / "config.yaml").exists():
            print("error: give --config FILE (or --run-dir of an existing run)", file=sys.stderr)
            return 2
        config_path = run_dir / "config.yaml"
    if run_dir is None:
        run_dir = pathlib.Path("runs") / pathlib.Path(config_path).stem
    keep_freed_memory()
    try:
        cfg = load_train_config(config_path, args.overrides)
        result = train(cfg, run_dir, max_steps=args.stop_at)
    except (ConfigError, DataError, CheckpointError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: rerun `longconv train --run-dir {run_dir}` to resume from its last checkpoint",
              file=sys.stderr)
        return 130
    if jax.process_index() == 0:
        msg = f"done: step {result['step']}"
        if result["train"]:
            msg += f", train loss {result['train']['loss']:.4f}"
        else:
            msg += " (nothing to train: the run was already there)"
        if result["eval"]:
            msg += f", {eval_summary(result['eval'])}"
        print(msg)
    return 0
