"""Parameter kinds and optimizer groups.

`FilterParam` marks long-convolution filter and SSM-like parameters (implicit-filter MLPs, explicit
kernels, SGConv sub-kernels, poles, residues): they stay fp32 and get weight decay 0.
`param_labels(state)` maps each parameter to "decay", "no_decay" or "filter" for `optax.multi_transform`.
"""

from __future__ import annotations

import jax
from flax import nnx


class FilterParam(nnx.Param):
    """A trainable long-filter / SSM parameter: fp32, weight decay 0, optionally its own learning rate."""


GROUPS = ("decay", "no_decay", "filter")


def path_names(path) -> tuple[str, ...]:
    """The names of a pytree key path's entries (dict keys, attribute names, sequence indices) as strings."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return tuple(names)


def _label(path, variable) -> str:
    if isinstance(variable, FilterParam):
        return "filter"
    name = str(path[-1])
    value = variable.get_value() if hasattr(variable, "get_value") else variable.value
    # Matrices (linear kernels, embeddings) decay; vectors (biases, norm scales, skips) do not.
    if getattr(value, "ndim", 0) >= 2 and name not in ("bias", "scale"):
        return "decay"
    return "no_decay"


def param_labels(params_state: nnx.State) -> nnx.State:
    """A state with the same structure as ``params_state`` whose leaves are group names (see GROUPS)."""
    return nnx.map_state(lambda path, var: _label(path, var), params_state)


def count_params(module: nnx.Module) -> int:
    """Number of trainable scalars (nnx.Param and subclasses)."""
    state = nnx.state(module, nnx.Param)
    return int(sum(x.size for x in jax.tree.leaves(state)))
