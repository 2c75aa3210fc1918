"""Recurrent twins, decoding equivalence (distill.md §8.3), sampling and the generate/distill CLIs."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.cli import main as cli_main
from lm.config import from_dict
from lm.distill.convert import (check_modal_fits, distill_model, load_distilled, load_modal, long_filter_banks,
                                replace_filters, save_modal)
from lm.distill.fit import DistillError
from lm.distill.modal import ModalParams
from lm.distill.recurrent import Decoder, RecurrentError
from lm.generate import GenerateError, SamplingConfig, build_decoder, filter_logits, generate_ids, sample
from lm.model import LM, ModelConfig

MIXERS = {
    "hyena": {"name": "hyena", "filter_order": 16, "emb_dim": 5},
    "hyena_paper3": {"name": "hyena", "convention": "paper", "order": 3, "filter_order": 16, "emb_dim": 5},
    "hyena_safari3": {"name": "hyena", "order": 3, "filter_order": 16, "emb_dim": 5},
    "multihyena": {"name": "multihyena", "num_heads": 4, "filter_order": 16, "emb_dim": 5},
    "longconv": {"name": "longconv", "channels": 2},
    "sgconv": {"name": "sgconv", "kernel_dim": 8},
    "h3": {"name": "h3", "head_dim": 2},
}


def tiny_lm(mixer, layer_mixers=None, max_len=32, seed=0):
    cfg = from_dict(ModelConfig, {"vocab_size": 37, "d_model": 16, "n_layers": 2, "max_len": max_len,
                                  "mixer": mixer, "layer_mixers": layer_mixers or {}})
    lm = LM(cfg, rngs=nnx.Rngs(seed))
    lm.eval()
    return lm


def rel(a, b):
    return float(jnp.linalg.norm(jnp.asarray(a) - jnp.asarray(b)) / jnp.linalg.norm(jnp.asarray(b)))


def decode_logits(decoder, tokens, split):
    """Logits at positions split.. by prefill(tokens[:, :split]) then one step per token."""
    logits, cache = decoder.prefill(tokens[:, :split], cap=tokens.shape[1])
    outs = [logits[:, -1]]
    for t in range(split, tokens.shape[1] - 1):
        lg, cache = decoder.step(tokens[:, t], cache)
        outs.append(lg)
    return jnp.stack(outs, 1)  # logits predicting tokens split..T-1, i.e. positions split-1..T-2


@pytest.mark.parametrize("name", [n if n in ("hyena", "multihyena", "h3")
                                  else pytest.param(n, marks=pytest.mark.slow) for n in sorted(MIXERS)])
def test_distilled_decode_matches_replaced_forward(name):
    """§8.3: prefill + token-by-token decode == full forward of the model whose long filters are
    REPLACED by the materialised modal filters (logits, rel err < 1e-4 fp32)."""
    layer_mixers = {1: {"name": "attention", "num_heads": 2}} if name == "hyena" else None  # one hybrid case
    lm = tiny_lm(MIXERS[name], layer_mixers)
    modal, reports = distill_model(lm, order=4)
    replaced = replace_filters(lm, modal)
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 37)
    ref = replaced(tokens)
    decoder = Decoder(lm, "recurrent", modal)
    full, _ = decoder.prefill(tokens)
    assert rel(full, ref) < 1e-4
    got = decode_logits(decoder, tokens, 11)
    assert rel(got, ref[:, 10:31]) < 1e-4
    # the replaced model differs from the original only through the fit
    assert all(r.rel_error < 10 for layer in reports.values() for reps in layer.values() for r in reps)


def modal_filter_np(p: ModalParams, length: int) -> np.ndarray:
    """float64 ĥ (length, C) from the fp32 planes: ĥ_0 = h0, ĥ_t = Re Σ_n R_n λ_n^(t-1) (t >= 1)."""
    poles = np.asarray(p.pole_re, np.float64) + 1j * np.asarray(p.pole_im, np.float64)
    res = np.asarray(p.res_re, np.float64) + 1j * np.asarray(p.res_im, np.float64)
    tail = np.real(np.einsum("cd,tcd->tc", res, poles[None] ** np.arange(length - 1)[:, None, None]))
    return np.concatenate([np.asarray(p.h0, np.float64)[None], tail])


@pytest.mark.parametrize("name", ["hyena", pytest.param("multihyena", marks=pytest.mark.slow)])
def test_distilled_decode_matches_the_original_model(name):
    """Decoding with filters FITTED to the model's own filters (order 16) reproduces the ORIGINAL model.

    Filter errors are computed here in float64 from the returned poles and residues. Keeping only each
    filter's tap h0 (filter error e_tail, per bank ‖ĥ − h‖ / ‖h‖) moves the decoded logits by err_tail;
    the fit must be far closer to h than that (e_fit < e_tail / 4), and its logits may move by about
    err_tail · e_fit / e_tail: allowed 3x that + 1e-4 (fp32). Zero residues make ĥ = h0 and fail both."""
    lm = tiny_lm(MIXERS[name])
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 37)
    ref = lm(tokens)[:, 10:31]
    modal, _ = distill_model(lm, order=16)
    banks = long_filter_banks(lm)

    def filter_error(params_of):
        return [float(np.linalg.norm(modal_filter_np(params_of(i, n), len(h)) - h) / np.linalg.norm(h))
                for i, layer in banks.items() for n, h in layer.items()]

    h0_only = {i: {n: p._replace(res_re=0 * p.res_re, res_im=0 * p.res_im) for n, p in layer.items()}
               for i, layer in modal.items()}
    e_fit = max(filter_error(lambda i, n: modal[i][n]))
    e_tail = min(filter_error(lambda i, n: h0_only[i][n]))
    err_tail = rel(decode_logits(Decoder(lm, "recurrent", h0_only), tokens, 11), ref)
    err_fit = rel(decode_logits(Decoder(lm, "recurrent", modal), tokens, 11), ref)
    assert e_fit < e_tail / 4, (e_fit, e_tail)
    assert err_fit < 3 * err_tail * e_fit / e_tail + 1e-4, (err_fit, err_tail, e_fit, e_tail)


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m != "fft" else m
                                    for m in ("vandermonde", "chunked", "scan", "fft")])
def test_prefill_methods_give_the_same_decode(method):
    lm = tiny_lm(MIXERS["hyena"])
    modal, _ = distill_model(lm, order=3)
    tokens = jax.random.randint(jax.random.key(2), (1, 32), 0, 37)
    ref = replace_filters(lm, modal)(tokens)
    got = decode_logits(Decoder(lm, "recurrent", modal, prefill_method=method), tokens, 20)
    assert rel(got, ref[:, 19:31]) < 1e-4


def test_exactly_modal_filters_decode_exactly():
    """Directly set modal filters (no fit): decode reproduces the replaced forward."""
    lm = tiny_lm(MIXERS["multihyena"])
    rng = np.random.default_rng(0)
    modal = {}
    for i, block in enumerate(lm.blocks):
        c = block.mixer.long_filters(4)["filter"].shape[1]
        poles = rng.uniform(0.9, 0.999, (c, 3)) * np.exp(1j * rng.uniform(0.3, 2.0, (c, 3)))
        res = 0.1 * (rng.normal(size=(c, 3)) + 1j * rng.normal(size=(c, 3)))
        modal[i] = {"filter": ModalParams.from_complex(poles, res, rng.normal(size=c))}
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, 37)
    ref = replace_filters(lm, modal)(tokens)
    got = decode_logits(Decoder(lm, "recurrent", modal), tokens, 5)
    assert rel(got, ref[:, 4:31]) < 1e-4


@pytest.mark.parametrize("name", ["hyena", pytest.param("multihyena", marks=pytest.mark.slow),
                                  pytest.param("h3", marks=pytest.mark.slow)])
def test_conv_cache_decode_matches_model(name):
    lm = tiny_lm(MIXERS[name], {1: {"name": "attention", "num_heads": 2}})
    tokens = jax.random.randint(jax.random.key(4), (2, 32), 0, 37)
    ref = lm(tokens)
    decoder = Decoder(lm, "convcache")
    full, _ = decoder.prefill(tokens)
    assert rel(full, ref) < 1e-5
    assert rel(decode_logits(decoder, tokens, 9), ref[:, 8:31]) < 1e-5


def test_attention_kv_cache_matches_model():
    lm = tiny_lm({"name": "attention", "num_heads": 2})
    tokens = jax.random.randint(jax.random.key(5), (2, 32), 0, 37)
    ref = lm(tokens)
    assert rel(decode_logits(Decoder(lm, "convcache"), tokens, 3), ref[:, 2:31]) < 1e-5
    assert rel(decode_logits(Decoder(lm, "recurrent"), tokens, 3), ref[:, 2:31]) < 1e-5


def test_recurrent_state_is_constant_size_and_runs_past_max_len():
    lm = tiny_lm(MIXERS["hyena"])
    modal, _ = distill_model(lm, order=2)
    dec = Decoder(lm, "recurrent", modal)
    assert dec.cache_limit() is None
    _, c1 = dec.prefill(jnp.zeros((1, 4), jnp.int32))
    _, c2 = dec.prefill(jnp.zeros((1, 30), jnp.int32))
    size = lambda c: sum(x.size for x in jax.tree.leaves(c))
    assert size(c1) == size(c2)
    out = generate_ids(dec, [1, 2, 3], 40, SamplingConfig(temperature=0))  # 43 tokens > max_len 32
    assert out["ids"].shape == (1, 40)
    with pytest.raises(GenerateError, match="exceeds"):
        generate_ids(Decoder(lm, "convcache"), [1, 2, 3], 40)


def test_sampling_filters():
    logits = jnp.array([[0.0, 3.0, 1.0, 2.0]])
    assert int(sample(jax.random.key(0), logits, SamplingConfig(temperature=0))[0]) == 1
    for seed in range(5):
        assert int(sample(jax.random.key(seed), logits, SamplingConfig(1.0, top_k=1))[0]) == 1
        assert int(sample(jax.random.key(seed), logits, SamplingConfig(1.0, top_p=0.01))[0]) == 1
    kept = filter_logits(logits, top_k=2)
    assert np.isfinite(np.asarray(kept)).all() and int(jnp.sum(kept > -1e30)) == 2
    assert int(jnp.sum(filter_logits(logits, top_p=0.8) > -1e30)) == 2  # probs .64 .24 .09 .03
    with pytest.raises(GenerateError):
        SamplingConfig(top_p=0.0).validate()
    with pytest.raises(GenerateError):
        SamplingConfig(temperature=-1).validate()


class _ConstantDecoder:
    """A fake decoder whose logits are always ``logits`` (default: favour token 2); counts prefill/step calls."""

    mode = "fake"

    def __init__(self, logits=(0.0, 0.0, 1.0, 0.0, 0.0)):
        self.logits = jnp.asarray(logits, jnp.float32)
        self.steps, self.caps = 0, []

    def cache_limit(self):
        return None

    def prefill(self, prompt, cap):
        self.caps.append(cap)
        return jnp.broadcast_to(self.logits, prompt.shape + self.logits.shape), {}

    def step(self, tok, cache):
        self.steps += 1
        return jnp.broadcast_to(self.logits, tok.shape + self.logits.shape), cache


def test_sampling_draws_from_softmax_of_logits_over_temperature():
    """`generate_ids` samples from softmax(logits / T): the frequencies of 4000 independent rows match the
    float64 softmax within 5 standard errors (+1e-3) at T = 0.5 and 2, which differ from each other by a
    total variation > 0.3; T = 1e-3 is argmax for every row."""
    logits = np.array([0.0, 1.0, 2.0, 0.5, -1.0])
    rows = 4000
    freqs = {}
    for temperature in (0.5, 2.0, 1e-3):
        ids = generate_ids(_ConstantDecoder(logits), np.zeros((rows, 1), np.int32), 1,
                           SamplingConfig(temperature=temperature), seed=7)["ids"][:, 0]
        freqs[temperature] = freq = np.bincount(ids, minlength=len(logits)) / rows
        p = np.exp(logits / temperature - (logits / temperature).max())
        p /= p.sum()
        assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / rows) + 1e-3), (temperature, freq, p)
    assert 0.5 * np.abs(freqs[0.5] - freqs[2.0]).sum() > 0.3
    assert freqs[1e-3][2] == 1.0


def test_generate_ids_budget_steps_and_stop():
    dec = _ConstantDecoder()
    out = generate_ids(dec, [1, 1], 4, SamplingConfig(temperature=0))
    assert out["ids"].tolist() == [[2, 2, 2, 2]] and not out["stopped"]
    assert dec.caps == [6] and dec.steps == 3  # no wasted step after the last token
    dec = _ConstantDecoder()
    out = generate_ids(dec, [1], 4, SamplingConfig(temperature=0), stop_ids=(2,))
    assert out["ids"].tolist() == [[2]] and out["stopped"] and dec.steps == 0
    with pytest.raises(GenerateError, match="cap 5 is smaller"):  # would overflow the caches silently
        generate_ids(_ConstantDecoder(), [1, 1], 4, cap=5)


def test_bad_inputs():
    lm_attn = tiny_lm({"name": "attention", "num_heads": 2})
    with pytest.raises(DistillError, match="no long filters"):
        distill_model(lm_attn, order=4)
    lm = tiny_lm(MIXERS["hyena"])
    for bad in (0, -1):
        with pytest.raises(DistillError, match="positive integer"):
            distill_model(lm, order=bad)
    with pytest.raises(RecurrentError, match="no distilled"):
        Decoder(lm, "recurrent", {})
    modal, _ = distill_model(lm, order=2)
    other = tiny_lm({**MIXERS["hyena"]}, max_len=32)
    check_modal_fits(other, modal)  # same shapes: fine
    wide = LM(from_dict(ModelConfig, {"vocab_size": 37, "d_model": 32, "n_layers": 2, "max_len": 32,
                                      "mixer": MIXERS["hyena"]}), rngs=nnx.Rngs(0))
    with pytest.raises(DistillError, match="do not match"):
        check_modal_fits(wide, modal)


# ------------------------------------------------------------------------------------------------
# End to end: trainer run dir -> distill CLI -> generate CLI with each path
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from lm.train import load_train_config, train

    root = tmp_path_factory.mktemp("gen")
    text = ("first citizen: we are accounted poor citizens, the patricians good.\n" * 40)
    (root / "corpus.txt").write_text(text)
    out = {}
    for name, mixer in (("hyena", MIXERS["hyena"]), ("attention", {"name": "attention", "num_heads": 2})):
        cfg = {
            "model": {"d_model": 16, "n_layers": 2, "max_len": 32, "mixer": mixer, "mlp_ratio": 2.0},
            "data": {"source": str(root / "corpus.txt"), "tokenizer": {"kind": "char"}, "block_size": 32,
                     "batch_size": 4, "val_fraction": 0.1},
            "optimizer": {"lr": 1e-2, "warmup_steps": 1},
            "trainer": {"steps": 3, "eval_every": 0, "eval_steps": 1, "checkpoint_every": 3, "log_every": 1,
                        "progress": False, "async_checkpointing": False},
        }
        train(load_train_config(base=cfg), root / name)
        out[name] = root / name
    return out


def test_cli_distill_and_generate_all_paths(runs, capsys):
    src = runs["hyena"]
    out = src.with_name("hyena-d4")
    assert cli_main(["distill", "--run", str(src), "--order", "4", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and set(summary["layers"]) == {"0", "1"}
    _, lm, _, _, modal, meta = load_distilled(out)
    assert meta["order"] == 4 and modal[0]["filter_0"].order == 4
    texts = {}
    for run, path in ((out, "recurrent"), (out, "conv"), (src, "conv"), (out, "auto"), (runs["attention"], "attention")):
        code = cli_main(["generate", "--run", str(run), "--prompt", "first", "--path", path, "--max-new-tokens", "12",
                         "--temperature", "0", "--no-stop-eod", "--json"])
        assert code == 0, path
        res = json.loads(capsys.readouterr().out)
        assert res["new_tokens"] == 12 and isinstance(res["text"], str)
        texts[(run.name, path)] = res
    assert texts[(out.name, "auto")]["path"] == "recurrent"
    # top-k / top-p / stop strings through the CLI
    assert cli_main(["generate", "--run", str(out), "--prompt", "fi", "--top-k", "3", "--top-p", "0.9",
                     "--max-new-tokens", "30", "--stop", "e", "--no-stop-eod"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("fi") and "e" not in printed[2:].rstrip("\n")


def test_cli_bad_inputs(runs, capsys, tmp_path):
    attn, src = runs["attention"], runs["hyena"]
    assert cli_main(["distill", "--run", str(attn), "--order", "4", "--out", str(tmp_path / "x")]) == 1
    assert "no long filters" in capsys.readouterr().err
    assert cli_main(["distill", "--run", str(src), "--order", "0", "--out", str(tmp_path / "y")]) == 1
    assert "positive integer" in capsys.readouterr().err
    assert cli_main(["generate", "--run", str(src), "--path", "recurrent", "--prompt", "a"]) == 1
    assert "not a distilled run" in capsys.readouterr().err
    assert cli_main(["generate", "--run", str(src), "--path", "attention", "--prompt", "a"]) == 1
    assert "attention-only" in capsys.readouterr().err
    assert cli_main(["generate", "--run", str(src), "--path", "conv", "--prompt", "a", "--max-new-tokens", "100"]) == 1
    assert "exceeds" in capsys.readouterr().err
    # a distilled run whose modal filters do not fit the checkpoint
    out = tmp_path / "mismatch"
    assert cli_main(["distill", "--run", str(src), "--order", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    modal = load_modal(out / "distilled" / "modal.npz")
    bad = ModalParams(*[a[:8] for a in modal[0]["filter_0"]])
    modal[0]["filter_0"] = bad
    save_modal(out / "distilled" / "modal.npz", modal)
    assert cli_main(["generate", "--run", str(out), "--prompt", "a"]) == 1
    assert "do not match" in capsys.readouterr().err
    with pytest.raises(GenerateError, match="unknown path"):
        build_decoder(src, "bogus")
