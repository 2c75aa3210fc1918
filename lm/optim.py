"""Optimizer: AdamW with linear warmup + cosine decay, global-norm clipping and parameter groups.

Groups come from `lm.params.param_labels` (see mixers.md §5):

- ``decay``     matrices (linear kernels, embeddings): AdamW with ``weight_decay``;
- ``no_decay``  vectors (biases, norm scales, skips): weight decay 0, or ``weight_decay`` when
                ``weight_decay_on`` is "all" (PyTorch's AdamW over ``model.parameters()`` decays every tensor);
- ``filter``    long-filter / SSM parameters (`FilterParam`): ``filter_weight_decay`` (0 by default) and,
                when ``filter_lr`` is set, their own peak learning rate (same warmup/cosine shape).

The transformation is ``chain(clip_by_global_norm(grad_clip), multi_transform({group: adamw}))``.

Gradient accumulation is *not* done here with ``optax.MultiSteps``: the trainer's jitted step splits
the global batch into ``grad_accum`` micro-batches, sums their gradients in a ``lax.scan`` and applies
one optimizer update per step. The optimizer therefore sees exactly the gradient of the full batch and
its step count equals the trainer step (see `lm.train`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lm.config import ConfigError
from lm.params import path_names


WEIGHT_DECAY_ON = ("matrices", "all")


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW + warmup/cosine schedule. ``warmup_steps`` < 0 means ``warmup_ratio * total steps``."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr (safari lr_min = 0.1 lr)
    warmup_init_lr: float = 0.0  # lr at step 0 of the linear warmup (safari: 1e-6)
    warmup_steps: int = -1
    warmup_ratio: float = 0.01
    schedule: str = "cosine"  # "cosine" | "constant" (constant after warmup)
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # global-norm clip; null disables
    filter_lr: float | None = None  # peak lr of the "filter" group; null = lr
    filter_weight_decay: float = 0.0
    weight_decay_on: str = "matrices"  # "matrices" | "all" (vectors too; the filter group keeps its own)

    def validate(self) -> None:
        if self.weight_decay_on not in WEIGHT_DECAY_ON:
            raise ConfigError(f"config key 'optimizer.weight_decay_on' must be one of {WEIGHT_DECAY_ON}, "
                              f"got {self.weight_decay_on!r}")
        if self.lr <= 0:
            raise ConfigError(f"config key 'optimizer.lr' must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"config key 'optimizer.min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"config key 'optimizer.schedule' must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0.0 <= self.b1 < 1.0 or not 0.0 <= self.b2 < 1.0:
            raise ConfigError("config keys 'optimizer.b1'/'optimizer.b2' must be in [0, 1)")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"config key 'optimizer.grad_clip' must be > 0 or null, got {self.grad_clip}")
        if self.filter_lr is not None and self.filter_lr < 0:
            raise ConfigError(f"config key 'optimizer.filter_lr' must be >= 0, got {self.filter_lr}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"config key 'optimizer.warmup_ratio' must be in [0, 1], got {self.warmup_ratio}")

    def resolved_warmup(self, total_steps: int) -> int:
        if self.warmup_steps >= 0:
            return min(self.warmup_steps, total_steps)
        return min(int(round(self.warmup_ratio * total_steps)), total_steps)


def lr_schedule(cfg: OptimizerConfig, total_steps: int, peak_lr: float | None = None) -> optax.Schedule:
    """Linear warmup from ``warmup_init_lr`` to the peak, then cosine decay to ``min_lr_ratio * peak``."""
    peak = cfg.lr if peak_lr is None else peak_lr
    warmup = cfg.resolved_warmup(total_steps)
    init = min(cfg.warmup_init_lr, peak)
    end = cfg.min_lr_ratio * peak
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=(end / peak) if peak > 0 else 0.0)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(init, peak, warmup), after], [warmup])


def _adamw(cfg: OptimizerConfig, schedule: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=weight_decay)


def labels_fn(label_map: dict[tuple[str, ...], str]) -> Callable[[Any], Any]:
    """A callable ``params -> labels tree`` for ``optax.multi_transform``.

    Works on both ``nnx.State`` trees whose leaves are Variables (as at ``tx.init``) and on pure-array
    trees (as at ``tx.update``) by looking each leaf up by its path.
    """
    from flax import nnx

    def is_var(x):
        return isinstance(x, nnx.Variable)

    def fn(params):
        def one(path, leaf):
            key = path_names(path)
            if key not in label_map:
                raise KeyError(f"no optimizer group for parameter {'/'.join(key)}")
            return label_map[key]

        return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_var)

    return fn


def model_label_map(model) -> dict[tuple[str, ...], str]:
    """{parameter path: group} for every nnx.Param of ``model`` (via `lm.params.param_labels`)."""
    from flax import nnx

    from lm.params import param_labels

    labels = param_labels(nnx.state(model, nnx.Param))
    out = {}
    for path, label in nnx.to_flat_state(labels):
        label = label if isinstance(label, str) else getattr(label, "value", label)
        out[tuple(str(p) for p in path)] = label
    return out


def make_optimizer(cfg: OptimizerConfig, total_steps: int, label_map: dict[tuple[str, ...], str]
                   ) -> optax.GradientTransformation:
    """The full gradient transformation for a model whose parameters are grouped by ``label_map``."""
    cfg.validate()
    sched = lr_schedule(cfg, total_steps)
    filter_sched = lr_schedule(cfg, total_steps, cfg.filter_lr) if cfg.filter_lr is not None else sched
    groups = {
        "decay": _adamw(cfg, sched, cfg.weight_decay),
        "no_decay": _adamw(cfg, sched, cfg.weight_decay if cfg.weight_decay_on == "all" else 0.0),
        "filter": _adamw(cfg, filter_sched, cfg.filter_weight_decay),
    }
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.multi_transform(groups, labels_fn(label_map)))
    return optax.chain(*parts)


def group_sizes(label_map: dict[tuple[str, ...], str], params) -> dict[str, int]:
    """Number of scalars per group (for logs)."""
    sizes: dict[str, int] = {}
    fn = labels_fn(label_map)
    labels = jax.tree.leaves(fn(params))
    from flax import nnx

    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for label, leaf in zip(labels, leaves):
        size = int(jnp.size(leaf.get_value() if hasattr(leaf, "get_value") else leaf))
        sizes[label] = sizes.get(label, 0) + size
    return sizes
