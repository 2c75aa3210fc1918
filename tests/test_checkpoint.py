"""Damaged checkpoints, crashes mid-save and the module layering of lm.checkpoint (tiny real runs, CPU)."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lm.checkpoint import Checkpointer, CheckpointError, DamagedCheckpointError, load_run
from lm.cli import main as cli_main
from lm.tracking import read_metrics
from lm.train import Trainer, load_train_config
from tests.test_train import make_corpus, tiny

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def config(corpus, **over) -> dict:
    return tiny(corpus, **{"trainer.steps": 4, "trainer.eval_every": 0, "trainer.checkpoint_every": 2,
                           "trainer.log_every": 2, "trainer.keep_checkpoints": 2, **over})


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> pathlib.Path:
    """A run with committed checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    trainer = Trainer(load_train_config(base=config(corpus)), run_dir)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return run_dir


def copy_run(trained, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(trained, tmp_path / "run"))


def damage(step_dir: pathlib.Path, how: str) -> None:
    """Truncate the largest array data file of a step, or cut its metadata JSON in half."""
    if how == "truncated_array":
        target = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    else:
        target = step_dir / "meta" / "metadata"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def files(directory: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()}


def committed(run_dir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


REASON = {"truncated_array": "arrays unreadable", "corrupt_metadata": "metadata unreadable"}


@pytest.mark.parametrize("how", ["truncated_array", "corrupt_metadata"])
def test_load_run_falls_back_past_a_damaged_newest_step(how, trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    damage(run_dir / "checkpoints" / "4", how)
    damaged_files = files(run_dir / "checkpoints" / "4")
    capsys.readouterr()

    _, model, _, step = load_run(run_dir)
    notes = [line for line in capsys.readouterr().err.splitlines() if "using step" in line]
    assert step == 2 and len(notes) == 1, notes
    assert "step 4:" in notes[0] and REASON[how] in notes[0] and "using step 2 instead" in notes[0]
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    saved = ckpt.read_arrays(2)["model.embed.embedding"]
    ckpt.close()
    np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]), saved)  # step 2's weights

    # `longconv eval` (via load_run) works on the run; asking for the damaged step names it.
    assert cli_main(["eval", "--run", str(run_dir), "--max-batches", "1"]) == 0
    assert "using step 2 instead" in capsys.readouterr().err
    with pytest.raises(DamagedCheckpointError, match=f"step 4 .*{REASON[how]}"):
        load_run(run_dir, step=4)
    assert committed(run_dir) == [2, 4] and files(run_dir / "checkpoints" / "4") == damaged_files  # untouched


