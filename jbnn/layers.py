"""Quantized Flax Linen layers, after Larq's ``QuantDense`` and ``QuantConv2D``.

A quantized layer quantizes its input (``input_quantizer``) and its latent float kernel
(``kernel_quantizer``) on use. With both quantizers None it computes exactly what
``nn.Dense`` / ``nn.Conv`` compute with the same parameters, so a model's
full-precision twin is the same module with the quantizers switched off.

``kernel_clip`` is the latent-weight clip (Larq's ``weight_clip`` constraint); the
layer only records it, and the training step applies it after every update.
:func:`quantized_layers` finds every quantized layer of a model with its clip, through
``nn.intercept_methods`` and without running any computation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import initializers

from jbnn import ops
from jbnn import quantizers as qz

QuantizerSpec = str | None
Dtype = Any

__all__ = ["LayerInfo", "QuantConv", "QuantDense", "quantized_layers"]


def _quantize_input(x: jax.Array, spec: QuantizerSpec, surrogate: str | None) -> jax.Array:
    if spec is None:
        return x
    quantizer = qz.get(spec)
    if surrogate is not None:
        quantizer = qz.with_surrogate(quantizer, surrogate)
    return quantizer(x)


def _quantize_kernel(kernel: jax.Array, spec: QuantizerSpec) -> jax.Array:
    return kernel if spec is None else qz.get(spec)(kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _xnor_kernel(kernel: jax.Array, quantizer) -> tuple[jax.Array, jax.Array]:
    """XNOR-Net's binary kernel ``quantizer(clip(w, -1, 1))`` and its scale alpha.

    ``alpha = mean |clip(w, -1, 1)|`` per output filter (over all but the last axis:
    (C_out,)), differentiable, as larq-zoo's ``xnor_weight_scale``. The values and
    gradients are those of that TensorFlow formula, up to float summation order, with
    TensorFlow's tie rules: ``clip_by_value`` passes the whole gradient at exactly
    +-1 (where the latent-weight clip puts weights after every step; ``jnp.clip``
    would pass half) and ``abs`` passes 0 at 0 (``jnp.abs`` passes +1). The VJP is
    written out so that the kernel's gradient is one elementwise pass over the binary
    kernel's gradient and the kernel: JAX's own rules for ``clip`` and ``abs`` made
    XLA write out each tie mask as a kernel-sized array.
    """
    return _xnor_kernel_fwd(kernel, quantizer)[0]


def _xnor_kernel_fwd(kernel, quantizer):
    c_out = kernel.shape[-1]
    # |clip(w, -1, 1)| = min(|w|, 1), summed over the (fan_in, C_out) view: XLA's default
    # CPU fusions reduce this form in one pass over the kernel (the clipped kernel's abs,
    # or a select, was written out first; Gradient of an XNOR-Net at 224 px: 1.6x); on
    # XLA's classic CPU kernels (the explainers' programs) ops.channel_sum sums in two
    # stages, as one reduction wrote the magnitudes out first there (1.38x). Summed and
    # divided in float32 for a float16 kernel, whose fan-in may pass 65504.
    magnitude = jnp.minimum(jnp.abs(kernel.reshape(-1, c_out)), 1.0)
    alpha = qz._channel_mean(magnitude, magnitude.shape[0])
    return (quantizer(jnp.clip(kernel, -1.0, 1.0)), alpha), kernel


def _xnor_kernel_bwd(quantizer, kernel, cotangents):
    g_binary, g_alpha = cotangents
    fan_in = kernel.size // kernel.shape[-1]
    _, quantizer_pullback = jax.vjp(quantizer, jnp.clip(kernel, -1.0, 1.0))
    (d_clipped,) = quantizer_pullback(g_binary)
    # d mean|c| / dc = sign(c) / fan_in, with TensorFlow's abs'(0) = 0 (sign(c) = sign(w))
    d_mean = _divide_in_scale_dtype(g_alpha, fan_in).astype(kernel.dtype)
    d_clipped = d_clipped + jnp.where(kernel > 0, d_mean, jnp.where(kernel < 0, -d_mean, 0.0))
    # d clip(w) / dw: 1 on [-1, 1], bounds included (TensorFlow's clip_by_value), 0
    # beyond. Selects (not masks multiplied in) and no |w| shared with the forward pass,
    # so that XLA fuses the whole gradient into one pass over the kernel and cotangent.
    inside = (kernel >= -1.0) & (kernel <= 1.0)
    return (jnp.where(inside, d_clipped, 0.0).astype(kernel.dtype),)


_xnor_kernel.defvjp(_xnor_kernel_fwd, _xnor_kernel_bwd)


def _divide_in_scale_dtype(value: jax.Array, fan_in: int) -> jax.Array:
    """``value / fan_in`` in value's dtype, computed in float32 for float16 (a fan-in
    above 65504 is inf there), as :func:`jbnn.quantizers._channel_mean` does."""
    dtype = qz._scale_dtype(value.dtype)
    if dtype == value.dtype:
        return value / fan_in
    return (value.astype(dtype) / fan_in).astype(value.dtype)


def _binary_kernel_and_scale(
    kernel: jax.Array, spec: QuantizerSpec, kernel_scale: bool
) -> tuple[jax.Array, jax.Array | None]:
    """The kernel the MAC op multiplies by, and a per-output-channel scale of its result.

    XNOR-Net's kernel ``alpha * quantizer(clip(w, -1, 1))`` (``kernel_scale``; larq-zoo's
    ``xnor_weight_scale``, with alpha differentiable) is returned as the binary kernel
    ``quantizer(clip(w, -1, 1))`` and the scale ``alpha``: the layer multiplies its
    output by alpha, which is the same linear map (one alpha per output channel) and the
    same gradients, up to float rounding. With a binary input the product is an exact
    integer sum, and the output alpha times it with one rounding: a sum of zero gives
    exactly 0 (so +1 at the next sign), where the sum of +-alpha over a scaled kernel
    left a rounding residue of either sign. Written this way alpha and its gradient are
    one reduction of the kernel and of the (B, ..., C_out) output, where the scaled
    kernel took a full-size product in the forward pass and a contraction of the kernel
    gradient with the binary kernel in the backward pass. Other kernels: (the quantized
    kernel, None).
    """
    if spec is None or not kernel_scale:
        return _quantize_kernel(kernel, spec), None
    if ops.forward_mode_active():
        return _xnor_kernel_forward_mode(kernel, qz.get(spec))
    return _xnor_kernel(kernel, qz.get(spec))


@jax.custom_jvp
def _tf_clip(kernel: jax.Array) -> jax.Array:
    """clip(w, -1, 1) whose derivative passes at the bounds, as TensorFlow's."""
    return jnp.clip(kernel, -1.0, 1.0)


