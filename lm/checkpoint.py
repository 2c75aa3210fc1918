"""Checkpoints with orbax: exact resume, weights-only initialisation, and `load_run` for other tools.

Layout of a run directory::

    run_dir/config.yaml          the full TrainConfig (as trained)
    run_dir/tokenizer/           the tokenizer (lm.data save/load)
    run_dir/metrics.jsonl        train/eval metrics, one JSON object a line
    run_dir/checkpoints/<step>/  orbax step directories: items "state" (arrays) and "meta" (JSON)

The "state" item is a *flat* dict ``{"model.blocks.0.mixer.in_proj.kernel": array, ...,
"optimizer.opt_state....": array}`` covering everything in ``nnx.state(model)`` (parameters, dropout
RNG keys and counters) and ``nnx.state(optimizer)`` (step, AdamW moments). Typed PRNG keys are stored
as their raw ``key_data``. The "meta" item holds the step, every array's shape and dtype, the data
loader position and free-form extras.

Writes are atomic: orbax writes into a temporary directory and renames it when complete, so a crash
mid-save (an async save included) leaves only that temporary directory, which the next writable
`Checkpointer` removes; ``keep`` bounds how many committed steps are kept. Before any array is read,
the saved shapes are compared with the model being restored and a mismatch raises `CheckpointError`
naming the first differing parameter (nothing is written in that case).

Damaged steps: a committed step whose files cannot be read (a truncated array file, corrupt metadata)
raises `DamagedCheckpointError`. `Checkpointer.restore_newest` (used to resume training and by
`load_run` when no step is asked for) then falls back to the newest step that restores and reports the
skipped steps; nothing here deletes them. Training moves a skipped step aside to
``checkpoints/<step>.damaged`` (`Checkpointer.set_aside`) so it can write that step again; a set-aside
step is no longer a checkpoint, so it does not count towards ``keep`` and is never removed.
"""

from __future__ import annotations

