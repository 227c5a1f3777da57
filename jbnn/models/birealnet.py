"""Bi-Real Net 18 (Liu et al. 2018), after larq-zoo's ``BiRealNet``.

Every 3x3 convolution is binary (``approx_sign`` inputs, ``magnitude_aware_sign``
weights, latent weights clipped to [-1, 1]) and has its own real-valued shortcut:
``out = BN(QuantConv(x)) + shortcut(x)``. Where the channels double, the convolution has
stride 2 and the shortcut is AvgPool(2, "same") -> real 1x1 conv -> BN. The stem and the
classifier are real-valued. BatchNorm momentum 0.8, epsilon 1e-3 (Keras' default), as
larq-zoo; initializers glorot_normal (convolutions) and glorot_uniform (classifier).

The 18 layers are a stem, four stages of four binary blocks and the classifier.
``stem="imagenet"`` (224 px) is larq-zoo's 7x7/2 conv -> BN -> 3x3/2 max-pool;
``stem="small"`` (28-64 px, jbnn's choice) is a 3x3/1 conv -> BN without pooling, so a
32 px input reaches the last stage at 4x4.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbnn import ops
from jbnn.models import _zoo
from jbnn.models.common import QuantMixin, RealLayerMixin, batch_norm


class ShortcutBlock(nn.Module, QuantMixin):
    """One binary 3x3 conv with its real shortcut: ``BN(QuantConv(x)) + shortcut(x)``.

    The shortcut is the identity, or, when the channel count changes,
    AvgPool(2, "same") -> real 1x1 conv (``shortcut_conv``) -> BN (``shortcut_bn``).
    The convolution (``conv``) has stride ``strides``; the shortcut downsamples when the
    stride is not 1 or the channel count changes. Submodules: ``conv``, ``bn``, and where the
    shortcut downsamples, ``shortcut_conv``, ``shortcut_bn``.
    """

    features: int
    binary: bool
    input_quantizer: str | None
    kernel_quantizer: str | None
    kernel_clip: float | None
    strides: int = 1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    surrogate: str | None = None
    fp_activation: str = "hard_tanh"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bn = dict(dtype=self.dtype, momentum=self.bn_momentum, epsilon=self.bn_epsilon)
        shortcut = x  # (B, H, W, C)
        if x.shape[-1] != self.features or self.strides != 1:
            shortcut = _zoo.avg_pool_same(shortcut, self.strides)
            shortcut = self.real_conv(
                self.features, (1, 1), kernel_init=_zoo.glorot_normal, name="shortcut_conv"
            )(shortcut)
            shortcut = batch_norm(train, name="shortcut_bn", **bn)(shortcut)
        y = self.binary_conv(
            self.features,
            (3, 3),
            strides=(self.strides, self.strides),
            kernel_init=_zoo.glorot_normal,
            name="conv",
        )(self.twin_act(x))
        y = batch_norm(train, name="bn", **bn)(y)
        return y + shortcut


class ShortcutStage(nn.Module):
    """``num_blocks`` :class:`ShortcutBlock` s named ``block1``, ``block2``, ...; the
    first has stride ``strides`` and switches to ``features`` channels."""

    features: int
    num_blocks: int
    strides: int
    block_kwargs: dict

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for j in range(self.num_blocks):
            x = ShortcutBlock(
                self.features,
                strides=self.strides if j == 0 else 1,
                name=f"block{j + 1}",
                **self.block_kwargs,
            )(x, train)
        return x


def shortcut_stages(x: jax.Array, train: bool, width: float, block_kwargs: dict) -> jax.Array:
    """ResNet-18's body with a shortcut per convolution, as Bi-Real Net and ResNetE have it.

    Four :class:`ShortcutStage` s of four blocks, with 64, 128, 256, 512 channels times
    ``width``; stride 2 in the first block of stages 2-4. Call it inside the model's
    compact ``__call__``: the stages become the model's submodules ``stage1`` ...
    ``stage4``.

    Args:
      x: (B, H, W, C) output of the stem.
      train: whether BatchNorm uses batch statistics.
      width: channel multiplier.
      block_kwargs: the :class:`ShortcutBlock` fields other than ``features``, ``strides``.

    Returns:
      (B, ceil(H / 8), ceil(W / 8), C) feature maps, C = 512 channels times ``width``.
    """
    for i, channels in enumerate((64, 128, 256, 512)):
        x = ShortcutStage(
            _zoo.scaled(channels, width),
            num_blocks=4,
            strides=1 if i == 0 else 2,
            block_kwargs=block_kwargs,
            name=f"stage{i + 1}",
        )(x, train)
    return x


class BiRealNet18(_zoo.ZooModel):
    """Bi-Real Net 18 with configurable width and stem.

    Paths: ``stem`` (``stem/conv``, ``stem/bn``), ``stage1`` ... ``stage4``, each with
    ``block1`` ... ``block4`` (:class:`ShortcutBlock`: ``conv``, ``bn``, and in the
    first block of stages 2-4 ``shortcut_conv``, ``shortcut_bn``), ``head`` (real dense
    layer with bias, after global average pooling). Channels 64, 128, 256, 512 times
    ``width``. Fields: those of :class:`~jbnn.models._zoo.ZooModel`, with Bi-Real Net's
    quantizers as defaults.
    """

    input_quantizer: str | None = "approx_sign"
    kernel_quantizer: str | None = "magnitude_aware_sign"
    kernel_clip: float | None = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _zoo.check_model_input(x, self.stem, self.width, "birealnet18")
        bn = dict(dtype=self.dtype, momentum=0.8, epsilon=1e-3)
        filters = _zoo.scaled(64, self.width)
        x = _Stem(filters, self.stem, bn, self.surrogate, self.dtype, name="stem")(x, train)
        block_kwargs = dict(self.quant_fields(), bn_momentum=0.8, bn_epsilon=1e-3)
        x = shortcut_stages(x, train, self.width, block_kwargs)
        x = _zoo.global_avg_pool(x)  # (B, C)
        x = self.real_dense(self.num_classes, kernel_init=_zoo.glorot_uniform, name="head")(x)
        return x.astype(jnp.float32)


class _Stem(nn.Module, RealLayerMixin):
    """Real-valued stem: ``conv`` (7x7/2 or 3x3/1) -> ``bn`` (-> 3x3/2 max-pool)."""

    features: int
    stem: str
    bn_kwargs: dict
    surrogate: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kernel_size, strides = _zoo.stem_conv_geometry(self.stem)
        x = self.real_conv(
            self.features, kernel_size, strides, kernel_init=_zoo.glorot_normal, name="conv"
        )(x)
        x = batch_norm(train, name="bn", **self.bn_kwargs)(x)
        if self.stem == "imagenet":
            x = ops.max_pool(x, (3, 3), (2, 2), padding="SAME")
        return x
