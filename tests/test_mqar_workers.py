"""`longconv mqar` with config key ``workers``: groups of runs trained at once in CPU worker processes."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lm.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
TWO_CPUS = len(os.sched_getaffinity(0)) >= 2 if hasattr(os, "sched_getaffinity") else False
needs_two_cpus = pytest.mark.skipif(not TWO_CPUS, reason="worker processes need 2 CPUs to be pinned apart")


def _config(tmp_path, max_epochs=3, **over) -> pathlib.Path:
    import yaml

    d = {
        "name": "w",
        "workers": 2,
        "data": {"vocab_size": 64, "num_train_examples": 128, "num_test_examples": 64},
        "mixers": [{"label": "attention", "mixer": {"name": "attention", "rotary": True}},
                   {"label": "baseconv", "mixer": {"name": "baseconv", "kernel_sizes": [3, -1]}}],
        "grid": {"points": [{"seq_len": 16, "num_kv_pairs": 2, "batch_size": 32}], "d_models": [32],
                 "lrs": [3e-3]},
        "train": {"max_epochs": max_epochs},
    }
    d.update(over)
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _records(out: pathlib.Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_cpu_shares_split_the_affinity_into_contiguous_parts(monkeypatch):
    from lm.mqar import workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    assert workers.cpu_shares(3) == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert workers.cpu_shares(2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert workers.cpu_shares(16) == [[i] for i in range(8)]  # at most one worker per CPU


def test_workers_config_key_is_checked(tmp_path):
    from lm.mqar.runner import load_mqar_config

    assert load_mqar_config(_config(tmp_path)).workers == 2
    with pytest.raises(ConfigError, match="config key 'workers' must be >= 1, got 0"):
        load_mqar_config(_config(tmp_path), ["workers=0"])


@needs_two_cpus
def test_workers_train_groups_apart_with_the_results_of_one_process(tmp_path):
    """Two groups in two pinned worker processes: each record comes back once, names the one CPU its group
    trained on (different CPUs), and matches the same sweep run group after group in this process."""
    from lm.mqar import runner

    path = _config(tmp_path)
    parallel = runner.sweep(runner.load_mqar_config(path), tmp_path / "par", progress=False, report=False)
    serial = runner.sweep(runner.load_mqar_config(path, ["workers=1"]), tmp_path / "ser", progress=False,
                          report=False)
    assert len(parallel) == len(serial) == 2
    a, b = (set(r["cpus"]) for r in parallel)
    assert a and b and not a & b and a | b <= os.sched_getaffinity(0)  # disjoint shares of this process's CPUs
    assert all("cpus" not in r for r in serial)
    assert len((tmp_path / "par" / "results.jsonl").read_text().splitlines()) == 2
    for p, s in zip(parallel, serial):
        assert (p["key"], p["stop"], p["steps"], p["fingerprint"]) == (s["key"], s["stop"], s["steps"], s["fingerprint"])
        np.testing.assert_allclose([h["test_loss"] for h in p["history"]], [h["test_loss"] for h in s["history"]],
                                   rtol=1e-4)
        assert [h["test_acc"] for h in p["history"]] == pytest.approx([h["test_acc"] for h in s["history"]],
                                                                        abs=1 / 64)


def _longconv(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "lm.cli", "mqar", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@needs_two_cpus
def test_sigterm_stops_the_workers_with_their_cut_runs_recorded_and_a_rerun_finishes_them(tmp_path):
    """SIGTERM to ``longconv mqar`` while both workers train: exit 130, an ``interrupted`` record and a
    checkpoint per group; the same command then resumes both groups and finishes them."""
    # 4 steps an epoch, about a millisecond each: a group trains for ~15 s, so that the other group's
    # compilation, late by a few seconds on a loaded machine, still finds it training
    total_steps = 4 * 3000
    path = _config(tmp_path, train={"max_epochs": 3000, "eval_every_steps": 1000})
    out = tmp_path / "out"
    proc = _longconv("--config", str(path), "--out", str(out))
    seen, lines = set(), []
    deadline = time.monotonic() + 240
    while len(seen) < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if " epoch " in line:  # both groups past their compilation and into training
            seen.add(line.split()[0])
    assert len(seen) == 2, "".join(lines)
    assert all(line.rstrip().endswith(" tok/s") for line in lines if " epoch " in line)  # no bars: the rate is here
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + rest
    recs = _records(out)
    assert sorted(r["stop"] for r in recs.values()) == ["interrupted", "interrupted"], rest
    assert all(0 < r["steps"] < total_steps for r in recs.values())
    assert len(list((out / "checkpoints").iterdir())) == 2

    again = _longconv("--config", str(path), "--out", str(out))
    text, _ = again.communicate(timeout=300)
    assert again.returncode == 0, text
    assert text.count("resumed 1 runs at step") == 2, text
    recs = _records(out)
    assert [r["stop"] for r in recs.values()] == ["max_epochs", "max_epochs"] and all(
        r["steps"] == total_steps for r in recs.values())
    assert not any((out / "checkpoints").iterdir())


@needs_two_cpus
def test_a_failing_worker_stops_the_sweep_with_its_error(tmp_path):
    """A group that cannot be built fails in its worker: the command ends with exit status 2 and the
    worker's message."""
    path = _config(tmp_path, mixers=[{"label": "attention", "mixer": {"name": "attention", "rotary": True}},
                                     {"label": "bad", "mixer": {"name": "attention", "num_heads": 3}}])
    proc = _longconv("--config", str(path), "--out", str(tmp_path / "out"))
    text, _ = proc.communicate(timeout=240)
    assert proc.returncode == 2, text
    assert "error: a worker failed: attention: d_model=32 is not divisible by num_heads=3" in text


def test_a_ctrl_c_dropped_in_a_gc_callback_still_stops_the_workers(tmp_path, monkeypatch):
    """A Ctrl-C whose KeyboardInterrupt Python drops (the handler ran in a gc callback) while this process
    waits for its worker: the workers ignore SIGINT, so without `interrupts_kept` the sweep would go on to
    the end. It stops within a second instead: KeyboardInterrupt here, and the worker's run, stopped long
    before its end, is recorded as cut (or not at all, if the stop reached it before training started)."""
    import multiprocessing.connection

    from lm.mqar import runner, workers
    from tests.test_signals import drop_interrupt_in_gc

    cfg = runner.load_mqar_config(_config(tmp_path, max_epochs=2000), ["grid.mixers=[attention]"])
    real_wait, waits_after_first_message = multiprocessing.connection.wait, []

    def wait_dropping_an_interrupt(conns, timeout=None):
        if waits_after_first_message is not None and waits_after_first_message:
            waits_after_first_message.append(timeout)
            if len(waits_after_first_message) == 3:  # the worker has its group
                drop_interrupt_in_gc("")
        ready = real_wait(conns, timeout)
        if ready and not waits_after_first_message:
            waits_after_first_message.append(timeout)  # its "next": answered once this returns
        return ready

    monkeypatch.setattr(multiprocessing.connection, "wait", wait_dropping_an_interrupt)
    records = []
    with pytest.raises(KeyboardInterrupt):
        workers.train_in_workers(cfg, runner.group_runs(runner.expand_grid(cfg)), tmp_path / "out",
                                 shares=[sorted(os.sched_getaffinity(0))[:1]], on_record=records.append)
    assert len(waits_after_first_message) >= 3, "the interrupt was never dropped"
    assert all(r["stop"] == "interrupted" and r["steps"] < 8000 for r in records), records