import logging
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lm.params import path_names
from lm.run_config import TrainConfig, load_train_config


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model; the message says which."""


class DamagedCheckpointError(CheckpointError):
    """A committed checkpoint step exists but its files cannot be read (truncated or corrupt)."""

    def __init__(self, step: int, reason: str, directory: pathlib.Path):
        self.step, self.reason = int(step), reason
        super().__init__(f"checkpoint step {step} in {directory} cannot be restored: {reason}")


def _short_reason(error: BaseException, limit: int = 200) -> str:
    """The innermost cause of ``error``, first line, at most ``limit`` characters."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _path_str(path) -> str:
    parts = path_names(path)
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return ".".join(parts)


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def flatten(tree) -> tuple[dict[str, Any], Any, list[str]]:
    """(flat {path: leaf}, treedef, ordered paths) of any pytree (nnx.State included)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat, order = {}, []
    for path, leaf in leaves:
        key = _path_str(path)
        if key in flat:
            raise CheckpointError(f"duplicate state path {key!r}")
        flat[key] = leaf
        order.append(key)
    return flat, treedef, order


def unflatten(treedef, order: list[str], flat: dict[str, Any]):
    return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in order])


def _spec(x) -> dict[str, Any]:
    if _is_key(x):
        impl = getattr(getattr(x.dtype, "_impl", None), "name", None)
        return {"shape": list(x.shape), "dtype": "key", "impl": impl}
    return {"shape": list(x.shape), "dtype": str(jnp.dtype(x.dtype))}


def _saveable(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: (jax.random.key_data(v) if _is_key(v) else v) for k, v in flat.items()}


def _fmt(spec: dict[str, Any]) -> str:
    return f"{spec['dtype']}{tuple(spec['shape'])}"


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for train states (see the module docstring)."""

    def __init__(self, directory: str | pathlib.Path, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        if read_only:  # orbax warns that a read-only manager will not save; that is the point
            absl_logger.setLevel(logging.ERROR)
        try:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=not read_only, read_only=read_only,
                enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
            )
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        finally:
            absl_logger.setLevel(level)

    # -- queries -------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def set_aside(self, steps: list[int]) -> list[pathlib.Path]:
        """Rename each step directory to ``<step>.damaged`` (``.damaged.N`` if taken); returns the new paths.

        The renamed directories are kept for inspection and no longer count as checkpoints. Process 0
        renames; every process then re-reads the step list.
        """
        targets = []
        for step in steps:
            target = self.directory / f"{int(step)}.damaged"
            n = 1
            while target.exists():
                n += 1
                target = self.directory / f"{int(step)}.damaged.{n}"
            if jax.process_index() == 0:
                (self.directory / str(int(step))).rename(target)
            targets.append(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("longconv_checkpoint_set_aside")
        self.manager.reload()
        return targets

    # -- save ----------------------------------------------------------------------------------
    def save(self, step: int, state, meta: dict[str, Any] | None = None, force: bool = True) -> None:
        """Save ``state`` (any pytree of arrays / typed keys) and JSON ``meta`` at ``step``."""
        flat, _, _ = flatten(state)
        full_meta = dict(meta or {})
        full_meta["step"] = int(step)
        full_meta["arrays"] = {k: _spec(v) for k, v in flat.items()}
        self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(_saveable(flat)),
                                    meta=ocp.args.JsonSave(full_meta)),
            force=force,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- restore -------------------------------------------------------------------------------
    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._resolve(step)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types
            raise DamagedCheckpointError(step, f"metadata unreadable ({_short_reason(e)})", self.directory) from e
        if not isinstance(meta, dict) or not isinstance(meta.get("arrays"), dict):
            raise DamagedCheckpointError(step, "metadata has no 'arrays' table", self.directory)
        return dict(meta)

    def read_arrays(self, step: int | None = None) -> dict[str, np.ndarray]:
        """The raw saved arrays ``{path: numpy array}`` (PRNG keys as key data) on the host."""
        step = self._resolve(step)
        meta = self.read_meta(step)
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = {}
        for name, spec in meta["arrays"].items():
            if spec["dtype"] == "key":
                shape = tuple(spec["shape"]) + tuple(
                    jax.random.key_data(jax.random.key(0, impl=spec.get("impl") or None)).shape)
                abstract[name] = jax.ShapeDtypeStruct(shape, jnp.uint32, sharding=default)
            else:
                abstract[name] = jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]), sharding=default)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return {k: np.asarray(v) for k, v in out["state"].items()}

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint found in {self.directory}")
        elif step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
        return int(step)

    def restore(self, target, step: int | None = None, shardings=None, prefix: str = "", strict: bool = True):
        """Restore into the structure of ``target`` (arrays or ShapeDtypeStructs); returns (tree, meta).

        ``shardings`` (same tree as target, optional) places the arrays; by default arrays keep the
        target's sharding when it has one, else go to the first local device. ``prefix`` restricts the
        match to saved keys starting with it (e.g. "model." for weights only); other saved arrays are
        ignored. Shapes, dtypes and names must match (with ``strict=False`` extra saved arrays are
        allowed), otherwise `CheckpointError` names the first offending parameter.
        """
        step = self._resolve(step)
        meta = self.read_meta(step)
        saved = meta.get("arrays", {})
        flat_t, treedef, order = flatten(target)
        flat_s = flatten(shardings)[0] if shardings is not None else {}
        wanted = {prefix + k: v for k, v in flat_t.items()}
        self._check(saved, wanted, step, prefix, strict)
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = {}
        for name in saved:
            spec = saved[name]
            key = name[len(prefix):] if name.startswith(prefix) else None
            sharding = None
            if key is not None and key in flat_t:
                sharding = flat_s.get(key) or getattr(flat_t[key], "sharding", None)
            if spec["dtype"] == "key":
                shape = tuple(spec["shape"]) + tuple(
                    jax.random.key_data(jax.random.key(0, impl=spec.get("impl") or None)).shape)
                dtype = jnp.uint32
                sharding = _replicated_like(sharding) or default
            else:
                shape, dtype = tuple(spec["shape"]), jnp.dtype(spec["dtype"])
            abstract[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding or default)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpointError(step, f"arrays unreadable ({_short_reason(e)})", self.directory) from e
        arrays = out["state"]
        result = {}
        for key in order:
            spec = saved[prefix + key]
            value = arrays[prefix + key]
            if spec["dtype"] == "key":
                value = jax.random.wrap_key_data(value, impl=spec.get("impl") or None)
            result[key] = value
        return unflatten(treedef, order, result), meta

    def restore_newest(self, target, shardings=None, prefix: str = "", strict: bool = True):
        """`restore` the newest step that can be read; returns (tree, meta, skipped).

        ``skipped`` lists the `DamagedCheckpointError` of each newer step that could not be read (newest
        first). A step that does not fit the model is not skipped: its `CheckpointError` propagates, as
        older steps of the same run would not fit either. Raises `CheckpointError` when there is no
        step or none can be read.
        """
        skipped: list[DamagedCheckpointError] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                tree, meta = self.restore(target, step=step, shardings=shardings, prefix=prefix, strict=strict)
            except DamagedCheckpointError as e:
                skipped.append(e)
                continue
            return tree, meta, skipped
        if not skipped:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        raise CheckpointError(f"no checkpoint in {self.directory} can be restored: "
                              + "; ".join(f"step {e.step}: {e.reason}" for e in skipped))

    @staticmethod
    def _check(saved: dict[str, Any], wanted: dict[str, Any], step: int, prefix: str, strict: bool) -> None:
        saved_keys = {k for k in saved if k.startswith(prefix)} if strict else set()
        missing = [k for k in wanted if k not in saved]
        unexpected = sorted(saved_keys - set(wanted))
        problems = []
        for k in wanted:
            if k in saved:
                want = _spec(wanted[k])
                got = saved[k]
                if list(want["shape"]) != list(got["shape"]) or want["dtype"] != got["dtype"]:
                    problems.append(f"parameter '{k}': checkpoint has {_fmt(got)}, model expects {_fmt(want)}")
        if missing:
            problems.append(f"parameter '{missing[0]}' is missing from the checkpoint"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            problems.append(f"checkpoint has parameter '{unexpected[0]}' that the model lacks"
                            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        if problems:
            raise CheckpointError(
                f"checkpoint at step {step} does not match the model (was it trained with another config?): "
                + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))


def _replicated_like(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


def fallback_note(skipped: list[DamagedCheckpointError], used_step: int, kept: str = "left in place") -> str:
    """One line: the damaged steps `Checkpointer.restore_newest` skipped (and why), the step it used, and
    what became of the damaged steps (``kept``)."""
    reasons = "; ".join(f"step {e.step}: {e.reason}" for e in skipped)
    return f"checkpoint {reasons}; using step {used_step} instead (damaged {'steps' if len(skipped) > 1 else 'step'} {kept})"


def find_checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
    """Accept a run directory or its ``checkpoints/`` directory; return the latter."""
    path = pathlib.Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir():
        return path
    raise CheckpointError(f"no run or checkpoint directory at {path}")


def host_copy(tree):
    """numpy copy of a pytree (for comparisons in tests and tools)."""
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if _is_key(x) else x), tree)


