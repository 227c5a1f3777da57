"""Boundary checks and model-function handling shared by every saliency method.

Everything here runs on the host, once per public call, before any jitted code:
errors name the offending value and say what is expected.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jbnn.models.common import variables_fit

Partial = jax.tree_util.Partial


class _ByIdentity:
    """Wraps an unhashable callable so that it can be a static jit argument."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other) -> bool:
        return isinstance(other, _ByIdentity) and other.fn is self.fn


def as_partial(fn: Callable, name: str) -> Partial:
    """``fn`` as a ``jax.tree_util.Partial`` to pass to jitted code as a pytree.

    A ``Partial`` (what :func:`jbnn.models.apply_fn` returns) is kept: its bound
    arguments (the variables) are traced leaves, its function is part of the treedef,
    so new variables of the same shapes reuse the compiled code. Any other callable
    becomes a ``Partial`` without arguments, i.e. a static argument compared by
    equality (by identity for an unhashable callable).
    """
    if not callable(fn):
        raise TypeError(
            f"{name}: fn must be a callable x -> logits (B, K), e.g. "
            f"jbnn.models.apply_fn(model, variables); got {type(fn).__name__}."
        )
    _check_one_argument(fn, name)
    if isinstance(fn, Partial):
        return fn
    try:
        hash(fn)
    except TypeError:
        fn = _ByIdentity(fn)
    return Partial(fn)


def _check_one_argument(fn: Callable, name: str) -> None:
    """A TypeError for the callables that are not ``x -> logits``: a Flax module itself,
    its ``apply`` (which takes ``(variables, x)``), any function of two arguments or more.
    Called as ``fn(x)``, they fail deep inside Flax with errors about the images."""
    use = (
        "pass jbnn.models.apply_fn(model, variables) (the model in inference mode with its "
        "variables) or lambda x: model.apply(variables, x)"
    )
    if isinstance(fn, nn.Module):
        raise TypeError(
            f"{name}: fn must be a function x -> logits (B, K), got the Flax module "
            f"{type(fn).__name__} itself, which holds no variables; {use}."
        )
    owner = getattr(fn, "__self__", None)
    method = getattr(fn, "__name__", "")
    if isinstance(owner, nn.Module) and method in ("apply", "init", "init_with_output"):
        raise TypeError(
            f"{name}: fn is {type(owner).__name__}.{method}, which takes (variables, x); fn "
            f"must be a function of the images alone, x -> logits (B, K): {use}."
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or an object inspect cannot read
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p.name
        for p in signature.parameters.values()
        if p.kind in positional and p.default is inspect.Parameter.empty
    ]
    if len(required) > 1:
        raise TypeError(
            f"{name}: fn must be a function of one argument, the images x, returning logits "
            f"(B, K); it takes {len(required)} ({', '.join(required)}). For a function of "
            f"(variables, x), {use}."
        )


def _is_finite(x: jax.Array) -> jax.Array:
    return jnp.isfinite(x).all()


_is_finite_jit = jax.jit(_is_finite)


