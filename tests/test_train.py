"""End-to-end trainer tests on a generated corpus with a tiny model (CPU, a few seconds each)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm.checkpoint import CheckpointError, host_copy, load_run
from lm.config import ConfigError
from lm.data import DataError
from lm.tracking import read_metrics
from lm.train import NonFiniteError, Trainer, load_train_config, train

REPO = pathlib.Path(__file__).resolve().parent.parent

WORDS = "the cat sat on a mat and then ran far away from big dog who was not so kind to it".split()


def make_corpus(path: pathlib.Path, n_words: int = 4000, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    # A learnable source: mostly a fixed cycle of words with some random substitutions.
    words = [WORDS[i % len(WORDS)] if rng.random() < 0.8 else WORDS[rng.integers(len(WORDS))]
             for i in range(n_words)]
    lines = [" ".join(words[i:i + 12]) for i in range(0, n_words, 12)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def tiny(corpus, mixer="attention", **over) -> dict:
    mixers = {"attention": {"name": "attention", "num_heads": 2},
              "hyena": {"name": "hyena", "filter_order": 8, "emb_dim": 3}}
    cfg = {
        "model": {"d_model": 32, "n_layers": 1, "max_len": 16, "mixer": mixers[mixer], "mlp_ratio": 2.0},
        "data": {"source": str(corpus), "tokenizer": {"kind": "char"}, "block_size": 16, "batch_size": 8,
                 "val_fraction": 0.1},
        "optimizer": {"lr": 1e-2, "warmup_steps": 2},
        "trainer": {"steps": 20, "eval_every": 10, "eval_steps": 2, "checkpoint_every": 10, "log_every": 5,
                    "progress": False, "async_checkpointing": False},
    }
    for key, value in over.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def run(cfg: dict, run_dir, max_steps=None, hooks=()):
    trainer = Trainer(load_train_config(base=cfg), run_dir, hooks=hooks)
    try:
        result = trainer.fit(max_steps=max_steps)
        params = host_copy(trainer.state)
    finally:
        trainer.close()
    return result, params


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "train")]


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def snapshot(ckpt_dir: pathlib.Path) -> dict[str, float]:
    return {str(p.relative_to(ckpt_dir)): p.stat().st_mtime for p in ckpt_dir.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------


def test_loss_falls_and_run_dir_layout(corpus, tmp_path):
    run_dir = tmp_path / "run"
    result, _ = run(tiny(corpus, **{"trainer.steps": 30, "trainer.keep_checkpoints": 2}), run_dir)
    ls = losses(run_dir)
    assert ls[-1] < ls[0] - 0.5, ls
    assert result["eval"]["loss"] < 3.0 and "bits_per_char" in result["eval"]
    for name in ("config.yaml", "metrics.jsonl", "tokenizer/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [20, 30]

    # load_run gives the trained model back.
    cfg, model, tokenizer, step = load_run(run_dir)
    assert step == 30 and tokenizer.vocab_size == cfg.model.vocab_size
    tokens = np.asarray([tokenizer.encode("the cat sat on a")[:16]], np.int32)
    assert np.isfinite(np.asarray(model(tokens))).all()

    # `longconv eval --run DIR` uses the same pieces.
    from lm.cli import main as cli_main

    assert cli_main(["eval", "--run", str(run_dir), "--max-batches", "2"]) == 0


def test_exact_resume_matches_straight_run(corpus, tmp_path):
    """2N steps straight == N steps, stop, `longconv train` on the run dir (resumes) for N more."""
    import yaml

    from lm.cli import main as cli_main

    cfg = tiny(corpus, "hyena", **{"model.dropout": 0.1, "trainer.steps": 8, "trainer.log_every": 1,
                                   "trainer.checkpoint_every": 0, "trainer.eval_every": 0, "data.val_fraction": 0.0})
    run(cfg, tmp_path / "a")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    b = tmp_path / "b"
    assert cli_main(["train", "--config", str(cfg_file), "--run-dir", str(b), "--stop-at", "4"]) == 0
    assert [p.name for p in (b / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]
    assert cli_main(["train", "--run-dir", str(b)]) == 0  # resumes at step 4 with the run's config.yaml
    assert [r["step"] for r in read_metrics(b, "train")] == list(range(1, 9))
    np.testing.assert_allclose(losses(b), losses(tmp_path / "a"), rtol=1e-6, atol=1e-6)
    # Parameters, AdamW moments, step counters and dropout RNG state all match the straight run.
    from lm.checkpoint import Checkpointer

    arrays = []
    for d in (tmp_path / "a", b):
        ckpt = Checkpointer(d / "checkpoints", read_only=True)
        arrays.append(ckpt.read_arrays(8))
        ckpt.close()
    assert sorted(arrays[0]) == sorted(arrays[1]) and any("rngs" in k for k in arrays[0])
    for k in arrays[0]:
        np.testing.assert_allclose(arrays[1][k], arrays[0][k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_grad_accumulation_matches_full_batch(corpus, tmp_path):
    base = tiny(corpus, **{"trainer.steps": 3, "trainer.eval_every": 0, "trainer.log_every": 1,
                           "trainer.checkpoint_every": 0, "data.val_fraction": 0.0})
    _, full = run(base, tmp_path / "full")
    _, accum = run(tiny(corpus, **{"trainer.steps": 3, "trainer.eval_every": 0, "trainer.log_every": 1,
                                   "trainer.checkpoint_every": 0, "data.val_fraction": 0.0, "trainer.grad_accum": 2}),
                   tmp_path / "acc")
    np.testing.assert_allclose(losses(tmp_path / "acc"), losses(tmp_path / "full"), rtol=1e-5)
    assert max_diff(full["model"], accum["model"]) < 1e-5


def test_eight_devices_match_one_device(corpus, tmp_path):
    over = {"trainer.steps": 3, "trainer.eval_every": 0, "trainer.log_every": 1, "trainer.checkpoint_every": 0,
            "data.val_fraction": 0.0}
    _, one = run(tiny(corpus, **over), tmp_path / "one")
    cfg8 = tiny(corpus, **over, **{"mesh.data": 4, "mesh.fsdp": 2, "mesh.min_shard_size": 1})
    script = f"""
