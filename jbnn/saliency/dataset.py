"""Explaining a whole dataset split: batches streamed through a method, sharded over devices.

Every batch is padded to one fixed size (a multiple of the device count, so that one
compiled program serves every batch), placed on a ``jax.sharding.Mesh`` over the
local devices with a ``NamedSharding`` that splits the batch axis, and run through the
jitted method; the model's variables are replicated. The host fetches a batch's maps
while the next batch computes. The padding is dropped from the results.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jbnn.ops import platform_jit
from jbnn.saliency import _checks, cam, gradients

METHODS: dict[str, Callable[..., Any]] = {
    "gradient": gradients.gradient,
    "input_x_gradient": gradients.input_x_gradient,
    "smoothgrad": gradients.smoothgrad,
    "smoothgrad_sq": functools.partial(gradients.smoothgrad, variant="smoothgrad_sq"),
    "vargrad": functools.partial(gradients.smoothgrad, variant="vargrad"),
    "integrated_gradients": gradients.integrated_gradients,
    "gradcam": cam.gradcam,
    "gradcam_plus_plus": cam.gradcam_plus_plus,
}
"""Method name -> public function. ``smoothgrad_sq`` and ``vargrad`` are ``smoothgrad``
with the variant fixed."""

_CAM_METHODS = ("gradcam", "gradcam_plus_plus")
_KEY_METHODS = ("smoothgrad", "smoothgrad_sq", "vargrad")

__all__ = ["METHODS", "explain_dataset"]


def _keyword_options(method: str) -> tuple[str, ...]:
    function = METHODS[method]
    fixed = function.keywords if isinstance(function, functools.partial) else {}
    function = function.func if isinstance(function, functools.partial) else function
    params = inspect.signature(function).parameters.values()
    names = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return tuple(n for n in names if n not in fixed and n != "return_low_res")


def _build_step(method, fn, model, x_shape, kwargs, replicated) -> Callable:
    """A function ``(x, target, keys) -> maps`` with the method's options checked once.

    ``fn`` is the function explained: for GradCAM, ``model`` unfolded (its layer paths
    are ``model``'s). The options that are arrays (IG's baseline, SmoothGrad's noise
    scale) are put on every device of the mesh with ``replicated``: one given on (or
    committed to) a single device would not meet the sharded batch in one computation.
    """
    name = f"explain_dataset({method!r})"
    allowed = _keyword_options(method)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"{name}: unknown option(s) {unknown}; {method} takes {', '.join(allowed) or 'none'}."
        )
    if method in ("gradient", "input_x_gradient"):
        times_input = method == "input_x_gradient"
        return lambda x, t, k: gradients._gradient_jit(fn, x, t, times_input=times_input)
    if method in _KEY_METHODS:
        options = dict(
            num_samples=50,
            noise_level=0.15,
            noise_sigma=None,
            batch_size="auto",
            split_input_layer=True,
        )
        options["variant"] = {"smoothgrad_sq": "smoothgrad_sq", "vargrad": "vargrad"}.get(
            method, "smoothgrad"
        )
        options.update(kwargs)
        for option in ("noise_sigma", "noise_level"):  # per-example arrays would apply
            if options[option] is not None and np.ndim(options[option]) != 0:  # per slot
                raise ValueError(f"{name}: {option} must be one number for a whole dataset.")
        scale, static = gradients._smoothgrad_options(
            x_shape,
            options["num_samples"],
            options["noise_level"],
            options["noise_sigma"],
            options["variant"],
            options["batch_size"],
            options["split_input_layer"],
            name,
        )
        scale = jax.device_put(scale, replicated)
        return lambda x, t, k: gradients._smoothgrad_jit(fn, x, t, k, scale, **static)
    if method == "integrated_gradients":
        options = dict(
            baseline=0.0,
            num_steps=50,
            method="riemann_trapezoid",
            batch_size="auto",
            split_input_layer=True,
        )
        options.update(kwargs)
        if np.ndim(options["baseline"]) > 3:
            raise ValueError(
                f"{name}: baseline must be a number or one image (H, W, C) for a whole dataset."
            )
        base, static = gradients._ig_options(
            x_shape,
            options["baseline"],
            options["num_steps"],
            options["method"],
            options["batch_size"],
            options["split_input_layer"],
            name,
        )
        base = jax.device_put(base, replicated)
        return lambda x, t, k: gradients._ig_jit(fn, x, t, base, **static)
    # GradCAM / GradCAM++
    if "layer" not in kwargs:
        raise TypeError(f"{name}: the layer option is required, e.g. layer='block6'.")
    options = dict(relu=True, interpolation="bilinear")
    options.update(kwargs)
    _checks.check_choice(options["interpolation"], tuple(cam.INTERPOLATIONS), "interpolation", name)
    path, _ = _checks.check_layer(model, x_shape, options["layer"], name)
    static = dict(
        path=path,
        plus_plus=method == "gradcam_plus_plus",
        relu=bool(options["relu"]),
        interpolation=options["interpolation"],
        return_low_res=False,
    )
    return lambda x, t, k: cam._cam_jit(fn, x, t, **static)


def _unpack(batch) -> tuple[Any, Any]:
    """(images, labels or None) from an array, an (images, labels) pair or a dict."""
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(
                f"explain_dataset: a dict batch needs an 'image' entry, got keys {sorted(batch)}."
            )
        return batch["image"], batch.get("label")
    if isinstance(batch, tuple | list):
        if len(batch) != 2:
            raise ValueError(
                "explain_dataset: a tuple batch must be (images, labels), got "
                f"{len(batch)} elements."
            )
        return batch[0], batch[1]
    return batch, None


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    """Pads axis 0 to ``size`` by repeating the last example (dropped afterwards)."""
    missing = size - array.shape[0]
    if missing == 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)], axis=0)


@functools.partial(jax.jit, static_argnums=2)
def _offset_keys(key: jax.Array, offset: jax.Array, size: int) -> jax.Array:
    """``fold_in(key, i)`` for the dataset indices ``offset .. offset + size - 1``."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(size))