def check_images(x: ArrayLike, name: str, arg: str = "x") -> jax.Array | np.ndarray:
    """Checks that ``x`` is a finite float NHWC batch (B, H, W, C); returns it as an array.

    The NaN / inf check runs once here, on concrete values (one reduction and one
    scalar sync for a device array); a tracer (a call inside the caller's own ``jit``
    or ``vmap``) gets the shape and dtype checks only.
    """
    if isinstance(x, list | tuple):
        x = np.asarray(x)
    if not hasattr(x, "dtype") or not hasattr(x, "ndim"):
        raise TypeError(
            f"{name}: {arg} must be an array of images (B, H, W, C), got {type(x).__name__}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name}: {arg} must be floating-point images (B, H, W, C), got dtype {x.dtype}; "
            "convert uint8 images with x.astype(np.float32) / 255 (or jbnn.data's pipeline)."
        )
    if x.ndim != 4:
        raise ValueError(
            f"{name}: {arg} must be a rank-4 batch of NHWC images (B, H, W, C), got shape "
            f"{tuple(x.shape)}; add a batch axis with x[None] for a single image."
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: {arg} is an empty batch (shape {tuple(x.shape)}).")
    check_finite(x, name, arg, "saliency maps of non-finite inputs are meaningless")
    return x


def check_finite(x: jax.Array | np.ndarray, name: str, arg: str, why: str) -> None:
    """Raises a ValueError naming the batch examples if concrete ``x`` holds NaN or inf.

    One reduction and one scalar sync for a device array; a tracer (a call inside the
    caller's own ``jit`` or ``vmap``) is not checked: its values are not known here.
    """
    if isinstance(x, jax.core.Tracer):
        return
    finite = np.isfinite(x).all() if isinstance(x, np.ndarray) else bool(_is_finite_jit(x))
    if not finite:
        xn = np.asarray(x)
        bad = sorted({int(i) for i in np.nonzero(~np.isfinite(xn))[0]})
        raise ValueError(
            f"{name}: {arg} contains NaN or inf values (in batch example(s) {bad[:10]}); {why}."
        )


def _call(fn: Partial, x: jax.Array) -> jax.Array:
    return fn(x)


_call_jit = jax.jit(_call)


#: Each ``fn``'s logits shape per image shape and dtype, for as long as ``fn`` lives.
#: A Partial's function and arguments cannot be replaced, so the shapes cannot change;
#: the shape-only trace cost ~1 ms per call for a ResNet-18's frozen ``fn`` (2,000
#: leaves to abstract), about 2% of its Gradient at 112 px on 2 CPU cores.
_LOGITS_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def logits_shape(fn: Partial, x: ArrayLike, name: str) -> tuple[int, int]:
    """Shape (B, K) of ``fn(x)``, from an abstract evaluation (nothing computed), kept
    for later calls with the same ``fn`` object and images of the same shape and dtype.

    Flax's errors about the variables ``fn`` holds become ValueErrors that say whether
    the variables are another model's or made for other images (:func:`variables_fit`).
    """
    key = (tuple(x.shape), jnp.dtype(x.dtype))
    try:
        known = _LOGITS_SHAPES.setdefault(fn, {})
    except TypeError:  # not weakly referable
        known = {}
    if key not in known:
        known[key] = _logits_shape(fn, x, name)
    return known[key]


def _logits_shape(fn: Partial, x: ArrayLike, name: str) -> tuple[int, int]:
    with variables_fit(x.shape, name):
        out = _call_jit.eval_shape(fn, x)
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != x.shape[0]:
        got = jax.tree_util.tree_map(lambda a: tuple(a.shape), out)
        raise ValueError(
            f"{name}: fn(x) must return logits of shape (B, K) = ({x.shape[0]}, K) for x of "
            f"shape {tuple(x.shape)}, got {got}."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{name}: fn(x) must return floating-point logits, got {out.dtype}.")
    return tuple(shape)


def check_target(target, batch: int, num_classes: int, name: str) -> jax.Array | None:
    """None, an int (same class for every example) or an int array (B,) in [0, K)."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise TypeError(f"{name}: target must be an int or an int array (B,), got {target!r}.")
    if isinstance(target, jax.core.Tracer):  # inside the caller's jit: shape and dtype only
        if not jnp.issubdtype(target.dtype, jnp.integer) or target.shape not in ((), (batch,)):
            raise TypeError(
                f"{name}: target must be integer class indices of shape ({batch},), got "
                f"{target.dtype}{list(target.shape)}."
            )
        return jnp.broadcast_to(target.astype(jnp.int32), (batch,))
    arr = np.asarray(target)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"{name}: target must hold integer class indices, got dtype {arr.dtype} ({target!r})."
        )
    if arr.ndim == 0:
        arr = np.full((batch,), int(arr), dtype=np.int32)
    if arr.shape != (batch,):
        raise ValueError(
            f"{name}: target must have shape (B,) = ({batch},) (one class per example), "
            f"got shape {arr.shape}."
        )
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        raise ValueError(
            f"{name}: target must be in [0, {num_classes}) for a model with {num_classes} "
            f"logits, got {arr[bad].tolist()[:10]} at example(s) "
            f"{np.nonzero(bad)[0].tolist()[:10]}."
        )
    return jnp.asarray(arr, dtype=jnp.int32)


def check_positive_int(value, arg: str, name: str) -> int:
    """``value`` as a positive int, or a ValueError naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}.")
    return int(value)


def check_choice(value, choices: Sequence[str], arg: str, name: str) -> str:
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name}: unknown {arg} {value!r}; expected one of {', '.join(choices)}.")
    return value


