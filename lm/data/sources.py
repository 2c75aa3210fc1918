"""Text sources: local text / JSONL / Parquet files (through HF ``datasets``) or hub datasets by name.

`iter_documents(cfg, split)` yields the non-empty documents (strings) of the training or validation
source of a `DataConfig`. Local files are read with ``load_dataset("text" | "json" | "parquet",
data_files=..., streaming=True)`` (no Arrow cache is written); hub datasets with
``load_dataset(name, config, split=..., streaming=cfg.streaming)``. Every failure is a `DataError` that
names the file or dataset: a missing path, a file that is not valid UTF-8 (with the byte offset), a
missing text column, or a hub dataset that cannot be reached (offline) -- with a hint to use a local file.
"""

from __future__ import annotations

import codecs
import glob
import os
import pathlib
from collections.abc import Iterator

from lm.data.config import DataConfig, DataError

BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_GLOB_CHARS = set("*?[")


def looks_local(source: str) -> bool:
    """True if ``source`` names (or is meant to name) local files rather than a hub dataset."""
    if os.path.exists(os.path.expanduser(source)):
        return True
    if source.startswith(("/", "./", "../", "~", ".\\")) or _GLOB_CHARS & set(source):
        return True
    return pathlib.PurePath(source).suffix.lower() in BUILDERS


def resolve_local_files(source: str) -> tuple[str, list[str]]:
    """(datasets builder name, sorted file list) for a local file, directory or glob; errors name the path."""
    path = os.path.expanduser(source)
    if _GLOB_CHARS & set(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"data source not found: no files match {source!r}")
    elif os.path.isdir(path):
        files = sorted(
            str(p) for p in pathlib.Path(path).rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS
        )
        if not files:
            raise DataError(
                f"data source directory {source!r} holds no {'/'.join(sorted(BUILDERS))} files"
            )
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"data source not found: {source!r} (no such file or directory)")
    kinds = {BUILDERS.get(pathlib.Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if pathlib.Path(f).suffix.lower() not in BUILDERS)
        raise DataError(f"data file {bad!r} has an unknown extension; use one of {sorted(BUILDERS)}")
    if len(kinds) > 1:
        raise DataError(f"data source {source!r} mixes file formats {sorted(kinds)}; use one format per source")
    return kinds.pop(), files


def check_utf8(path: str, chunk_size: int = 1 << 24) -> None:
    """Raise DataError naming ``path`` and the byte offset of the first invalid UTF-8 sequence."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            final = not chunk
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=final)
            except UnicodeDecodeError as e:
                position = offset - pending + e.start
                raise DataError(
                    f"data file {path!r} is not valid UTF-8 at byte offset {position} ({e.reason}); "
                    "re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if final:
                return
            offset += len(chunk)


def _iter_rows(dataset, text_field: str, where: str) -> Iterator[str]:
    first = True
    for row in dataset:
        if first:
            if text_field not in row:
                raise DataError(f"{where} has no text field {text_field!r}; its fields are {sorted(row)} (set data.text_field)")
            first = False
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} holds {type(text).__name__}, not text")
        if text.strip():
            yield text


def iter_local_documents(source: str, text_field: str = "text", text_unit: str = "document") -> Iterator[str]:
    """Documents of a local file / directory / glob (see module docstring)."""
    import datasets

    builder, files = resolve_local_files(source)
    if builder in ("text", "json"):
        for f in files:
            check_utf8(f)
    kwargs = {"sample_by": text_unit, "keep_linebreaks": True} if builder == "text" else {}
    where = f"data source {source!r}"
    try:
        dataset = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
        yield from _iter_rows(dataset, "text" if builder == "text" else text_field, where)
    except DataError:
        raise
    except Exception as e:  # datasets/pyarrow parse errors
        raise DataError(f"could not read {where} ({builder} files {files[:3]}{'...' if len(files) > 3 else ''}): {type(e).__name__}: {e}") from None


def _offline_hint(name: str) -> str:
    return (
        f"could not reach hub dataset {name!r}: no network or offline mode (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) "
        "and it is not in the local cache. To train on local text, set data.source to a .txt / .jsonl / .parquet "
        "file or directory (for example data.source=./data/input.txt), or run once with network access to cache it"
    )


def iter_hub_documents(source: str, split: str, text_field: str = "text", streaming: bool = True) -> Iterator[str]:
    """Documents of hub dataset ``name[:config]`` split ``split``."""
    import datasets

    name, _, config = source.partition(":")
    where = f"hub dataset {source!r} split {split!r}"
    try:
        dataset = datasets.load_dataset(name, config or None, split=split, streaming=streaming)
    except (ConnectionError, TimeoutError) as e:
        raise DataError(f"{_offline_hint(source)} [{e}]") from None
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if "offline" in text.lower() or "couldn't reach" in text.lower() or "connection" in text.lower():
            raise DataError(f"{_offline_hint(source)} [{text}]") from None
        raise DataError(f"could not load {where}: {text} (a local path must exist or start with ./ or /)") from None
    try:
        yield from _iter_rows(dataset, text_field, where)
    except DataError:
        raise
    except (ConnectionError, TimeoutError) as e:
        raise DataError(f"lost the connection while streaming {where}: {e}") from None


def iter_documents(cfg: DataConfig, split: str = "train") -> Iterator[str]:
    """Non-empty documents of the training (``split="train"``) or validation source of ``cfg``.

    The validation source is ``cfg.val_split``: a local path, or a split name of the hub dataset. Caps
    (``max_documents``) apply per split.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if split == "train":
        source, hub_split = cfg.source, cfg.train_split
    else:
        if cfg.val_split is None:
            raise DataError("no validation source: data.val_split is not set (the validation data is then held out by val_fraction)")
        if looks_local(cfg.val_split):
            source, hub_split = cfg.val_split, None
        else:
            source, hub_split = cfg.source, cfg.val_split
    if looks_local(source):
        docs = iter_local_documents(source, cfg.text_field, cfg.text_unit)
    else:
        if looks_local(cfg.source):
            raise DataError(f"data.val_split {cfg.val_split!r} is not a local path, but data.source is local")
        if cfg.streaming and cfg.max_documents is None and cfg.max_tokens is None:
            raise DataError(
                f"streaming hub dataset {source!r} needs a cap: set data.max_documents or data.max_tokens "
                "(the tokens are held in memory), or data.streaming=false to download it whole"
            )
        docs = iter_hub_documents(source, hub_split, cfg.text_field, cfg.streaming)
    for i, doc in enumerate(docs):
        if cfg.max_documents is not None and i >= cfg.max_documents:
            break
        yield doc
