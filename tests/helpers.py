"""Helpers shared by test modules (not tests): small models and images."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbnn import models


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
