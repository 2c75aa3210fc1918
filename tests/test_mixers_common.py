"""Properties every registered mixer must have: shapes, dtypes, causality through gradients, finite grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.mixers import MIXERS, build_mixer
from lm.params import count_params

D_MODEL, MAX_LEN = 16, 32


def make(name, dtype=jnp.float32, layer_idx=0):
    mixer = build_mixer({"name": name}, d_model=D_MODEL, max_len=MAX_LEN, layer_idx=layer_idx, n_layers=2,
                        dtype=dtype, rngs=nnx.Rngs(0))
    mixer.eval()
    return mixer


def apply_fn(mixer):
    graphdef, state = nnx.split(mixer)
    return lambda x: nnx.merge(graphdef, state)(x)


def unit_input(shape, seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_shape_dtype_and_params(name):
    mixer = make(name)
    assert count_params(mixer) > 0
    y = mixer(unit_input((2, MAX_LEN, D_MODEL)))
    assert y.shape == (2, MAX_LEN, D_MODEL) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    y_short = mixer(unit_input((2, 7, D_MODEL)))  # shorter and odd lengths work too
    assert y_short.shape == (2, 7, D_MODEL)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_bf16_activations(name):
    mixer = make(name, dtype=jnp.bfloat16)
    y = mixer(unit_input((2, MAX_LEN, D_MODEL), dtype=jnp.bfloat16))
    assert y.shape == (2, MAX_LEN, D_MODEL) and y.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


@pytest.mark.parametrize("name", sorted(MIXERS))
@pytest.mark.parametrize("layer_idx", [0, 1])
def test_causal_through_gradients(name, layer_idx):
    """∂y_t/∂u_s = 0 for s > t, from the full Jacobian; and the past does influence the present."""
    mixer = make(name, layer_idx=layer_idx)
    length = 24
    x = unit_input((1, length, D_MODEL), seed=2)
    jac = jax.jacrev(lambda u: apply_fn(mixer)(u)[0])(x)[:, :, 0]  # (t, d_out, s, d_in)
    influence = np.asarray(jnp.max(jnp.abs(jac), axis=(1, 3)))  # (t, s)
    scale = influence.max()
    assert scale > 0
    future = np.triu(influence, k=1)
    assert future.max() <= 1e-5 * scale, f"{name}: output at t depends on inputs after t ({future.max():.3g})"
    past = np.tril(influence, k=-1)
    assert past.max() > 1e-3 * scale, f"{name}: no influence from earlier positions"


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_parameter_gradients_finite(name):
    mixer = build_mixer({"name": name}, d_model=D_MODEL, max_len=MAX_LEN, n_layers=2, rngs=nnx.Rngs(3))
    x = unit_input((2, MAX_LEN, D_MODEL), seed=4)

    def loss(m):
        return jnp.mean(m(x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(mixer)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_rejects_sequences_longer_than_max_len(name):
    mixer = make(name)
    with pytest.raises(ValueError, match=str(MAX_LEN)):
        mixer(unit_input((1, MAX_LEN + 1, D_MODEL)))