import json, sys, numpy as np, jax
sys.path.insert(0, {str(REPO)!r})
from tests.test_train import run
from lm.checkpoint import flatten
assert jax.device_count() == 8, jax.device_count()
_, state = run(json.loads({json.dumps(json.dumps(cfg8))}), {str(tmp_path / 'eight')!r})
flat = flatten(state["model"])[0]
np.savez({str(tmp_path / 'eight.npz')!r}, **flat)
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'data': 4, 'fsdp': 2" in proc.stderr
    np.testing.assert_allclose(losses(tmp_path / "eight"), losses(tmp_path / "one"), rtol=2e-5)
    from lm.checkpoint import flatten

    eight = np.load(tmp_path / "eight.npz")
    for k, v in flatten(one["model"])[0].items():
        np.testing.assert_allclose(eight[k], v, atol=2e-5, err_msg=k)


def test_nan_guard_stops_without_overwriting_checkpoints(corpus, tmp_path):
    run_dir = tmp_path / "run"

    def poison(step, metrics, trainer):  # corrupt the weights after the step-4 checkpoint
        trainer.state = jax.tree.map(
            lambda x: x * np.nan if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, trainer.state)

    # (bf16 compute here, to cover trainer.precision: parameters and optimizer state stay fp32)
    cfg = tiny(corpus, **{"trainer.checkpoint_every": 4, "trainer.log_every": 1, "trainer.eval_every": 0,
                          "trainer.precision": "bf16", "data.val_fraction": 0.0})
    with pytest.raises(NonFiniteError, match="non-finite training loss.*step 5.*Last good checkpoint: step 4"):
        run(cfg, run_dir, hooks=[(poison, 4)])
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]
    assert all(np.isfinite(losses(run_dir)))  # steps 1-4 were logged, finite
    from lm.checkpoint import Checkpointer

    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    saved = ckpt.read_arrays(4)
    ckpt.close()
    assert saved["model.embed.embedding"].dtype == np.float32 and np.isfinite(saved["model.embed.embedding"]).all()


