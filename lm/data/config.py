"""Data configuration: where text comes from, how it is tokenized, packed and batched.

Loaded with `lm.config.from_dict(DataConfig, {...})` (or as the ``data:`` section of a run config), so
unknown keys raise `lm.config.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from lm.config import ConfigError


class DataError(ValueError):
    """The data cannot be loaded, tokenized or packed as configured; the message says why and what to do."""


@dataclasses.dataclass
class TokenizerConfig:
    """Which tokenizer turns text into ids.

    kind:    "byte" (UTF-8 bytes, 256 ids + <eod>), "char" (one id per character seen in the training
             text, + <unk> and <eod>) or "sentencepiece" (a trained model; see `longconv tokenizer train`).
    path:    a saved tokenizer directory (from `Tokenizer.save` / `longconv tokenizer train`) or a
             sentencepiece ``.model`` file. Required for "sentencepiece"; optional for "char" (without it
             the vocabulary is built from the training text); unused for "byte".
    """

    kind: Literal["byte", "char", "sentencepiece"] = "byte"
    path: str | None = None


@dataclasses.dataclass
class DataConfig:
    """Text source, split, tokenizer and batching of an LM run.

    source:        a local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file, a directory of them, a glob
                   such as ``data/*.txt``, or a Hugging Face hub dataset name, optionally with a config
                   after a colon: ``"wikitext:wikitext-103-raw-v1"``, ``"roneneldan/TinyStories"``.
                   Local paths must start with ``/``, ``./``, ``../`` or ``~`` or end in a known extension
                   if they do not exist yet, so that a typo is reported as a missing file.
    text_field:    the column holding the text (JSONL / Parquet / hub datasets).
    text_unit:     for ``.txt`` files, what one document is: the whole file ("document"), a blank-line
                   separated paragraph ("paragraph") or a line ("line"). An <eod> token follows each document.
    train_split:   hub split used for training (slicing like ``"train[:10%]"`` works when not streaming).
    val_split:     a hub split name (e.g. ``"validation"``) or a local path for validation text. When None,
                   the LAST ``val_fraction`` of the training token stream is held out for validation.
    val_fraction:  fraction in [0, 1) held out when ``val_split`` is None; 0 means no validation data.
    streaming:     stream hub datasets instead of downloading them whole (a cap is then required).
    max_documents: read at most this many documents of each split.
    max_tokens:    keep at most this many tokens of the training source (before the validation hold-out).
    tokenizer:     see `TokenizerConfig`.
    block_size:    sequence length: each example holds block_size inputs and block_size shifted targets.
    batch_size:    GLOBAL number of sequences per training step (summed over all hosts and devices).
    eval_batch_size: global batch of the validation iterator (default: batch_size).
    seed:          seed of the epoch shuffles of the training blocks.
    """

    source: str = ""
    text_field: str = "text"
    text_unit: Literal["document", "paragraph", "line"] = "document"
    train_split: str = "train"
    val_split: str | None = None
    val_fraction: float = 0.1
    streaming: bool = True
    max_documents: int | None = None
    max_tokens: int | None = None
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    block_size: int = 256
    batch_size: int = 8
    eval_batch_size: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if not self.source:
            raise ConfigError("config key 'data.source' is required: a local text/JSONL/Parquet path or a hub dataset name")
        if self.block_size < 1:
            raise ConfigError(f"config key 'data.block_size' must be >= 1, got {self.block_size}")
        if self.batch_size < 1:
            raise ConfigError(f"config key 'data.batch_size' must be >= 1, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"config key 'data.eval_batch_size' must be >= 1, got {self.eval_batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"config key 'data.val_fraction' must be in [0, 1), got {self.val_fraction}")
        for key in ("max_documents", "max_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"config key 'data.{key}' must be >= 1 (or null for no cap), got {value}")
