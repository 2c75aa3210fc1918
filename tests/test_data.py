"""Tests of the data layer: sources, tokenizers, packing, the resumable loader and sharded batches."""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lm.config import ConfigError, from_dict
from lm.data import (
    BatchLoader,
    ByteTokenizer,
    CharTokenizer,
    DataConfig,
    DataError,
    PackedTokens,
    SentencePieceTokenizer,
    build_data,
    eval_batches,
    iter_local_documents,
    load_tokenizer,
    pack,
    tokenize_documents,
    train_sentencepiece,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over lazy dog and then sleeps under a warm sun while birds sing".split()


def make_text(n_lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", ",", "!", ""])
             for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


def cfg(source, **kw) -> DataConfig:
    return from_dict(DataConfig, {"source": str(source), **kw})


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_non_ascii(tmp_path):
    tok = ByteTokenizer()
    text = "héllo wörld — ✓ 你好 🙂\n\ttabs"
    ids = tok.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eod_id]) == text  # specials are skipped
    assert tok.vocab_size == 257 and tok.eod_id == tok.eos_id == 256
    assert tok.text_stats(np.array(ids + [tok.eod_id])) == (len(text.encode()), len(text))
    again = load_tokenizer(tok.save(tmp_path / "byte"))
    assert isinstance(again, ByteTokenizer) and again.encode(text) == ids


def test_char_tokenizer_round_trip_and_save(tmp_path):
    text = "héllo wörld\n你好 🙂"
    tok = CharTokenizer.from_texts([text])
    assert tok.vocab_size == len(set(text)) + 2
    ids = tok.encode(text)
    assert tok.eod_id not in ids and tok.unk_id not in ids
    assert tok.decode(ids) == text
    assert tok.encode("Z")[0] == tok.unk_id  # unseen character
    assert tok.text_stats(np.array(ids + [0])) == (len(text.encode()), len(text))
    again = load_tokenizer(tok.save(tmp_path / "char"))
    assert isinstance(again, CharTokenizer) and again.encode(text) == ids and again.decode(ids) == text
    meta = json.loads((tmp_path / "char" / "tokenizer.json").read_text())
    assert meta["kind"] == "char"


def test_sentencepiece_train_and_round_trip(tmp_path, text_file):
    model = train_sentencepiece([text_file], vocab_size=48, model_prefix=tmp_path / "spm")
    assert model.is_file()
    tok = SentencePieceTokenizer(model)
    assert tok.vocab_size == 48 and tok.eod_id == 2
    sample = "the quick brown fox\n  jumps over the lazy dog!\n\nbirds sing"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert tok.encode_batch([sample, "dog"]) == [ids, tok.encode("dog")]
    n_bytes, n_chars = tok.text_stats(np.array(ids + [tok.eod_id]))
    assert (n_bytes, n_chars) == (len(sample.encode()), len(sample))
    again = load_tokenizer(tok.save(tmp_path / "saved"))
    assert isinstance(again, SentencePieceTokenizer) and again.encode(sample) == ids
    assert load_tokenizer(model).encode(sample) == ids  # a bare .model file loads too


def test_tokenizer_cli(tmp_path, text_file, capsys):
    from lm.cli import main

    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(text_file), "--vocab-size", "40", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "sentencepiece" and (out / "tokenizer.model").is_file()
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "the lazy dog"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert load_tokenizer(out).decode(ids) == "the lazy dog"
    assert main(["tokenizer", "decode", "--tokenizer", str(out), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "the lazy dog\n"
    assert main(["tokenizer", "train", "--input", str(text_file), "--kind", "char", "--out", str(tmp_path / "c")]) == 0
    assert load_tokenizer(tmp_path / "c").kind == "char"
    assert main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--kind", "char",
                 "--out", str(tmp_path / "x")]) == 1
    assert "missing.txt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- packing


