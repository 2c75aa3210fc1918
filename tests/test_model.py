"""The LM backbone: forward/backward, hand-counted parameters, parameter groups, bad input."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lm.config import ConfigError, from_dict
from lm.model import LM, ModelConfig, parameter_report, parameter_table
from lm.params import count_params

TINY = {"vocab_size": 37, "d_model": 16, "n_layers": 2, "max_len": 32, "mixer": {"name": "hyena"}}


def tiny(**overrides):
    return from_dict(ModelConfig, {**TINY, **overrides})


@pytest.mark.parametrize("mixer", ["hyena", "attention"])
def test_forward_backward(mixer):
    model = LM(tiny(mixer={"name": mixer}, dropout=0.1), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, 37)
    logits = model(tokens)
    assert logits.shape == (2, 20, 37) and logits.dtype == jnp.float32

    def loss(m):
        lp = jax.nn.log_softmax(m(tokens[:, :-1]))
        return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1))

    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.Param))(model)
    assert jnp.isfinite(value) and abs(float(value) - jnp.log(37.0)) < 0.5  # near-uniform at init
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    model.eval()
    assert jnp.allclose(model(tokens), model(tokens))  # deterministic without dropout


@pytest.mark.parametrize("dropout, embed_dropout, embed_rate, residual_rate",
                         [(0.0, 0.5, 0.5, None), (0.3, 0.0, None, 0.3), (0.3, None, 0.3, 0.3), (0.2, 0.5, 0.5, 0.2)])
def test_embed_dropout_replaces_dropout_on_the_embeddings_only(dropout, embed_dropout, embed_rate, residual_rate):
    """Zoology drops 10 % of the embeddings and nothing on the residual branches: ``embed_dropout`` sets
    the embeddings' rate (unset: ``dropout``), ``dropout`` the blocks'. In training mode the embeddings'
    zeroed fraction is the rate."""
    model = LM(tiny(dropout=dropout, embed_dropout=embed_dropout, mlp="mlp"), rngs=nnx.Rngs(0))
    rates = [None if d is None else d.rate for d in (model.embed_dropout, *(b.dropout for b in model.blocks))]
    assert rates == [embed_rate] + [residual_rate] * 2
    x = model.embed_tokens(jnp.ones((64, 32), jnp.int32))
    dropped = float(jnp.mean(x == 0.0))
    assert abs(dropped - (embed_rate or 0.0)) < 0.02, dropped


def test_hidden_then_logits_equals_call():
    model = LM(tiny(), rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 37)
    assert jnp.allclose(model.logits(model.hidden(tokens)), model(tokens), atol=1e-6)


@pytest.mark.parametrize("mlp", ["glu", "mlp", "none", "identity"])
@pytest.mark.parametrize("tie", [True, False])
def test_parameter_count_matches_hand_count(mlp, tie):
    cfg = tiny(mlp=mlp, tie_embeddings=tie, pos_embedding="learned", mlp_ratio=4.0)
    model = LM(cfg, rngs=nnx.Rngs(0))
    v, d, n, length = 37, 16, 2, 32
    d_mlp = {"glu": 40, "mlp": 64}.get(mlp, 0)  # glu: 8 * round(4 * 16 * 2/3 / 8) = 40
    mlp_params = {"glu": d * 2 * d_mlp + 2 * d_mlp + d_mlp * d + d,
                  "mlp": d * d_mlp + d_mlp + d_mlp * d + d}.get(mlp, 0)
    norms_per_block = 2 if mlp != "none" else 1
    mixers = sum(count_params(block.mixer) for block in model.blocks)
    expected = (v * d + length * d + n * (norms_per_block * 2 * d + mlp_params) + mixers + 2 * d
                + (0 if tie else d * v))
    assert count_params(model) == expected
    assert "total" in parameter_report(model)


def test_filter_parameters_get_their_own_group():
    rows = parameter_table(LM(tiny(), rngs=nnx.Rngs(0)))
    groups = {path: group for path, _, _, group in rows}
    assert groups["embed/embedding"] == "decay"
    assert any(group == "filter" and "mixer" in path for path, group in groups.items())
    assert groups["blocks/0/mixer/filter/freq"] == "filter"
    assert all(group == "no_decay" for path, group in groups.items()
               if path.endswith(("bias", "scale")) and "/filter/" not in path)


def test_hybrid_layer_mixers():
    model = LM(tiny(layer_mixers={1: {"name": "attention"}}), rngs=nnx.Rngs(0))
    names = [type(block.mixer).__name__ for block in model.blocks]
    assert names[0] != names[1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mixer": {"name": "nope"}}, "unknown mixer 'nope'"),
        ({"mixer": {"name": "hyena", "bogus_option": 1}}, "unknown config key 'model.mixer.bogus_option'"),
        ({"layer_mixers": {5: {"name": "attention"}}}, "layer index out of range"),
        ({"d_model": 0}, "model.d_model"),
        ({"mlp": "wide"}, "config key .mlp.: .wide. is not one of"),
        ({"dropout": 1.5}, "model.dropout"),
        ({"embed_dropout": -0.1}, "model.embed_dropout"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_bad_tokens():
    model = LM(tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds model max_len 32"):
        model(jnp.zeros((1, 33), jnp.int32))
    with pytest.raises(ValueError, match="shape \\(batch, length\\)"):
        model(jnp.zeros((33,), jnp.int32))
    with pytest.raises(ValueError, match="must be integers"):
        model(jnp.zeros((1, 4), jnp.float32))
