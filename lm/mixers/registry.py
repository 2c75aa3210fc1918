"""Mixer registry: every sequence mixer registers a typed config and an NNX module under a name.

A mixer is built as ``Module(cfg, *, d_model, max_len, layer_idx, n_layers, dtype, rngs)`` and called
as ``module(x)`` with x (batch, length, d_model) -> (batch, length, d_model); it must be causal.
``max_len`` is the longest sequence it will see (the l_max of implicit filters and position tables);
``dtype`` is the activation/compute dtype (parameters stay fp32).
Specs in model configs are mappings ``{"name": <mixer>, **options}``; options are checked against the
mixer's config dataclass, so an unknown option is a ConfigError naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

from lm.config import ConfigError, from_dict


class MixerEntry(NamedTuple):
    config_cls: type
    module_cls: type
    summary: str


MIXERS: dict[str, MixerEntry] = {}


def register_mixer(name: str, config_cls: type, summary: str) -> Callable[[type], type]:
    """Class decorator adding a mixer module to MIXERS under ``name``."""

    def wrap(module_cls: type) -> type:
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} registered twice")
        if not dataclasses.is_dataclass(config_cls):
            raise TypeError(f"config for mixer {name!r} must be a dataclass")
        MIXERS[name] = MixerEntry(config_cls, module_cls, summary)
        return module_cls

    return wrap


def parse_mixer_spec(spec: dict[str, Any], where: str = "mixer") -> tuple[str, Any]:
    """Split ``{"name": ..., **options}`` into (name, typed config); errors name the key."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"config key '{where}' must be a mapping with a 'name' (one of {sorted(MIXERS)})")
    options = dict(spec)
    name = options.pop("name")
    if name not in MIXERS:
        raise ConfigError(f"config key '{where}.name': unknown mixer {name!r}; available: {sorted(MIXERS)}")
    return name, from_dict(MIXERS[name].config_cls, options, prefix=where)


def build_mixer(spec: dict[str, Any], *, d_model: int, max_len: int, layer_idx: int = 0, n_layers: int = 1,
                dtype: Any = None, rngs, where: str = "mixer"):
    """Instantiate the mixer described by ``spec``."""
    import jax.numpy as jnp

    name, cfg = parse_mixer_spec(spec, where)
    return MIXERS[name].module_cls(
        cfg, d_model=d_model, max_len=max_len, layer_idx=layer_idx, n_layers=n_layers,
        dtype=dtype or jnp.float32, rngs=rngs,
    )
