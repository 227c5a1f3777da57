"""Small reference BNNs: a binarized MLP and BinaryNet (Courbariaux, Hubara et al. 2016).

BinaryNet for CIFAR-10 is 2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10 with BatchNorm
after every layer; the first convolution sees real-valued pixels with binary weights,
every later layer binarizes its input and its weights with ``ste_sign``, latent weights
are clipped to [-1, 1]. ``width`` scales every channel count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbnn import ops
from jbnn.models import _zoo
from jbnn.models.common import QuantMixin, batch_norm, check_images


class ConvBlock(nn.Module, QuantMixin):
    """Quantized conv -> (max-pool) -> BatchNorm, as in BinaryNet."""

    features: int
    binary: bool
    input_quantizer: str | None
    kernel_quantizer: str | None
    kernel_clip: float | None
    pool: bool = False
    surrogate: str | None = None
    fp_activation: str = "hard_tanh"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.binary_conv(self.features, (3, 3), name="conv")(self.twin_act(x))
        if self.pool:
            x = ops.max_pool(x, (2, 2), (2, 2))
        return batch_norm(train, name="bn", dtype=self.dtype, use_scale=False)(x)


class MLP(nn.Module, QuantMixin):
    """A binarized multi-layer perceptron (BinaryNet's MNIST model; ``hidden``: its widths).

    Layers ``dense{i}`` (QuantDense -> BatchNorm), then ``head``. The first layer sees
    the real-valued pixels with binary weights; later layers binarize inputs and weights.
    """

    num_classes: int
    binary: bool = True
    hidden: Sequence[int] = (512, 512)
    input_quantizer: str | None = "ste_sign"
    kernel_quantizer: str | None = "ste_sign"
    kernel_clip: float | None = 1.0
    surrogate: str | None = None
    fp_activation: str = "hard_tanh"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, "mlp")
        if not self.hidden or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in self.hidden
        ):
            raise ValueError(f"mlp: hidden must be positive ints, got {self.hidden!r}.")
        x = x.reshape((x.shape[0], -1))
        for i, features in enumerate((*self.hidden, self.num_classes)):
            first = i == 0
            if not first:
                x = self.twin_act(x)
            name = "head" if i == len(self.hidden) else f"dense{i + 1}"
            real_pixels = {"input_quantizer": None} if first else {}
            x = self.binary_dense(features, name=name, **real_pixels)(x)
            x = batch_norm(
                train, name=f"{name}_bn", dtype=self.dtype, use_scale=i < len(self.hidden)
            )(x)
        return x.astype(jnp.float32)


class BinaryNet(nn.Module, QuantMixin):
    """BinaryNet (VGG-like) with configurable width.

    Paths: ``block1`` ... ``block6`` (``ConvBlock``: ``conv``, ``bn``), ``dense1``,
    ``dense2``, ``head``. ``stem="imagenet"`` (jbnn's addition; BinaryNet has no
    ImageNet model) adds ``stem``, a real 7x7/2 convolution (real input and real
    weights), ``stem_bn`` and a 3x3/2 max-pool before ``block1`` (224 px -> 56 px), whose
    input is then binarized.
    """

    num_classes: int
    binary: bool = True
    width: float = 1.0
    stem: str = "small"
    input_quantizer: str | None = "ste_sign"
    kernel_quantizer: str | None = "ste_sign"
    kernel_clip: float | None = 1.0
    dense_features: int = 1024
    surrogate: str | None = None
    fp_activation: str = "hard_tanh"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, "binarynet")
        _zoo.check_width(self.width, "binarynet")
        w = lambda c: _zoo.scaled(c, self.width)
        if self.stem == "imagenet":
            x = self.real_conv(w(64), (7, 7), (2, 2), name="stem")(x)
            x = batch_norm(train, name="stem_bn", dtype=self.dtype)(x)
            x = ops.max_pool(x, (3, 3), (2, 2), padding="SAME")
        elif self.stem != "small":
            raise ValueError(f"binarynet: stem must be 'small' or 'imagenet', got {self.stem!r}")
        channels = (128, 128, 256, 256, 512, 512)
        for i, c in enumerate(channels):
            first = i == 0 and self.stem == "small"  # sees the real pixels
            block_kwargs = dict(
                self.quant_fields(), input_quantizer=None if first else self.input_quantizer
            )
            x = ConvBlock(w(c), pool=i % 2 == 1, name=f"block{i + 1}", **block_kwargs)(x, train)
        x = x.reshape((x.shape[0], -1))
        dense = w(self.dense_features)
        for features, name in ((dense, "dense1"), (dense, "dense2"), (self.num_classes, "head")):
            x = self.binary_dense(features, name=name)(self.twin_act(x))
            x = batch_norm(train, name=f"{name}_bn", dtype=self.dtype, use_scale=False)(x)
        return x.astype(jnp.float32)
