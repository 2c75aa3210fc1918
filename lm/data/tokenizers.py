"""Tokenizers: byte-level, char-level and sentencepiece, behind one small interface.

Every tokenizer has ``encode(str) -> list[int]``, ``encode_batch(list[str]) -> list[list[int]]``,
``decode(ids) -> str``, ``vocab_size``, ``eod_id`` (alias ``eos_id``: the end-of-document token appended
after every document when packing), ``text_stats(ids) -> (n_bytes, n_chars)`` (the text a token stream
stands for, used for bits-per-byte / bits-per-char), and ``save(dir)``. `load_tokenizer(path)` reads any
of them back from a directory written by ``save`` (``tokenizer.json`` plus, for sentencepiece,
``tokenizer.model``) or from a bare sentencepiece ``.model`` file.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

from lm.data.config import DataError

TOKENIZER_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"


class Tokenizer:
    """Common interface; see the module docstring."""

    kind: str = ""
    vocab_size: int
    eod_id: int

    @property
    def eos_id(self) -> int:
        return self.eod_id

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def text_stats(self, ids: np.ndarray) -> tuple[int, int]:
        """(UTF-8 bytes, characters) of the text that ``ids`` encode, special tokens excluded."""
        ids = np.asarray(ids)
        total_bytes = total_chars = 0
        for start in range(0, len(ids), 1 << 20):
            text = self.decode(ids[start : start + (1 << 20)].tolist())
            total_bytes += len(text.encode("utf-8"))
            total_chars += len(text)
        return total_bytes, total_chars

    def _meta(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eod_id": self.eod_id}

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write the tokenizer into ``directory`` (created); returns the directory."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(json.dumps(self._meta(), ensure_ascii=False, indent=1))
        return directory

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod_id={self.eod_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0..255 are bytes, 256 is <eod>. Round-trips any string."""

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def text_stats(self, ids: np.ndarray) -> tuple[int, int]:
        ids = np.asarray(ids)
        data = ids[ids < 256]
        # A character starts at every byte that is not a UTF-8 continuation byte (0b10xxxxxx).
        return int(data.size), int(np.count_nonzero((data & 0xC0) != 0x80))


class CharTokenizer(Tokenizer):
    """One id per character: 0 is <eod>, 1 is <unk> (characters not seen when the vocabulary was built)."""

    kind = "char"
    SPECIALS = ("<eod>", "<unk>")

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise DataError("char tokenizer vocabulary must be distinct single characters")
        self.chars = chars
        self.eod_id, self.unk_id = 0, 1
        offset = len(self.SPECIALS)
        self.vocab_size = offset + len(chars)
        self._index = {c: i + offset for i, c in enumerate(chars)}
        # Dense lookup table over code points for fast encoding (code points beyond it go through the dict).
        limit = min(max((ord(c) for c in chars), default=0) + 1, 1 << 17)
        self._table = np.full(limit, self.unk_id, dtype=np.int32)
        for c, i in self._index.items():
            if ord(c) < limit:
                self._table[ord(c)] = i
        self._chars_arr = np.array(["", ""] + chars, dtype=object)
        self._bytes_arr = np.array([0, 0] + [len(c.encode("utf-8")) for c in chars], dtype=np.int64)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        """Vocabulary = every distinct character of ``texts``, sorted by code point."""
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        if not seen:
            raise DataError("cannot build a char tokenizer from empty text")
        return cls(sorted(seen))

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        out = np.full(codes.shape, self.unk_id, dtype=np.int32)
        small = codes < len(self._table)
        out[small] = self._table[codes[small]]
        if not small.all():
            for j in np.nonzero(~small)[0]:
                out[j] = self._index.get(chr(codes[j]), self.unk_id)
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        ids = ids[(ids >= len(self.SPECIALS)) & (ids < self.vocab_size)]
        return "".join(self._chars_arr[ids])

    def text_stats(self, ids: np.ndarray) -> tuple[int, int]:
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[(ids >= len(self.SPECIALS)) & (ids < self.vocab_size)]
        return int(self._bytes_arr[ids].sum()), int(ids.size)

    def _meta(self) -> dict:
        return {**super()._meta(), "unk_id": self.unk_id, "chars": "".join(self.chars)}


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; <eod> is the model's end-of-sentence id (``</s>``)."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike) -> None:
        import sentencepiece as spm

        model_file = pathlib.Path(model_file)
        if not model_file.is_file():
            raise DataError(f"sentencepiece model not found: {model_file}")
        self.model_file = model_file
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = int(self._sp.vocab_size())
        self.eod_id = int(self._sp.eos_id())
        if self.eod_id < 0:
            raise DataError(f"sentencepiece model {model_file} has no end-of-sentence (eos) piece to use as <eod>")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) != self.eod_id])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        directory = super().save(directory)
        target = directory / SPM_FILE
        if self.model_file.resolve() != target.resolve():
            shutil.copyfile(self.model_file, target)
        return directory


