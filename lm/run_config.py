"""The configuration of a pretraining run: `TrainerConfig`, `TrainConfig` and `load_train_config`.

A run's ``config.yaml`` is a `TrainConfig`. This module sits below `lm.checkpoint` (whose `load_run`
reads a run's config back), which sits below `lm.train`: no import cycle. `lm.train` re-exports all
three names.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from lm.config import ConfigError, apply_overrides, from_dict, read_yaml
from lm.data.config import DataConfig
from lm.model import ModelConfig
from lm.optim import OptimizerConfig
from lm.sharding import MeshConfig
from lm.tracking import TrackerConfig


@dataclasses.dataclass
class TrainerConfig:
    """Loop settings. ``eval_every``/``checkpoint_every``/``log_every``/``hooks_every`` of 0 disable the
    periodic action (eval and a checkpoint still happen at the end; the final eval covers the whole
    validation split)."""

    steps: int = 1000
    eval_every: int = 500
    eval_steps: int = 50  # validation batches per periodic evaluation (0 = the whole validation split)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    hooks_every: int = 100
    grad_accum: int = 1
    seed: int = 0
    precision: str | None = None  # "fp32" | "bf16" (bf16 compute, fp32 params); null = model.dtype
    async_checkpointing: bool = True
    progress: bool = True  # process 0 shows progress: a tqdm bar on a terminal, else a log line per log_every

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
