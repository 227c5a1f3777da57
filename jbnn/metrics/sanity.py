"""Sanity checks for saliency methods: model parameter randomisation, random logit.

Adebayo et al. (Sanity Checks for Saliency Maps, 2018): if a saliency map stays the same
when the model's weights are replaced by random ones, it does not explain the model.
:func:`mprt` re-initialises the layers of any Flax Linen model from the logits down,
cumulatively (cascading), and measures how similar each stage's maps remain to the
original ones. :func:`random_logit_test` (Sixt et al. 2020, Quantus's ``RandomLogit``)
compares the map of the target class with the map of a random other class.

``explain(model, variables, x, target) -> maps (B, H, W)`` is any saliency method; it is
called once per stage with new variables of the same shapes (a method jitted over
``jbnn.models.apply_fn(model, variables)`` does not recompile).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jbnn.metrics import _checks
from jbnn.metrics.similarity import spearman, ssim

Explain = Callable[[nn.Module, Mapping, jax.Array, jax.Array], jax.Array]
Similarity = Callable[[jax.Array, jax.Array], jax.Array]


def default_similarities() -> dict[str, Similarity]:
    """The measures :func:`mprt` uses by default.

    Returns:
      ``{"spearman_abs", "spearman", "ssim"}`` -> functions (B, H, W) x (B, H, W) -> (B,):
      Spearman on |maps| and on signed maps, SSIM on maps min-max scaled to [0, 1]
      (which needs maps of at least 11 x 11; pass ``similarity=`` for smaller ones).
    """
    return {
        "spearman_abs": functools.partial(spearman, absolute=True),
        "spearman": spearman,
        "ssim": ssim,
    }


def _module_paths_with_params(params: Mapping, prefix: tuple[str, ...] = ()) -> list[str]:
    """'/'-joined paths of the dicts in ``params`` that hold arrays directly (layers)."""
    out = []
    if any(not isinstance(v, Mapping) for v in params.values()):
        out.append("/".join(prefix))
    for name, value in params.items():
        if isinstance(value, Mapping):
            out.extend(_module_paths_with_params(value, (*prefix, name)))
    return out


def _hashable(model: nn.Module) -> bool:
    try:
        hash(model)
    except TypeError:
        return False
    return True


def _call_order(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, ...]:
    """The module paths in call order (:func:`jbnn.models.layer_paths`), cached per model."""
    from jbnn.models import layer_paths

    if not _hashable(model):  # e.g. a list attribute: cannot be cached, traced every time
        return tuple(layer_paths(model, input_shape))
    return _cached_call_order(model, input_shape)


@functools.lru_cache(maxsize=64)
def _cached_call_order(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, ...]:
    from jbnn.models import layer_paths

    return tuple(layer_paths(model, input_shape))


@functools.partial(jax.jit, static_argnames=("model",))
def _jitted_init(model: nn.Module, key: jax.Array, x: jax.Array) -> dict:
    """``model.init(key, x)``, compiled once per (model, shapes) and reused by :func:`mprt`."""
    return model.init(key, x)


def _fresh_variables(model: nn.Module, key: jax.Array, x: jax.Array) -> dict:
    """Variables drawn by the model's own initialisers: ``jax.jit(model.init)(key, x)``."""
    if not _hashable(model):  # cannot be a static argument: compiled anew every time
        return jax.jit(model.init)(key, x)
    return _jitted_init(model, key, x)


def parameter_layers(model: nn.Module, variables: Mapping, input_shape: Sequence[int]) -> list[str]:
    """The param-holding module paths of ``model``, logits side first.

    The paths (as :func:`jbnn.models.layer_paths` spells them) of every submodule that
    owns arrays in ``variables["params"]`` itself, ordered against the order in which the
    forward pass calls them, reversed (so the last layer called comes first). Modules the
    forward pass does not reach through ``__call__`` keep the order of the parameter tree
    and come last.

    Args:
      model: a Flax Linen module.
      variables: its variables (arrays or ``jax.ShapeDtypeStruct`` leaves).
      input_shape: an input batch shape, e.g. (1, 32, 32, 3).

    Returns:
      The paths, e.g. ``["head_bn", "head", ..., "block1/conv"]`` for BinaryNet.
    """
    if "params" not in variables:
        raise ValueError(f"variables have no 'params' collection (got {list(variables)})")
    owners = _module_paths_with_params(variables["params"])
    calls = _call_order(model, tuple(int(d) for d in input_shape))
    position = {path: i for i, path in enumerate(calls)}
    called = sorted((p for p in owners if p in position), key=position.__getitem__)
    return list(reversed(called)) + [p for p in owners if p not in position]


