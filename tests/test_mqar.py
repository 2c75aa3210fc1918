"""MQAR: generator semantics and statistics, config errors, resumable sweeps, a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lm.config import ConfigError
from lm.mqar import report
from lm.mqar.generator import IGNORE_INDEX, MQARError, multiquery_ar, power_law_probs, scored_positions


def _gen(**kw):
    args = dict(vocab_size=8192, num_examples=500, input_seq_len=64, seed=0, num_kv_pairs=4,
                random_non_queries=False)
    args.update(kw)
    return multiquery_ar(**args)


# ---------------------------------------------------------------------------------------------- generator


def test_deterministic_and_seeded():
    a = _gen(seed=3, random_non_queries=True)
    b = _gen(seed=3, random_non_queries=True)
    c = _gen(seed=4, random_non_queries=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("L,P,passes", [(64, 4, 1), (128, 8, 1), (256, 16, 1), (512, 64, 1), (64, 4, 3), (16, 2, 1)])
def test_structure(L, P, passes):
    V = 8192 if L > 16 else 40
    x, y = _gen(vocab_size=V, input_seq_len=L, num_kv_pairs=P, num_passes=passes, num_examples=300)
    N = x.shape[0]
    assert x.shape == y.shape == (N, L) and x.dtype == np.int32 and y.dtype == np.int32
    C = 2 * P * passes
    keys, vals = x[:, 0:2 * P:2], x[:, 1:2 * P:2]
    assert keys.min() >= 1 and keys.max() <= V // 2 - 1
    assert vals.min() >= V // 2 and vals.max() <= V - 1
    # distinct keys and values per row
    assert all(len(set(r)) == P for r in keys) and all(len(set(r)) == P for r in vals)
    # context repeated num_passes times
    for rep in range(1, passes):
        np.testing.assert_array_equal(x[:, 2 * P * rep:2 * P * (rep + 1)], x[:, :2 * P])
    # exactly P scored positions, all at/after the context, at even offsets from it; never in the context
    assert np.all((y != IGNORE_INDEX).sum(1) == P)
    pos = scored_positions(y, P)
    assert pos.min() >= C and np.all((pos - C) % 2 == 0) and pos.max() <= L - 2
    assert np.all(y[:, :C] == IGNORE_INDEX)
    # each query token is a key of its row, and its target is the value right after that key
    for i in range(N):
        lookup = dict(zip(keys[i].tolist(), vals[i].tolist()))
        for t in pos[i]:
            assert int(x[i, t]) in lookup
            assert int(y[i, t]) == lookup[int(x[i, t])]
            j = int(np.flatnonzero(x[i, :C] == x[i, t])[0])
            assert j % 2 == 0 and x[i, j + 1] == y[i, t]
    # each key is queried exactly once; the input after a query is filler, never the value
    assert all(sorted(x[i, pos[i]].tolist()) == sorted(keys[i].tolist()) for i in range(N))
    after = np.take_along_axis(x, pos + 1, axis=1)
    assert np.all(after == 0)
    # everything after the context that is not a query is the filler 0
    rest = x[:, C:].copy()
    np.put_along_axis(rest, pos - C, 0, axis=1)
    assert np.all(rest == 0)


def test_query_position_distribution():
    """a = 0.01, V = 8192, L = 64, P = 4, no filler: mean ≈ 22.3, std ≈ 14.9, ≈ 93% zeros after context."""
    x, y = _gen(num_examples=4000, seed=1)
    pos = scored_positions(y, 4).astype(np.float64)
    assert abs(pos.mean() - 22.3) < 0.6, pos.mean()
    assert abs(pos.std() - 14.9) < 0.5, pos.std()
    assert abs((x[:, 8:] == 0).mean() - 52 / 56) < 0.005


def test_uniform_gaps_with_power_a_one():
    x, y = _gen(num_examples=3000, power_a=1.0)
    gaps = (scored_positions(y, 4) - 8) // 2  # 28 slots, uniform without replacement
    counts = np.bincount(gaps.ravel(), minlength=28)
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_first_gap_follows_power_law():
    """Gumbel-top-k's first draw has probability p(g) exactly (successive sampling like np.random.choice)."""
    # the first key of the context is queried at gap g_1 (first draw)
    x, y = _gen(num_examples=20000, seed=5)
    first_key = x[:, 0]
    where = np.argmax(x[:, 8:] == first_key[:, None], axis=1)  # offset of k1's query in the query region
    g1 = where // 2
    p = power_law_probs(28, 0.01)
    freq = np.bincount(g1, minlength=28) / len(g1)
    assert abs(freq[0] - p[0]) < 0.015 and abs(freq[:5].sum() - p[:5].sum()) < 0.015


