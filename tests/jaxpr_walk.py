"""Walk a function's jaxpr, nested jaxprs (jit, custom_vjp, loops, Pallas kernel bodies) included."""

from __future__ import annotations

import re
from collections.abc import Iterator

import jax


def equations(fn, *args) -> Iterator[tuple[object, bool]]:
    """(equation, inside a pallas_call body) for every equation of fn(*args)'s jaxpr, depth first."""

    def visit(jaxpr, inside):
        for eqn in jaxpr.eqns:
            yield eqn, inside
            nested = inside or eqn.primitive.name == "pallas_call"
            for value in eqn.params.values():
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(item, "jaxpr", item)
                    if hasattr(sub, "eqns"):
                        yield from visit(sub, nested)

    yield from visit(jax.make_jaxpr(fn)(*args).jaxpr, False)


def kernel_name(eqn) -> str:
    """The name a pallas_call equation was given (jax 0.10 and later spell the parameter differently)."""
    return re.match(r"\w+", str(eqn.params.get("name", eqn.params.get("name_and_src_info")))).group()


def kernel_calls(fn, *args) -> list:
    """The pallas_call equations of fn(*args), in order."""
    return [eqn for eqn, _ in equations(fn, *args) if eqn.primitive.name == "pallas_call"]
