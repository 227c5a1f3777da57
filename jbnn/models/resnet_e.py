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

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbnn.models import _zoo
from jbnn.models.birealnet import shortcut_stages


class BinaryResNetE18(_zoo.ZooModel):
    """BinaryResNetE18 with configurable width and stem.

    Paths: ``stem`` (``stem/conv``; with the ImageNet stem also ``stem/bn``,
    ``stem/bn2``), ``stage1`` ... ``stage4``, each with ``block1`` ... ``block4``
    (:class:`~jbnn.models.birealnet.ShortcutBlock`: ``conv``, ``bn``, and in the first
    block of stages 2-4 ``shortcut_conv``, ``shortcut_bn``), ``head`` (real dense layer
    with bias). Fields: those of :class:`~jbnn.models._zoo.ZooModel`, with ResNetE's
    quantizers as defaults.
    """

    input_quantizer: str | None = "ste_sign(clip_value=1.25)"
    kernel_quantizer: str | None = "ste_sign(clip_value=1.25)"
    kernel_clip: float | None = 1.25

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _zoo.check_model_input(x, self.stem, self.width, "binary_resnet_e18")
        x = _zoo.BackToSimplicityStem(
            _zoo.scaled(64, self.width),
            self.stem,
            final_bn=True,
            surrogate=self.surrogate,
            dtype=self.dtype,
            name="stem",
        )(x, train)
        block_kwargs = dict(self.quant_fields(), bn_momentum=0.9, bn_epsilon=1e-5)
        x = shortcut_stages(x, train, self.width, block_kwargs)
        x = _zoo.global_avg_pool(nn.relu(x))  # (B, C)
        x = self.real_dense(self.num_classes, kernel_init=_zoo.glorot_normal, name="head")(x)
        return x.astype(jnp.float32)
