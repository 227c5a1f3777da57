"""Pieces shared by the architectures: input checks, twin activations, layer factories,
norm layers.

Every jbnn model is a Linen module with the fields

* ``num_classes``: size of the logits;
* ``binary``: True for the BNN, False for its full-precision twin. The twin is the
  same module with every quantizer switched off: the parameter tree (names and shapes)
  is identical, and where the BNN binarizes a layer's input the twin applies
  ``fp_activation`` (hard tanh by default, the function whose derivative the
  straight-through estimator uses), so that the twin is not a linear model;
* ``surrogate``: None, or a backward surrogate spec (``"approx_sign"``...) that
  replaces the backward pass of every *input* quantizer while leaving the forward pass
  bit for bit as it is (see :func:`jbnn.quantizers.with_surrogate`);
* ``dtype``: the computation dtype (None: float32 parameters and inputs decide).

and ``__call__(x, train=False)``: ``x`` is NHWC (B, H, W, C) float; BatchNorm uses its
running statistics unless ``train`` is True (then ``batch_stats`` must be mutable).
"""

from __future__ import annotations

import ast
import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp

from jbnn.layers import QuantConv, QuantDense

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "hard_tanh": nn.hard_tanh,
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def check_images(x: jax.Array, model_name: str, ndim: int = 4) -> None:
    """Raises a clear error unless ``x`` is a float array of rank ``ndim``."""
    if not hasattr(x, "dtype") or not hasattr(x, "ndim"):
        raise TypeError(f"{model_name} expects an array, got {type(x).__name__}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{model_name} expects floating-point images, got dtype {x.dtype}; normalise "
            "uint8 images to float first (jbnn.data does)."
        )
    if x.ndim != ndim:
        raise ValueError(
            f"{model_name} expects a rank-{ndim} batch of NHWC images (B, H, W, C), got "
            f"shape {tuple(x.shape)}; add a batch axis with x[None] for a single image."
        )


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The twin activation called ``name``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def batch_norm(train: bool, name: str | None = None, dtype: Any = None, **kwargs) -> nn.BatchNorm:
    """BatchNorm as Larq's Keras models use it (momentum 0.9, epsilon 1e-5 here)."""
    kwargs.setdefault("momentum", 0.9)
    kwargs.setdefault("epsilon", 1e-5)
    return nn.BatchNorm(use_running_average=not train, name=name, dtype=dtype, **kwargs)


class RealLayerMixin:
    """Real-valued layers for modules with ``surrogate`` and ``dtype`` fields.

    "Real" as larq-zoo means it: no quantizer, the same in the BNN and its twin (stems,
    shortcuts, transitions, classifiers). The layers still get the module's ``surrogate``
    so that every QuantConv / QuantDense of a model carries the same one.
    """

    def real_conv(
        self,
        features: int,
        kernel_size: tuple[int, int],
        strides: tuple[int, int] = (1, 1),
        **kwargs,
    ) -> QuantConv:
        """A real convolution without bias.

        Args:
          features: output channels.
          kernel_size: (height, width) of the kernel.
          strides: (height, width) strides.
          **kwargs: further QuantConv fields (``kernel_init``, ``name``...).

        Returns:
          The QuantConv module, to be called on the input.
        """
        return QuantConv(
            features,
            kernel_size,
            strides,
            use_bias=False,
            surrogate=self.surrogate,
            dtype=self.dtype,
            **kwargs,
        )

    def real_dense(self, features: int, **kwargs) -> QuantDense:
        """A real dense layer (with bias unless ``use_bias=False`` is given).

        Args:
          features: output features.
          **kwargs: further QuantDense fields (``kernel_init``, ``name``...).

        Returns:
          The QuantDense module, to be called on the input.
        """
        return QuantDense(features, surrogate=self.surrogate, dtype=self.dtype, **kwargs)


