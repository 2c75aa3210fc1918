"""Tracker backends read back from disk: TensorBoard event files (tensorboardX) and W&B offline runs.

Both files are parsed here without TensorFlow or a W&B server: the TFRecord framing of TensorBoard event
files and the LevelDB-log framing of ``.wandb`` files, with the backends' own protobuf classes. Each test
skips when its package (the ``tracking`` extra) is missing.
"""

from __future__ import annotations

import json
import pathlib
import struct

import numpy as np
import pytest

from lm.tracking import Tracker, TrackerConfig, read_metrics
from test_train import run, tiny


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C rotated right by 15 bits plus a constant (mod 2**32)."""
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tensorboard_scalars(log_dir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file under ``log_dir`` (TFRecords of `Event` protos:
    uint64 length, uint32 masked CRC of the length, payload, uint32 masked CRC of the payload)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {log_dir}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
            payload = data[pos + 12:pos + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
            assert length_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload), f"bad CRC in {path}"
            pos += 16 + length
            event = Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def read_wandb_records(run_file: pathlib.Path) -> list:
    """The `wandb_internal_pb2.Record`s of an offline ``run-*.wandb`` file: a 7-byte header (":W&B",
    magic 0xBEE1, version 0), then LevelDB log records (uint32 CRC, uint16 length, uint8 type: 1 full,
    2 first, 3 middle, 4 last) in 32 KiB blocks, a block's tail shorter than a record header being padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    block, header_len = 32768, 7
    data = run_file.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), data[:7]
    records, pos, pending = [], header_len, b""
    while pos + header_len <= len(data):
        if block - pos % block < header_len:  # padding at the end of a block
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header_len])
        chunk = data[pos + header_len:pos + header_len + length]
        pos += header_len + length
        if kind == 0 and length == 0:  # zero padding
            continue
        pending += chunk
        if kind in (1, 4):  # full / last piece
            records.append(Record.FromString(pending))
            pending = b""
    return records


def test_tensorboard_events_hold_the_logged_train_and_eval_metrics(tmp_path):
    pytest.importorskip("tensorboardX")
    from test_train import make_corpus

    cfg = tiny(make_corpus(tmp_path / "corpus.txt"), **{
        "trainer.steps": 6, "trainer.log_every": 2, "trainer.eval_every": 3, "trainer.checkpoint_every": 0,
        "tracker.backends": ["tensorboard"]})
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    scalars = read_tensorboard_scalars(run_dir / "tensorboard")
    for split in ("train", "eval"):
        records = read_metrics(run_dir, split)
        assert [r["step"] for r in records] == ([2, 4, 6] if split == "train" else [3, 6])
        for key in ("loss",) + (("grad_norm", "lr", "tokens_per_s") if split == "train" else ("ppl", "bits_per_char")):
            got = scalars[f"{split}/{key}"]
            assert [s for s, _ in got] == [r["step"] for r in records], key
            np.testing.assert_allclose([v for _, v in got], [r[key] for r in records], rtol=1e-6, err_msg=key)


def test_wandb_offline_run_holds_config_and_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "myrun"
    tracker = Tracker(run_dir, TrackerConfig(backends=["wandb"]), {"model": {"d_model": 32}, "trainer": {"steps": 3}})
    logged = {1: {"loss": 3.5, "lr": 1e-3}, 2: {"loss": 2.25, "lr": 2e-3}, 3: {"loss": 1.125, "lr": 3e-3}}
    for step, metrics in logged.items():
        tracker.log(step, metrics)
    tracker.log(3, {"loss": 1.5}, split="eval")
    tracker.close()
    import wandb

    wandb.teardown()  # stops the wandb-core service, which writes the run file out

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    (run_record,) = [r.run for r, k in zip(records, kinds) if k == "run"]
    assert run_record.display_name == "myrun" and run_record.project == "longconv"
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["model"] == {"d_model": 32} and config["trainer"] == {"steps": 3}
    history = {}
    for r, k in zip(records, kinds):
        if k == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history.setdefault(int(items.pop("_step")), {}).update(
                {key: v for key, v in items.items() if not key.startswith("_")})
    assert history == {1: {"train/loss": 3.5, "train/lr": 1e-3}, 2: {"train/loss": 2.25, "train/lr": 2e-3},
                       3: {"train/loss": 1.125, "train/lr": 3e-3, "eval/loss": 1.5}}
