"""Metrics tracking: a JSONL log in the run directory (always) plus optional TensorBoard / W&B.

Only process 0 writes. Each JSONL line is ``{"step": int, "split": "train"|"eval"|..., **metrics}``
with plain floats; `read_metrics(run_dir)` loads them back.
TensorBoard needs ``tensorboardX`` (or torch's SummaryWriter), W&B needs ``wandb`` — both in the
``tracking`` extra; a missing backend raises a clear error at start, not mid-run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import jax

from lm.config import ConfigError

BACKENDS = ("tensorboard", "wandb")


@dataclasses.dataclass
class TrackerConfig:
    """``backends``: extra sinks besides metrics.jsonl ("tensorboard", "wandb")."""

    backends: list[str] = dataclasses.field(default_factory=list)
    project: str = "longconv"  # wandb project
    name: str | None = None  # wandb run name (default: run directory name)

    def validate(self) -> None:
        for b in self.backends:
            if b not in BACKENDS:
                raise ConfigError(f"config key 'tracker.backends': unknown backend {b!r}; choose from {BACKENDS}")


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, str, int)) or v is None:
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f if math.isfinite(f) else str(f)


class Tracker:
    """Writes metrics on process 0; no-op elsewhere."""

    def __init__(self, run_dir: str | pathlib.Path, cfg: TrackerConfig | None = None,
                 config_dict: dict | None = None):
        self.cfg = cfg or TrackerConfig()
        self.run_dir = pathlib.Path(run_dir)
        self.active = jax.process_index() == 0
        self._file = None
        self._tb = None
        self._wandb = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if "tensorboard" in self.cfg.backends:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                try:
                    from torch.utils.tensorboard import SummaryWriter  # type: ignore
                except ImportError:
                    raise ConfigError("tracker backend 'tensorboard' needs tensorboardX: "
                                      "pip install 'longconv[tracking]'") from None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if "wandb" in self.cfg.backends:
            try:
                import wandb
            except ImportError:
                raise ConfigError("tracker backend 'wandb' needs wandb: pip install 'longconv[tracking]'") from None
            self._wandb = wandb.init(project=self.cfg.project, name=self.cfg.name or self.run_dir.name,
                                     dir=str(self.run_dir), config=config_dict, resume="allow")

    def log(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        if not self.active:
            return
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items()
                   if k not in ("step", "split", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in numeric.items()}, step=int(step))

    def truncate_after(self, step: int) -> None:
        """Drop JSONL records with step > ``step`` (used when resuming from an earlier checkpoint)."""
        if not self.active:
            return
        path = self.run_dir / "metrics.jsonl"
        self._file.close()
        kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
        self._file = open(path, "a", buffering=1)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per line; missing file -> []. Lines that are not a JSON object
    (e.g. the last line cut by a crash) are skipped."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(run_dir: str | pathlib.Path, split: str | None = None) -> list[dict[str, Any]]:
    """Records of ``run_dir/metrics.jsonl`` (optionally one split); missing file -> []."""
    records = read_jsonl(pathlib.Path(run_dir) / "metrics.jsonl")
    return [r for r in records if split is None or r.get("split") == split]