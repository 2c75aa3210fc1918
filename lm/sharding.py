"""Device mesh and sharding rules (data parallel + fully-sharded parameters, optional tensor axis).

The mesh has three named axes ``("data", "fsdp", "tensor")`` built with `jax.make_mesh`; any size
may be 1 and one may be -1 ("all remaining devices"). The same code runs on one CPU device, on 8 forced
host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and on many hosts after
``jax.distributed.initialize()`` (every process runs the same program; `jax.devices()` is global).

Rules (`state_shardings`):

- the batch is split over ``("data", "fsdp")`` along its first dimension;
- every array with >= 2 dims and at least ``min_shard_size`` elements is sharded over ``"fsdp"`` along
  its largest dimension divisible by the fsdp size, and over ``"tensor"`` along the largest remaining
  divisible dimension; everything else (biases, norm scales, step counters, RNG keys) is replicated.
  Optimizer moments have the parameters' shapes, so they get the same shardings.

XLA's SPMD partitioner inserts the all-gathers / reduce-scatters; the train step is a `jax.jit` with
these shardings as ``in_shardings``/``out_shardings`` and the state donated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lm.config import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass
class MeshConfig:
    """Mesh axis sizes; -1 = all remaining devices (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    min_shard_size: int = 2**14  # arrays smaller than this stay replicated

    def validate(self) -> None:
        sizes = [self.data, self.fsdp, self.tensor]
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError("config key 'mesh': at most one of data/fsdp/tensor may be -1")
        for name, s in zip(AXES, sizes):
            if s == 0 or s < -1:
                raise ConfigError(f"config key 'mesh.{name}' must be a positive size or -1, got {s}")

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % fixed:
                raise ConfigError(
                    f"mesh {dict(zip(AXES, sizes))}: {n_devices} devices are not divisible by {fixed}")
            sizes = [n_devices // fixed if s == -1 else s for s in sizes]
        if math.prod(sizes) != n_devices:
            raise ConfigError(
                f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but {n_devices} are available")
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> jax.sharding.Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all global devices)."""
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding of a (batch, length) token array: rows over ("data", "fsdp")."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: jax.sharding.Mesh) -> int:
    """The global batch must be a multiple of this (the data x fsdp size)."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def spec_for(shape: tuple[int, ...], mesh: jax.sharding.Mesh, min_shard_size: int = 2**14) -> P:
    """PartitionSpec of one array under the fsdp/tensor rules in the module docstring."""
    if len(shape) < 2 or int(np.prod(shape)) < min_shard_size:
        return P()
    spec: list[Any] = [None] * len(shape)
    for axis in ("fsdp", "tensor"):
        n = mesh.shape[axis]
        if n == 1:
            continue
        candidates = [i for i in range(len(shape)) if spec[i] is None and shape[i] % n == 0]
        if not candidates:
            continue
        best = max(candidates, key=lambda i: (shape[i], -i))
        spec[best] = axis
    return P(*spec) if any(a is not None for a in spec) else P()


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, min_shard_size: int = 2**14):
    """NamedShardings (same tree as ``abstract_state``) for params, optimizer state, counters and RNGs."""

    def one(x):
        shape = tuple(getattr(x, "shape", ()))
        if _is_key(x):
            return replicated(mesh)
        return NamedSharding(mesh, spec_for(shape, mesh, min_shard_size))

    return jax.tree.map(one, abstract_state)


def describe(mesh: jax.sharding.Mesh) -> str:
    return (f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} device(s), "
            f"{jax.process_count()} process(es)")


def sync_processes(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (unique per use); no-op with one process.

    The barrier is the coordination service's (timeout 300 s), not a device collective: JAX's CPU (gloo)
    collectives give a late peer only 30 s to join a new device group, so processes meet here before a
    program's first collective when one of them may still be compiling it.
    """
    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp

    ocp.multihost.sync_global_processes(name, processes=set(range(jax.process_count())))