def test_nan_guard_names_the_step_and_the_layer(corpus, tmp_path):
    """NaN weights in layer 1's mixer after step 2: the error names step 3 and that layer."""
    from flax import nnx

    def poison(step, metrics, trainer):
        if step == 2:
            model = trainer.model
            mixer = model.blocks[1].mixer
            nnx.update(mixer, jax.tree.map(lambda x: x * np.nan, nnx.state(mixer, nnx.Param)))
            trainer.state = {"model": nnx.state(model), "optimizer": trainer.state["optimizer"]}

    cfg = tiny(corpus, "hyena", **{"model.n_layers": 2, "trainer.steps": 8, "trainer.log_every": 4,
                                   "trainer.checkpoint_every": 0, "trainer.eval_every": 0, "data.val_fraction": 0.0})
    # Steps 3 and 4 are both non-finite; the check at step 4 reports the first.
    with pytest.raises(NonFiniteError, match=r"at step 3 \(loss=nan.*first non-finite activation in layer 1 "
                                             r"\(hyena mixer, blocks\.1\.mixer\) when re-running step 3's batch"):
        run(cfg, tmp_path / "run", hooks=[(poison, 2)])


def test_plain_progress_lines_and_labelled_evaluations(corpus, tmp_path, capsys):
    """stderr not a terminal: plain lines, compilation (a slow first step) out of tokens/s; periodic
    evaluations say how many batches they used and the last one covers the whole split, as `longconv eval`."""
    import re
    import time

    from lm.evaluate import evaluate_run

    cfg = tiny(corpus, **{"trainer.steps": 8, "trainer.log_every": 4, "trainer.eval_every": 4, "trainer.eval_steps": 1,
                          "trainer.checkpoint_every": 0, "trainer.progress": True})
    trainer = Trainer(load_train_config(base=cfg), tmp_path / "run")
    real_step, calls = trainer._train_step, []

    def slow_first_step(state, batch):  # stands in for a long compilation
        calls.append(1)
        if len(calls) == 1:
            time.sleep(5)
        return real_step(state, batch)

    trainer._train_step = slow_first_step
    try:
        result = trainer.fit()
        n_positions = trainer.data.val.n_tokens - 1
    finally:
        trainer.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line.removeprefix("[longconv train] ") for line in err.splitlines()]
    assert any(re.fullmatch(r"step 1/8: first step took \d+\.\d s \(compilation included\)", x) for x in lines), lines
    for s in (4, 8):
        assert any(re.fullmatch(rf"step {s}/8: loss \d\.\d{{4}}, [\d,]+ tokens/s, ETA \d+m\d\ds", x) for x in lines), lines
    assert any(re.fullmatch(r"step 4: val loss \d\.\d{4} \(1 batch, 128 positions\), ppl .*", x) for x in lines), lines
    final = f"step 8: val loss {result['eval']['loss']:.4f} (whole split, {n_positions:,} positions), ppl "
    assert any(x.startswith(final) for x in lines), lines
    # Steps 2-4 took well under 3.75 s: with the 5 s first step counted, the rate would be below 4*128/5.
    assert next(r for r in read_metrics(tmp_path / "run", "train") if r["step"] == 4)["tokens_per_s"] > 4 * 128 / 5
    ref = evaluate_run(tmp_path / "run")
    assert ref["tokens"] == result["eval"]["tokens"] == n_positions and result["eval"]["whole_split"]
    np.testing.assert_allclose(result["eval"]["loss"], ref["loss"], rtol=1e-5)


