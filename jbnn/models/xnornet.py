"""XNOR-Net (Rastegari et al. 2016), after larq-zoo's ``XNORNet`` (AlexNet layout).

The stem (conv -> BN -> ReLU -> 3x3/2 max-pool -> BN) and the classifier (ReLU ->
flatten -> dense, no bias) are real-valued. Every other layer is a binary convolution:
inputs binarized with ``ste_sign``, weights ``alpha * ste_sign(clip(w, -1, 1))`` with
``alpha = mean |clip(w, -1, 1)|`` per output filter (larq-zoo's ``xnor_weight_scale``;
``kernel_scale=True`` in :mod:`jbnn.layers`), latent weights clipped to [-1, 1]. Each is
followed by BatchNorm without scale (momentum 0.9; epsilon 1e-4, 1e-3 for the last),
with 3x3/2 max-pools after the 5x5 conv and the last 3x3 conv. Channels 96, 256, 384,
384, 256, 4096, 4096 (times ``width``).

``stem="imagenet"`` (224 px) is larq-zoo's 11x11/4 conv, and ``fc6`` is its 6x6 "valid"
convolution (224 px -> 6x6 maps -> 1x1). ``stem="small"`` (28-64 px, jbnn's choice) uses
a 3x3/1 conv instead, and ``fc6`` then spans the whole remaining map (3x3 at 32 px), so
that it stays a fully connected layer as in the original. larq-zoo's L2 kernel
regularizer (5e-7, a loss term) is not reproduced: jbnn's trainer adds no regularization
loss (its nearest option, ``adamw``'s decoupled ``weight_decay``, is not the same).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbnn import ops
from jbnn.models import _zoo
from jbnn.models.common import QuantMixin, RealLayerMixin, batch_norm


class XNORBlock(nn.Module, QuantMixin):
    """Binary ``conv`` (XNOR-scaled weights) -> (3x3/2 max-pool) -> ``bn`` (no scale)."""

    features: int
    kernel_size: tuple[int, int]
    binary: bool
    input_quantizer: str | None
    kernel_quantizer: str | None
    kernel_clip: float | None
    padding: str = "SAME"
    pool: bool = False
    bn_epsilon: float = 1e-4
    surrogate: str | None = None
    fp_activation: str = "hard_tanh"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.binary_conv(
            self.features,
            self.kernel_size,
            padding=self.padding,
            kernel_scale=True,
            kernel_init=_zoo.glorot_uniform,
            name="conv",
        )(self.twin_act(x))
        if self.pool:
            x = ops.max_pool(x, (3, 3), (2, 2))
        return batch_norm(
            train, name="bn", dtype=self.dtype, use_scale=False, epsilon=self.bn_epsilon
        )(x)


class _XNORStem(nn.Module, RealLayerMixin):
    """Real stem: ``conv`` -> ``bn`` -> ReLU -> 3x3/2 max-pool -> ``bn2``."""

    features: int
    stem: str
    surrogate: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        imagenet = self.stem == "imagenet"
        x = self.real_conv(
            self.features,
            (11, 11) if imagenet else (3, 3),
            (4, 4) if imagenet else (1, 1),
            kernel_init=_zoo.glorot_uniform,
            name="conv",
        )(x)
        x = batch_norm(train, name="bn", dtype=self.dtype, use_scale=False, epsilon=1e-5)(x)
        x = ops.max_pool(nn.relu(x), (3, 3), (2, 2))
        return batch_norm(train, name="bn2", dtype=self.dtype, use_scale=False, epsilon=1e-4)(x)


class XNORNet(_zoo.ZooModel):
    """XNOR-Net with configurable width and stem.

    Paths: ``stem`` (``stem/conv``, ``stem/bn``, ``stem/bn2``), ``block2`` ...
    ``block5``, ``fc6``, ``fc7`` (:class:`XNORBlock`: ``conv``, ``bn``), ``head``.
    ``block5`` is the last convolutional block (6x6 maps at 224 px, 3x3 at 32 px);
    ``fc6`` and ``fc7`` are the binary fully connected layers, as 1x1-output
    convolutions. Fields: those of :class:`~jbnn.models._zoo.ZooModel`, with XNOR-Net's
    quantizers as defaults; the kernel is always scaled by its mean magnitude per filter
    (``kernel_scale``).
    """

    input_quantizer: str | None = "ste_sign"
    kernel_quantizer: str | None = "ste_sign"
    kernel_clip: float | None = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _zoo.check_model_input(x, self.stem, self.width, "xnornet")
        w = lambda c: _zoo.scaled(c, self.width)
        in_shape = tuple(x.shape)
        common = self.quant_fields()
        x = _XNORStem(w(96), self.stem, self.surrogate, self.dtype, name="stem")(x, train)
        pooled = lambda n: (n - 3) // 2 + 1  # a 3x3/2 "valid" max-pool
        final = min(pooled(pooled(n)) for n in x.shape[1:3])  # side of block5's maps
        if final < (6 if self.stem == "imagenet" else 1):
            raise ValueError(
                f"xnornet: input of shape {in_shape} is too small for the {self.stem!r} stem "
                f"(the last conv block's maps would be {final} px wide); use 224 px with "
                "stem='imagenet' or 28-64 px with stem='small'."
            )
        x = XNORBlock(w(256), (5, 5), pool=True, name="block2", **common)(x, train)
        x = XNORBlock(w(384), (3, 3), name="block3", **common)(x, train)
        x = XNORBlock(w(384), (3, 3), name="block4", **common)(x, train)
        x = XNORBlock(w(256), (3, 3), pool=True, name="block5", **common)(x, train)
        fc6_kernel = (6, 6) if self.stem == "imagenet" else tuple(x.shape[1:3])
        x = XNORBlock(w(4096), fc6_kernel, padding="VALID", name="fc6", **common)(x, train)
        x = XNORBlock(w(4096), (1, 1), padding="VALID", bn_epsilon=1e-3, name="fc7", **common)(
            x, train
        )
        x = nn.relu(x).reshape((x.shape[0], -1))  # (B, H * W * C)
        x = self.real_dense(
            self.num_classes, use_bias=False, kernel_init=_zoo.glorot_uniform, name="head"
        )(x)
        return x.astype(jnp.float32)