def test_packing_targets_shifted_eod_and_no_token_lost():
    tok = ByteTokenizer()
    docs = ["abc", "defgh", "ij", "klmnopq"]
    tokens = tokenize_documents(docs, tok)
    expected = []
    for d in docs:
        expected += list(d.encode()) + [tok.eod_id]
    assert tokens.dtype == np.int32 and tokens.tolist() == expected  # <eod> after every document
    packed = pack(tokens, block_size=4, tokenizer=tok)
    n = len(tokens)
    assert packed.num_blocks == (n - 1) // 4
    blocks = packed.blocks(range(packed.num_blocks))
    assert blocks.shape == (packed.num_blocks, 5) and blocks.dtype == np.int32
    for i, block in enumerate(blocks):
        assert block.tolist() == expected[4 * i : 4 * i + 5]
    batch = next(eval_batches(packed, batch_size=packed.num_blocks))
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])  # shifted by one
    # Inputs + the final target cover the stream up to the tail remainder (< block_size tokens).
    covered = np.concatenate([batch["inputs"].reshape(-1), batch["targets"][-1, -1:]])
    assert covered.tolist() == expected[: len(covered)]
    assert n - len(covered) < 4
    assert packed.n_bytes == sum(len(d) for d in docs) and packed.n_tokens == n


def test_bits_per_byte_conversion():
    packed = PackedTokens(np.zeros(101, np.int32), block_size=10, n_bytes=404, n_chars=202)
    assert packed.bytes_per_token == 4.0 and packed.chars_per_token == 2.0
    assert packed.bits_per_byte(np.log(2) * 8) == pytest.approx(2.0)
    assert packed.bits_per_char(np.log(2) * 8) == pytest.approx(4.0)


def test_max_tokens_and_max_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(50)))
    data = build_data(cfg(path, max_tokens=100, val_fraction=0.0, block_size=8, batch_size=2))
    assert data.train.n_tokens == 100
    data = build_data(cfg(path, max_documents=3, val_fraction=0.0, block_size=8, batch_size=2))
    assert data.train.n_tokens == sum(len(f"document number {i}") + 1 for i in range(3))


# ---------------------------------------------------------------------------------------------- sources


def test_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}: " + make_text(3, seed=i) for i in range(20)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"body": texts, "id": list(range(20))}), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.parquet"):
        assert list(iter_local_documents(str(tmp_path / name), "body")) == texts
        data = build_data(cfg(tmp_path / name, text_field="body", block_size=16, batch_size=2))
        expected = tokenize_documents(texts, ByteTokenizer())
        np.testing.assert_array_equal(np.concatenate([data.train.tokens, data.val.tokens]), expected)
    with pytest.raises(DataError, match="no text field 'text'.*body"):
        build_data(cfg(tmp_path / "a.jsonl", block_size=16))


def test_text_units_and_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.txt").write_text("line one\nline two\n\npara two\n")
    (tmp_path / "d" / "2.txt").write_text("second file\n")
    assert list(iter_local_documents(str(tmp_path / "d"))) == ["line one\nline two\n\npara two\n", "second file\n"]
    lines = list(iter_local_documents(str(tmp_path / "d" / "1.txt"), text_unit="line"))
    assert [l.strip() for l in lines] == ["line one", "line two", "para two"]


def test_val_fraction_takes_last_part(text_file):
    data = build_data(cfg(text_file, val_fraction=0.1, block_size=16, batch_size=4))
    all_tokens = ByteTokenizer().encode(text_file.read_text()) + [256]
    n_val = int(np.ceil(0.1 * len(all_tokens)))
    assert data.val.tokens.tolist() == all_tokens[-n_val:]
    assert data.train.tokens.tolist() == all_tokens[:-n_val]
    assert data.train.n_bytes + data.val.n_bytes == len(text_file.read_bytes())


