"""Small helpers shared by the larq-zoo architectures (private to :mod:`jbnn.models`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

STEMS = ("small", "imagenet")

# Keras' initializers, as larq-zoo names them (flax's match Keras': truncated normal
# for the *_normal ones, fan_in / fan_avg as Keras computes them).
glorot_normal = nn.initializers.glorot_normal()
glorot_uniform = nn.initializers.glorot_uniform()
he_normal = nn.initializers.he_normal()


def scaled(channels: int, width: float, minimum: int = 8) -> int:
    """``channels * width`` rounded, at least ``minimum`` (as BinaryNet's ``width``)."""
    return max(minimum, int(round(channels * width)))


def check_stem(stem: str, model_name: str) -> None:
    """Raises a ValueError naming ``stem`` unless it is 'small' or 'imagenet'."""
    if stem not in STEMS:
        raise ValueError(
            f"{model_name}: stem must be 'small' (28-64 px inputs) or 'imagenet' "
            f"(224 px inputs), got {stem!r}."
        )


def check_width(width: float, model_name: str) -> None:
    """Raises a ValueError naming ``width`` unless it is a positive number."""
    if not isinstance(width, int | float) or not width > 0:
        raise ValueError(f"{model_name}: width must be a positive number, got {width!r}.")


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes: (B, H, W, C) -> (B, C)."""
    return jnp.mean(x, axis=(1, 2))


def avg_pool_same(x: jax.Array, size: int = 2) -> jax.Array:
    """Keras' ``AvgPool2D(size, strides=size, padding="same")``: padding not averaged."""
    return nn.avg_pool(x, (size, size), (size, size), padding="SAME", count_include_pad=False)
