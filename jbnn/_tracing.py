"""Reads of traced programs, and the shape-only traces jbnn makes to analyse a model."""

from __future__ import annotations

import contextlib
import threading

import jax

_STATE = threading.local()


@contextlib.contextmanager
def analysis():
    """Marks the traces made in the block as jbnn's own analysis of a model.

    :mod:`jbnn.models.fold` traces the model to find its folds, also when the folded
    function is itself being traced by an explainer; jbnn's interceptors that rewrite
    module calls (:mod:`jbnn.saliency._input_layer`) leave those traces alone.
    """
    depth = getattr(_STATE, "depth", 0)
    _STATE.depth = depth + 1
    try:
        yield
    finally:
        _STATE.depth = depth


def in_analysis() -> bool:
    """Whether a trace of :func:`analysis` is under way."""
    return getattr(_STATE, "depth", 0) > 0


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