def test_char_tokenizer_saved_with_run_and_reused(tmp_path, text_file):
    run = tmp_path / "run"
    data = build_data(cfg(text_file, tokenizer={"kind": "char"}, block_size=16), run_dir=run)
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    # Resuming with other text keeps the saved vocabulary.
    other = tmp_path / "other.txt"
    other.write_text("zzz " * 100)
    again = build_data(cfg(other, tokenizer={"kind": "char"}, block_size=16), run_dir=run)
    assert again.tokenizer.chars == data.tokenizer.chars
    with pytest.raises(DataError, match="is 'char' but data.tokenizer.kind is 'byte'"):
        build_data(cfg(text_file, block_size=16), run_dir=run)


SPEECHES = [
    ("First Citizen", "Before we proceed any further, hear me speak."),
    ("All", "Speak, speak."),
    ("First Citizen", "You are all resolved rather to die than to famish?"),
    ("MENENIUS", "What work's, my countrymen, in hand? where go you\nWith bats and clubs? The matter? speak, I pray you."),
    ("ROMEO", "But, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun."),
    ("JULIET", "O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;"),
]


def shakespeare_text(n_speeches: int = 120, seed: int = 0) -> str:
    """A few kB in tinyshakespeare's layout: "SPEAKER:\nline(s)\n\n" blocks."""
    rng = random.Random(seed)
    return "".join(f"{who}:\n{what}\n\n" for who, what in (rng.choice(SPEECHES) for _ in range(n_speeches)))


def test_shakespeare_layout_char_corpus(tmp_path):
    """The tinyshakespeare configs' data path (char tokenizer, last 10% validation) on a small corpus
    in that layout, built here so the test runs without the shared data set."""
    path = tmp_path / "input.txt"
    text = shakespeare_text()
    path.write_text(text)
    assert 4_000 < len(text) < 20_000
    data = build_data(cfg(path, tokenizer={"kind": "char"}, block_size=64, batch_size=8))
    assert data.tokenizer.vocab_size == len(set(text)) + 2  # + <unk>, <eod>
    assert data.tokenizer.decode(np.concatenate([data.train.tokens, data.val.tokens]).tolist()) == text
    assert data.train.n_chars + data.val.n_chars == len(text)
    assert abs(data.val.n_tokens / (data.train.n_tokens + data.val.n_tokens) - 0.1) < 1e-3
    batch = data.next_batch()
    assert batch["inputs"].shape == (8, 64)
    assert data.val.n_bytes == data.val.n_chars == data.val.n_tokens - 1  # ASCII: one token per char + <eod>
    assert data.val_bytes_per_token == data.val_chars_per_token == pytest.approx(data.val.n_chars / data.val.n_tokens)


# ----------------------------------------------------------------------------------------------- errors