def test_random_non_queries():
    V = 8192
    x0, y0 = _gen(num_examples=400, seed=2, random_non_queries=False)
    x1, y1 = _gen(num_examples=400, seed=2, random_non_queries=True)
    np.testing.assert_array_equal(y0, y1)  # same labels: filler is drawn after everything else
    filler = x0 == 0
    np.testing.assert_array_equal(x1[~filler], x0[~filler])
    assert (x1[filler] == 0).mean() < 0.01 and x1[filler].max() < V and x1[filler].min() >= 0
    assert len(np.unique(x1[filler])) > 1000


def test_fast_for_100k_rows():
    import time

    t = time.perf_counter()
    x, _ = multiquery_ar(8192, 100_000, 128, 0, num_kv_pairs=8, random_non_queries=True)
    assert x.shape == (100_000, 128)
    assert time.perf_counter() - t < 20.0


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(input_seq_len=63), "even"),
        (dict(vocab_size=64, input_seq_len=64), "vocab_size must exceed"),
        (dict(num_kv_pairs=17, input_seq_len=64), "do not fit"),
        (dict(num_kv_pairs=8, num_passes=4, input_seq_len=64), "do not fit"),
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(power_a=0.0), "power_a"),
    ],
)
def test_bad_params(kw, msg):
    with pytest.raises(MQARError, match=msg):
        _gen(**kw)


def test_vocab_too_small():
    # keys come from 1..V/2-1 and values from V/2..V-1; V > L (Zoology's assert) guarantees room for the
    # at most L/4 pairs that fit, so "too small" is reported through the V > L check
    with pytest.raises(MQARError, match="vocab_size must exceed input_seq_len"):
        _gen(vocab_size=32, input_seq_len=64)


# ---------------------------------------------------------------------------------------------- config


def _cfg_dict(tmp_path, **over):
    d = {
        "name": "t",
        "out_dir": str(tmp_path / "out"),
        "data": {"vocab_size": 64, "num_train_examples": 256, "num_test_examples": 64},
        "mixers": [{"label": "attention", "mixer": {"name": "attention", "rotary": True}}],
        "grid": {"points": [{"seq_len": 16, "num_kv_pairs": 2, "batch_size": 32}], "d_models": [32],
                 "lrs": [1e-3, 3e-3]},
        "train": {"max_epochs": 1},
    }
    d.update(over)
    return d


def _write(tmp_path, d):
    import yaml

    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_config_errors(tmp_path):
    from lm.mqar.runner import load_mqar_config

    p = _write(tmp_path, _cfg_dict(tmp_path))
    cfg = load_mqar_config(p)
    assert cfg.grid.points[0].seq_len == 16
    with pytest.raises(ConfigError, match="unknown config key 'train.max_epoch'"):
        load_mqar_config(p, ["train.max_epoch=3"])
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_mqar_config(p, ["bogus=1"])
    with pytest.raises(ConfigError, match=r"grid.points\[0\].*do not fit"):
        load_mqar_config(p, ["grid.points=[{seq_len: 16, num_kv_pairs: 5, batch_size: 32}]"])
    with pytest.raises(ConfigError, match="vocab_size must exceed"):
        load_mqar_config(p, ["data.vocab_size=16"])
    with pytest.raises(ConfigError, match="grid.mixers"):
        load_mqar_config(p, ["grid.mixers=[nope]"])
    with pytest.raises(ConfigError, match="seed"):
        load_mqar_config(p, ["data.test_seed=0"])
    with pytest.raises(ConfigError, match=r"config key 'grid.d_models'.*got 0"):  # the key the user wrote
        load_mqar_config(p, ["grid.d_models=[0]"])


def test_repo_configs_load():
    import pathlib

    from lm.mqar.runner import expand_grid, load_mqar_config, model_config_for

    root = pathlib.Path(__file__).resolve().parents[1] / "configs" / "mqar"
    quick = load_mqar_config(root / "quick.yaml")
    zoo = load_mqar_config(root / "zoology.yaml")
    assert len(expand_grid(zoo)) >= 4 * 4 * 4 * 3
    assert {p.seq_len: p.num_kv_pairs for p in zoo.grid.points} == {64: 4, 128: 8, 256: 16, 512: 64}
    assert zoo.data.vocab_size == 8192 and zoo.data.num_train_examples == 100_000
    for cfg in (quick, zoo):
        for run in expand_grid(cfg):
            mc = model_config_for(cfg, run)
            mc.validate()  # every mixer spec is valid for the registered mixers
            assert mc.n_layers == 2