def _subtree(tree: Mapping, keys: Sequence[str]):
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _replaced(tree: Mapping, keys: Sequence[str], value) -> dict:
    """A copy of nested dict ``tree`` with ``tree[k0][k1]...`` set to ``value``."""
    out = dict(tree)
    if len(keys) == 1:
        out[keys[0]] = value
    else:
        out[keys[0]] = _replaced(tree[keys[0]], keys[1:], value)
    return out


def _stage(paths) -> tuple[str, ...]:
    """A stage of several paths as a tuple of str; a clear error for anything else."""
    stage = tuple(paths) if isinstance(paths, Sequence) else None
    if not stage or not all(isinstance(p, str) for p in stage):
        raise ValueError(
            "each entry of layers must be a '/'-separated module path or a non-empty tuple "
            f"of them (one stage), got {paths!r}"
        )
    return stage


def _randomised(variables: Mapping, fresh: Mapping, path: str, collections) -> dict:
    keys = tuple(k for k in path.split("/") if k)
    out = dict(variables)
    for col in collections:
        if col not in variables or col not in fresh:
            continue
        new = _subtree(fresh[col], keys) if keys else fresh[col]
        if new is None or (keys and _subtree(variables[col], keys) is None):
            continue
        out[col] = _replaced(variables[col], keys, new) if keys else new
    return out


def _check_maps_like(name: str, m, x: jax.Array) -> jax.Array:
    m = _checks.maps(name, m)
    if tuple(m.shape) != tuple(x.shape[:3]):
        raise ValueError(
            f"explain must return maps (B, H, W) = {tuple(x.shape[:3])} for x of shape "
            f"{tuple(x.shape)}, but {name} has shape {tuple(m.shape)}"
        )
    return m


