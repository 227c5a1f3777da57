"""What the larq-zoo architectures share (private to :mod:`jbnn.models`).

Initializers, width scaling, input checks, the :class:`ZooModel` fields, the stem that
BinaryResNetE18 and BinaryDenseNet28 have in common, and pooling helpers.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbnn import ops
from jbnn.models.common import QuantMixin, RealLayerMixin, batch_norm, check_images

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
    """Raises a ValueError naming ``width`` unless it is a finite positive number (NumPy
    scalars included; a bool is not a width)."""
    ok = (
        isinstance(width, numbers.Real)
        and not isinstance(width, bool | np.bool_)
        and math.isfinite(width)
        and width > 0
    )
    if not ok:
        raise ValueError(f"{model_name}: width must be a finite positive number, got {width!r}.")


def check_model_input(x: jax.Array, stem: str, width: float, model_name: str) -> None:
    """The checks every larq-zoo model starts with: :func:`check_images`, then
    :func:`check_stem`, then :func:`check_width` (the first failing one raises)."""
    check_images(x, model_name)
    check_stem(stem, model_name)
    check_width(width, model_name)


def stem_conv_geometry(stem: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(kernel size, strides) of the ResNet-style stems' first convolution.

    7x7/2 (ResNet's) for ``stem="imagenet"``, 3x3/1 for ``stem="small"``.
    """
    return ((7, 7), (2, 2)) if stem == "imagenet" else ((3, 3), (1, 1))


class ZooModel(nn.Module, QuantMixin):
    """The fields of a larq-zoo model without extra hyper-parameters (a base class).

    A subclass (BiRealNet18, BinaryResNetE18, XNORNet) sets its quantizer defaults, its
    binary layers' design, and defines ``__call__``; redeclared fields keep their place,
    so every subclass has the fields in this order. (BinaryDenseNet28 and QuickNetSmall
    declare their own: their extra hyper-parameters come before the quantizers.)

    Attributes:
      num_classes: number of logits.
      binary: True for the BNN, False for the full-precision twin.
      width: channel multiplier.
      stem: "small" (28-64 px) or "imagenet" (224 px).
      input_quantizer, kernel_quantizer, kernel_clip: of the binary convolutions.
      surrogate: backward surrogate for the input quantizers, or None.
      fp_activation: what the twin applies where the BNN binarizes.
      dtype: computation dtype.
    """

    num_classes: int
    binary: bool = True
    width: float = 1.0
    stem: str = "small"
    input_quantizer: str | None = None
    kernel_quantizer: str | None = None
    kernel_clip: float | None = None
    surrogate: str | None = None
    fp_activation: str = "hard_tanh"
    dtype: Any = None


class BackToSimplicityStem(nn.Module, RealLayerMixin):
    """The real stem of BinaryResNetE18 and BinaryDenseNet (Bethge et al., "Back to
    Simplicity"), as larq-zoo builds both.

    ``stem="small"``: ``conv`` (3x3/1). ``stem="imagenet"``: ``conv`` (7x7/2) -> ``bn``
    -> ReLU -> 3x3/2 max-pool, then ``bn2`` where ``final_bn`` (ResNetE has it, the
    DenseNets do not). He-normal kernels, BatchNorm momentum 0.9, epsilon 1e-5.
    """

    features: int
    stem: str
    final_bn: bool
    surrogate: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kernel_size, strides = stem_conv_geometry(self.stem)
        conv = self.real_conv(
            self.features, kernel_size, strides, kernel_init=he_normal, name="conv"
        )
        x = conv(x)
        if self.stem == "imagenet":
            x = nn.relu(batch_norm(train, name="bn", dtype=self.dtype)(x))
            x = ops.max_pool(x, (3, 3), (2, 2), padding="SAME")
            if self.final_bn:
                x = batch_norm(train, name="bn2", dtype=self.dtype)(x)
        return x


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes: (B, H, W, C) -> (B, C)."""
    return jnp.mean(x, axis=(1, 2))


def avg_pool_same(x: jax.Array, size: int = 2) -> jax.Array:
    """Keras' ``AvgPool2D(size, strides=size, padding="same")``: padding not averaged."""
    return nn.avg_pool(x, (size, size), (size, size), padding="SAME", count_include_pad=False)
