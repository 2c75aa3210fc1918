"""MQAR runner: vmapped groups of runs equal separate runs; time budget, Ctrl-C records and exact resume."""

from __future__ import annotations

import os
import signal

import numpy as np
import optax
import pytest
from flax import nnx

from lm.mqar import runner
from lm.signals import sigterm_as_interrupt
from tests.test_signals import drop_interrupt_in_gc

STEPS_PER_EPOCH = 25  # 400 rows / batch 16


def _cfg(tmp_path, grid=None, **train):
    import yaml

    d = {
        "name": "vmap",
        "data": {"vocab_size": 32, "num_train_examples": 400, "num_test_examples": 64},
        "model": {"init_std": 0.1, "n_layers": 1},  # one layer: the compilations dominate these tests
        # attention dropout: each member must carry its own dropout RNG stream
        "mixers": [{"label": "attention", "mixer": {"name": "attention", "rotary": True, "init_std": 0.1,
                                                     "dropout": 0.1}}],
        "grid": {"points": [{"seq_len": 16, "num_kv_pairs": 2, "batch_size": 16}], "d_models": [16],
                 "lrs": [1e-3, 1e-2], "seeds": [0, 1], **(grid or {})},
        "train": {"max_epochs": 8, "eval_every_steps": 20, "early_stop_acc": 1.1, **train},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d))
    return runner.load_mqar_config(p)


def _scored_logits(model, x, pos):
    import jax.numpy as jnp

    return jnp.take_along_axis(model(x), pos[:, :, None], axis=1)


