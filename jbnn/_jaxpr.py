"""Small reads of traced programs shared by the model and saliency code."""

from __future__ import annotations

import jax


def inputs_read(jaxpr: jax.extend.core.Jaxpr) -> list[bool]:
    """For each input of ``jaxpr``, whether any of its outputs can depend on it.

    Walks back from the outputs, conservatively: an equation reads all of its inputs
    (a sub-program is not looked into).
    """
    needed = {v for v in jaxpr.outvars if not _is_literal(v)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars):
            needed.update(v for v in eqn.invars if not _is_literal(v))
    return [v in needed for v in jaxpr.invars]


def _is_literal(v) -> bool:
    return type(v).__name__ == "Literal"