@pytest.mark.parametrize("how", ["truncated_array", "corrupt_metadata"])
def test_resume_falls_back_and_sets_the_damaged_step_aside(how, corpus, trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    damage(run_dir / "checkpoints" / "4", how)
    damaged_files = files(run_dir / "checkpoints" / "4")
    capsys.readouterr()

    trainer = Trainer(load_train_config(base=config(corpus, **{"trainer.steps": 6})), run_dir)
    try:
        assert trainer.step == 2
        notes = [line for line in capsys.readouterr().err.splitlines() if "using step" in line]
        assert len(notes) == 1 and "step 4:" in notes[0] and REASON[how] in notes[0], notes
        assert "using step 2 instead (damaged step kept as 4.damaged)" in notes[0]
        trainer.fit()
    finally:
        trainer.close()
    # keep_checkpoints=2 counts committed steps only; the damaged step is kept, renamed, byte for byte.
    assert committed(run_dir) == [4, 6]
    assert files(run_dir / "checkpoints" / "4.damaged") == damaged_files
    assert [r["step"] for r in read_metrics(run_dir, "train")] == [2, 4, 6]  # the old step-4 record dropped
    capsys.readouterr()
    assert load_run(run_dir)[3] == 6 and "using step" not in capsys.readouterr().err


def test_initialize_from_falls_back_past_a_damaged_newest_step(corpus, trained, tmp_path, capsys):
    source = copy_run(trained, tmp_path)
    damage(source / "checkpoints" / "4", "corrupt_metadata")
    capsys.readouterr()
    trainer = Trainer(load_train_config(base=config(corpus, initialize_from=str(source))), tmp_path / "new")
    try:
        weights = np.asarray(trainer.model.embed.embedding[...])
    finally:
        trainer.close()
    notes = [line for line in capsys.readouterr().err.splitlines() if "using step" in line]
    assert len(notes) == 1 and "initialize_from: checkpoint step 4: metadata unreadable" in notes[0], notes
    ckpt = Checkpointer(source / "checkpoints", read_only=True)
    np.testing.assert_array_equal(weights, ckpt.read_arrays(2)["model.embed.embedding"])
    ckpt.close()
    assert committed(source) == [2, 4]


def test_every_step_damaged_is_a_clear_error(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    for step in (2, 4):
        damage(run_dir / "checkpoints" / str(step), "corrupt_metadata")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be restored: step 4: .*; step 2: "):
        load_run(run_dir)
    assert committed(run_dir) == [2, 4]


def test_keep_checkpoints_honoured_after_a_crash_during_an_async_save(corpus, trained, tmp_path):
    """A process killed mid-save leaves ``<step>.orbax-checkpoint-tmp``; the next run removes it and keeps K."""
    run_dir = copy_run(trained, tmp_path)
    # What a kill leaves (see test_crash_during_async_save_leaves_only_a_tmp_dir), here for a step the
    # resumed schedule never saves again (e.g. the save of a Ctrl-C at step 5), so nothing overwrites it.
    partial = run_dir / "checkpoints" / "5.orbax-checkpoint-tmp"
    shutil.copytree(run_dir / "checkpoints" / "4", partial)
    for marker in partial.rglob("commit_success.txt"):
        marker.unlink()
    assert committed(run_dir) == [2, 4]
    trainer = Trainer(load_train_config(base=config(corpus, **{"trainer.steps": 8,
                                                               "trainer.async_checkpointing": True})), run_dir)
    try:
        assert trainer.step == 4
        trainer.fit()
    finally:
        trainer.close()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["6", "8"]


CRASH_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
from lm.train import Trainer, load_train_config
cfg = {cfg!r}

def die(step, metrics, trainer):  # the async save of this step is still being written
    os._exit(3)

Trainer(load_train_config(base=cfg), {run_dir!r}, hooks=[(die, 4)]).fit()
"""


@pytest.mark.slow
def test_crash_during_async_save_leaves_only_a_tmp_dir(corpus, tmp_path):
    """Kill a real training process right after it starts an async save; then resume with keep 2."""
    run_dir = tmp_path / "run"
    cfg = config(corpus, **{"trainer.steps": 8, "trainer.async_checkpointing": True})
    script = CRASH_SCRIPT.format(repo=str(REPO), cfg=cfg, run_dir=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert left in (["2", "4.orbax-checkpoint-tmp"], ["2", "4"]), left  # the latter if the save beat the kill
    trainer = Trainer(load_train_config(base=cfg), run_dir)
    try:
        assert trainer.step == max(committed(run_dir))
        trainer.fit()
    finally:
        trainer.close()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["6", "8"]


@pytest.mark.parametrize("argv, match", [(["--stop-at", "2"], "cannot stop at step 2 .*already at step 4"),
                                         (["trainer.steps=3"], r"config key 'trainer.steps' \(3\) is below .*\(4\)")])
def test_stopping_before_the_current_step_is_a_clear_error(argv, match, trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    before = files(run_dir / "checkpoints")
    config_before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    assert cli_main(["train", "--run-dir", str(run_dir), *argv]) == 1
    out, err = capsys.readouterr()
    assert re.search("^error: " + match, err, re.MULTILINE), err
    assert "nan" not in out
    assert files(run_dir / "checkpoints") == before and (run_dir / "config.yaml").read_text() == config_before


def test_checkpoint_module_sits_below_training(trained):
    """Loading a run through lm.checkpoint never imports lm.train; lm.train still exports the public names."""
    code = (f"import sys; from lm.checkpoint import load_run; assert load_run({str(trained)!r})[3] == 4; "
            "assert 'lm.train' not in sys.modules, 'lm.train imported'; "
            "from lm.train import Trainer, TrainConfig, train, load_train_config")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