def _lines(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(
    files: Sequence[str | os.PathLike] | None,
    vocab_size: int,
    model_prefix: str | os.PathLike,
    *,
    texts: Iterable[str] | None = None,
    model_type: str = "unigram",
    byte_fallback: bool | None = None,
    character_coverage: float = 1.0,
    max_sentences: int = 2_000_000,
    seed: int = 0,
    text_field: str = "text",
    **extra,
) -> pathlib.Path:
    """Train a sentencepiece model on text ``files`` (local sources, see `lm.data.sources`) and/or ``texts``.

    Returns the written ``<model_prefix>.model``. Normalisation is the identity and whitespace is kept
    as is (so ``decode(encode(s)) == s`` for text made of known pieces); ``"\\n"`` is a piece of its own.
    ``byte_fallback`` (default: on when vocab_size >= 1024) encodes unseen characters as UTF-8 bytes
    instead of <unk>. Training reads at most ``max_sentences`` lines (a random sample beyond that).
    ``text_field`` is the column of JSONL / Parquet files. Extra keyword arguments go to ``SentencePieceTrainer.train``.
    """
    import sentencepiece as spm

    from lm.data.sources import iter_local_documents

    if vocab_size < 8:
        raise DataError(f"sentencepiece vocab_size must be >= 8, got {vocab_size}")
    if byte_fallback is None:
        byte_fallback = vocab_size >= 1024

    def sentences():
        if files:
            for f in files:
                yield from _lines(iter_local_documents(str(f), text_field, text_unit="line"))
        if texts is not None:
            yield from _lines(texts)

    model_prefix = pathlib.Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    iterator = sentences()
    try:
        first = next(iterator)
    except StopIteration:
        raise DataError(f"cannot train a sentencepiece model: no text in {list(map(str, files or []))}") from None

    def chained():
        yield first
        yield from iterator

    options = dict(
        sentence_iterator=chained(),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    options.update(extra)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as e:
        raise DataError(f"sentencepiece training failed (vocab_size={vocab_size}): {e}") from None
    return pathlib.Path(f"{model_prefix}.model")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved with ``save(dir)`` (or a bare sentencepiece ``.model`` file)."""
    path = pathlib.Path(path).expanduser()
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path)
    meta_file = path / TOKENIZER_FILE
    if not meta_file.is_file():
        raise DataError(f"no tokenizer at {path}: expected a directory with {TOKENIZER_FILE} or a sentencepiece .model file")
    meta = json.loads(meta_file.read_text())
    kind = meta.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(list(meta["chars"]))
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path / SPM_FILE)
    raise DataError(f"{meta_file}: unknown tokenizer kind {kind!r}")


def train_tokenizer(
    kind: str,
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int | None = None,
    text_field: str = "text",
    **sentencepiece_options,
) -> Tokenizer:
    """Build a tokenizer of ``kind`` from local text files and save it to ``out_dir``; returns it."""
    from lm.data.sources import iter_local_documents

    out_dir = pathlib.Path(out_dir)
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "char":
        tok = CharTokenizer.from_texts(doc for f in files for doc in iter_local_documents(str(f), text_field))
    elif kind == "sentencepiece":
        if not vocab_size:
            raise DataError("sentencepiece training needs a vocab size (--vocab-size)")
        with tempfile.TemporaryDirectory() as tmp:
            model = train_sentencepiece(
                files, vocab_size, pathlib.Path(tmp) / "spm", text_field=text_field, **sentencepiece_options
            )
            tok = SentencePieceTokenizer(model)
            tok.save(out_dir)
        return SentencePieceTokenizer(out_dir / SPM_FILE)
    else:
        raise DataError(f"unknown tokenizer kind {kind!r}; use byte, char or sentencepiece")
    tok.save(out_dir)
    return tok