def load_run(run_dir: str | pathlib.Path, step: int | None = None) -> tuple[TrainConfig, Any, Any, int]:
    """Load a trained run for evaluation, generation or distillation.

    Returns ``(cfg, model, tokenizer, step)``: the run's `TrainConfig` (from ``run_dir/config.yaml``), the
    `lm.model.LM` with the weights of checkpoint ``step`` in eval mode on the default device, the
    tokenizer from ``run_dir/tokenizer``, and the step. Without ``step``, the newest step that can be
    read: damaged newer steps are skipped with one line on stderr (`fallback_note`) and left in place.
    Raises `CheckpointError` / `lm.config.ConfigError` / `lm.data.DataError` with a clear message when
    something is missing or does not fit.
    """
    from flax import nnx

    from lm.data import load_tokenizer
    from lm.model import LM

    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_train_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    abstract = nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(cfg.trainer.seed)))
    graphdef, state = nnx.split(abstract)
    ckpt = Checkpointer(find_checkpoint_dir(run_dir), keep=None, read_only=True)
    try:
        if step is None:
            restored, meta, skipped = ckpt.restore_newest(state, prefix="model.", strict=False)
            if skipped:
                print(f"[longconv] {fallback_note(skipped, int(meta['step']))}", file=sys.stderr, flush=True)
        else:
            restored, meta = ckpt.restore(state, step=step, prefix="model.", strict=False)
    finally:
        ckpt.close()
    model = nnx.merge(graphdef, restored)
    model.eval()
    return cfg, model, tokenizer, int(meta["step"])