class QuantMixin(RealLayerMixin):
    """Helpers for models with ``binary``, ``surrogate`` and ``fp_activation`` fields.

    :meth:`quant_fields` and the binary layers further need ``input_quantizer``,
    ``kernel_quantizer``, ``kernel_clip`` and ``dtype``.
    """

    def in_q(self, spec: str | None) -> str | None:
        """The input quantizer to give a layer: ``spec`` in the BNN, None in the twin."""
        return spec if self.binary else None

    def k_q(self, spec: str | None) -> str | None:
        """The kernel quantizer to give a layer: ``spec`` in the BNN, None in the twin."""
        return spec if self.binary else None

    def clip(self, value: float | None) -> float | None:
        """The latent-weight clip: ``value`` in the BNN, None in the twin."""
        return value if self.binary else None

    def twin_act(self, x: jax.Array) -> jax.Array:
        """Where the BNN binarizes a layer's input, the twin applies ``fp_activation``.

        Called on the input of a layer whose BNN input quantizer is the module's
        ``input_quantizer``: the BNN and a config without input quantizer (None) get
        ``x`` as it is, so that the twin of such a config is that BNN with its kernel
        quantizers removed, and nothing added.
        """
        if self.binary or self.input_quantizer is None:
            return x
        return activation(self.fp_activation)(x)

    def quant_fields(self) -> dict[str, Any]:
        """The fields a model hands down to each of its binary blocks, as they are."""
        return dict(
            binary=self.binary,
            input_quantizer=self.input_quantizer,
            kernel_quantizer=self.kernel_quantizer,
            kernel_clip=self.kernel_clip,
            surrogate=self.surrogate,
            fp_activation=self.fp_activation,
            dtype=self.dtype,
        )

    def binary_conv(self, features: int, kernel_size: tuple[int, int], **kwargs) -> QuantConv:
        """A convolution without bias, binary in the BNN and real in the twin.

        Its input and kernel quantizers and latent clip are the module's in the BNN and
        None in the twin. The caller applies :meth:`twin_act` to its input.

        Args:
          features: output channels.
          kernel_size: (height, width) of the kernel.
          **kwargs: further QuantConv fields (``strides``, ``kernel_init``, ``name``...).

        Returns:
          The QuantConv module, to be called on the input.
        """
        return QuantConv(features, kernel_size, **(self._binary_layer_fields() | kwargs))

    def binary_dense(self, features: int, **kwargs) -> QuantDense:
        """A dense layer without bias, binary in the BNN and real in the twin.

        As :meth:`binary_conv`; ``kwargs`` may override a field (``input_quantizer=None``
        for a first layer that sees real pixels).

        Args:
          features: output features.
          **kwargs: further QuantDense fields (``name``...).

        Returns:
          The QuantDense module, to be called on the input.
        """
        return QuantDense(features, **(self._binary_layer_fields() | kwargs))

    def _binary_layer_fields(self) -> dict[str, Any]:
        return dict(
            use_bias=False,
            input_quantizer=self.in_q(self.input_quantizer),
            kernel_quantizer=self.k_q(self.kernel_quantizer),
            kernel_clip=self.clip(self.kernel_clip),
            surrogate=self.surrogate,
            dtype=self.dtype,
        )


_SHAPE_ERROR = re.compile(
    r'parameter "(?P<param>[^"]+)" in "(?P<scope>[^"]*)".*?generate shape (?P<init>\([^)]*\))'
    r".*?has shape (?P<value>\([^)]*\))",
    re.S,
)


def _shape_error_parts(error: Exception) -> tuple[str, str, tuple, tuple] | None:
    """(parameter, layer, shape in the variables, shape the model makes) of Flax's
    ``ScopeParamShapeError``, or None where its message cannot be read."""
    match = _SHAPE_ERROR.search(str(error))
    if match is None:
        return None
    try:
        init, value = ast.literal_eval(match["init"]), ast.literal_eval(match["value"])
    except (ValueError, SyntaxError):
        return None
    if not (isinstance(init, tuple) and isinstance(value, tuple)):
        return None
    return match["param"], match["scope"].strip("/"), value, init


def _images_can_explain(value: tuple, init: tuple) -> bool:
    """Whether images of another shape could make the model want ``init`` where the
    variables hold ``value``: only a parameter's input-feature size depends on the
    images (axis -2 of a Conv / Dense kernel: the channels of the first layer, the
    flattened size of the first dense layer; the size of a vector parameter, e.g. a
    BatchNorm's on the input). Another rank, kernel size or output size is the
    model's."""
    if len(value) != len(init):
        return False
    differ = [i for i, (a, b) in enumerate(zip(value, init, strict=True)) if a != b]
    return len(value) == 1 or differ == [len(value) - 2]


@contextlib.contextmanager
def variables_fit(x_shape: Sequence[int], name: str):
    """Turns Flax's errors about the variables, met while tracing the model on images of
    shape ``x_shape``, into a ValueError that names the problem: the variables are not
    the model's (a parameter or collection missing, a parameter of another shape than
    any images would give), or they were made for images of another size or channel
    count."""
    hwc = tuple(int(d) for d in x_shape[1:])
    not_the_models = (
        "the variables are another model's, or another configuration's (number of classes, "
        "width...): pass the variables this model was initialised or trained with"
    )
    try:
        yield
    except flax.errors.ScopeParamShapeError as error:
        parts = _shape_error_parts(error)
        if parts is not None and not _images_can_explain(parts[2], parts[3]):
            param, layer, value, init = parts
            raise ValueError(
                f"{name}: the variables do not belong to this model: parameter {param!r} of "
                f"layer {layer!r} has shape {value} in the variables, but the model makes it "
                f"{init} (for images of shape (H, W, C) = {hwc}, which cannot change it); "
                f"{not_the_models}. Flax: {error}"
            ) from None
        raise ValueError(
            f"{name}: the model's variables do not fit images of shape (H, W, C) = {hwc} "
            f"(x of shape {tuple(x_shape)}); give images of the size and channel count the "
            f"variables were made for (if they are, {not_the_models}). Flax: {error}"
        ) from None
    except (
        flax.errors.ScopeParamNotFoundError,
        flax.errors.ScopeCollectionNotFound,
        flax.errors.ScopeVariableNotFoundError,
    ) as error:
        raise ValueError(
            f"{name}: the variables do not match the model ({error}); {not_the_models}, "
            "with every collection (params, and batch_stats for BatchNorm statistics)."
        ) from None
