"""A plain ResNet-18 (He et al. 2016, torchvision's layout) in Flax Linen, for profiling.

Not a jbnn model: the reference point for what XLA does with an ordinary CNN on CPU
(strided convolutions, max-pool, ReLU, BatchNorm), next to jbnn's BNNs. ``ops`` picks
the max-pool and convolution implementations: ``"lax"`` (``nn.max_pool``,
``lax.conv_general_dilated``) or ``"jbnn"`` (:mod:`jbnn.ops`), which compute the same
values with cheaper backward passes. Same module paths as :class:`torch_port.PlainResNet18`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _conv_fn(ops: str):
    if ops == "jbnn":
        from jbnn import ops as jops

        return jops.conv
    return lambda x, w, strides, padding: lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _max_pool_fn(ops: str):
    if ops == "jbnn":
        from jbnn import ops as jops

        return jops.max_pool
    return nn.max_pool


class Conv(nn.Module):
    """Bias-free "SAME" convolution (HWIO kernel, He-normal init)."""

    features: int
    kernel: int
    stride: int = 1
    ops: str = "lax"

    @nn.compact
    def __call__(self, x):
        w = self.param(
            "kernel",
            nn.initializers.he_normal(),
            (self.kernel, self.kernel, x.shape[-1], self.features),
        )
        return _conv_fn(self.ops)(x, w, (self.stride, self.stride), "SAME")


class BasicBlock(nn.Module):
    features: int
    stride: int = 1
    ops: str = "lax"

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
        y = Conv(self.features, 3, self.stride, self.ops, name="conv1")(x)
        y = nn.relu(bn("bn1")(y))
        y = Conv(self.features, 3, 1, self.ops, name="conv2")(y)
        y = bn("bn2")(y)
        if x.shape[-1] != self.features or self.stride != 1:
            x = Conv(self.features, 1, self.stride, self.ops, name="shortcut_conv")(x)
            x = bn("shortcut_bn")(x)
        return nn.relu(y + x)


class Stage(nn.Module):
    """Two basic blocks, ``block1`` (stride ``stride``) and ``block2``."""

    features: int
    stride: int
    ops: str = "lax"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = BasicBlock(self.features, self.stride, self.ops, name="block1")(x, train)
        return BasicBlock(self.features, 1, self.ops, name="block2")(x, train)


class ResNet18(nn.Module):
    """ResNet-18: 7x7/2 stem, 3x3/2 max-pool, 4 stages of 2 basic blocks, linear head."""

    num_classes: int = 1000
    ops: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = Conv(64, 7, 2, self.ops, name="stem_conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
        x = _max_pool_fn(self.ops)(x, (3, 3), (2, 2), "SAME")
        for i, c in enumerate((64, 128, 256, 512)):
            x = Stage(c, 2 if i > 0 else 1, self.ops, name=f"stage{i + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # (B, C)
        return nn.Dense(self.num_classes, name="head")(x)
