"""Fixtures shared by the test modules.

The README runs the suite in two pytest-xdist workers with ``--dist loadfile``: each
module's tests run in one worker, one after another, so a module-scoped fixture (the
study's report, the trained runs) is made once; with xdist's default distribution the
costliest, the study's, was made in both workers (47 + 26 s of an 11-minute run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import jax
import pytest

# A compilation cache for the test session, shared by pytest-xdist's workers and removed
# at the end: many tests compile the same program again (a model's forward pass or
# input gradient, built anew in each test), and compiling, not running, is most of the
# suite's time. The cache key is the program with its compile options (so
# ``fast_compiles`` and jbnn's CPU compiler options key apart) and a cached executable
# computes what a fresh compile does; in-process jit caches, which the recompilation
# tests count, are not involved. ``JBNN_TEST_COMPILATION_CACHE=0`` turns it off.
_CACHE_ENV = "JBNN_TEST_JAX_CACHE_DIR"  # set by the first process, inherited by workers
_CACHE_DIR, _OWN_CACHE = None, False
if os.environ.get("JBNN_TEST_COMPILATION_CACHE", "1") != "0":
    _CACHE_DIR = os.environ.get(_CACHE_ENV)
    if _CACHE_DIR is None:
        _CACHE_DIR, _OWN_CACHE = tempfile.mkdtemp(prefix="jbnn-test-jax-cache-"), True
        os.environ[_CACHE_ENV] = _CACHE_DIR
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_sessionfinish(session):
    # the process that made the cache (xdist's controller, or pytest without xdist)
    # removes it once every worker is done
    if _OWN_CACHE:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@contextlib.contextmanager
def _most_optimizations_disabled():
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def fast_compiles():
    """``jax_disable_most_optimizations`` for a module's tests (restored afterwards): the
    models compile several times faster, and the tests check values, not speed."""
    with _most_optimizations_disabled():
        yield


@pytest.fixture(autouse=True)
def _fast_compiles_after_the_first_case(request):
    """Tests marked ``fast_compiles_after_first_case``: every parametrized case but the
    first compiles as ``fast_compiles`` does (the formulas checked case by case); the
    first case checks the programs as XLA optimises them for jbnn's users."""
    callspec = getattr(request.node, "callspec", None)
    if (
        request.node.get_closest_marker("fast_compiles_after_first_case") is None
        or callspec is None
        or not any(callspec.indices.values())
    ):
        yield
        return
    with _most_optimizations_disabled():
        yield