def typed_key(key, name: str) -> jax.Array:
    """``key`` as a typed PRNG key array (raw ``PRNGKey`` uint32 data is wrapped)."""
    if key is None:
        raise ValueError(
            f"{name}: key is required (a jax.random.key); noise is never drawn from a global RNG."
        )
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32 or key.ndim == 0 or key.shape[-1] != 2:
            raise TypeError(
                f"{name}: key must be a jax.random.key (or a raw jax.random.PRNGKey), got "
                f"dtype {key.dtype} with shape {tuple(key.shape)}."
            )
        key = jax.random.wrap_key_data(key)
    return key


def per_example_keys(key, batch: int, name: str) -> jax.Array:
    """One typed PRNG key per example: ``fold_in(key, i)``, or ``key`` itself if (B,)."""
    key = typed_key(key, name)
    if key.shape == ():
        return _fold_keys(key, batch)
    if key.shape != (batch,):
        raise ValueError(
            f"{name}: key must be a single key or one key per example, shape ({batch},); got "
            f"key shape {tuple(key.shape)}."
        )
    return key


@functools.partial(jax.jit, static_argnums=1)
def _fold_keys(key: jax.Array, batch: int) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


@functools.lru_cache(maxsize=128)
def _layer_paths(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
    from jbnn.models import layer_paths

    return layer_paths(model, input_shape)


def check_layer(model: nn.Module, x_shape: tuple[int, ...], layer: str, name: str) -> tuple:
    """The module path of ``layer`` (a '/'-separated string) and its output shape.

    Raises a ValueError listing every valid path when ``layer`` is not one, and when
    the layer's output is not a (B, h, w, C) feature map.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: model must be a Flax Linen module, got {type(model).__name__}.")
    if not isinstance(layer, str) or not layer:
        raise TypeError(
            f"{name}: layer must be a module path such as 'block6' or 'stage4/block1', "
            f"got {layer!r}."
        )
    try:
        hash(model)
    except TypeError as e:
        raise TypeError(
            f"{name}: model must be hashable (it is a static argument of the jitted "
            f"computation); use tuples rather than lists in its fields ({e})."
        ) from None
    paths = _layer_paths(model, tuple(int(d) for d in x_shape))
    if layer not in paths:
        listing = ", ".join(f"{p} {s}" for p, s in paths.items())
        raise ValueError(
            f"{name}: unknown layer {layer!r}; valid layer paths (output shapes) for input "
            f"shape {tuple(x_shape)}: {listing}"
        )
    shape = paths[layer]
    if not (len(shape) == 4 and all(isinstance(d, int) for d in shape)):
        convs = [p for p, s in paths.items() if len(s) == 4 and all(isinstance(d, int) for d in s)]
        raise ValueError(
            f"{name}: layer {layer!r} outputs {shape}; GradCAM needs a (B, h, w, C) feature "
            f"map. Layers with one: {', '.join(convs) or 'none'}."
        )
    return tuple(layer.split("/")), shape
