"""BinaryResNetE18 (Bethge et al. 2019, "Back to Simplicity"), after larq-zoo.

ResNet-18 with a shortcut around every binary 3x3 convolution (each of ResNet-18's
basic blocks split in two): four stages of four :class:`ShortcutBlock` s with 64, 128,
256, 512 channels (times ``width``), stride 2 in the first block of stages 2-4, where
the shortcut is AvgPool(2) -> real 1x1 conv -> BN. Inputs and weights are binarized
with ``ste_sign(clip_value=1.25)`` and latent weights clipped to [-1.25, 1.25].
BatchNorm momentum 0.9, epsilon 1e-5. The output of the last stage goes through a ReLU
and global average pooling into a real dense classifier.

Stems, as larq-zoo picks them by input size: ``stem="small"`` (inputs under 50 px) is a
single real 3x3/1 conv with no BatchNorm; ``stem="imagenet"`` is 7x7/2 conv -> BN ->
ReLU -> 3x3/2 max-pool -> BN. larq-zoo's shortcut pools "valid"; jbnn pools "same"
(padding not averaged), which is the same on even sizes (all sizes at 224 px) and keeps
odd sizes (28 px inputs reach 7x7) consistent with the stride-2 convolution.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbnn import ops
from jbnn.layers import QuantConv, QuantDense
from jbnn.models import _zoo
from jbnn.models.birealnet import ShortcutStage
from jbnn.models.common import QuantMixin, batch_norm, check_images


class _ResNetEStem(nn.Module):
    """Real stem: ``conv`` (3x3/1) or ``conv`` (7x7/2) -> ``bn`` -> ReLU -> max-pool -> ``bn2``."""

    features: int
    stem: str
    surrogate: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        imagenet = self.stem == "imagenet"
        x = QuantConv(
            self.features,
            (7, 7) if imagenet else (3, 3),
            (2, 2) if imagenet else (1, 1),
            use_bias=False,
            kernel_init=_zoo.he_normal,
            surrogate=self.surrogate,
            dtype=self.dtype,
            name="conv",
        )(x)
        if imagenet:
            x = batch_norm(train, name="bn", dtype=self.dtype)(x)
            x = nn.relu(x)
            x = ops.max_pool(x, (3, 3), (2, 2), padding="SAME")
            x = batch_norm(train, name="bn2", dtype=self.dtype)(x)
        return x


class BinaryResNetE18(nn.Module, QuantMixin):
    """BinaryResNetE18 with configurable width and stem.

    Paths: ``stem`` (``stem/conv``; with the ImageNet stem also ``stem/bn``,
    ``stem/bn2``), ``stage1`` ... ``stage4``, each with ``block1`` ... ``block4``
    (:class:`~jbnn.models.birealnet.ShortcutBlock`: ``conv``, ``bn``, and in the first
    block of stages 2-4 ``shortcut_conv``, ``shortcut_bn``), ``head`` (real dense layer
    with bias).

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
    input_quantizer: str | None = "ste_sign(clip_value=1.25)"
    kernel_quantizer: str | None = "ste_sign(clip_value=1.25)"
    kernel_clip: float | None = 1.25
    surrogate: str | None = None
    fp_activation: str = "hard_tanh"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, "binary_resnet_e18")
        _zoo.check_stem(self.stem, "binary_resnet_e18")
        _zoo.check_width(self.width, "binary_resnet_e18")
        x = _ResNetEStem(
            _zoo.scaled(64, self.width), self.stem, self.surrogate, self.dtype, name="stem"
        )(x, train)
        block_kwargs = dict(
            binary=self.binary,
            input_quantizer=self.input_quantizer,
            kernel_quantizer=self.kernel_quantizer,
            kernel_clip=self.kernel_clip,
            bn_momentum=0.9,
            bn_epsilon=1e-5,
            surrogate=self.surrogate,
            fp_activation=self.fp_activation,
            dtype=self.dtype,
        )
        for i, channels in enumerate((64, 128, 256, 512)):
            x = ShortcutStage(
                _zoo.scaled(channels, self.width),
                num_blocks=4,
                strides=1 if i == 0 else 2,
                block_kwargs=block_kwargs,
                name=f"stage{i + 1}",
            )(x, train)
        x = _zoo.global_avg_pool(nn.relu(x))  # (B, C)
        x = QuantDense(
            self.num_classes,
            kernel_init=_zoo.glorot_normal,
            surrogate=self.surrogate,
            dtype=self.dtype,
            name="head",
        )(x)
        return x.astype(jnp.float32)