def test_error_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found.*nope.txt"):
        build_data(cfg(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="not found.*typo.jsonl"):
        build_data(cfg("typo.jsonl"))


def test_error_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="corpus is empty"):
        build_data(cfg(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="corpus is empty"):
        build_data(cfg(tmp_path / "empty.txt", tokenizer={"kind": "char"}))


def test_error_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("plain ascii then ".encode() + "café".encode("latin-1") + b" more")
    with pytest.raises(DataError, match=r"latin1\.txt.*not valid UTF-8 at byte offset 20"):
        build_data(cfg(path))


def test_error_block_longer_than_corpus(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny")  # 4 bytes + <eod>
    with pytest.raises(DataError, match=r"block longer than the corpus: block_size 64 needs 65 tokens .* only 5 tokens"):
        build_data(cfg(path, block_size=64, val_fraction=0.0))


def test_error_unknown_config_key():
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        from_dict(DataConfig, {"source": "x.txt", "bogus": 1})
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        from_dict(DataConfig, {"source": "x.txt", "tokenizer": {"kind": "wordpiece"}})
    with pytest.raises(ConfigError, match="val_fraction"):
        from_dict(DataConfig, {"source": "x.txt", "val_fraction": 1.5})


def test_error_sentencepiece_without_path(text_file):
    with pytest.raises(DataError, match="longconv tokenizer train"):
        build_data(cfg(text_file, tokenizer={"kind": "sentencepiece"}))


def test_error_offline_hub_dataset():
    code = textwrap.dedent(
        """
        from lm.config import from_dict
        from lm.data import DataConfig, DataError, build_data
        c = from_dict(DataConfig, {"source": "wikitext:wikitext-103-raw-v1", "max_documents": 10})
        try:
            build_data(c)
        except DataError as e:
            print("ERR", e)
        """
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "ERR could not reach hub dataset 'wikitext:wikitext-103-raw-v1'" in out.stdout, out.stdout + out.stderr
    assert "local" in out.stdout


def test_error_streaming_hub_needs_cap():
    with pytest.raises(DataError, match="needs a cap"):
        build_data(cfg("EleutherAI/pile"))


# ----------------------------------------------------------------------------------------------- loader


def _packed(n_tokens=1000, block_size=8):
    return PackedTokens(np.arange(n_tokens, dtype=np.int32), block_size, n_tokens, n_tokens)


def test_loader_determinism_and_epochs():
    data = _packed()
    a = [BatchLoader(data, 4, seed=1).next()["inputs"] for _ in range(1)]
    l1, l2, l3 = BatchLoader(data, 4, seed=1), BatchLoader(data, 4, seed=1), BatchLoader(data, 4, seed=2)
    b1 = [l1.next()["inputs"] for _ in range(40)]
    b2 = [l2.next()["inputs"] for _ in range(40)]
    b3 = [l3.next()["inputs"] for _ in range(40)]
    np.testing.assert_array_equal(a[0], b1[0])
    assert all(np.array_equal(x, y) for x, y in zip(b1, b2))
    assert not all(np.array_equal(x, y) for x, y in zip(b1, b3))
    # One epoch visits distinct blocks; each batch row is a real block of the stream.
    assert l1.steps_per_epoch == data.num_blocks // 4 == 31
    starts = np.concatenate([b[:, 0] for b in b1[:31]])
    assert len(set(starts.tolist())) == 124 and all(s % 8 == 0 for s in starts)
    assert l1.state()["epoch"] == 1  # 40 steps crossed the epoch boundary
    second = np.concatenate([b[:, 0] for b in b1[31:40]])
    assert not np.array_equal(second, starts[: len(second)])  # a new shuffle each epoch


def test_loader_exact_resume_across_epoch_boundary():
    data = _packed()
    reference = BatchLoader(data, 4, seed=7)
    expected = [reference.next() for _ in range(70)]  # 31 steps/epoch: crosses two boundaries
    loader = BatchLoader(data, 4, seed=7)
    for _ in range(29):
        loader.next()
    state = json.loads(json.dumps(loader.state()))  # survives a JSON checkpoint
    fresh = BatchLoader(data, 4, seed=7)
    fresh.restore(state)
    for i in range(29, 70):
        batch = fresh.next()
        for key in ("inputs", "targets", "mask"):
            np.testing.assert_array_equal(batch[key], expected[i][key])
    with pytest.raises(DataError, match="seed"):
        BatchLoader(data, 4, seed=8).restore(state)


def test_grain_loader_batches_are_a_pure_function_of_seed_and_index():
    """The batches come from a grain MapDataset: batch j is the same whether read ahead by the grain
    reader thread, synchronously, or directly by index; every epoch is a fresh permutation of distinct
    blocks; the checkpointed grain iterator state counts consumed (not prefetched) batches."""
    import grain

    data = _packed()
    ahead, sync = BatchLoader(data, 4, seed=5, prefetch=4), BatchLoader(data, 4, seed=5, prefetch=0)
    assert isinstance(ahead.dataset, grain.MapDataset)
    steps = ahead.steps_per_epoch
    for j in range(2 * steps + 3):
        a, b = ahead.next(), sync.next()
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["inputs"], ahead.batch(j)["inputs"])
        np.testing.assert_array_equal(a["inputs"], data.blocks(ahead.indices(j))[:, :-1])
    assert ahead.state()["iterator"] == {"next_index": 2 * steps + 3}
    for epoch in range(2):
        seen = np.concatenate([ahead.indices(epoch * steps + k) for k in range(steps)])
        assert len(set(seen.tolist())) == steps * 4 and seen.min() >= 0 and seen.max() < data.num_blocks
    assert not np.array_equal(ahead.indices(0), ahead.indices(steps))
    # The order is grain's own per-epoch shuffle of the blocks (MapDataset.shuffle reseeds each epoch).
    order = grain.MapDataset.range(data.num_blocks).shuffle(seed=5)
    for j in (0, 7, steps, 2 * steps + 1):
        epoch, k = divmod(j, steps)
        start = epoch * data.num_blocks + k * 4
        np.testing.assert_array_equal(ahead.indices(j), [order[i] for i in range(start, start + 4)])


def test_bundle_facade_resume(text_file):
    c = cfg(text_file, block_size=16, batch_size=4, seed=3)
    reference = build_data(c)
    expected = [reference.next_batch()["inputs"] for _ in range(reference.loader.steps_per_epoch + 5)]
    data = build_data(c)
    for _ in range(10):
        data.next_batch()
    resumed = build_data(c)
    resumed.restore(data.state())
    for i in range(10, len(expected)):
        np.testing.assert_array_equal(resumed.next_batch()["inputs"], expected[i])
    assert sum(1 for _ in resumed.val_batches()) == resumed.val.num_blocks // 4
    assert resumed.val_bytes_per_token == resumed.val.bytes_per_token


def test_eval_batches_pad_and_drop():
    data = _packed(n_tokens=81, block_size=8)  # 10 blocks
    batches = list(eval_batches(data, 4, pad=True))
    assert len(batches) == 3
    assert batches[-1]["mask"][:, 0].tolist() == [1, 1, 0, 0]
    inputs = np.concatenate([b["inputs"] for b in batches])[:10]
    np.testing.assert_array_equal(inputs, data.blocks(range(10))[:, :-1])
    dropped = list(eval_batches(data, 4))  # default: drop the partial batch, every row real
    assert len(dropped) == 2 and all(b["mask"].all() for b in dropped)
    assert len(list(eval_batches(data, 4, max_batches=1))) == 1
    small = list(eval_batches(data, 16))  # fewer blocks than a batch: one padded batch, never empty
    assert len(small) == 1 and small[0]["mask"][:, 0].sum() == 10


def test_eval_batches_pad_scores_every_position_once():
    """85 tokens, block 8: 10 full blocks (80 positions) and a tail of 4; pad=True yields each of the 84
    (input, target) transitions exactly once with mask 1, and nothing else with mask 1."""
    data = _packed(n_tokens=85, block_size=8)
    assert data.tail_positions == 4
    batches = list(eval_batches(data, 4, pad=True))
    assert len(batches) == 3  # 11 rows: 10 blocks + the tail block, padded to 12
    pairs = [(int(x), int(y)) for b in batches
             for x, y, m in zip(b["inputs"].ravel(), b["targets"].ravel(), b["mask"].ravel()) if m == 1]
    assert pairs == [(t, t + 1) for t in range(84)]
    assert batches[-1]["mask"].sum(axis=1).tolist() == [8, 8, 4, 0]  # blocks 8, 9, the tail, padding
    assert all(b["mask"].all() for b in eval_batches(data, 4))  # pad=False: full blocks only, as before
    assert sum(b["mask"].sum() for b in eval_batches(data, 4)) == 64


def test_loader_errors():
    with pytest.raises(DataError, match="fewer than one batch"):
        BatchLoader(_packed(n_tokens=30, block_size=8), 8)


SHARDED_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lm.data import BatchLoader, DataError, PackedTokens, eval_batches
    assert jax.device_count() == 8
    data = PackedTokens(np.arange(2001, dtype=np.int32), 16, 2001, 2001)
    for shape, names in [((4, 2), ("data", "fsdp")), ((2, 2, 2), ("data", "fsdp", "model"))]:
        mesh = jax.make_mesh(shape, names)
        sharding = NamedSharding(mesh, P(("data", "fsdp")))
        sharded, plain = BatchLoader(data, 8, seed=3, sharding=sharding), BatchLoader(data, 8, seed=3)
        for _ in range(20):
            a, b = sharded.next(), plain.next()
            for k in b:
                assert isinstance(a[k], jax.Array) and a[k].sharding == sharding, k
                assert a[k].shape == b[k].shape
                np.testing.assert_array_equal(np.asarray(a[k]), b[k])
        for a, b in zip(eval_batches(data, 8, sharding, pad=True), eval_batches(data, 8, pad=True)):
            for k in b:
                np.testing.assert_array_equal(np.asarray(a[k]), b[k])
        try:
            BatchLoader(data, 6, sharding=sharding)
            raise SystemExit("no error")
        except DataError as e:
            shards = 8 if shape == (4, 2) else 4
            assert f"not divisible by the {shards} data shards" in str(e), e
    # The bundle facade the trainer uses.
    import pathlib, tempfile
    from lm.config import from_dict
    from lm.data import DataConfig, build_data
    path = pathlib.Path(tempfile.mkdtemp()) / "t.txt"
    path.write_text("some text for the sharded bundle " * 200)
    c = from_dict(DataConfig, {"source": str(path), "block_size": 32, "batch_size": 8})
    sharding = NamedSharding(jax.make_mesh((4, 2), ("data", "fsdp")), P(("data", "fsdp")))
    a, b = build_data(c, sharding=sharding), build_data(c)
    for _ in range(3):
        x, y = a.next_batch(), b.next_batch()
        assert x["inputs"].sharding == sharding
        np.testing.assert_array_equal(np.asarray(x["inputs"]), y["inputs"])
    assert next(a.val_batches())["targets"].sharding == sharding
    try:
        build_data(from_dict(DataConfig, {"source": str(path), "batch_size": 4}), sharding=sharding)
        raise SystemExit("no error")
    except DataError as e:
        assert "data.batch_size 4 is not divisible by the 8 data shards" in str(e), e
    print("OK")
    """
)


def test_sharded_global_batches_on_8_cpu_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def test_local_rows_of_a_multi_host_sharding():
    from lm.data.loader import _local_rows

    class FakeSharding:  # this process's 2 devices hold rows 8:12 and 24:28 of 32
        def addressable_devices_indices_map(self, shape):
            return {0: (slice(8, 12), slice(None)), 1: (slice(24, 28), slice(None))}

    assert _local_rows(FakeSharding(), (32, 5)).tolist() == [8, 9, 10, 11, 24, 25, 26, 27]


def test_hub_source_with_named_splits(monkeypatch):
    """The hub path (mocked: no network here): named train/validation splits, config name, caps."""
    import datasets

    calls = []
    rows = {"train": [{"text": f"train doc {i} " * 5} for i in range(30)],
            "validation": [{"text": f"val doc {i} " * 5} for i in range(10)]}

    def fake_load_dataset(name, config=None, split=None, streaming=False, **kw):
        calls.append((name, config, split, streaming))
        return iter(rows[split])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = build_data(cfg("wikitext:wikitext-2-raw-v1", val_split="validation", max_documents=20, block_size=16))
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train", True), ("wikitext", "wikitext-2-raw-v1", "validation", True)]
    tok = ByteTokenizer()
    np.testing.assert_array_equal(data.train.tokens, tokenize_documents([r["text"] for r in rows["train"][:20]], tok))
    np.testing.assert_array_equal(data.val.tokens, tokenize_documents([r["text"] for r in rows["validation"]], tok))


def test_hub_connection_error_is_clear(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'EleutherAI/pile' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="could not reach hub dataset 'EleutherAI/pile'.*data.source"):
        build_data(cfg("EleutherAI/pile", max_tokens=1000))


def test_local_val_split_file(tmp_path, text_file):
    val = tmp_path / "val.txt"
    val.write_text(make_text(50, seed=1))
    data = build_data(cfg(text_file, val_split=str(val), block_size=16))
    assert data.train.n_bytes == len(text_file.read_bytes()) and data.val.n_bytes == len(val.read_bytes())