def mprt(
    model: nn.Module,
    variables: Mapping,
    x: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    explain: Explain,
    *,
    key: jax.Array,
    layers: Sequence[str | Sequence[str]] | None = None,
    similarity: Mapping[str, Similarity] | None = None,
    cascading: bool = True,
    collections: Sequence[str] | None = None,
) -> dict:
    """Model parameter randomisation test (Adebayo et al. 2018), cascading, top-down.

    One fresh set of variables is drawn with the model's own initialisers,
    ``jax.jit(model.init)(key, x[:1])`` (compiled once per model and input shape: a second
    call with the same model and shapes reuses the compiled code). Stage s (s = 0..S-1)
    replaces the variables of ``layers[0..s]`` (cascading) or of ``layers[s]`` alone
    (``cascading=False``) by the fresh ones, in every collection that holds that layer
    (``params``, and BatchNorm's ``batch_stats`` reset to mean 0 / variance 1, as PyTorch's
    ``reset_parameters``), and recomputes the maps. Each stage's maps are compared with the
    original maps by each similarity measure. For a method that depends on the model the
    similarity should fall as more layers are randomised.

    Args:
      model: a Flax Linen module, called as ``model.apply(variables, x)``.
      variables: its trained variables.
      x: images (B, H, W, C).
      target: classes (B,) to explain (kept the same at every stage).
      explain: ``(model, variables, x, target) -> maps (B, H, W)``.
      key: PRNG key for the re-initialisation.
      layers: the stages, in the order to randomise: each a module path ('/'-separated,
        as :func:`jbnn.models.layer_paths`; a path may name a whole block) or a tuple of
        paths randomised together in one stage (e.g. ``("dense1", "dense1_bn")``, a dense
        layer with the BatchNorm after it). Default: :func:`parameter_layers`, every
        param-holding module on its own, logits side first.
      similarity: name -> ``f(original, stage) -> (B,)``; default
        :func:`default_similarities`.
      cascading: randomise cumulatively (True) or one layer at a time (False).
      collections: variable collections to re-initialise (default: all of them).

    Returns:
      A dict with ``"layers"`` (the S stages, in order: a path, or a tuple of paths for a
      stage of several), ``"original"`` (B, H, W)
      maps, ``"maps"`` (S, B, H, W) maps per stage, and ``"similarity"``: name -> (S, B)
      float32 similarity of each stage's maps to the original.

    Raises:
      ValueError: a layer path not in ``variables["params"]``, maps of the wrong shape,
        non-finite maps, an empty ``layers`` or an empty stage.
    """
    x = _checks.images("x", x)
    target = _checks.targets(target, x.shape[0])
    if "params" not in variables:
        raise ValueError(f"variables have no 'params' collection (got {list(variables)})")
    variables = (
        flax.core.unfreeze(variables) if isinstance(variables, flax.core.FrozenDict) else variables
    )
    if layers is None:
        layers = parameter_layers(model, variables, x.shape)
    layers = tuple(stage if isinstance(stage, str) else _stage(stage) for stage in layers)
    if not layers:
        raise ValueError("layers is empty: name at least one module path to randomise")
    for stage in layers:
        for path in (stage,) if isinstance(stage, str) else stage:
            if _subtree(variables["params"], [k for k in path.split("/") if k]) is None:
                known = ", ".join(parameter_layers(model, variables, x.shape))
                raise ValueError(
                    f"Unknown layer {path!r}: not in variables['params']; known: {known}"
                )
    measures = dict(default_similarities() if similarity is None else similarity)
    if not measures:
        raise ValueError("similarity is empty: give at least one measure")
    collections = tuple(variables) if collections is None else tuple(collections)

    fresh = _fresh_variables(model, key, x[:1])  # compiled once per model and input shape
    original = _check_maps_like("the original maps", explain(model, variables, x, target), x)
    stage_maps = []
    current = variables
    for stage in layers:
        current = current if cascading else variables
        for path in (stage,) if isinstance(stage, str) else stage:
            current = _randomised(current, fresh, path, collections)
        m = explain(model, current, x, target)
        stage_maps.append(_check_maps_like(f"the maps with {stage!r} randomised", m, x))
    maps = jnp.stack(stage_maps)  # (S, B, H, W)
    scores = {
        name: jnp.stack([jnp.asarray(f(original, m), jnp.float32) for m in stage_maps])
        for name, f in measures.items()
    }
    return {"layers": layers, "original": original, "maps": maps, "similarity": scores}


def random_logit_test(
    model: nn.Module,
    variables: Mapping,
    x: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    explain: Explain,
    *,
    key: jax.Array,
    num_classes: int | None = None,
    similarity: Similarity = ssim,
) -> jax.Array:
    """Similarity between the map of the target class and that of a random other class.

    As Quantus's ``RandomLogit`` (Sixt et al. 2020): for each image a class is drawn
    uniformly among the ``num_classes - 1`` classes other than its target
    (``(target + randint(key, 1, K)) % K``) and both maps are compared with
    ``similarity`` (SSIM on min-max scaled maps by default). A class-sensitive method
    gives low similarity.

    Args:
      model: a Flax Linen module.
      variables: its variables.
      x: images (B, H, W, C).
      target: classes (B,).
      explain: ``(model, variables, x, target) -> maps (B, H, W)``.
      key: PRNG key for the random classes.
      num_classes: K; default: the model's number of logits.
      similarity: ``f(a, b) -> (B,)``.

    Returns:
      (B,) float32 similarities.

    Raises:
      ValueError: fewer than 2 classes, a target >= K, maps of the wrong shape.
    """
    x = _checks.images("x", x)
    target = _checks.targets(target, x.shape[0])
    if num_classes is None:
        out = jax.eval_shape(lambda v, xi: model.apply(v, xi), variables, x[:1])
        num_classes = int(out.shape[-1])
    num_classes = _checks.positive_int("num_classes", num_classes, minimum=2)
    if not _checks.is_traced(target) and int(jnp.max(target)) >= num_classes:
        raise ValueError(f"target holds class {int(jnp.max(target))} >= num_classes {num_classes}")
    shift = jax.random.randint(key, target.shape, 1, num_classes)
    other = (target + shift) % num_classes
    a = _check_maps_like("the target-class maps", explain(model, variables, x, target), x)
    b = _check_maps_like("the random-class maps", explain(model, variables, x, other), x)
    return jnp.asarray(similarity(a, b), jnp.float32)
