"""Class activation maps: GradCAM and GradCAM++ on any Flax Linen model, unchanged.

The explained layer is named by its module path (``"block6"``, ``"stage4/block1"``;
:func:`jbnn.models.layer_paths` lists them). Flax's ``nn.intercept_methods`` reaches
it: the ``__call__`` of the module at that path gets a zero "perturbation" added to
its output, and the gradient with respect to that perturbation is the gradient of
the target logit with respect to the layer's activation (the mechanism of
``Module.perturb``, without editing the model). The model runs in inference mode,
``model.apply(variables, x)``: BatchNorm uses its running statistics and nothing is
mutable, so the examples of a batch never influence each other. With ``fn=`` the model
runs as that function (e.g. over kernels quantized once, ``apply_fn(..., input_like=x)``),
whose module calls the interceptor sees all the same.

Two layers have no activation to take, and are refused with a ValueError that says
why and what to do: a convolution whose BatchNorm ``fn`` folds into it
(``apply_fn(..., fold_batchnorm=True)``; there the convolution returns the BatchNorm's
output: explain the BatchNorm's layer, or an unfolded fn), and a layer run inside a
JAX transformation of the model such as ``nn.remat`` (its output lives in that inner
trace: explain the same model built without ``nn.remat``, with the same variables).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import tracers as flax_tracers
from jax.typing import ArrayLike

from jbnn._tracing import in_analysis
from jbnn.ops import platform_jit
from jbnn.saliency import _checks

# jbnn's name -> jax.image.resize's method; "nearest_torch" is PyTorch's own rule.
INTERPOLATIONS = {
    "bilinear": "linear",
    "nearest": "nearest",
    "bicubic": "cubic",
    "nearest_torch": None,
}

__all__ = ["INTERPOLATIONS", "gradcam", "gradcam_plus_plus", "layer_activation_and_gradient"]


def _forward_with_probe(fn, path: tuple[str, ...], x, delta):
    """``fn(x)`` with ``delta`` added to the output of the module at ``path``.

    ``fn`` is the model as a function of its input (a ``Partial`` of
    :func:`jbnn.models.apply_fn`, its kernels quantized per call or once): Linen's
    interceptors see the module calls made inside it. Returns ``(logits, activation)``,
    the activation being the layer's own output (the first call of the module at
    ``path``, should it be called more than once).

    Raises a ValueError (while tracing) where the activation taken would not be the
    layer's: a layer run inside a JAX transformation of the model (``nn.remat``...),
    whose output is a value of that inner trace, and a layer whose BatchNorm ``fn``
    folds into it (:mod:`jbnn.models.fold`), whose output is then the BatchNorm's.
    """
    captured = []  # the layer's output
    handed_on = []  # what the model reads in its place (output + delta)
    level = flax_tracers.current_trace()  # the trace fn runs in

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if in_analysis() or context.method_name != "__call__":
            # a per-call folded fn traces the model to find its folds: not the real call
            return out
        module = context.module
        if not captured and tuple(module.path) == path:
            if flax_tracers.current_trace() != level:
                raise ValueError(_transformed_layer_message(path, module))
            captured.append(out)
            if delta is not None:
                out = out + delta.astype(out.dtype)
            handed_on.append(out)
        elif (
            handed_on
            and isinstance(module, nn.BatchNorm)
            and args
            and args[0] is handed_on[0]
            and out is args[0]
        ):
            # A BatchNorm that hands its input on unchanged has been folded into the
            # layer that produced it (jbnn.models.fold): the layer's "output" is the
            # BatchNorm's, and GradCAM would explain that activation instead.
            raise ValueError(_folded_layer_message(path, tuple(module.path)))
        return out

    with nn.intercept_methods(interceptor):
        logits = fn(x)
    if not captured:
        raise ValueError(
            f"layer {'/'.join(path)!r} was not called by the model (model.apply or fn); a "
            "fn wrapped in jax.jit that has run before calls no module: pass it unwrapped"
        )
    return logits, captured[0]


def _transformed_layer_message(path: tuple[str, ...], module: nn.Module) -> str:
    layer = "/".join(path)
    return (
        f"layer {layer!r} ({type(module).__name__}) runs inside a JAX transformation within "
        "the model: nn.remat / nn.checkpoint (or nn.scan, nn.vmap, nn.jit; or jax.jit, "
        "jax.checkpoint... inside fn). GradCAM cannot take the layer's activation out of it "
        "(JAX raises an UnexpectedTracerError). nn.remat only saves training memory and "
        "leaves the variables as they are: explain the same model built without nn.remat, "
        "with the same variables (and a fn without such transformations)."
    )


def _folded_layer_message(path: tuple[str, ...], batchnorm: tuple[str, ...]) -> str:
    layer, bn = "/".join(path), "/".join(batchnorm)
    return (
        f"layer {layer!r}: fn folds the BatchNorm {bn!r} that reads this layer's output into "
        "the layer (jbnn.models.apply_fn(..., fold_batchnorm=True)), so there the layer "
        "outputs the BatchNorm's output, not its own, and GradCAM would explain the wrong "
        f"activation. Explain layer={bn!r} (the BatchNorm's output, the same folded or "
        "not), or pass fn built without fold_batchnorm (e.g. jbnn.models.apply_fn(model, "
        "variables, input_like=x))."
    )


def _activation_and_gradient(fn, path, x, target):
    """Layer activation A and d logit[target] / dA, both (B, h, w, C); and the logits."""
    probe = jax.eval_shape(lambda x: _forward_with_probe(fn, path, x, None)[1], x)
    delta = jnp.zeros(probe.shape, probe.dtype)
    logits, pullback, activation = jax.vjp(
        lambda d: _forward_with_probe(fn, path, x, d), delta, has_aux=True
    )
    if target is None:
        target = jnp.argmax(logits, axis=-1)
    cotangent = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
    (grad,) = pullback(cotangent)
    return activation, grad, logits


@functools.partial(platform_jit, static_argnames=("path",))
def _activation_and_gradient_jit(fn, x, target, *, path):
    activation, grad, _ = _activation_and_gradient(fn, path, x, target)
    return activation, grad


def layer_activation_and_gradient(
    model: nn.Module,
    variables,
    x: ArrayLike,
    target: ArrayLike | int | None,
    *,
    layer: str,
    fn: Callable | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The activation of ``layer`` and the gradient of the target logit with respect to it.

    Args:
      model: any Flax Linen module, called as ``model.apply(variables, x)``.
      variables: its variables (``{"params": ..., "batch_stats": ...}``).
      x: float images (B, H, W, C), finite.
      target: int (B,) (or one int) in [0, K), or None for the predicted class.
      layer: module path, e.g. ``"block6"``.
      fn: the model as a function ``x -> logits`` to run instead of
        ``model.apply(variables, x)``, e.g. ``jbnn.models.apply_fn(model, variables,
        input_like=x)``, whose kernels are quantized once (faster over many calls;
        ``explain_dataset`` does this); ``variables`` is then unused (None). It must make
        ``model``'s module calls (the layer is found by its path). A convolution whose
        BatchNorm ``fn`` folds is refused (its output there is the BatchNorm's).

    Returns:
      ``(activation, gradient)``, both of the layer's output shape (B, h, w, C).
    """
    name = "layer_activation_and_gradient"
    fn, x, target, path = _prepare(model, variables, x, target, layer, name, fn)
    return _activation_and_gradient_jit(fn, x, target, path=path)