@_tf_clip.defjvp
def _tf_clip_jvp(primals, tangents):
    (kernel,), (t,) = primals, tangents
    inside = (kernel >= -1.0) & (kernel <= 1.0)
    return _tf_clip(kernel), jnp.where(inside, t, jnp.zeros_like(t))


@jax.custom_jvp
def _tf_abs(x: jax.Array) -> jax.Array:
    """|x| whose derivative is 0 at 0, as TensorFlow's."""
    return jnp.abs(x)


@_tf_abs.defjvp
def _tf_abs_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _tf_abs(x), jnp.where(x > 0, t, jnp.where(x < 0, -t, jnp.zeros_like(t)))


def _xnor_kernel_forward_mode(kernel: jax.Array, quantizer) -> tuple[jax.Array, jax.Array]:
    """:func:`_xnor_kernel` written as larq-zoo's formula, with TensorFlow's tie rules as
    ``custom_jvp`` derivatives (:func:`jbnn.ops.forward_mode`)."""
    clipped = _tf_clip(kernel)
    c_out = kernel.shape[-1]
    alpha = qz._channel_mean(_tf_abs(clipped).reshape(-1, c_out), kernel.size // c_out)
    return quantizer(clipped), alpha


def _apply_scale(y: jax.Array, scale: jax.Array | None) -> jax.Array:
    return y if scale is None else y * scale.astype(y.dtype)


def _check_kernel_clip(value: Any, layer: str) -> None:
    """A ValueError unless the latent-weight clip is None or a finite number > 0 (the
    trainer clips to [-value, value]: -1 set every weight to -1, True clipped to 1).
    Checked in Python when the layer is traced, so once per trace; a traced value (the
    layer built inside a transformation) is left as it is."""
    if value is None or isinstance(value, jax.core.Tracer):
        return
    try:
        ok = (
            not isinstance(value, bool | str)
            and np.ndim(value) == 0
            and np.asarray(value).dtype.kind in "fiu"
            and bool(np.isfinite(value))
            and value > 0
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{layer}: kernel_clip must be None or a finite number > 0, got {value!r}."
        )


def _conv_pair(value: Any, what: str) -> tuple[int, int]:
    """``kernel_size`` / ``strides`` as (h, w): an int n is (n, n), as Larq's (and
    nn.Conv's strides); a ValueError for anything but one or two positive ints."""
    if isinstance(value, bool) or (
        hasattr(value, "__len__") and any(isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"QuantConv: {what} must be two positive ints (h, w), got {value!r}.")
    return ops._pair(value, "QuantConv", what)


def _check_input(x: jax.Array, ndim: int | None, layer: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{layer} expects a floating-point input, got dtype {x.dtype}.")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"{layer} expects a rank-{ndim} input (N, H, W, C), got shape {tuple(x.shape)}."
        )


class QuantDense(nn.Module):
    """A dense layer with optional input and kernel quantizers.

    Attributes:
      features: number of output features.
      use_bias: whether to add a bias.
      input_quantizer: quantizer spec for the input (e.g. ``"ste_sign"``), or None.
      kernel_quantizer: quantizer spec for the latent kernel, or None.
      kernel_clip: clip value of the latent kernel, applied by the trainer: None or a
        finite number > 0 (a ValueError otherwise, when the layer is called).
      kernel_scale: XNOR-Net's kernel ``alpha * q(clip(w, -1, 1))``, alpha = mean
        |clip(w, -1, 1)| per output unit; the product is by ``q(clip(w, -1, 1))`` and
        alpha scales the output (the same map, exact for binary inputs).
      surrogate: backward surrogate that replaces the input quantizer's, or None.
      dtype: computation dtype (None: from the inputs and parameters).
      param_dtype: parameter dtype.
      kernel_init: kernel initializer.
      bias_init: bias initializer.
    """

    features: int
    use_bias: bool = True
    input_quantizer: QuantizerSpec = None
    kernel_quantizer: QuantizerSpec = None
    kernel_clip: float | None = None
    kernel_scale: bool = False
    surrogate: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input(x, None, "QuantDense")
        _check_kernel_clip(self.kernel_clip, "QuantDense")
        kernel = self.param(
            "kernel", self.kernel_init, (jnp.shape(x)[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        return self.forward_quantized(x, *self.quantized_kernel(kernel, bias))

    def quantized_kernel(
        self, kernel: jax.Array, bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """``(kernel, scale, bias)`` that :meth:`forward_quantized` takes, from the
        latent ``kernel``: the quantized kernel, XNOR-Net's alpha (else None), the bias.

        They do not depend on the input: an inference function can compute them once
        (:func:`jbnn.models.apply_fn` with ``input_like``).
        """
        kernel, scale = _binary_kernel_and_scale(kernel, self.kernel_quantizer, self.kernel_scale)
        return kernel, scale, bias

    def forward_quantized(
        self,
        x: jax.Array,
        kernel: jax.Array,
        scale: jax.Array | None,
        bias: jax.Array | None,
    ) -> jax.Array:
        """The layer's output from :meth:`quantized_kernel`'s ``(kernel, scale, bias)``."""
        x = _quantize_input(x, self.input_quantizer, self.surrogate)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        # lax.dot_general; a kernel of -1 / 0 / +1 multiplies exactly in bfloat16 on CPUs
        # with AMX bfloat16 tiles (jbnn.ops.dense).
        y = ops.dense(
            x,
            kernel,
            exact_kernel=qz.integer_valued(self.kernel_quantizer),
            exact_input=qz.integer_valued(self.input_quantizer),
        )
        y = _apply_scale(y, scale)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class QuantConv(nn.Module):
    """A 2-D convolution (NHWC) with optional input and kernel quantizers.

    Attributes:
      features: number of output channels.
      kernel_size: (kh, kw), or one int for a square kernel.
      strides: (sh, sw), or one int for both.
      padding: "SAME", "VALID" or explicit ((top, bottom), (left, right)).
      pad_values: value that SAME / explicit padding fills with (QuickNet uses 1.0 so
        that a binary input stays binary); 0.0 is ordinary zero padding.
      feature_group_count: groups (= input channels for a depthwise convolution).
      use_bias: whether to add a bias.
      input_quantizer, kernel_quantizer, kernel_clip, kernel_scale, surrogate: as
        :class:`QuantDense`.
      dtype, param_dtype, kernel_init, bias_init: as :class:`flax.linen.Conv`.
    """

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    strides: int | Sequence[int] = (1, 1)
    padding: str | Sequence[tuple[int, int]] = "SAME"
    pad_values: float = 0.0
    feature_group_count: int = 1
    use_bias: bool = True
    input_quantizer: QuantizerSpec = None
    kernel_quantizer: QuantizerSpec = None
    kernel_clip: float | None = None
    kernel_scale: bool = False
    surrogate: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input(x, 4, "QuantConv")
        _check_kernel_clip(self.kernel_clip, "QuantConv")
        kh, kw = _conv_pair(self.kernel_size, "kernel_size")
        in_features = x.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"QuantConv: {in_features} input channels are not divisible by "
                f"feature_group_count={self.feature_group_count}."
            )
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (kh, kw, in_features // self.feature_group_count, self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        return self.forward(x, kernel, bias)

    def forward(
        self,
        x: jax.Array,
        kernel: jax.Array,
        bias: jax.Array | None,
        out_scale: jax.Array | None = None,
    ) -> jax.Array:
        """The layer's computation from given parameters (``__call__`` takes its own).

        Args:
          x: (B, H, W, C_in) input.
          kernel: the latent (kh, kw, C_in / groups, C_out) kernel.
          bias: (C_out,) or None.
          out_scale: (C_out,) factors applied to the quantized kernel and the bias, so
            that the output is the layer's times ``out_scale`` (a BatchNorm folded in,
            :func:`jbnn.models.fold_batchnorm`); None for the layer itself.

        Returns:
          (B, H', W', C_out).
        """
        return self.forward_quantized(x, *self.quantized_kernel(kernel, bias, out_scale))

    def quantized_kernel(
        self,
        kernel: jax.Array,
        bias: jax.Array | None,
        out_scale: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """``(kernel, scale, bias)`` that :meth:`forward_quantized` takes, from the
        latent ``kernel`` (and ``out_scale`` as :meth:`forward`): the quantized kernel,
        XNOR-Net's alpha (else None; folded into the kernel with ``out_scale``), the bias.

        They do not depend on the input: an inference function can compute them once
        (:func:`jbnn.models.apply_fn` with ``input_like``).
        """
        kernel, scale = _binary_kernel_and_scale(kernel, self.kernel_quantizer, self.kernel_scale)
        if out_scale is not None:
            if scale is not None:  # folded for inference: one scaled kernel
                kernel, scale = kernel * scale.astype(kernel.dtype), None
            kernel = kernel * out_scale.astype(kernel.dtype)
            bias = None if bias is None else bias * out_scale.astype(bias.dtype)
        return kernel, scale, bias

    def forward_quantized(
        self,
        x: jax.Array,
        kernel: jax.Array,
        scale: jax.Array | None,
        bias: jax.Array | None,
    ) -> jax.Array:
        """The layer's output from :meth:`quantized_kernel`'s ``(kernel, scale, bias)``."""
        x = _quantize_input(x, self.input_quantizer, self.surrogate)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)

        padding = self.padding
        # "same" / "valid" in any case, as lax (and Larq / Keras, which spell them lowercase)
        if (
            self.pad_values != 0.0
            and isinstance(padding, str)
            and padding.upper() not in ("SAME", "VALID")
        ):
            raise ValueError(f"QuantConv: unsupported padding {padding!r}.")
        # lax.conv_general_dilated (NHWC, HWIO) with an input gradient that stays on
        # XLA's fast CPU kernels inside loops, and padding with pad_values without a
        # padded copy of x; same values and gradients (jbnn.ops).
        y = ops.conv(
            x,
            kernel,
            _conv_pair(self.strides, "strides"),
            padding if isinstance(padding, str) else tuple(map(tuple, padding)),
            self.feature_group_count,
            pad_value=self.pad_values,
        )
        y = _apply_scale(y, scale)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What :func:`quantized_layers` records of one quantized layer."""

    path: tuple[str, ...]
    kind: str  # "QuantDense" or "QuantConv"
    input_quantizer: QuantizerSpec
    kernel_quantizer: QuantizerSpec
    kernel_clip: float | None
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    use_bias: bool


def quantized_layers(model: nn.Module, input_shape: Sequence[int]) -> list[LayerInfo]:
    """Lists every QuantDense / QuantConv of ``model`` in call order.

    Runs ``model.init`` under ``jax.eval_shape`` (nothing is computed or allocated)
    with an interceptor that records each quantized layer's module path, quantizers,
    latent clip and shapes.

    Args:
      model: any Flax Linen module.
      input_shape: the shape of one input batch, e.g. (1, 32, 32, 3).

    Returns:
      A list of :class:`LayerInfo`.
    """
    records: list[LayerInfo] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, QuantDense | QuantConv):
            x = args[0]
            if isinstance(mod, QuantDense):
                kshape = (x.shape[-1], mod.features)
            else:
                kshape = (
                    *_conv_pair(mod.kernel_size, "kernel_size"),
                    x.shape[-1] // mod.feature_group_count,
                    mod.features,
                )
            records.append(
                LayerInfo(
                    path=tuple(mod.path),
                    kind=type(mod).__name__,
                    input_quantizer=mod.input_quantizer,
                    kernel_quantizer=mod.kernel_quantizer,
                    kernel_clip=mod.kernel_clip,
                    input_shape=tuple(x.shape),
                    output_shape=tuple(out.shape),
                    kernel_shape=tuple(kshape),
                    use_bias=mod.use_bias,
                )
            )
        return out

    def init(key):
        with nn.intercept_methods(interceptor):
            return model.init(key, jnp.zeros(tuple(input_shape), jnp.float32))

    jax.eval_shape(init, jax.random.key(0))
    return records
