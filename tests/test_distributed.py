"""Multi-process training for real: two JAX processes on this machine run `longconv train --distributed`.

Each process gets 4 forced host CPU devices (8 global devices, mesh data=4 x fsdp=2); they meet through
JAX's coordination service on 127.0.0.1 and exchange gradients/parameters with JAX's CPU collectives
(gloo). The reference is one process with 8 forced devices and the same mesh, so the per-device
programs are the same and the two loss trajectories agree to float32 round-off.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from lm.checkpoint import Checkpointer
from lm.tracking import read_metrics
from test_train import make_corpus, tiny

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # per phase; a hang (e.g. a process waiting on a dead peer) fails instead of blocking CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list, devices: int, log: pathlib.Path) -> subprocess.Popen:
    """`python -m lm.cli train ARGS` on ``devices`` forced CPU devices; stdout+stderr go to ``log``
    (kept as ``proc.log_path``). Compiled programs are cached next to the log, so a resumed run reuses
    the first run's compilations."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_COMPILATION_CACHE_DIR=str(log.parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lm.cli", "train", *map(str, args)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    proc.log_path = log  # type: ignore[attr-defined]
    return proc


def launch_pair(args: list, log_dir: pathlib.Path, name: str, extra: tuple = ()) -> list[subprocess.Popen]:
    """The two processes of one distributed run (4 devices each), coordinator on a free loopback port."""
    coordinator = f"127.0.0.1:{free_port()}"
    return [launch([*args, "--distributed", "--coordinator", coordinator, "--num-processes", 2, "--process-id", i,
                    *extra], 4, log_dir / f"{name}{i}.log") for i in range(2)]


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[str]:
    """Wait for all (killing all on timeout); assert every exit code is 0; return each process's log."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
    logs = [p.log_path.read_text() for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{p.args} exited with {p.returncode}:\n{log[-3000:]}"
    return logs


def steps_on_disk(run_dir: pathlib.Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def read_checkpoint(run_dir: pathlib.Path, step: int) -> tuple[dict, dict]:
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        return ckpt.read_arrays(step), ckpt.read_meta(step)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def mesh_config(tmp_path_factory) -> pathlib.Path:
    """The tiny model on a data=4 x fsdp=2 mesh, 4 steps, a checkpoint every 2 steps, eval at the end."""
    root = tmp_path_factory.mktemp("dist")
    cfg = tiny(make_corpus(root / "corpus.txt"), **{
        "trainer.steps": 4, "trainer.checkpoint_every": 2, "trainer.log_every": 1, "trainer.eval_every": 0,
        "trainer.eval_steps": 2, "data.val_fraction": 0.1, "mesh.data": 4, "mesh.fsdp": 2,
        "mesh.min_shard_size": 1})
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_processes_stop_resume_and_match_one_process(mesh_config, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    reference = launch(["--config", mesh_config, "--run-dir", one], 8, tmp_path / "one.log")
    first = launch_pair(["--config", mesh_config, "--run-dir", two, "--stop-at", 2], tmp_path, "first")
    logs = finish(first + [reference])
    assert steps_on_disk(two) == [2]
    # Process 0 alone logs and writes metrics; both see 8 devices in 2 processes.
    assert "over 8 cpu device(s), 2 process(es)" in logs[0] and "fresh start" in logs[0], logs[0][-2000:]
    assert "[longconv train]" not in logs[1] and "done:" not in logs[1], logs[1][-2000:]

    # New processes, new coordinator: resume from the step-2 checkpoint with the run's config.yaml.
    second = finish(launch_pair(["--run-dir", two], tmp_path, "second"))
    assert "resuming at step 2" in second[0], second[0][-2000:]

    ref, got = read_metrics(one, "train"), read_metrics(two, "train")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-6, err_msg=key)
    (ref_eval,), (got_eval,) = read_metrics(one, "eval"), read_metrics(two, "eval")
    assert got_eval["step"] == 4 and got_eval["tokens"] == ref_eval["tokens"] > 0
    np.testing.assert_allclose(got_eval["loss"], ref_eval["loss"], rtol=1e-6)
    # The checkpoint both processes wrote together holds the same parameters and AdamW moments.
    (arrays_ref, meta_ref), (arrays, meta) = read_checkpoint(one, 4), read_checkpoint(two, 4)
    assert sorted(arrays) == sorted(arrays_ref) and meta["data"] == meta_ref["data"]
    for k in arrays_ref:
        # atol: AdamW's m / sqrt(v) magnifies float32 round-off of near-zero gradient entries; 1e-5 is
        # a thousandth of one step's update (lr 1e-2), far below what any disagreement in data would give.
        np.testing.assert_allclose(arrays[k], arrays_ref[k], rtol=1e-6, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_a_dead_process_stops_the_other_and_leaves_the_last_checkpoint(mesh_config, tmp_path):
    """kill -9 one process mid-run: the survivor aborts with JAX's "stopped sending heartbeats" error
    within the heartbeat timeout, and the last committed checkpoint restores."""
    run_dir = tmp_path / "run"
    procs = launch_pair(["--config", mesh_config, "--run-dir", run_dir, "trainer.steps=100000",
                         "trainer.checkpoint_every=5", "trainer.log_every=5"], tmp_path, "p",
                        extra=("--heartbeat-timeout", 10))
    deadline = time.monotonic() + TIMEOUT_S
    while not [s for s in steps_on_disk(run_dir) if s >= 10]:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint at step 10"
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    try:
        procs[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("process 0 did not stop within 120 s of process 1's death")
    log = procs[0].log_path.read_text()
    assert procs[0].returncode != 0
    assert "stopped sending heartbeats" in log, log[-3000:]
    last = steps_on_disk(run_dir)[-1]
    arrays, meta = read_checkpoint(run_dir, last)
    assert meta["step"] == last >= 10 and all(np.isfinite(a).all() for a in arrays.values())