@platform_jit
def _predict(fn, x):
    return jnp.argmax(fn(x), axis=-1).astype(jnp.int32)


def explain_dataset(
    method: str,
    /,
    batches: Iterable,
    *,
    model: nn.Module | None = None,
    variables: Any = None,
    fn: Callable | None = None,
    key: jax.Array | None = None,
    target: str = "predicted",
    mesh: Mesh | None = None,
    progress: bool = True,
    path: str | os.PathLike | None = None,
    fold_batchnorm: bool = False,
    **options,
) -> dict[str, np.ndarray]:
    """Runs a saliency method over a stream of batches, sharded over the local devices.

    Args:
      method: a name of :data:`METHODS` (``"gradient"``, ``"smoothgrad"``, ``"gradcam"``...);
        positional only, so that Integrated Gradients' own ``method`` option (the
        quadrature, e.g. ``method="gausslegendre"``) goes to ``**options``.
      batches: an iterable of image batches (B, H, W, C), of ``(images, labels)`` pairs or
        of dicts with ``"image"`` (and ``"label"``) entries, e.g. a tfds split as numpy.
        Batches may differ in size (the last one is usually smaller), not in image
        shape or dtype.
      model: the Linen model (needed by GradCAM; with ``variables`` it gives ``fn``,
        with every quantized kernel computed once, at the first batch:
        ``jbnn.models.apply_fn(model, variables, input_like=...)``; GradCAM runs over
        kernels computed once too).
      variables: its variables; the model runs in inference mode.
      fn: ``x -> logits`` (B, K) for the gradient methods, instead of model/variables.
      key: ``jax.random.key`` for the SmoothGrad family. Example ``i`` of the dataset
        (counted over the whole stream) uses ``fold_in(key, i)``, so maps do not depend
        on the batch size, the padding or the number of devices.
      target: ``"predicted"`` (the model's class for each image) or ``"label"``.
      mesh: a ``jax.sharding.Mesh``; the batch is split over all its axes. Default: a
        one-axis mesh ``("batch",)`` over ``jax.local_devices()``.
      progress: show a tqdm progress bar.
      path: if given, the results are also written there with ``numpy.savez``.
      fold_batchnorm: with ``model`` and ``variables``, fold the inference BatchNorms
        into the convolutions that feed them (``jbnn.models.apply_fn``; the same function
        up to float rounding, faster on GPUs). GradCAM runs the model unfolded.
      **options: the method's keyword options (``num_samples``, ``layer``...).

    Returns:
      A dict of numpy arrays over the N streamed examples: ``"maps"`` (N, H, W, C) or
      (N, H, W) for GradCAM, ``"targets"`` (N,), ``"predictions"`` (N,), and
      ``"labels"`` (N,) when the batches have labels.

    Raises:
      ValueError, TypeError: for an unknown method or option, a missing model, key or
        label, and any bad batch (wrong rank, non-float, NaN...), naming the batch.
    """
    from tqdm.auto import tqdm

    name = "explain_dataset"
    _checks.check_choice(method, tuple(METHODS), "method", name)
    _checks.check_choice(target, ("predicted", "label"), "target", name)
    if method in _CAM_METHODS and (model is None or variables is None):
        raise ValueError(f"{name}: {method} needs model= and variables=.")
    if not isinstance(fold_batchnorm, bool):
        raise TypeError(f"{name}: fold_batchnorm must be True or False, got {fold_batchnorm!r}.")
    if fold_batchnorm and fn is not None:
        raise ValueError(
            f"{name}: fold_batchnorm=True folds model= and variables=; with fn= fold when "
            "building it (jbnn.models.apply_fn(model, variables, fold_batchnorm=True))."
        )
    frozen_fn = fn is None  # built from model and variables at the first batch
    if frozen_fn and (model is None or variables is None):
        raise ValueError(f"{name}: give fn= (x -> logits) or model= and variables=.")
    if method in _KEY_METHODS:
        key = _checks.typed_key(key, name)
        if key.shape != ():
            raise ValueError(f"{name}: key must be a single key, got shape {tuple(key.shape)}.")
    if mesh is None:
        mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
    num_devices = mesh.size
    split = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    replicated = NamedSharding(mesh, P())
    if not frozen_fn:
        fn = jax.device_put(_checks.as_partial(fn, name), replicated)
    cam_fn = None

    total = len(batches) if hasattr(batches, "__len__") else None
    bar = tqdm(total=total, disable=not progress, desc=f"{method}", unit="batch")
    collected: dict[str, list[np.ndarray]] = {"maps": [], "targets": [], "predictions": []}
    labels_seen: list[np.ndarray] = []
    pending = None
    size, step, num_classes, offset = 0, None, None, 0

    def fetch(item):
        maps, targets, predictions, n = item
        collected["maps"].append(np.asarray(maps)[:n])
        collected["targets"].append(np.asarray(targets)[:n])
        collected["predictions"].append(np.asarray(predictions)[:n])

    for index, batch in enumerate(batches):
        images, labels = _unpack(batch)
        images = _checks.check_images(np.asarray(images), name, arg=f"batch {index} images")
        n = images.shape[0]
        image_spec = (images.shape[1:], jax.dtypes.canonicalize_dtype(images.dtype))
        if index == 0:
            first_spec = image_spec
        elif image_spec != first_spec:
            raise ValueError(
                f"{name}: batch {index} images are {image_spec[1]} of shape "
                f"{images.shape[1:]} per image; batch 0's were {first_spec[1]} of shape "
                f"{first_spec[0]}: every batch must have the same image shape and dtype."
            )
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(
                    f"{name}: batch {index} labels must be ints of shape ({n},), got "
                    f"{labels.dtype} {labels.shape}."
                )
        elif target == "label":
            raise ValueError(f"{name}: target='label' but batch {index} has no labels.")
        if n > size:  # first batch, or a larger one: (re)build for the new padded size
            size = -(-n // num_devices) * num_devices
            shape = (size, *images.shape[1:])
            spec = jax.ShapeDtypeStruct(shape, jax.dtypes.canonicalize_dtype(images.dtype))
            if index == 0:
                # every quantized kernel computed once, not per batch (jbnn.models.frozen)
                from jbnn.models import apply_fn

                if frozen_fn:
                    # variables of another model, or of another image size: say which
                    # (one shape-only trace) before the frozen program's traces meet them
                    _checks.logits_shape(apply_fn(model, variables), spec, name)
                    fn = apply_fn(model, variables, fold_batchnorm=fold_batchnorm, input_like=spec)
                    fn = jax.device_put(fn, replicated)
                if method in _CAM_METHODS:  # the model as it is: unfolded
                    if frozen_fn and not fold_batchnorm:
                        cam_fn = fn
                    else:
                        cam_fn = apply_fn(model, variables, input_like=spec)
                        cam_fn = jax.device_put(cam_fn, replicated)
            num_classes = _checks.logits_shape(fn, spec, name)[1]
            explained = fn if cam_fn is None else cam_fn
            step = _build_step(method, explained, model, shape, options, replicated)
        if labels is not None and target == "label":
            _checks.check_target(labels, n, num_classes, f"{name} (batch {index} labels)")
        x = jax.device_put(_pad(images, size), split)
        predictions = _predict(fn, x)
        if target == "label":
            targets = jax.device_put(_pad(labels.astype(np.int32), size), split)
        else:
            targets = predictions
        keys = None
        if method in _KEY_METHODS:
            keys = jax.device_put(_offset_keys(key, jnp.asarray(offset), size), split)
        maps = step(x, targets, keys)
        if pending is not None:
            fetch(pending)
        pending = (maps, targets, predictions, n)
        if labels is not None:
            labels_seen.append(labels)
        offset += n
        bar.update(1)
    if pending is not None:
        fetch(pending)
    bar.close()
    if not collected["maps"]:
        raise ValueError(f"{name}: batches is empty.")
    result = {k: np.concatenate(v, axis=0) for k, v in collected.items()}
    if labels_seen:
        if len(labels_seen) != len(collected["maps"]):
            raise ValueError(f"{name}: some batches have labels and others do not.")
        result["labels"] = np.concatenate(labels_seen, axis=0)
    if path is not None:
        np.savez(path, **result)
    return result