def test_longconv_eval_scores_every_position(trained_run, capsys):
    """The loss of `longconv eval` equals the mean next-token NLL of the whole validation stream computed by
    calling the model directly (block-aligned chunks, the short last one included)."""
    from lm.cli import main as cli_main
    from lm.data import build_data
    from lm.evaluate import evaluate_run
    from lm.train import resolve_data_paths

    cfg, model, tokenizer, _ = load_run(trained_run)
    val = build_data(resolve_data_paths(cfg.data), tokenizer=tokenizer).val
    stream, block = val.tokens, cfg.data.block_size
    n_full = (len(stream) - 1) // block
    assert 0 < len(stream) - 1 - n_full * block  # a partial last block exists

    def nll(inputs, targets):
        logits = np.asarray(model(inputs), np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -np.take_along_axis(logp, targets[..., None], -1).sum()

    full = stream[: n_full * block + 1]
    total = nll(full[:-1].reshape(n_full, block), full[1:].reshape(n_full, block))
    total += nll(stream[n_full * block:-1][None], stream[n_full * block + 1:][None])
    out = evaluate_run(trained_run)
    assert out["tokens"] == len(stream) - 1 and out["whole_split"]
    np.testing.assert_allclose(out["loss"], total / (len(stream) - 1), rtol=1e-5)
    capsys.readouterr()
    assert cli_main(["eval", "--run", str(trained_run)]) == 0
    assert f"({len(stream) - 1:,} positions scored: the whole split)" in capsys.readouterr().out


def test_initialize_from_loads_weights_only(corpus, trained_run, tmp_path):
    _, src_model, _, src_step = load_run(trained_run)
    trainer = Trainer(load_train_config(base=tiny(corpus, initialize_from=str(trained_run))), tmp_path / "dst")
    try:
        from flax import nnx

        a = host_copy(nnx.state(trainer.model, nnx.Param))
        b = host_copy(nnx.state(src_model, nnx.Param))
        assert src_step == 4 and max_diff(a, b) == 0.0
        assert trainer.step == 0 and int(trainer.state["optimizer"]["step"][...]) == 0
    finally:
        trainer.close()


def _interrupted_fit_meta(corpus, tmp_path, wrap_step, checkpoint_every=0) -> dict:
    """Train an 8-step run whose step is ``wrap_step(real_step)``, expect KeyboardInterrupt, and return the
    meta of the newest checkpoint it left (SIGTERM maps to KeyboardInterrupt meanwhile, as in `longconv`)."""
    from lm.checkpoint import Checkpointer
    from lm.signals import sigterm_as_interrupt

    cfg = tiny(corpus, **{"trainer.steps": 8, "trainer.checkpoint_every": checkpoint_every, "trainer.eval_every": 0,
                          "data.val_fraction": 0.0})
    trainer = Trainer(load_train_config(base=cfg), tmp_path / "run")
    trainer._train_step = wrap_step(trainer._train_step)
    try:
        with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
            trainer.fit()
    finally:
        trainer.close()
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True)
    meta = ckpt.read_meta()
    ckpt.close()
    return meta


def test_interrupt_inside_a_step_checkpoints_the_matching_data_position(corpus, tmp_path):
    """Ctrl-C while step 4 runs (its batch already drawn): the step-3 checkpoint records 3 batches read."""
    calls = []

    def wrap(real_step):
        def interrupted_step(state, batch):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return real_step(state, batch)
        return interrupted_step

    meta = _interrupted_fit_meta(corpus, tmp_path, wrap)
    assert meta["step"] == 3 and meta["data"]["step"] == 3 and meta["data"]["epoch"] == 0


def _sigterm():
    import os
    import signal

    os.kill(os.getpid(), signal.SIGTERM)


def _ctrl_c_dropped_by_gc():
    from tests.test_signals import drop_interrupt_in_gc

    drop_interrupt_in_gc()


def _sigterm_twice():
    _sigterm()
    _sigterm()


@pytest.mark.parametrize("stop, checkpoint_every, saved_step", [(_sigterm, 0, 4), (_ctrl_c_dropped_by_gc, 0, 4),
                                                                 (_sigterm_twice, 2, 2)],
                         ids=["sigterm", "dropped_by_gc", "sigterm_twice"])
def test_stop_signal_while_a_step_runs_checkpoints_that_step(corpus, tmp_path, stop, checkpoint_every, saved_step):
    """SIGTERM arriving while step 4 runs (the step donates the state it is given) acts once the step has
    returned: the checkpoint holds step 4 and 4 batches read. The same for a KeyboardInterrupt raised inside
    a gc callback (JAX registers one), which Python cannot propagate: the loop keeps it for the next step.
    SIGTERM twice acts at once (the user insists): step 4's input state is gone (donated), so the run stops
    with KeyboardInterrupt, not an error on a deleted buffer, and keeps its last checkpoint (step 2)."""
    calls = []

    def wrap(real_step):
        def signalled_step(state, batch):
            calls.append(1)
            out = real_step(state, batch)
            if len(calls) == 4:
                stop()
            return out
        return signalled_step

    meta = _interrupted_fit_meta(corpus, tmp_path, wrap, checkpoint_every)
    assert len(calls) == 4 and meta["step"] == saved_step and meta["data"]["step"] == saved_step


