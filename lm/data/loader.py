"""Deterministic, resumable batch loading into (sharded) global arrays, and `build_data`.

A batch is a dict of three (batch, block_size) arrays: ``inputs`` and ``targets`` (int32; targets are
inputs shifted by one token) and ``mask`` (float32: 1 for real rows, 0 for padding rows, which only the
last validation batch can have).

`BatchLoader` is a `grain` pipeline: it walks the training blocks in a fresh seeded permutation every
epoch (grain's index shuffle with seed ``seed + epoch``); an epoch is ``num_blocks // batch_size``
steps (the leftover blocks of a permutation are skipped that epoch, different ones each epoch), and
batches are assembled ahead of time in a grain reader thread. Its position, ``state()``, is a small
JSON-serialisable dict (ints and grain's iterator state) that ``restore(state)`` puts back exactly, so
a checkpointed run resumes with the same batches it would have seen.

With a ``sharding`` (a `jax.sharding.NamedSharding` whose first partition-spec entry names the data
axes, e.g. ``P(("data", "fsdp"))``), batches come back as global `jax.Array`s built with
`jax.make_array_from_process_local_data`: each process gathers only the rows its devices hold. Without
one, batches are numpy arrays.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from lm.data.config import DataConfig, DataError
from lm.data.packing import PackedTokens, pack, split_tail, tokenize_documents
from lm.data.sources import iter_documents
from lm.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    TOKENIZER_FILE,
    load_tokenizer,
)

log = logging.getLogger("lm.data")

Batch = dict[str, Any]


# ----------------------------------------------------------------------------------------- sharding


def data_shards(sharding) -> int:
    """How many ways ``sharding`` splits the batch (first) dimension; 1 for None or a replicated spec."""
    if sharding is None:
        return 1
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    if spec is None or mesh is None:
        raise TypeError(f"expected a jax.sharding.NamedSharding, got {type(sharding).__name__}")
    if len(spec) == 0 or spec[0] is None:
        return 1
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    n = 1
    for axis in axes:
        n *= int(mesh.shape[axis])
    return n


def check_batch_size(batch_size: int, sharding, what: str = "data.batch_size") -> None:
    shards = data_shards(sharding)
    if batch_size % shards:
        raise DataError(
            f"{what} {batch_size} is not divisible by the {shards} data shards of the mesh "
            f"(axes {sharding.spec[0]!r}); use a multiple of {shards}"
        )


def _local_rows(sharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """Row indices of the global batch that this process's devices hold, in the order
    `jax.make_array_from_process_local_data` expects (distinct row ranges, ascending)."""
    ranges = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(global_shape[0])
        ranges.add((start, stop))
    return np.concatenate([np.arange(a, b) for a, b in sorted(ranges)])


def _assemble(block_source, row_indices: np.ndarray, mask: np.ndarray, block_size: int, sharding) -> Batch:
    """Gather blocks (only this process's rows when sharded) and build the batch dict; ``mask`` is per
    row (rows,) or per position (rows, block_size)."""
    global_shape = (len(row_indices), block_size)
    if sharding is None:
        local = np.arange(len(row_indices))
    else:
        local = _local_rows(sharding, global_shape)
    blocks = block_source(row_indices[local])
    arrays = {
        "inputs": np.ascontiguousarray(blocks[:, :-1]),
        "targets": np.ascontiguousarray(blocks[:, 1:]),
        "mask": np.ascontiguousarray(
            np.broadcast_to(mask[local].reshape(len(local), -1), (len(local), block_size)), dtype=np.float32),
    }
    if sharding is None:
        return arrays
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, v, global_shape) for k, v in arrays.items()}


# ------------------------------------------------------------------------------------------ loaders


class BatchLoader:
    """Seeded, epoch-shuffled, exactly resumable training batches of `PackedTokens` blocks, on grain.

    The batches are a `grain.MapDataset`: batch ``j = e·steps_per_epoch + k`` holds rows k·B .. (k+1)·B-1
    of epoch e's permutation of the N blocks, grain's index shuffle seeded by ``seed + e`` (the
    permutation `grain.MapDataset.shuffle` uses, computed per row: no permutation array is
    materialised), so any batch is a pure function of (seed, j). Each process gathers only the rows of the global batch its
    devices hold (see `_assemble`), so the global batch does not depend on the number of processes.
    Batches are produced ``prefetch`` ahead in a grain reader thread (0 = synchronously).

    ``next()`` (or ``next(loader)``) returns the next batch; ``state()`` / ``restore(state)`` save and
    put back the position ``{"epoch", "step", "seed", "num_blocks", "batch_size", "iterator"}`` (plain
    ints and grain's iterator state, JSON-serialisable; restore checks that seed, block count and batch
    size still match).
    """

    def __init__(self, data: PackedTokens, batch_size: int, seed: int = 0, sharding=None, prefetch: int = 2) -> None:
        import grain

        check_batch_size(batch_size, sharding)
        if data.num_blocks < batch_size:
            raise DataError(
                f"the {data.name} split has {data.num_blocks} blocks of {data.block_size + 1} tokens, fewer than one "
                f"batch of {batch_size}; lower data.batch_size or data.block_size, or use more text"
            )
        if not 0 <= int(seed) < 2**32:
            raise DataError(f"data.seed must be in [0, 2**32), got {seed}")
        self.data = data
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.sharding = sharding
        self.prefetch = int(prefetch)
        self.dataset = (grain.MapDataset.range(self.steps_per_epoch).repeat()
                        .map_with_index(lambda j, _: self.batch(j)))
        self._read_options = grain.ReadOptions(num_threads=min(self.prefetch, 1), prefetch_buffer_size=self.prefetch)
        self._iterator = None
        self.position = 0  # batches consumed

    @property
    def steps_per_epoch(self) -> int:
        return self.data.num_blocks // self.batch_size

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.data.block_size

    @property
    def epoch(self) -> int:
        return self.position // self.steps_per_epoch

    @property
    def step(self) -> int:
        return self.position % self.steps_per_epoch

    def indices(self, j: int) -> np.ndarray:
        """Global block indices of batch ``j``: rows k·B .. (k+1)·B-1 of epoch e's permutation, where
        ``j = e·steps_per_epoch + k`` (grain's index shuffle, as `grain.MapDataset.shuffle` uses it)."""
        from grain.experimental import index_shuffle

        epoch, step = divmod(int(j), self.steps_per_epoch)
        seed, last = (self.seed + epoch) % 2**32, self.data.num_blocks - 1
        rows = range(step * self.batch_size, (step + 1) * self.batch_size)
        return np.fromiter((index_shuffle(i, max_index=last, seed=seed, rounds=4) for i in rows), np.int64,
                           self.batch_size)

    def batch(self, j: int) -> Batch:
        """Batch ``j`` (this process's rows, a global array when sharded)."""
        mask = np.ones(self.batch_size, dtype=np.float32)
        return _assemble(self.data.blocks, self.indices(j), mask, self.data.block_size, self.sharding)

    def _iter(self):
        if self._iterator is None:
            self._iterator = iter(self.dataset.to_iter_dataset(self._read_options))
            self._iterator.set_state({"next_index": self.position})
        return self._iterator

    def next(self) -> Batch:
        batch = next(self._iter())
        self.position += 1
        return batch

    __next__ = next

    def __iter__(self) -> Iterator[Batch]:
        return self

    def state(self) -> dict[str, Any]:
        iterator = self._iterator.get_state() if self._iterator is not None else {"next_index": self.position}
        return {
            "epoch": int(self.epoch),
            "step": int(self.step),
            "seed": int(self.seed),
            "num_blocks": int(self.data.num_blocks),
            "batch_size": int(self.batch_size),
            "iterator": {k: int(v) for k, v in iterator.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_blocks", "batch_size"):
            if key in state and int(state[key]) != self.state()[key]:
                raise DataError(
                    f"cannot resume the data loader: checkpointed {key}={int(state[key])} but the current data has "
                    f"{key}={self.state()[key]} (the data, tokenizer or config changed since the checkpoint)"
                )
        self.position = int(state["epoch"]) * self.steps_per_epoch + int(state["step"])
        self._iterator = None
        if "iterator" in state:
            self._iter().set_state(dict(state["iterator"]))


def eval_batches(
    data: PackedTokens,
    batch_size: int,
    sharding=None,
    pad: bool = False,
    max_batches: int | None = None,
) -> Iterator[Batch]:
    """Validation batches: the blocks of ``data`` in order, no shuffling, deterministic.

    ``pad=False`` (default) drops the last partial batch (fewer than ``batch_size`` blocks), so every row
    is real data and a consumer may ignore ``mask`` -- except when the split has fewer blocks than one
    batch: then the single batch is padded. ``pad=True`` scores every target position of the split
    exactly once: after the full blocks comes the partial tail block (`PackedTokens.tail_block`, its
    padding positions masked), and the last batch is completed with padding rows. Padding rows repeat
    block 0 and have ``mask`` 0: weight per-token losses by ``mask``. ``max_batches`` stops early.
    """
    check_batch_size(batch_size, sharding, "eval batch size")
    n = data.num_blocks
    tail = data.tail_positions if pad else 0
    rows = n + (1 if tail else 0)  # row n is the tail block
    n_batches = -(-rows // batch_size) if (pad or n < batch_size) else n // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)

    def blocks(indices: np.ndarray) -> np.ndarray:
        out = data.blocks(np.where(indices < n, indices, 0))
        out[indices == n] = data.tail_block()
        return out

    for b in range(n_batches):
        indices = np.arange(b * batch_size, (b + 1) * batch_size)
        mask = np.repeat((indices < n).astype(np.float32)[:, None], data.block_size, axis=1)
        mask[indices == n, :tail] = 1.0
        indices = np.where(indices < rows, indices, 0)
        yield _assemble(blocks, indices, mask, data.block_size, sharding)


# ------------------------------------------------------------------------------------------ building


@dataclasses.dataclass
class DataBundle:
    """Everything a run needs from the data layer (what `build_data` returns).

    ``next_batch()``, ``state()`` and ``restore(state)`` drive one training `BatchLoader` (created on
    first use with the bundle's ``sharding``); ``val_batches()`` iterates the validation split;
    ``val_bytes_per_token`` / ``val_chars_per_token`` convert its loss to bits per byte / character.
    """

    config: DataConfig
    tokenizer: Tokenizer
    train: PackedTokens
    val: PackedTokens | None
    sharding: Any = None
    _loader: BatchLoader | None = dataclasses.field(default=None, repr=False)

    @property
    def loader(self) -> BatchLoader:
        if self._loader is None:
            self._loader = BatchLoader(self.train, self.config.batch_size, self.config.seed, self.sharding)
        return self._loader

    def next_batch(self) -> Batch:
        return self.loader.next()

    def state(self) -> dict[str, int]:
        return self.loader.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.loader.restore(state)

    def val_batches(self, max_batches: int | None = None, pad: bool = False) -> Iterator[Batch]:
        """`eval_batches` over the validation split (empty when there is none)."""
        if self.val is None:
            return iter(())
        batch_size = self.config.eval_batch_size or self.config.batch_size
        return eval_batches(self.val, batch_size, self.sharding, pad, max_batches)

    @property
    def val_bytes_per_token(self) -> float | None:
        return self.val.bytes_per_token if self.val is not None else None

    @property
    def val_chars_per_token(self) -> float | None:
        return self.val.chars_per_token if self.val is not None else None

    def stats(self) -> dict:
        out = {"vocab_size": self.tokenizer.vocab_size, "train": self.train.stats()}
        if self.val is not None:
            out["val"] = self.val.stats()
        return out


def resolve_tokenizer(cfg: DataConfig, run_dir: str | os.PathLike | None = None) -> Tokenizer | None:
    """The run's tokenizer: ``run_dir/tokenizer`` if saved there, else ``cfg.tokenizer.path``, else a
    byte tokenizer; None when a char vocabulary must still be built from the training text."""
    kind = cfg.tokenizer.kind
    saved = pathlib.Path(run_dir) / "tokenizer" if run_dir is not None else None
    path = saved if saved is not None and (saved / TOKENIZER_FILE).is_file() else cfg.tokenizer.path
    if path is not None:
        tok = load_tokenizer(path)
        if tok.kind != kind:
            raise DataError(f"tokenizer at {path} is {tok.kind!r} but data.tokenizer.kind is {kind!r}")
        return tok
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        raise DataError(
            "data.tokenizer.kind=sentencepiece needs data.tokenizer.path: a model trained with "
            "`longconv tokenizer train --kind sentencepiece --input FILE --vocab-size N --out DIR`"
        )
    return None


def _read_chars_capped(docs, max_tokens: int | None) -> list[str]:
    out, total = [], 0
    for doc in docs:
        if max_tokens is not None and total >= max_tokens:
            break
        out.append(doc)
        total += len(doc) + 1
    return out


def build_data(
    cfg: DataConfig,
    run_dir: str | os.PathLike | None = None,
    tokenizer: Tokenizer | None = None,
    *,
    sharding=None,
    tokenizer_path: str | os.PathLike | None = None,
) -> DataBundle:
    """Read, tokenize, split and pack the data of ``cfg``; batches are sharded with ``sharding``.

    The tokenizer is ``tokenizer`` if given, else the one at ``tokenizer_path``, else the one saved in
    ``run_dir/tokenizer`` (so resumed, evaluated and sampled runs reuse it), else ``cfg.tokenizer.path``,
    else a new byte tokenizer or a char vocabulary built from the training text. With ``run_dir`` it is
    saved to ``run_dir/tokenizer``. Validation: ``cfg.val_split`` if set, else the last
    ``cfg.val_fraction`` of the training token stream. Checks the batch sizes against ``sharding``.
    """
    check_batch_size(cfg.batch_size, sharding)
    if cfg.eval_batch_size:
        check_batch_size(cfg.eval_batch_size, sharding, "data.eval_batch_size")
    if tokenizer is None and tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
        if tokenizer.kind != cfg.tokenizer.kind:
            raise DataError(f"tokenizer at {tokenizer_path} is {tokenizer.kind!r} but data.tokenizer.kind is {cfg.tokenizer.kind!r}")
    tok = tokenizer or resolve_tokenizer(cfg, run_dir)
    docs: Any = iter_documents(cfg, "train")
    if tok is None:  # char vocabulary from the training text
        docs = _read_chars_capped(docs, cfg.max_tokens)
        if not docs:
            raise DataError(f"corpus is empty: data source {cfg.source!r} has no text (field {cfg.text_field!r})")
        tok = CharTokenizer.from_texts(docs)
    tokens = tokenize_documents(docs, tok, cfg.max_tokens)
    if len(tokens) == 0:
        raise DataError(f"corpus is empty: data source {cfg.source!r} has no text (field {cfg.text_field!r})")
    if cfg.val_split is not None:
        train_tokens = tokens
        val_tokens = tokenize_documents(iter_documents(cfg, "validation"), tok)
        if len(val_tokens) == 0:
            raise DataError(f"validation data {cfg.val_split!r} is empty")
    elif cfg.val_fraction > 0:
        train_tokens, val_tokens = split_tail(tokens, cfg.val_fraction)
    else:
        train_tokens, val_tokens = tokens, None
    train = pack(train_tokens, cfg.block_size, tok, "train")
    val = None
    if val_tokens is not None:
        if len(val_tokens) < cfg.block_size + 1:
            raise DataError(
                f"block longer than the validation split: block_size {cfg.block_size} needs {cfg.block_size + 1} "
                f"tokens but validation has {len(val_tokens)}; raise data.val_fraction, lower data.block_size, "
                "or set data.val_fraction=0 for no validation"
            )
        val = pack(val_tokens, cfg.block_size, tok, "validation")
    if run_dir is not None:
        target = pathlib.Path(run_dir) / "tokenizer"
        if not (target / TOKENIZER_FILE).is_file():
            tok.save(target)
    bundle = DataBundle(cfg, tok, train, val, sharding)
    log.info("data %s: %s", cfg.source, bundle.stats())
    return bundle