# ---------------------------------------------------------------------------------------------- sweep


def test_resume_skips_finished(tmp_path, monkeypatch):
    from lm.mqar import runner

    calls = []

    def fake_record(cfg, run):
        return {"key": run.key, "fingerprint": runner.run_fingerprint(cfg, run), "mixer": run.mixer.label,
                "seq_len": run.point.seq_len, "num_kv_pairs": run.point.num_kv_pairs, "d_model": run.d_model,
                "lr": run.lr, "seed": run.seed, "n_layers": 2, "acc": 0.5 + run.lr, "final_acc": 0.5,
                "params": 1, "epochs": 1.0, "stop": "max_epochs", "wall_s": 0.0, "tokens_per_s": 1,
                "vocab_size": cfg.data.vocab_size, "num_train_examples": 256, "num_test_examples": 64,
                "group_size": 1, "startup_s": 0.0}

    def fake_train_group(cfg, runs, train, test, *, on_record, **kw):
        calls.extend(run.key for run in runs)
        recs = [fake_record(cfg, run) for run in runs]
        for rec in recs:
            on_record(rec)
        return recs

    monkeypatch.setattr(runner, "train_group", fake_train_group)
    cfg = runner.load_mqar_config(_write(tmp_path, _cfg_dict(tmp_path)))
    out = tmp_path / "out"
    runs = runner.expand_grid(cfg)
    # pretend the first learning rate finished in an earlier (interrupted) sweep
    runner.append_result(out / "results.jsonl", fake_record(cfg, runs[0]))
    with (out / "results.jsonl").open("a") as f:
        f.write('[1, 2]\n')  # valid JSON that is not a record is skipped, not a crash
        f.write('{"key": "trunc')  # a half-written line from a killed process is ignored
    calls.clear()
    recs = runner.sweep(cfg, out, progress=False)
    assert calls == [runs[1].key] and len(recs) == 2
    calls.clear()
    runner.sweep(cfg, out, progress=False)
    assert calls == []
    # how often a group is checkpointed does not change its result: the finished runs still count
    cfg_ckpt = runner.load_mqar_config(_write(tmp_path, _cfg_dict(tmp_path)), ["train.checkpoint_every_s=5"])
    assert [runner.run_fingerprint(cfg_ckpt, r) for r in runs] == [runner.run_fingerprint(cfg, r) for r in runs]
    # changed settings (different fingerprint) are not reused
    cfg2 = runner.load_mqar_config(_write(tmp_path, _cfg_dict(tmp_path)), ["train.max_epochs=2"])
    runner.sweep(cfg2, out, progress=False)
    assert len(calls) == 2
    table = (out / "table.md").read_text()
    assert "| 16 (2) | 32 |" in table and (out / "plot.png").is_file()
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[:1]]
    assert lines[0]["key"] == runs[0].key


def test_tiny_attention_learns_recall(tmp_path):
    """Attention learns a tiny MQAR (V 64, L 16, 2 pairs) far above the 0.5 plateau of guessing one of the
    two in-context values. init std 0.1 (quick.yaml's setting) shortens the plateau to ~1-2k steps."""
    from lm.mqar import runner

    d = _cfg_dict(tmp_path)
    d["data"] = {"vocab_size": 64, "num_train_examples": 20000, "num_test_examples": 256}
    d["model"] = {"init_std": 0.1}
    d["mixers"] = [{"label": "attention", "mixer": {"name": "attention", "rotary": True, "init_std": 0.1}}]
    d["grid"] = {"points": [{"seq_len": 16, "num_kv_pairs": 2, "batch_size": 64}], "d_models": [64], "lrs": [3e-3]}
    d["train"] = {"max_epochs": 12, "eval_every_steps": 100, "early_stop_acc": 0.95}
    cfg = runner.load_mqar_config(_write(tmp_path, d))
    recs = runner.sweep(cfg, tmp_path / "out", progress=False, report=False)
    rec = recs[0]
    assert rec["acc"] > 0.9, rec["history"]
    assert rec["stop"] == "early_stop" and rec["n_layers"] == 2 and rec["tokens_per_s"] > 0


