"""QuickNetSmall (Bannink et al. 2021, Larq Compute Engine), after larq-zoo's ``sota``.

Four stages of four residual blocks with 32, 64, 256, 512 channels (times ``width``).
A residual block is ``x + BN(ReLU(QuantConv3x3(x)))``: inputs and weights binarized
with ``ste_sign(clip_value=1.25)``, latent weights clipped to [-1.25, 1.25], and the
convolution pads its binary input with +1 (``pad_values=1.0``) so that it stays binary.
Stages 2-4 start with a real transition: ReLU -> 2x2/1 max-pool -> fixed 3x3/2
anti-aliasing blur (depthwise [1, 2, 1] x [1, 2, 1] / 16, not trained, as larq-zoo's
``blurpool_initializer`` with ``trainable=False``) -> real 1x1 conv -> BN (larq-zoo adds
a transition where the channel count changes, at width 1 exactly there; jbnn keeps them
at small widths too, where rounding may give two stages the same count). The stem is
real: 3x3/2 conv (channels / 4) -> BN -> ReLU -> 3x3/2 depthwise conv -> BN (no scale,
no offset) -> 1x1 conv -> BN. The classifier is ReLU -> global average pooling -> real
dense layer with bias. BatchNorm momentum 0.9, epsilon 1e-5, except the stem's (Keras'
defaults 0.99, 1e-3, as larq-zoo).

``stem="imagenet"`` (224 px) is larq-zoo's stem (overall stride 4); ``stem="small"``
(28-64 px, jbnn's choice) is the same with both strides 1.

The twin pads with zeros: padding with +1 only exists to keep a binary input binary (so
a BNN configured without input quantizer pads with zeros too).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbnn import ops
from jbnn.models import _zoo
from jbnn.models.common import QuantMixin, RealLayerMixin, batch_norm


def blur_pool(x: jax.Array, strides: int = 2) -> jax.Array:
    """Fixed depthwise 3x3 [1, 2, 1] x [1, 2, 1] / 16 blur, "same" zero padding.

    Args:
      x: (B, H, W, C) feature maps.
      strides: spatial stride.

    Returns:
      (B, ceil(H / strides), ceil(W / strides), C) blurred maps in x's dtype.
    """
    k = np.array([1.0, 2.0, 1.0])
    k = np.outer(k, k) / 16.0
    channels = x.shape[-1]
    kernel = jnp.asarray(np.tile(k[:, :, None, None], (1, 1, 1, channels)), x.dtype)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(strides, strides),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )


class QuickNetStem(nn.Module, RealLayerMixin):
    """Real stem: ``conv`` -> ``bn`` -> ReLU -> ``depthwise`` -> ``bn_dw`` ->
    ``pointwise`` -> ``bn_pw``."""

    features: int
    strides: int
    surrogate: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        s = (self.strides, self.strides)
        keras_bn = dict(dtype=self.dtype, momentum=0.99, epsilon=1e-3)
        x = self.real_conv(
            max(1, self.features // 4), (3, 3), s, kernel_init=_zoo.he_normal, name="conv"
        )(x)
        x = nn.relu(batch_norm(train, name="bn", **keras_bn)(x))
        x = self.real_conv(
            x.shape[-1],
            (3, 3),
            s,
            feature_group_count=x.shape[-1],
            kernel_init=_zoo.glorot_uniform,
            name="depthwise",
        )(x)
        x = batch_norm(train, name="bn_dw", use_scale=False, use_bias=False, **keras_bn)(x)
        x = self.real_conv(self.features, (1, 1), kernel_init=_zoo.he_normal, name="pointwise")(x)
        return batch_norm(train, name="bn_pw", **keras_bn)(x)


class QuickNetTransition(nn.Module, RealLayerMixin):
    """ReLU -> 2x2/1 max-pool -> fixed blur 3x3/2 -> real 1x1 ``conv`` -> ``bn``."""

    features: int
    surrogate: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = ops.max_pool(nn.relu(x), (2, 2), (1, 1), padding="VALID")
        x = blur_pool(x, 2)
        x = self.real_conv(self.features, (1, 1), kernel_init=_zoo.glorot_normal, name="conv")(x)
        return batch_norm(train, name="bn", dtype=self.dtype)(x)


class QuickNetBlock(nn.Module, QuantMixin):
    """``x + bn(ReLU(conv(x)))`` with a binary 3x3 ``conv`` padded with +1."""

    binary: bool
    input_quantizer: str | None
    kernel_quantizer: str | None
    kernel_clip: float | None
    surrogate: str | None = None
    fp_activation: str = "hard_tanh"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = self.binary_conv(
            x.shape[-1],
            (3, 3),
            pad_values=1.0 if self.binary and self.input_quantizer is not None else 0.0,
            kernel_init=_zoo.glorot_normal,
            name="conv",
        )(self.twin_act(x))
        y = batch_norm(train, name="bn", dtype=self.dtype)(nn.relu(y))
        return x + y


class QuickNetStage(nn.Module):
    """An optional ``transition`` then ``block1`` ... ``block{num_blocks}``.

    ``block_kwargs`` are the :class:`QuickNetBlock` fields (the model's
    ``quant_fields()``); ``surrogate`` and ``dtype`` are the transition's.
    """

    features: int
    num_blocks: int
    transition: bool
    block_kwargs: dict
    surrogate: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.transition:
            x = QuickNetTransition(self.features, self.surrogate, self.dtype, name="transition")(
                x, train
            )
        for j in range(self.num_blocks):
            x = QuickNetBlock(name=f"block{j + 1}", **self.block_kwargs)(x, train)
        return x


class QuickNetSmall(nn.Module, QuantMixin):
    """QuickNetSmall with configurable width and stem.

    Paths: ``stem`` (``stem/conv``, ``stem/bn``, ``stem/depthwise``, ``stem/bn_dw``,
    ``stem/pointwise``, ``stem/bn_pw``), ``stage1`` ... ``stage4`` with ``block1`` ...
    ``block4`` (:class:`QuickNetBlock`: ``conv``, ``bn``) and, in stages 2-4,
    ``transition`` (``conv``, ``bn``) before them; ``head`` (real dense layer).

    Attributes:
      num_classes: number of logits.
      binary: True for the BNN, False for the full-precision twin.
      width: channel multiplier.
      stem: "small" (28-64 px) or "imagenet" (224 px).
      section_blocks: blocks per stage.
      section_filters: channels per stage (before ``width``).
      input_quantizer, kernel_quantizer, kernel_clip: of the binary convolutions.
      surrogate: backward surrogate for the input quantizers, or None.
      fp_activation: what the twin applies where the BNN binarizes.
      dtype: computation dtype.
    """

    num_classes: int
    binary: bool = True
    width: float = 1.0
    stem: str = "small"
    section_blocks: tuple[int, ...] = (4, 4, 4, 4)
    section_filters: tuple[int, ...] = (32, 64, 256, 512)
    input_quantizer: str | None = "ste_sign(clip_value=1.25)"
    kernel_quantizer: str | None = "ste_sign(clip_value=1.25)"
    kernel_clip: float | None = 1.25
    surrogate: str | None = None
    fp_activation: str = "hard_tanh"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _zoo.check_model_input(x, self.stem, self.width, "quicknet_small")
        if len(self.section_blocks) != len(self.section_filters):
            raise ValueError(
                f"quicknet_small: section_blocks {self.section_blocks} and section_filters "
                f"{self.section_filters} must have the same length."
            )
        filters = [_zoo.scaled(c, self.width) for c in self.section_filters]
        x = QuickNetStem(
            filters[0],
            2 if self.stem == "imagenet" else 1,
            self.surrogate,
            self.dtype,
            name="stem",
        )(x, train)
        for i, (num_blocks, features) in enumerate(zip(self.section_blocks, filters, strict=True)):
            x = QuickNetStage(
                features,
                num_blocks,
                transition=i > 0,  # larq-zoo: where the channels change, i.e. here
                block_kwargs=self.quant_fields(),
                surrogate=self.surrogate,
                dtype=self.dtype,
                name=f"stage{i + 1}",
            )(x, train)
        x = _zoo.global_avg_pool(nn.relu(x))  # (B, C)
        x = self.real_dense(self.num_classes, kernel_init=_zoo.glorot_normal, name="head")(x)
        return x.astype(jnp.float32)