def test_trainer_eval_covers_whole_split_like_longconv_eval(trained_run, tmp_path):
    """eval_steps=0 scores every validation position (padded last batch and block too), as `longconv eval`."""
    import shutil

    from lm.evaluate import evaluate_run

    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    trainer = Trainer(load_train_config(run_dir / "config.yaml"), run_dir)
    try:
        ev = trainer.evaluate(max_batches=0)
        n_tokens = trainer.data.val.n_tokens - 1  # every next-token transition of the split
        assert trainer.data.val.num_blocks % trainer.cfg.data.batch_size  # a partial last batch exists
        assert trainer.data.val.tail_positions  # and a partial last block
    finally:
        trainer.close()
    ref = evaluate_run(run_dir)
    assert ev["tokens"] == n_tokens == ref["tokens"]
    np.testing.assert_allclose(ev["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(ev["bits_per_char"], ref["bits_per_char"], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors, existing checkpoints untouched.


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run(tiny(corpus, **{"trainer.steps": 4, "trainer.eval_every": 0, "trainer.checkpoint_every": 2}), run_dir)
    return run_dir


def _bad(tmp_path, name, content: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


@pytest.mark.parametrize("case", ["missing", "empty", "utf8", "block", "model"])
def test_bad_input_fails_clearly_and_keeps_checkpoints(case, corpus, trained_run, tmp_path):
    before = snapshot(trained_run / "checkpoints")
    config_before = (trained_run / "config.yaml").read_text()
    if case == "missing":
        cfg, err, match = tiny(tmp_path / "nope.txt"), DataError, "nope.txt"
    elif case == "empty":
        cfg, err, match = tiny(_bad(tmp_path, "empty.txt", b"")), DataError, "empty"
    elif case == "utf8":
        cfg, err, match = tiny(_bad(tmp_path, "bad.txt", b"hello \xff\xfe world\n" * 100)), DataError, "UTF-8"
    elif case == "block":
        cfg = tiny(_bad(tmp_path, "short.txt", b"tiny text\n"), **{"data.val_fraction": 0.0})
        err, match = DataError, "block longer than the corpus"
    else:  # a checkpoint from another model
        cfg, err, match = tiny(corpus, **{"model.d_model": 48}), CheckpointError, r"parameter '.*'.*checkpoint has"
    with pytest.raises(err, match=match):
        Trainer(load_train_config(base=cfg), trained_run)
    assert snapshot(trained_run / "checkpoints") == before
    assert (trained_run / "config.yaml").read_text() == config_before


def test_unknown_config_key_is_named(corpus):
    with pytest.raises(ConfigError, match="trainer.stpes"):
        load_train_config(base=tiny(corpus), overrides=["trainer.stpes=3"])
    with pytest.raises(ConfigError, match="optimizer.betas"):
        load_train_config(base=tiny(corpus, **{"optimizer.betas": [0.9, 0.9]}))


def test_shipped_configs_load():
    for path in sorted((REPO / "configs" / "lm").glob("*.yaml")):
        load_train_config(path)


def test_longconv_train_interrupted_exits_130_with_a_resume_hint(corpus, tmp_path, monkeypatch, capsys):
    """Ctrl-C/SIGTERM (KeyboardInterrupt once the trainer has checkpointed) ends `longconv train` with exit
    status 130 and the command that resumes, not a traceback."""
    import yaml

    import lm.train
    from lm.cli import main as cli_main

    def interrupted(cfg, run_dir, max_steps=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm.train, "train", interrupted)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny(corpus)))
    try:
        rc = cli_main(["train", "--config", str(cfg_file), "--run-dir", str(tmp_path / "run")])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped `longconv train`")  # (would also stop pytest itself)
    assert rc == 130
    assert f"rerun `longconv train --run-dir {tmp_path / 'run'}` to resume" in capsys.readouterr().err
