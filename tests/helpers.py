"""Helpers shared by test modules (not tests): small models, images, the CLIs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbnn import models

ROOT = Path(__file__).resolve().parents[1]


def run_cli(script: str, config: str, workdir, *flags: str) -> subprocess.CompletedProcess:
    """``python <script> --config=configs/<config>.py --workdir=<workdir> <flags>``, run
    from the repository root, with its output captured as text."""
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / script),
            f"--config={ROOT / 'configs' / f'{config}.py'}",
            f"--workdir={workdir}",
            *flags,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def small_model(name: str, binary: bool, **kwargs) -> nn.Module:
    """A registered model at width 0.125 (or 32-unit hidden layers), 5 classes."""
    fields = models._REGISTRY[name].__dataclass_fields__
    kw = {"width": 0.125} if "width" in fields else {}
    if "hidden" in fields:
        kw["hidden"] = (32, 32)
    return models.get(name, binary=binary, num_classes=5, **kw, **kwargs)


def images(size: int = 32, batch: int = 2, dtype=jnp.float32) -> jax.Array:
    """Uniform [0, 1) images (batch, size, size, 3), the same for the same size."""
    rng = np.random.default_rng(size)
    return jnp.asarray(rng.uniform(0, 1, size=(batch, size, size, 3)), dtype)


def variables_with_statistics(model: nn.Module, x, seed: int = 0, fill=None):
    """``model.init`` variables with BatchNorm running statistics away from (0, 1):
    means ~ 0.3 N(0, 1), variances ~ U(0.3, 2), so that a wrong use of them shows.

    ``fill(path, leaf, rng)`` may replace any other leaf (None: keep it); ``rng`` is the
    same generator, drawn in tree order.
    """
    variables = jax.jit(model.init)(jax.random.key(seed), x[:1])
    rng = np.random.default_rng(seed)

    def replace(path, leaf):
        key = path[-1].key
        if key == "mean":
            return jnp.asarray(0.3 * rng.normal(size=leaf.shape), leaf.dtype)
        if key == "var":
            return jnp.asarray(rng.uniform(0.3, 2.0, size=leaf.shape), leaf.dtype)
        out = None if fill is None else fill(path, leaf, rng)
        return leaf if out is None else out

    return jax.tree_util.tree_map_with_path(replace, variables)
