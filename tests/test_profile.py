"""`lm.profile`: a profiler trace summed per XLA op and labelled with the JAX op it came from."""

import jax
import jax.numpy as jnp

from lm.profile import ops_table, profile_ops, time_by_kind


def test_profile_names_the_ops_of_a_jitted_function():
    a = jnp.ones((256, 128), jnp.float32)
    b = jnp.ones((128, 64), jnp.float32)
    fn = jax.jit(lambda a, b: jnp.tanh(a @ b).sum(axis=0))
    hlo = fn.lower(a, b).compile().as_text()
    jax.block_until_ready(fn(a, b))
    rows = profile_ops(lambda: jax.block_until_ready(fn(a, b)), steps=3, compiled_text=hlo)
    assert rows and all(r["us"] >= 0 and r["shape"] for r in rows)  # only the module's ops, no runtime events
    assert [r["us"] for r in rows] == sorted((r["us"] for r in rows), reverse=True)
    dots = [r for r in rows if "dot_general" in r["source"]]  # the matmul, fused with tanh and the sum
    assert dots and dots[0]["shape"].startswith("f32[64]") and dots[0]["calls"] >= 3
    assert "tanh" in dots[0]["source"] and "reduce_sum" in dots[0]["source"]
    lines = ops_table(rows, steps=3, top=2)
    assert len(lines) == 2 + min(2, len(rows)) + 1 and lines[-1].startswith("| (all traced ops)")


def test_time_by_kind_attributes_each_op_to_its_main_primitive():
    rows = [{"op": "a", "us": 5.0, "source": "f/add [fft+mul]"}, {"op": "b", "us": 2.0, "source": "f/mul [dot_general]"},
            {"op": "c", "us": 1.0, "source": "f/tanh [tanh]"}, {"op": "d", "us": 3.0, "source": "f/dot_general"}]
    assert time_by_kind(rows) == {"dot_general": 5.0, "fft": 5.0, "elementwise/other": 1.0}
