"""BinaryDenseNet28 (Bethge et al. 2019, "Back to Simplicity"), after larq-zoo.

Four dense stages of 6, 6, 6, 5 layers. A dense layer is BN -> binary 3x3 conv with
``growth_rate`` (64 times ``width``) output channels -> concatenated to its input;
inputs and weights binarized with ``ste_sign(clip_value=1.3)``, latent weights clipped
to [-1.3, 1.3]. Between stages a real transition: BN -> 2x2/2 max-pool -> ReLU -> real
1x1 conv reducing the channels by 2.7, 2.7, 2.2, rounded to a multiple of 32 (times
``width``). At the end BN -> ReLU -> global average pooling -> real dense classifier.
BatchNorm momentum 0.9, epsilon 1e-5.

Stems, as larq-zoo picks them by input size: ``stem="small"`` (under 50 px) is a single
real 3x3/1 conv with 64 (times ``width``) channels and no BatchNorm; ``stem="imagenet"``
is 7x7/2 conv -> BN -> ReLU -> 3x3/2 max-pool.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbnn import ops
from jbnn.models import _zoo
from jbnn.models.common import QuantMixin, RealLayerMixin, batch_norm


class DenseLayer(nn.Module, QuantMixin):
    """``concat([x, conv(bn(x))])`` with a binary 3x3 ``conv`` of ``growth_rate`` channels."""

    growth_rate: int
    binary: bool
    input_quantizer: str | None
    kernel_quantizer: str | None
    kernel_clip: float | None
    surrogate: str | None = None
    fp_activation: str = "hard_tanh"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = batch_norm(train, name="bn", dtype=self.dtype)(x)
        conv = self.binary_conv(
            self.growth_rate, (3, 3), kernel_init=_zoo.glorot_normal, name="conv"
        )
        y = conv(self.twin_act(y))
        return jnp.concatenate([x, y.astype(x.dtype)], axis=-1)


class DenseStage(nn.Module):
    """``num_layers`` :class:`DenseLayer` s named ``block1``, ``block2``, ..."""

    num_layers: int
    layer_kwargs: dict

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for j in range(self.num_layers):
            x = DenseLayer(name=f"block{j + 1}", **self.layer_kwargs)(x, train)
        return x


class DenseTransition(nn.Module, RealLayerMixin):
    """Real transition: ``bn`` -> 2x2/2 max-pool -> ReLU -> 1x1 ``conv``."""

    features: int
    surrogate: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = batch_norm(train, name="bn", dtype=self.dtype)(x)
        x = nn.relu(ops.max_pool(x, (2, 2), (2, 2)))
        return self.real_conv(self.features, (1, 1), kernel_init=_zoo.he_normal, name="conv")(x)


def transition_features(channels: int, reduction: float, width: float) -> int:
    """larq-zoo's ``round(channels // reduction / 32) * 32``, the 32 scaled by ``width``."""
    multiple = max(1, int(round(32 * width)))
    return max(multiple, int(round(channels // reduction / multiple)) * multiple)


class BinaryDenseNet28(nn.Module, QuantMixin):
    """BinaryDenseNet28 with configurable width and stem.

    Paths: ``stem`` (``stem/conv``; ImageNet stem also ``stem/bn``), ``stage1`` ...
    ``stage4`` with ``block1`` ... ``block6`` (:class:`DenseLayer`: ``bn``, ``conv``;
    ``stage4`` has five), ``transition1`` ... ``transition3`` (``bn``, ``conv``),
    ``final_bn``, ``head`` (real dense layer with bias).

    Attributes:
      num_classes: number of logits.
      binary: True for the BNN, False for the full-precision twin.
      width: channel multiplier (initial channels 64, growth rate 64, and the multiple
        of 32 that transitions round to).
      stem: "small" (28-64 px) or "imagenet" (224 px).
      layers: dense layers per stage.
      reduction: channel reduction of each transition.
      input_quantizer, kernel_quantizer, kernel_clip: of the binary convolutions.
      surrogate: backward surrogate for the input quantizers, or None.
      fp_activation: what the twin applies where the BNN binarizes.
      dtype: computation dtype.
    """

    num_classes: int
    binary: bool = True
    width: float = 1.0
    stem: str = "small"
    layers: tuple[int, ...] = (6, 6, 6, 5)
    reduction: tuple[float, ...] = (2.7, 2.7, 2.2)
    input_quantizer: str | None = "ste_sign(clip_value=1.3)"
    kernel_quantizer: str | None = "ste_sign(clip_value=1.3)"
    kernel_clip: float | None = 1.3
    surrogate: str | None = None
    fp_activation: str = "hard_tanh"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _zoo.check_model_input(x, self.stem, self.width, "binary_densenet28")
        if len(self.reduction) != len(self.layers) - 1:
            raise ValueError(
                f"binary_densenet28: need one reduction per transition "
                f"({len(self.layers) - 1}), got reduction={self.reduction}."
            )
        x = _zoo.BackToSimplicityStem(
            _zoo.scaled(64, self.width),
            self.stem,
            final_bn=False,
            surrogate=self.surrogate,
            dtype=self.dtype,
            name="stem",
        )(x, train)
        layer_kwargs = dict(self.quant_fields(), growth_rate=_zoo.scaled(64, self.width))
        for i, num_layers in enumerate(self.layers):
            x = DenseStage(num_layers, layer_kwargs, name=f"stage{i + 1}")(x, train)
            if i < len(self.layers) - 1:
                features = transition_features(x.shape[-1], self.reduction[i], self.width)
                x = DenseTransition(
                    features, self.surrogate, self.dtype, name=f"transition{i + 1}"
                )(x, train)
        x = nn.relu(batch_norm(train, name="final_bn", dtype=self.dtype)(x))
        x = _zoo.global_avg_pool(x)  # (B, C)
        x = self.real_dense(self.num_classes, kernel_init=_zoo.he_normal, name="head")(x)
        return x.astype(jnp.float32)