def test_report_table_and_published_values():
    recs = [
        {"mixer": "attention", "seq_len": 64, "num_kv_pairs": 4, "d_model": 64, "lr": 1e-3, "seed": 0, "acc": 0.99,
         "n_layers": 2, "vocab_size": 8192, "num_train_examples": 100000, "num_test_examples": 3000},
        {"mixer": "attention", "seq_len": 64, "num_kv_pairs": 4, "d_model": 64, "lr": 1e-2, "seed": 0, "acc": 0.5,
         "n_layers": 2, "vocab_size": 8192, "num_train_examples": 100000, "num_test_examples": 3000},
        {"mixer": "hyena", "seq_len": 64, "num_kv_pairs": 4, "d_model": 64, "lr": 1e-3, "seed": 0, "acc": 0.3,
         "n_layers": 2, "vocab_size": 8192, "num_train_examples": 100000, "num_test_examples": 3000},
    ]
    table = report.markdown_table(recs)
    assert "| 64 (4) | 64 | 0.990 (1.00) | 0.300 (0.52) |" in table
    assert report.ZOOLOGY_FIGURE2[(512, 64, 512)]["baseconv"] == 0.71


# ---------------------------------------------------------------------------------------------- evaluation


def test_evaluation_scores_chance_and_known_answers(tmp_path):
    """The sweep's evaluation (`runner.evaluate` with its jitted eval step) on models with known scores.

    - Untrained: near chance. Values are drawn from V/2 = 32 tokens (guessing one scores 1/32); even
      knowing the 2 in-context values but not which one is right would score 0.5.
    - Zeroed parameters (constant logits): argmax is token 0, never a value, so exactly 0.
    - A hand-built split whose targets come from the model's own full-forward argmax at the labelled
      positions: row 0 none right, row 1 one of two, row 2 both -> (0 + 0.5 + 1) / 3 = 0.5. Eval batch 2
      over 3 rows: the last batch is padded with copies of row 2, which must not count."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from lm.model import LM
    from lm.mqar import runner

    cfg = runner.load_mqar_config(_write(tmp_path, _cfg_dict(tmp_path)))
    run = runner.expand_grid(cfg)[0]
    model = LM(runner.model_config_for(cfg, run), rngs=nnx.Rngs(0))
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.tree.map(lambda a: a[None], (params, rest))  # a group of one member
    _, eval_step = runner._build_steps(graphdef, graphdef, optax.sgd(0.0))

    def evaluate(params, split):
        accs, _ = runner.evaluate(eval_step, params, rest, runner.eval_batches(split, 2), split.inputs.shape[0])
        return accs[0]

    split = runner.make_split(cfg, run.point, train=False)
    assert evaluate(params, split) < 0.1
    assert evaluate(jax.tree.map(jnp.zeros_like, params), split) == 0.0
    x, pos = split.inputs[:3], split.positions[:3]
    predicted = np.take_along_axis(np.asarray(jnp.argmax(model(jnp.asarray(x)), -1)), pos, axis=1)
    wrong = (predicted + 1) % cfg.data.vocab_size
    targets = np.stack([wrong[0], [predicted[1, 0], wrong[1, 1]], predicted[2]]).astype(np.int32)
    assert evaluate(params, runner.MQARSplit(x, pos, targets)) == pytest.approx(0.5)


BEFORE_DECAY_ALL = ["train.weight_decay_on=matrices"]  # zoology.yaml before 2026-11-29 11:35 UTC
EARLIER_ZOOLOGY = BEFORE_DECAY_ALL + [  # zoology.yaml before 2026-11-29 10:00 UTC
    "model.embed_dropout=0.0",
    "mixers=[{label: attention, mixer: {name: attention, num_heads: 1, rotary: false, dropout: 0.1}, "
    "pos_embedding: learned}, {label: hyena, mixer: {name: hyena, order: 2, filter_order: 64, emb_dim: 3, "
    "w: 1.0, num_inner_mlps: 2}}, {label: baseconv, mixer: {name: baseconv, kernel_sizes: [3, -1, 3, -1]}}]",
]


@pytest.mark.parametrize("results, overrides", [("zoology_cpu", EARLIER_ZOOLOGY),
                                                ("zoology_cpu_checks/faithful", BEFORE_DECAY_ALL)])
def test_committed_paper_cell_records_keep_their_fingerprints(results, overrides):
    """Records made before a setting of zoology.yaml changed stay findable: the overrides that results/mqar/
    README.md gives for them (embedding dropout 0, the mixers without Zoology's filter init; weight decay on
    matrices only) give back their fingerprints, so a rerun skips or resumes them. Settings added later
    (``embed_dropout`` equal to ``dropout``, ``weight_decay_on: matrices``) are left out of the fingerprint;
    the current config is another run."""
    import pathlib

    from lm.mqar import runner

    root = pathlib.Path(__file__).resolve().parents[1]
    cell = ["grid.mixers=[attention,baseconv,hyena]", "grid.d_models=[64]",
            "grid.points=[{seq_len: 64, num_kv_pairs: 4, batch_size: 512}]"]
    earlier = runner.load_mqar_config(root / "configs/mqar/zoology.yaml", cell + overrides)
    fingerprints = {r.key: runner.run_fingerprint(earlier, r) for r in runner.expand_grid(earlier)}
    records = runner.read_results(root / "results/mqar" / results / "results.jsonl")
    assert records and all(fingerprints[r["key"]] == r["fingerprint"] for r in records)
    assert all(o in (root / "results/mqar/README.md").read_text() for o in overrides)
    current = runner.load_mqar_config(root / "configs/mqar/zoology.yaml", cell)
    for override in overrides[:2]:
        changed = runner.load_mqar_config(root / "configs/mqar/zoology.yaml", cell + [override])
        for r, u in zip(runner.expand_grid(current), runner.expand_grid(changed)):
            assert runner.run_fingerprint(current, r) not in (runner.run_fingerprint(changed, u), fingerprints[r.key])


def test_weight_decay_on_all_reaches_every_parameter_of_the_mqar_model():
    """`train.weight_decay_on: all` gives every parameter of an MQAR model (biases, norms, the implicit
    filter's MLP and positional features) the run's weight decay: zero gradients shrink each one."""
    import pathlib

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lm.model import LM
    from lm.mqar import runner
    from lm.optim import make_optimizer, model_label_map

    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = runner.load_mqar_config(root / "configs/mqar/zoology.yaml", [
                                         "data.vocab_size=16", "grid.mixers=[hyena]", "grid.d_models=[8]",
                                         "grid.points=[{seq_len: 8, num_kv_pairs: 2, batch_size: 4}]",
                                         "train.weight_decay=0.5"])
    run = runner.expand_grid(cfg)[0]
    for scope, decayed_groups in (("all", {"decay", "no_decay", "filter"}), ("matrices", {"decay"})):
        cfg.train.weight_decay_on = scope
        model = LM(runner.model_config_for(cfg, run), rngs=nnx.Rngs(0))
        labels = model_label_map(model)
        assert {"decay", "no_decay", "filter"} <= set(labels.values())
        params = nnx.state(model, nnx.Param)
        params = jax.tree.map(lambda x: x + 1.0, params)  # no zero tensors, whose decay would not show
        tx = make_optimizer(runner.optimizer_config(cfg.train, lr=0.1), 10, labels)
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        for path, u in nnx.to_flat_state(updates):
            p = nnx.to_flat_state(params)
            expect = -0.1 * 0.5 * np.asarray(dict(p)[path]) if labels[tuple(map(str, path))] in decayed_groups else 0.0
            np.testing.assert_allclose(np.asarray(u), expect, rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_plot_mqar_curves_lines_up_each_settings_accuracy_per_epoch(tmp_path):
    """scripts/plot_mqar_curves.py: one table row per (setting, learning rate) with the test accuracy at the
    listed epochs (blank after a cut run's last one), the latest record of a run winning, and the plot."""
    import pathlib
    import subprocess
    import sys

    def record(lr, epochs, acc_at):
        history = [{"epoch": float(e), "test_acc": acc_at(e)} for e in range(1, epochs + 1)]
        return {"key": f"baseconv|L64|P4|d64|lr{lr:.3g}|s0", "mixer": "baseconv", "lr": lr, "seq_len": 64,
                "num_kv_pairs": 4, "d_model": 64, "history": history, "epochs": float(epochs),
                "acc": max(h["test_acc"] for h in history)}

    runs = {"a": [record(1e-2, 3, lambda e: 0.1), record(1e-2, 64, lambda e: e / 100), record(1e-4, 64, lambda e: 0.2)],
            "b": [record(1e-2, 10, lambda e: 0.5 + e / 100)]}
    for name, recs in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "curves"
    subprocess.run([sys.executable, str(root / "scripts/plot_mqar_curves.py"), "--mixer", "baseconv", "--lrs", "0.01",
                    "--out", str(out), f"first={tmp_path / 'a'}", f"second={tmp_path / 'b'}"], check=True,
                   capture_output=True)
    rows = [line for line in (tmp_path / "curves.md").read_text().splitlines() if line.startswith("| first")
            or line.startswith("| second")]
    assert rows == ["| first | 0.01 | 0.040 | 0.080 | 0.120 | 0.160 | 0.200 | 0.240 | 0.320 | 0.400 | 0.480 | 0.560 "
                    "| 0.640 | 0.640 (64.0) |",
                    "| second | 0.01 | 0.540 | 0.580 |  |  |  |  |  |  |  |  |  | 0.600 (10.0) |"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