@functools.partial(
    platform_jit,
    static_argnames=("path", "plus_plus", "relu", "interpolation", "return_low_res"),
)
def _cam_jit(fn, x, target, *, path, plus_plus, relu, interpolation, return_low_res):
    activation, grad, _ = _activation_and_gradient(fn, path, x, target)
    dtype = jnp.promote_types(activation.dtype, jnp.float32)
    activation = activation.astype(dtype)  # (B, h, w, C)
    grad = grad.astype(dtype)  # (B, h, w, C)
    if plus_plus:
        # Chattopadhyay et al. 2018, as pytorch-grad-cam and tf-keras-vis compute it
        # (the exp(score) factors of the paper cancel in alpha and only scale the map):
        # alpha = g^2 / (2 g^2 + sum_ij A * g^3), 0 where undefined;
        # channel weight = sum_ij alpha * relu(g).
        g2 = jnp.square(grad)
        g3 = g2 * grad
        sum_a = jnp.sum(activation, axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
        denominator = 2.0 * g2 + sum_a * g3
        ok = (grad != 0) & (denominator != 0)
        alpha = jnp.where(ok, g2 / jnp.where(ok, denominator, 1.0), 0.0)
        weights = jnp.sum(alpha * jax.nn.relu(grad), axis=(1, 2))  # (B, C)
    else:
        weights = jnp.mean(grad, axis=(1, 2))  # (B, C)
    low_res = jnp.einsum("bhwc,bc->bhw", activation, weights)  # (B, h, w)
    if relu:
        low_res = jax.nn.relu(low_res)
    height, width = x.shape[1:3]
    if interpolation == "nearest_torch":
        rows = _torch_nearest_sources(low_res.shape[1], height)
        cols = _torch_nearest_sources(low_res.shape[2], width)
        cam = low_res[:, rows][:, :, cols]
    else:
        cam = jax.image.resize(
            low_res, (x.shape[0], height, width), method=INTERPOLATIONS[interpolation]
        )  # (B, H, W)
    return (cam, low_res) if return_low_res else cam


def _torch_nearest_sources(in_size: int, out_size: int) -> np.ndarray:
    """The source index of each output position under PyTorch's ``F.interpolate(...,
    mode="nearest")`` to a given size (Captum's ``LayerAttribution.interpolate``):
    ``min(floor(i * (in / out)), in - 1)`` with the scale and product in float32, as
    ATen's ``nearest_idx`` computes them (its shortcuts for out = in and out = 2 in give
    the same indices). Static shapes, so a constant of the compiled program."""
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def _prepare(model, variables, x, target, layer, name, fn=None):
    x = _checks.check_images(x, name)
    path, _ = _checks.check_layer(model, x.shape, layer, name)
    if fn is not None:
        fn = _checks.as_partial(fn, name)
    elif variables is None:
        raise ValueError(f"{name}: give variables= (or fn=, the model as a function).")
    else:
        from jbnn.models import apply_fn

        fn = apply_fn(model, variables)
    batch, num_classes = _checks.logits_shape(fn, x, name)
    target = _checks.check_target(target, batch, num_classes, name)
    return fn, x, target, path


def _cam(model, variables, x, target, layer, relu, interpolation, return_low_res, plus_plus, fn):
    name = "gradcam_plus_plus" if plus_plus else "gradcam"
    _checks.check_choice(interpolation, tuple(INTERPOLATIONS), "interpolation", name)
    fn, x, target, path = _prepare(model, variables, x, target, layer, name, fn)
    return _cam_jit(
        fn,
        x,
        target,
        path=path,
        plus_plus=plus_plus,
        relu=bool(relu),
        interpolation=interpolation,
        return_low_res=bool(return_low_res),
    )


def gradcam(
    model: nn.Module,
    variables,
    x: ArrayLike,
    target: ArrayLike | int | None,
    *,
    layer: str,
    relu: bool = True,
    interpolation: str = "bilinear",
    return_low_res: bool = False,
    fn: Callable | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """GradCAM (Selvaraju et al. 2017) of the target logit at ``layer``.

    Channel weights are the spatial mean of the gradient of the target logit with
    respect to the layer's activation A (B, h, w, C); the low-resolution map is
    ``sum_c weight_c * A[..., c]``, passed through a ReLU when ``relu`` (the paper,
    PAIR and tf-keras-vis always do; Captum's ``LayerGradCam`` does not by default:
    ``relu=False`` gives Captum's low-resolution map), then resized to (H, W) with
    ``jax.image.resize`` (half-pixel centres; bilinear by default as tf-keras-vis and
    PAIR's skimage resize; ``"nearest"`` samples the layer position whose centre is
    nearest). Captum upsamples with PyTorch's
    ``"nearest"``, which takes position ``floor(i * h / H)`` (shifted by up to one
    layer position where H is not a multiple of h): ``interpolation="nearest_torch"``
    with ``relu=False`` gives Captum's upsampled map (``LayerGradCam`` then
    ``LayerAttribution.interpolate``). No normalisation is applied: divide by the max
    (PAIR) or use :func:`normalize_pair` for display.

    Args:
      model: any Flax Linen module, called as ``model.apply(variables, x)`` (inference).
      variables: its variables.
      x: float images (B, H, W, C), finite.
      target: int (B,) (or one int) in [0, K), or None for the predicted class.
      layer: '/'-separated module path of a layer whose output is (B, h, w, C), e.g.
        ``"block6"`` or ``"stage4/block1"``; an unknown path raises a ValueError that
        lists the valid ones.
      relu: apply a ReLU to the map (before resizing).
      interpolation: ``"bilinear"``, ``"nearest"``, ``"bicubic"`` or ``"nearest_torch"``
        (PyTorch's and so Captum's nearest; see above).
      return_low_res: also return the map at the layer's resolution.
      fn: the model as a function ``x -> logits`` to run instead of
        ``model.apply(variables, x)``, e.g. ``jbnn.models.apply_fn(model, variables,
        input_like=x)``, whose kernels are quantized once (faster over many calls;
        ``explain_dataset`` does this); ``variables`` is then unused (None). It must make
        ``model``'s module calls (the layer is found by its path). A convolution whose
        BatchNorm ``fn`` folds is refused (its output there is the BatchNorm's).

    Returns:
      The map (B, H, W) in float32 (at least); with ``return_low_res``, the pair
      ``(map, low_res)`` with ``low_res`` of shape (B, h, w).
    """
    return _cam(model, variables, x, target, layer, relu, interpolation, return_low_res, False, fn)


def gradcam_plus_plus(
    model: nn.Module,
    variables,
    x: ArrayLike,
    target: ArrayLike | int | None,
    *,
    layer: str,
    relu: bool = True,
    interpolation: str = "bilinear",
    return_low_res: bool = False,
    fn: Callable | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """GradCAM++ (Chattopadhyay et al. 2018) of the target logit at ``layer``.

    With g the gradient of the target logit with respect to the activation A,
    ``alpha = g^2 / (2 g^2 + sum_ij(A) g^3)`` (0 where g = 0 or the denominator
    vanishes) and channel weights ``sum_ij alpha * relu(g)``: pytorch-grad-cam's
    formula, without the ``exp(score)`` factors of the paper (they cancel in alpha
    and would only rescale the map). Map, ReLU and resizing as :func:`gradcam`.

    Args:
      model: any Flax Linen module.
      variables: its variables.
      x: float images (B, H, W, C), finite.
      target: int (B,) (or one int) in [0, K), or None for the predicted class.
      layer: '/'-separated module path of a (B, h, w, C) layer.
      relu: apply a ReLU to the map (all references do).
      interpolation: ``"bilinear"``, ``"nearest"``, ``"bicubic"`` or ``"nearest_torch"``
        (as :func:`gradcam`'s).
      return_low_res: also return the map at the layer's resolution.
      fn: as :func:`gradcam`'s.

    Returns:
      The map (B, H, W), or ``(map, low_res)`` with ``return_low_res``.
    """
    return _cam(model, variables, x, target, layer, relu, interpolation, return_low_res, True, fn)
