"""Fixtures shared by the test modules."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(scope="module")
def fast_compiles():
    """``jax_disable_most_optimizations`` for a module's tests (restored afterwards): the
    models compile several times faster, and the tests check values, not speed."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