@nnx.jit
def _solo_step(model, opt, x, pos, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(_scored_logits(model, x, pos), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss


@nnx.jit
def _solo_test_metrics(model, x, pos, y):
    import jax.numpy as jnp

    logits = _scored_logits(model, x, pos)
    return (jnp.argmax(logits, -1) == y).mean(), optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


_SOLO_HISTORIES: dict = {}  # (run key, eval steps) -> history: both member loops compare with the same runs
_SOLO_TX: dict = {}  # lr -> optimizer: runs with one lr (seeds) share it, so their step compiles once


def _solo_history(cfg, run, train, test, eval_steps):
    """One run trained alone, written independently of the runner: plain NNX model and optax AdamW with the
    run's own learning rate, full-sequence logits (no gather before the head), the runner's batch order.
    Returns {step: (train_loss, test_acc, test_loss)} at ``eval_steps`` (cached per run and steps)."""
    key = (run.key, tuple(eval_steps))
    if key not in _SOLO_HISTORIES:
        _SOLO_HISTORIES[key] = _train_alone(cfg, run, train, test, eval_steps)
    return _SOLO_HISTORIES[key]


def _train_alone(cfg, run, train, test, eval_steps):
    import jax
    import jax.numpy as jnp

    from lm.model import LM
    from lm.optim import make_optimizer, model_label_map

    tc = cfg.train
    model = LM(runner.model_config_for(cfg, run), rngs=nnx.Rngs(params=run.seed, dropout=run.seed + 1))
    bs = run.point.batch_size
    spe = train.inputs.shape[0] // bs
    if run.lr not in _SOLO_TX:
        _SOLO_TX[run.lr] = make_optimizer(runner.optimizer_config(tc, run.lr), spe * tc.max_epochs,
                                          model_label_map(model))
    opt = nnx.Optimizer(model, _SOLO_TX[run.lr], wrt=nnx.Param)
    step = nnx.cached_partial(_solo_step, model, opt)

    out = {}
    orders = runner.epoch_orders(cfg.data.train_seed, train.inputs.shape[0], cfg.data.reshuffle)
    order = None
    for s in range(max(eval_steps)):
        epoch, i = divmod(s, spe)
        if i == 0:
            order = next(orders)
        idx = order[i * bs:(i + 1) * bs]
        loss = step(*(jnp.asarray(a[idx]) for a in (train.inputs, train.positions, train.targets)))
        if s + 1 in eval_steps:
            model.eval()
            acc, tl = _solo_test_metrics(model, *(jnp.asarray(a) for a in (test.inputs, test.positions, test.targets)))
            model.train()
            out[s + 1] = (float(loss), float(acc), float(tl))
    jax.block_until_ready(nnx.state(model))
    return out


@pytest.mark.parametrize("member_loop", ["vmap", pytest.param("map", marks=pytest.mark.slow)])  # map: -m slow (CI time)
def test_vmapped_group_equals_runs_trained_alone(tmp_path, monkeypatch, member_loop):
    """Four members (2 lrs x 2 seeds) in one step (vmapped, or mapped one after another) follow the
    trajectories of the same runs trained alone, for 200 steps; members that early-stop leave the stacked
    step (map) or stay in it frozen (vmap: the step compiles once), and the others go on unchanged."""
    cfg = _cfg(tmp_path, early_stop_acc=0.40, member_loop=member_loop)
    runs = runner.expand_grid(cfg)
    train = runner.make_split(cfg, runs[0].point, True)
    test = runner.make_split(cfg, runs[0].point, False)
    built, build = [], runner._build_steps
    monkeypatch.setattr(runner, "_build_steps", lambda *a: built.append(build(*a)) or built[-1])
    recs = runner.train_group(cfg, runs, train, test, progress=False)
    compiles = built[0][0]._cache_size()
    assert compiles == 1 if member_loop == "vmap" else compiles > 1, compiles
    by_key = {r["key"]: r for r in recs}
    assert sorted(by_key) == sorted(r.key for r in runs) and all(r["group_size"] == 4 for r in recs)
    stops = {r["stop"] for r in recs}
    assert stops == {"early_stop", "max_epochs"}, [(r["key"], r["stop"], r["steps"]) for r in recs]
    total = 8 * STEPS_PER_EPOCH
    for run in runs:
        rec = by_key[run.key]
        hist = {h["step"]: h for h in rec["history"]}
        assert max(hist) == rec["steps"] and (rec["stop"] == "early_stop") == (rec["steps"] < total)
        solo = _solo_history(cfg, run, train, test, sorted(hist))
        for s, (loss, acc, test_loss) in solo.items():
            h = hist[s]
            assert h["train_loss"] == pytest.approx(loss, abs=2e-4), (run.key, s)
            assert h["test_loss"] == pytest.approx(test_loss, abs=2e-4), (run.key, s)
            assert h["test_acc"] == pytest.approx(acc, abs=1e-3), (run.key, s)
        assert rec["acc"] == pytest.approx(max(a for _, a, _ in solo.values()), abs=1e-3)


def _final(path):
    return {r["key"]: r for r in runner.read_results(path) if r["stop"] in runner.FINAL_STOPS}


def _strip(rec):
    return {k: v for k, v in rec.items() if k not in ("wall_s", "cpu_s", "tokens_per_s", "startup_s")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _cfg(tmp, max_epochs=2)
    runner.sweep(cfg, tmp / "out", progress=False, report=False)
    return _final(tmp / "out" / "results.jsonl")


class _StepCounter:
    """Wraps `runner._build_steps` so that every training step is counted, and Ctrl-C can be simulated
    right before step ``interrupt_at`` (1-based, counted over all calls), a SIGTERM sent inside step
    ``sigterm_in`` (``sigterms`` of them), a Ctrl-C dropped by a gc callback inside step ``dropped_in``, or the process killed right before step ``crash_at``. With a fake ``clock`` a step takes
    one second, and the first step and the first evaluation ``compile_s`` more."""

    def __init__(self, monkeypatch, interrupt_at=None, clock=None, sigterm_in=None, crash_at=None, compile_s=0.0,
                 dropped_in=None, sigterms=1):
        self.calls, self.interrupt_at, self.clock, self.sigterm_in = 0, interrupt_at, clock, sigterm_in
        self.dropped_in, self.sigterms = dropped_in, sigterms
        self.crash_at, self.compile_s, self.evaluated = crash_at, compile_s, False
        build = runner._build_steps

        def counting_build(*args):
            train_step, eval_step = build(*args)

            def counted_step(*a):
                if self.calls + 1 == self.interrupt_at:
                    self.interrupt_at = None
                    raise KeyboardInterrupt
                if self.calls + 1 == self.crash_at:
                    self.crash_at = None
                    raise SystemExit("killed")  # no record, no checkpoint on the way out: as a killed process
                self.calls += 1
                if self.clock is not None:
                    self.clock.t += 1.0 + (self.compile_s if self.calls == 1 else 0.0)  # one (fake) second a step
                out = train_step(*a)
                if self.calls == self.sigterm_in:
                    for _ in range(self.sigterms):
                        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the step (which donated its input) runs
                if self.calls == self.dropped_in:
                    drop_interrupt_in_gc()  # as a Ctrl-C landing in JAX's gc callback: Python drops it
                return out

            def timed_eval(*a):
                if self.clock is not None and self.compile_s and not self.evaluated:
                    self.clock.t += self.compile_s
                self.evaluated = True
                return eval_step(*a)

            return counted_step, timed_eval

        monkeypatch.setattr(runner, "_build_steps", counting_build)


def test_ctrl_c_records_interrupted_runs_and_rerun_resumes_exactly(tmp_path, monkeypatch, uninterrupted):
    cfg = _cfg(tmp_path, max_epochs=2)
    out = tmp_path / "out"
    counter = _StepCounter(monkeypatch, interrupt_at=33)
    with pytest.raises(KeyboardInterrupt):
        runner.sweep(cfg, out, progress=False)
    recs = runner.read_results(out / "results.jsonl")
    assert len(recs) == 4 and {r["stop"] for r in recs} == {"interrupted"} and {r["steps"] for r in recs} == {32}
    assert runner.checkpoint_path(out, runner.expand_grid(cfg)).is_file()
    assert "[cut]" in (out / "table.md").read_text()  # the report is written and marks the cut runs

    runner.sweep(cfg, out, progress=False)
    assert counter.calls == 2 * STEPS_PER_EPOCH  # resumed at step 33, no step repeated
    resumed = _final(out / "results.jsonl")
    assert sorted(resumed) == sorted(uninterrupted)
    for key, rec in resumed.items():
        assert _strip(rec) == _strip(uninterrupted[key])  # same history and accuracy as never interrupted
    assert not runner.checkpoint_path(out, runner.expand_grid(cfg)).exists()


@pytest.mark.parametrize("how, signal_step, last_evaluated",
                         [("sigterm", 33, 25), ("sigterm", 40, 40), ("dropped_by_gc", 33, 25)])
def test_a_stop_signal_during_a_step_acts_after_it(tmp_path, monkeypatch, uninterrupted, signal_step, last_evaluated,
                                                   how):
    """SIGTERM while a step runs (it donates the state it is given) stops the sweep once the step has
    returned the new state, and once the evaluation the step ends (step 40: evaluations at 20, 25, 40, 50)
    has run: the checkpoint holds that step, and the rerun ends as if never interrupted. The same when the
    interrupt was raised in a gc callback, where Python drops it (`lm.signals.interrupts_kept`)."""
    cfg = _cfg(tmp_path, max_epochs=2)
    out = tmp_path / "out"
    counter = _StepCounter(monkeypatch, **{"sigterm_in" if how == "sigterm" else "dropped_in": signal_step})
    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        runner.sweep(cfg, out, progress=False, report=False)
    recs = runner.read_results(out / "results.jsonl")
    assert {r["stop"] for r in recs} == {"interrupted"} and {r["steps"] for r in recs} == {signal_step}
    assert {r["history"][-1]["step"] for r in recs} == {last_evaluated}
    assert runner.checkpoint_path(out, runner.expand_grid(cfg)).is_file()
    runner.sweep(cfg, out, progress=False, report=False)
    assert counter.calls == 2 * STEPS_PER_EPOCH
    resumed = _final(out / "results.jsonl")
    assert {k: _strip(r) for k, r in resumed.items()} == {k: _strip(r) for k, r in uninterrupted.items()}


def test_sigterm_twice_in_a_step_stops_at_once_and_resumes_from_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                    uninterrupted):
    """The second SIGTERM while step 33 runs acts at once: that step's input state is gone (donated), so
    the checkpoint of the evaluation at step 25 stays, and the rerun trains 26-33 again and ends as if
    never interrupted."""
    cfg = _cfg(tmp_path, max_epochs=2, checkpoint_every_s=1e-6)
    out = tmp_path / "out"
    counter = _StepCounter(monkeypatch, sigterm_in=33, sigterms=2)
    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        runner.sweep(cfg, out, progress=False, report=False)
    recs = runner.read_results(out / "results.jsonl")
    assert {r["stop"] for r in recs} == {"interrupted"} and {r["history"][-1]["step"] for r in recs} == {25}
    runner.sweep(cfg, out, progress=False, report=False)
    assert counter.calls == 33 + (2 * STEPS_PER_EPOCH - 25)
    resumed = _final(out / "results.jsonl")
    assert {k: _strip(r) for k, r in resumed.items()} == {k: _strip(r) for k, r in uninterrupted.items()}


def test_a_killed_sweep_resumes_from_its_last_periodic_checkpoint(tmp_path, monkeypatch, uninterrupted):
    """``train.checkpoint_every_s`` saves the group at evaluations: a process killed in epoch 2 (no record,
    no checkpoint on the way out) resumes from the end of epoch 1 and ends as if never stopped."""
    cfg = _cfg(tmp_path, max_epochs=2, checkpoint_every_s=1e-6)
    out = tmp_path / "out"
    counter = _StepCounter(monkeypatch, crash_at=STEPS_PER_EPOCH + 10)
    with pytest.raises(SystemExit):
        runner.sweep(cfg, out, progress=False, report=False)
    assert not runner.read_results(out / "results.jsonl")
    runner.sweep(cfg, out, progress=False, report=False)
    assert counter.calls == (STEPS_PER_EPOCH + 9) + STEPS_PER_EPOCH  # steps 26-34 are trained again
    resumed = _final(out / "results.jsonl")
    assert {k: _strip(r) for k, r in resumed.items()} == {k: _strip(r) for k, r in uninterrupted.items()}
    assert not runner.checkpoint_path(out, runner.expand_grid(cfg)).exists()  # removed once the runs ended


class _FakeClock:
    """perf_counter advancing ``per_call`` seconds per call: time limits then cut at deterministic steps."""

    def __init__(self, per_call=1.0):
        self.t, self.per_call = 0.0, per_call

    def perf_counter(self):
        self.t += self.per_call
        return self.t

    @staticmethod
    def process_time():
        return 0.0


@pytest.mark.slow  # four sweeps, each compiling its step: ~1 min of CPU
def test_time_budget_stops_before_it_and_rerun_continues(tmp_path, monkeypatch, uninterrupted, capsys):
    import argparse

    clock = _FakeClock()
    monkeypatch.setattr(runner, "time", clock)
    counter = _StepCounter(monkeypatch)
    cfg_path = tmp_path / "cfg.yaml"
    _cfg(tmp_path, max_epochs=2)
    out = tmp_path / "out"
    budget = 40.0  # fake seconds; the whole group takes ~75
    args = argparse.Namespace(config=str(cfg_path), overrides=["train.max_epochs=2"], out=str(out), time_budget=budget,
                              dry_run=False, report_only=False, no_progress=True, verbose=False)
    assert runner.main(args) == runner.EXIT_INCOMPLETE
    assert clock.t <= budget  # the whole call ended before the budget, by the (fake) clock
    recs = runner.read_results(out / "results.jsonl")
    assert {r["stop"] for r in recs} == {"time_budget"} and 0 < recs[0]["steps"] < 2 * STEPS_PER_EPOCH
    assert "rerun the same command" in capsys.readouterr().err
    for _ in range(10):  # short calls until the grid is done
        start = clock.t
        status = runner.main(args)
        assert clock.t - start <= budget
        if status != runner.EXIT_INCOMPLETE:
            break
    assert status == 0
    assert counter.calls == 2 * STEPS_PER_EPOCH  # every call went on where the previous one stopped
    resumed = _final(out / "results.jsonl")
    assert sorted(resumed) == sorted(uninterrupted)
    for key, rec in resumed.items():
        assert _strip(rec) == _strip(uninterrupted[key])


def test_time_budget_does_not_count_compilation_as_step_or_evaluation_time(tmp_path, monkeypatch):
    """The first step and the first evaluation take 10 s more (they compile): that is start-up, not the
    step or evaluation time the budget's checks use. With a 60 s budget and 1 s steps the group trains on
    after the first epoch's evaluation (at 45 s) and stops within the budget."""
    clock = _FakeClock(per_call=0.0)
    monkeypatch.setattr(runner, "time", clock)
    _StepCounter(monkeypatch, clock=clock, compile_s=10.0)
    cfg = _cfg(tmp_path, max_epochs=2, eval_every_steps=0)  # evaluations at the end of each 25-step epoch
    recs = runner.sweep(cfg, tmp_path / "out", progress=False, report=False, time_budget=60.0)
    assert {r["stop"] for r in recs} == {"time_budget"} and clock.t <= 60.0
    assert recs[0]["steps"] > STEPS_PER_EPOCH, recs[0]["steps"]
    assert recs[0]["startup_s"] >= 10.0


def test_evaluation_lines_and_max_run_seconds(tmp_path, monkeypatch, capsys):
    """Each evaluation is a plain line naming every member's test accuracy (not glued onto the bar, which
    shows test accuracy too); ``train.max_run_seconds`` stops within a few steps of its cap."""
    clock = _FakeClock(per_call=0.0)
    monkeypatch.setattr(runner, "time", clock)
    _StepCounter(monkeypatch, clock=clock)  # time advances 1 s per training step only
    cfg = _cfg(tmp_path, max_epochs=1, eval_every_steps=5, max_run_seconds=12.5)
    runs = runner.expand_grid(cfg)[0:3:2]  # lr 1e-3 and 1e-2, seed 0
    train = runner.make_split(cfg, runs[0].point, True)
    test = runner.make_split(cfg, runs[0].point, False)
    recs = runner.train_group(cfg, runs, train, test, progress=True)
    # checked before every step: step 14 would start after 13 s > 12.5 s (not at the next evaluation, step 15)
    assert [(r["stop"], r["steps"]) for r in recs] == [("time_limit", 13)] * 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("attention|L16|P2|d16 epoch 0.40 (step 10) test acc"))
    assert "lr 0.001: " in line and "lr 0.01: " in line, line
    bars = [ln for ln in err.replace("\r", "\n").splitlines() if "%|" in ln]
    assert any("test acc 0." in b for b in bars)


def test_table_marks_cut_and_early_stopped_runs():
    from lm.mqar import report

    def rec(mixer, d, acc, stop):
        return {"mixer": mixer, "seq_len": 64, "num_kv_pairs": 4, "d_model": d, "lr": 1e-3, "seed": 0, "acc": acc,
                "stop": stop, "n_layers": 2, "vocab_size": 8192, "num_train_examples": 100000,
                "num_test_examples": 3000}

    recs = [rec("attention", 64, 0.97, "time_budget"), rec("hyena", 64, 0.995, "early_stop"),
            rec("baseconv", 64, 0.70, "max_epochs"), rec("attention", 128, 0.99, "interrupted"),
            rec("hyena", 128, 0.5, "time_limit"), rec("baseconv", 128, 0.9, "early_stop")]
    table = report.markdown_table(recs)
    assert "| 64 (4) | 64 | 0.970 [cut] (1.00) | 0.995 [e] (0.52) | 0.700 (0.70) |" in table
    assert "| 64 (4) | 128 | 0.990 [cut] (1.00) | 0.500 [cut] (0.75) | 0.900 [e] (0.94) |" in table
    assert "[cut]: stopped by a time limit" in table


def test_output_directory_rule_is_stated_once_everywhere():
    import argparse
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    rule = runner.OUTPUT_DIR_RULE
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    assert rule in " ".join(parser.format_help().split())
    for doc in ("README.md", "results/mqar/README.md"):
        assert rule in (root / doc).read_text(), doc
    cfg = runner.MQARConfig(name="x", out_dir=None)
    assert runner.output_dir(cfg) == pathlib.Path("runs/mqar/x")
    assert runner.output_dir(runner.MQARConfig(name="x", out_dir="a")) == pathlib.Path("a")
    assert runner.output_dir(runner.MQARConfig(name="x", out_dir="a"), "b") == pathlib.Path("b")


def _last_number_printed_by(code: str, *args: str) -> int:
    """Run ``code`` in a fresh Python (glibc only: mallopt settings are per process and glibc-specific)
    with this repository importable; its last printed number."""
    import os
    import pathlib
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt tuning is glibc-only")
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_keep_freed_memory_keeps_freed_buffers_resident():
    """A 64 MB buffer freed and allocated again: with glibc's defaults it is a fresh mmap each time and
    every page faults in again (as XLA's CPU buffers did on every step); after `keep_freed_memory` the
    freed memory stays in the heap and the next buffer reuses its resident pages."""
    code = """
import resource, sys
import numpy as np
from lm.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = np.ones(16 * 1024 * 1024, np.float32)  # 64 MB, every page touched
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del buf
print(sum(faults[1:]))  # the first allocation faults in either case
"""
    faults = {mode: _last_number_printed_by(code, mode) for mode in ("default", "keep")}
    # default: >= 32 faults per allocation (16k with 4 kB pages, 32 with 2 MB huge pages); kept: ~none
    assert faults["default"] >= 4 * 32 and faults["keep"] * 10 < faults["default"], faults


def test_keep_freed_memory_never_trims_the_heap():
    """A freed heap top larger than 2 GB stays mapped: a trim threshold of INT_MAX (mallopt's largest
    positive value) let glibc hand such tops back, and XLA's step buffers then faulted in again every
    10-40 steps (results/mqar/README.md). Only address space is taken: malloc does not touch the pages."""
    code = """
import ctypes
from lm.host_memory import keep_freed_memory
assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes, libc.sbrk.argtypes = [ctypes.c_size_t], [ctypes.c_void_p], [ctypes.c_ssize_t]
block = libc.malloc(2500 << 20)  # above 2 GB: a heap block, as there is no mmap
assert block, "malloc of 2.5 GB failed"
top = libc.sbrk(0)
libc.free(block)
print((top - libc.sbrk(0)) >> 20)  # MB given back to the kernel by the free
"""
    assert _last_number_printed_by(code) == 0  # MB given back


@pytest.mark.parametrize("setting, expected", [("auto", "map"), ("map", "map"), ("vmap", "vmap")])
def test_member_loop_setting_picks_the_step_structure(tmp_path, setting, expected):
    """``train.member_loop`` decides how a step runs its members: ``map`` is a loop (a scan over the stacked
    state) in the step's program, ``vmap`` batches them (no loop); ``auto`` is ``map`` on CPU."""
    import jax
    import jax.numpy as jnp

    cfg = _cfg(tmp_path, member_loop=setting)
    runs = runner.expand_grid(cfg)
    assert runner.member_loop_for(setting) == expected
    train = runner.make_split(cfg, runs[0].point, True)
    train_step, _, state, _ = runner.init_group(cfg, runs, 10)
    data = tuple(jnp.asarray(a) for a in (train.inputs, train.positions, train.targets))
    lrs = jnp.asarray([r.lr for r in runs], jnp.float32)
    jaxpr = str(jax.make_jaxpr(train_step)(*state, lrs, data, np.arange(runs[0].point.batch_size)))
    assert ("scan[" in jaxpr) == (expected == "map")


@pytest.mark.slow  # three sweeps, ~30 s: the vmap loop is the accelerator default, CPU runs use map
def test_frozen_members_are_not_checkpointed_and_a_rerun_resumes_the_rest(tmp_path, monkeypatch):
    """vmap loop: a member that early-stops stays in the step frozen; Ctrl-C after that saves only the
    members still training, and the rerun finishes them exactly as an uninterrupted run does."""
    cfg = _cfg(tmp_path, grid={"seeds": [0]}, early_stop_acc=0.38, member_loop="vmap", max_epochs=3)
    runner.sweep(cfg, tmp_path / "ref", progress=False, report=False)
    ref = _final(tmp_path / "ref" / "results.jsonl")
    first_stop = min(r["steps"] for r in ref.values() if r["stop"] == "early_stop")
    assert first_stop < max(r["steps"] for r in ref.values()), "needs a member that stops before the others"

    out = tmp_path / "out"
    _StepCounter(monkeypatch, interrupt_at=first_stop + 2)
    with pytest.raises(KeyboardInterrupt):
        runner.sweep(cfg, out, progress=False, report=False)
    cut = runner.read_results(out / "results.jsonl")
    assert {r["stop"] for r in cut} == {"early_stop", "interrupted"}
    runner.sweep(cfg, out, progress=False, report=False)
    resumed = _final(out / "results.jsonl")
    assert sorted(resumed) == sorted(ref)
    for key, rec in resumed.items():  # the resumed group is smaller: only group_size differs
        assert {**_strip(rec), "group_size": 0} == {**_strip(ref[key]), "group_size": 0}
