"""Concatenate-and-chunk packing of tokenized documents into fixed-length blocks.

Documents are tokenized and concatenated into one int32 stream, each followed by the tokenizer's <eod>
id. Block ``i`` is ``tokens[i*T : i*T + T + 1]`` (T = block_size): ``inputs = block[:-1]``,
``targets = block[1:]``. Consecutive blocks share their boundary token, so every next-token transition
of the stream is trained on exactly once; only the tail of fewer than T tokens after the last full
block is not used.

`PackedTokens` also carries the amount of text (UTF-8 bytes and characters) its stream stands for, so
a loss in nats per token converts to bits per byte / character: ``bits_per_byte(loss)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable

import numpy as np

from lm.data.config import DataError
from lm.data.tokenizers import Tokenizer


@dataclasses.dataclass
class PackedTokens:
    """A packed split: a 1-D int32 token stream cut into overlapping-by-one blocks of block_size + 1."""

    tokens: np.ndarray
    block_size: int
    n_bytes: int
    n_chars: int
    name: str = "train"

    def __post_init__(self) -> None:
        self.tokens = np.ascontiguousarray(self.tokens, dtype=np.int32)
        if self.tokens.ndim != 1:
            raise ValueError("tokens must be a 1-D array")
        if len(self.tokens) < self.block_size + 1:
            raise DataError(
                f"block longer than the corpus: block_size {self.block_size} needs {self.block_size + 1} tokens "
                f"(inputs + shifted targets) but the {self.name} split has only {len(self.tokens)} tokens; "
                "lower data.block_size or use more text"
            )

    @property
    def n_tokens(self) -> int:
        return int(len(self.tokens))

    @property
    def num_blocks(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def blocks(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """Blocks ``indices`` as an int32 array of shape (len(indices), block_size + 1)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_blocks):
            raise IndexError(f"block index out of range [0, {self.num_blocks})")
        offsets = indices[:, None] * self.block_size + np.arange(self.block_size + 1)[None, :]
        return self.tokens[offsets]

    @property
    def tail_positions(self) -> int:
        """Target positions after the last full block (0 <= n < block_size): the ones ``blocks`` leaves out."""
        return self.n_tokens - 1 - self.num_blocks * self.block_size

    def tail_block(self) -> np.ndarray:
        """The last ``tail_positions + 1`` tokens right-padded with token 0 to a (block_size + 1,) block:
        its first ``tail_positions`` next-token transitions are the ones after the last full block."""
        out = np.zeros(self.block_size + 1, dtype=np.int32)
        start = self.num_blocks * self.block_size
        out[: self.n_tokens - start] = self.tokens[start:]
        return out

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of text per token (<eod> tokens count as tokens and carry no text)."""
        return self.n_bytes / self.n_tokens

    @property
    def chars_per_token(self) -> float:
        return self.n_chars / self.n_tokens

    def bits_per_byte(self, loss_nats_per_token: float) -> float:
        """Convert a mean cross-entropy in nats per token of this split to bits per UTF-8 byte."""
        return float(loss_nats_per_token) / math.log(2) / self.bytes_per_token

    def bits_per_char(self, loss_nats_per_token: float) -> float:
        return float(loss_nats_per_token) / math.log(2) / self.chars_per_token

    def stats(self) -> dict:
        return {
            "tokens": self.n_tokens,
            "blocks": self.num_blocks,
            "bytes": self.n_bytes,
            "chars": self.n_chars,
            "bytes_per_token": self.bytes_per_token,
            "chars_per_token": self.chars_per_token,
        }


def tokenize_documents(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    max_tokens: int | None = None,
    batch_documents: int = 512,
) -> np.ndarray:
    """Encode documents into one int32 stream, <eod> after each; stop after ``max_tokens`` tokens."""
    pieces: list[np.ndarray] = []
    total = 0
    eod = np.array([tokenizer.eod_id], dtype=np.int32)
    iterator = iter(documents)
    while max_tokens is None or total < max_tokens:
        batch = list(itertools.islice(iterator, batch_documents))
        if not batch:
            break
        if hasattr(tokenizer, "encode_array"):
            encoded = [tokenizer.encode_array(doc) for doc in batch]
        else:
            encoded = [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(batch)]
        for ids in encoded:
            pieces.append(ids.astype(np.int32, copy=False))
            pieces.append(eod)
            total += len(ids) + 1
    if not pieces:
        return np.zeros((0,), dtype=np.int32)
    tokens = np.concatenate(pieces)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    return tokens


def pack(tokens: np.ndarray, block_size: int, tokenizer: Tokenizer, name: str = "train") -> PackedTokens:
    """Wrap a token stream as `PackedTokens`, measuring the text it stands for."""
    if len(tokens) < block_size + 1:
        # Raise the clear "block longer than the corpus" error before measuring text.
        return PackedTokens(tokens, block_size, 0, 0, name)
    n_bytes, n_chars = tokenizer.text_stats(tokens)
    return PackedTokens(tokens, block_size, n_bytes, n_chars, name)


def split_tail(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the validation split is the LAST ``ceil(val_fraction * n)`` tokens."""
    n_val = math.ceil(val_fraction * len(tokens)) if val_fraction > 0 else 0
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
