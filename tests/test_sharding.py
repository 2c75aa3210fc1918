"""Unit tests of the mesh/sharding rules, the optimizer and the checkpointer (fast, 1 CPU device)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lm.checkpoint import Checkpointer, CheckpointError, host_copy
from lm.config import ConfigError, from_dict
from lm.optim import OptimizerConfig, lr_schedule, make_optimizer, model_label_map
from lm.params import FilterParam
from lm.sharding import MeshConfig, batch_sharding, make_mesh, spec_for, state_shardings


def fake_mesh(**sizes):
    return types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1, **sizes})


# -- mesh ------------------------------------------------------------------------------------------


def test_mesh_config_resolves_rest_and_rejects_bad_sizes():
    assert MeshConfig(data=-1, fsdp=2).resolve(8) == (4, 2, 1)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="needs 4 devices"):
        MeshConfig(data=4, fsdp=1).resolve(8)
    with pytest.raises(ConfigError, match="not divisible"):
        MeshConfig(data=-1, fsdp=3).resolve(8)
    with pytest.raises(ConfigError, match="at most one"):
        from_dict(MeshConfig, {"data": -1, "fsdp": -1})


def test_single_device_mesh_and_batch_sharding():
    mesh = make_mesh(MeshConfig())
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_fsdp_rule_shards_largest_divisible_dim_and_replicates_small():
    mesh = fake_mesh(fsdp=4)
    assert spec_for((512, 128), mesh, 1) == P("fsdp", None)
    assert spec_for((128, 512), mesh, 1) == P(None, "fsdp")
    assert spec_for((66, 128), mesh, 1) == P(None, "fsdp")  # 66 is not divisible by 4
    assert spec_for((66, 67), mesh, 1) == P()  # nothing divisible: replicated
    assert spec_for((512,), mesh, 1) == P()  # vectors replicated
    assert spec_for((64, 64), mesh, 2**14) == P()  # small: replicated
    mesh = fake_mesh(fsdp=2, tensor=2)
    assert spec_for((256, 512), mesh, 1) == P("tensor", "fsdp")


def test_state_shardings_replicate_rng_keys():
    mesh = make_mesh(MeshConfig())
    tree = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32), "key": jax.random.key(0)}
    sh = state_shardings(tree, mesh, 1)
    assert sh["key"].spec == P()


# -- optimizer -------------------------------------------------------------------------------------


def test_schedule_warmup_cosine_and_min_ratio():
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=10, warmup_init_lr=1e-6, min_lr_ratio=0.1)
    s = lr_schedule(cfg, 110)
    assert float(s(0)) == pytest.approx(1e-6, rel=1e-4)
    assert float(s(10)) == pytest.approx(1e-3, rel=1e-5)
    assert float(s(60)) == pytest.approx(0.55e-3, rel=1e-3)  # half-way down the cosine
    assert float(s(110)) == pytest.approx(1e-4, rel=1e-4)
    ratio = OptimizerConfig(warmup_steps=-1, warmup_ratio=0.01)
    assert ratio.resolved_warmup(1000) == 10


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.filt = FilterParam(jnp.ones((8, 4)))

    def __call__(self, x):
        return self.norm(self.lin(x)) + self.filt[...].sum()


def test_parameter_groups_weight_decay_and_filter_lr():
    model = Toy(nnx.Rngs(0))
    labels = model_label_map(model)
    assert labels[("lin", "kernel")] == "decay" and labels[("lin", "bias")] == "no_decay"
    assert labels[("norm", "scale")] == "no_decay" and labels[("filt",)] == "filter"
    cfg = OptimizerConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, filter_lr=0.0)
    opt = nnx.Optimizer(model, make_optimizer(cfg, 10, labels), wrt=nnx.Param)
    before = host_copy(nnx.state(model, nnx.Param))
    zero = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    opt.update(model, zero)  # zero gradients: only weight decay moves parameters
    after = host_copy(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(after["lin"]["kernel"], before["lin"]["kernel"] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(after["lin"]["bias"], before["lin"]["bias"])
    np.testing.assert_array_equal(after["norm"]["scale"], before["norm"]["scale"])
    np.testing.assert_array_equal(after["filt"], before["filt"])  # filter: wd 0 (and lr 0 here)


def test_weight_decay_on_all_decays_every_tensor():
    """``weight_decay_on: all`` (PyTorch's AdamW over model.parameters()) decays biases and norm scales too;
    the filter group follows ``filter_weight_decay``; an unknown value is a named config error."""
    model = Toy(nnx.Rngs(0))
    model.lin.bias[...] = jnp.arange(1.0, 5.0)  # nonzero, so that decay shows
    cfg = OptimizerConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, weight_decay_on="all",
                          filter_weight_decay=0.2)
    opt = nnx.Optimizer(model, make_optimizer(cfg, 10, model_label_map(model)), wrt=nnx.Param)
    before = host_copy(nnx.state(model, nnx.Param))
    opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = host_copy(nnx.state(model, nnx.Param))
    for path in (("lin", "kernel"), ("lin", "bias"), ("norm", "scale")):
        np.testing.assert_allclose(after[path[0]][path[1]], before[path[0]][path[1]] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(after["filt"], before["filt"] * (1 - 0.1 * 0.2), rtol=1e-6)
    with pytest.raises(ConfigError, match="optimizer.weight_decay_on"):
        make_optimizer(OptimizerConfig(weight_decay_on="everything"), 10, model_label_map(model))


def test_gradient_clipping_and_sgd_like_first_step():
    import optax

    model = Toy(nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    grads = jax.tree.map(lambda x: jnp.full_like(x, 100.0), params)
    g, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert float(optax.tree.norm(g)) == pytest.approx(1.0, rel=1e-5)
    cfg = OptimizerConfig(lr=0.5, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    tx = make_optimizer(cfg, 10, model_label_map(model))
    updates, _ = tx.update(grads, tx.init(params), params)
    for u in jax.tree.leaves(updates):  # Adam's first step is -lr * sign(g) (up to eps)
        np.testing.assert_allclose(np.asarray(u), -0.5, rtol=1e-4)


def test_unknown_optimizer_key_is_named():
    with pytest.raises(ConfigError, match="optimizer.momentum"):
        from_dict(OptimizerConfig, {"momentum": 0.9}, prefix="optimizer")


# -- checkpoints -----------------------------------------------------------------------------------


def _state(d_in=4):
    model = Toy(nnx.Rngs(0))
    model.lin = nnx.Linear(d_in, 4, rngs=nnx.Rngs(1))
    drop = nnx.Dropout(0.5, rngs=nnx.Rngs(2))
    return {"model": nnx.state(nnx.List([model, drop])), "extra": jnp.arange(3)}


def test_checkpoint_roundtrip_keep_and_mismatch(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep=2, async_save=False)
    state = _state()
    for step in (1, 2, 3):
        ckpt.save(step, state, {"data": {"epoch": 0, "step": step}})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    restored, meta = ckpt.restore(state)
    assert meta["step"] == 3 and meta["data"]["step"] == 3
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(host_copy(state)), jax.tree.leaves(host_copy(restored))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match=r"parameter 'model.0.lin.kernel': checkpoint has float32\(4, 4\), "
                                              r"model expects float32\(5, 4\)"):
        ckpt.restore(_state(d_in=5))
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        ckpt.restore(state, step=7)
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()


def test_missing_checkpoint_dir_is_clear(tmp_path):
    ckpt = Checkpointer(tmp_path / "empty", keep=1)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ckpt.restore(_state())
    ckpt.close()
