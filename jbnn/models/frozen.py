"""An inference function whose quantized kernels are computed once, not at every call.

A :class:`~jbnn.layers.QuantConv` or :class:`~jbnn.layers.QuantDense` quantizes its
latent kernel on use: ``q(clip(w))``, XNOR-Net's alpha, a folded BatchNorm's scale
(:mod:`jbnn.models.fold`). None of it depends on the input, yet a jitted explainer
recomputes it at every call, and inside SmoothGrad's loop too unless XLA hoists it.
For an XNOR-Net at 224 px, whose ``fc6``/``fc7`` hold 55M weights, that pass over the
kernels cost more than the network itself: a BNN's Gradient took 3x its twin's time on
a 2-core CPU (``benchmarks/frozen_ab.py``). Folding BatchNorms did not pay on CPUs
for the same reason: the scaled kernels were recomputed per call.

:func:`freeze` runs every quantized layer's :meth:`quantized_kernel` once, in one jitted
program (the model's forward pass is traced but not computed: XLA drops it), and
returns the variables with each such layer's latent kernel and bias replaced by what
its :meth:`forward_quantized` takes. :func:`program`'s ``apply`` runs the model with
an interceptor that hands each of those layers its frozen arrays. The values are the
same ops on the same numbers, so the function is the model's up to float rounding
(bit for bit for sign kernels, whose quantizers are elementwise; a kernel with a
reduced scale, XNOR-Net's or Bi-Real Net's, to float rounding); with
BatchNorms folded, the folded function's.

What it is for: explaining (input gradients). The frozen variables are arrays of the
quantized kernels, so a gradient with respect to them is not one with respect to the
latent weights: train with ``model.apply``. The function is built for inputs of one
shape (but any batch size) and dtype, ``input_like``'s, and says so when called with
others. Only layers of the exact types ``QuantConv`` / ``QuantDense`` are frozen (a
subclass may compute anything): others, and their folds, run as they are.

Module interceptors of the caller still see every module call, with the same inputs and
outputs (with folds: as :mod:`jbnn.models.fold` says).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbnn import layers
from jbnn._tracing import analysis
from jbnn.models import fold

Path = tuple[str, ...]

_FROZEN_TYPES = (layers.QuantConv, layers.QuantDense)


def _is_frozen_type(module: nn.Module) -> bool:
    return type(module) in _FROZEN_TYPES


def _key(path: Path) -> str:
    return "/".join(path)


def _input_spec(input_like: Any) -> tuple[tuple[int, ...], jnp.dtype]:
    try:
        shape = tuple(int(d) for d in input_like.shape)
        dtype = jax.dtypes.canonicalize_dtype(input_like.dtype)
    except (AttributeError, TypeError) as error:
        raise TypeError(
            "input_like must be an array or jax.ShapeDtypeStruct of the inputs' shape and "
            f"dtype, got {type(input_like).__name__}."
        ) from error
    if len(shape) < 2:
        raise ValueError(f"input_like must be a batch (B, ...), got shape {shape}.")
    return shape, dtype


def _signature(variables) -> tuple:
    leaves, treedef = jax.tree.flatten(variables)
    return treedef, tuple((tuple(jnp.shape(v)), jnp.result_type(v)) for v in leaves)


def _without(tree: Mapping, path: Path, names: tuple[str, ...]) -> dict:
    """``tree`` (nested mappings) with the entries ``names`` of ``tree[path]`` removed."""
    out = dict(tree)
    if not path:
        for name in names:
            out.pop(name, None)
        return out
    out[path[0]] = _without(tree[path[0]], path[1:], names)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """The frozen form of one model, for one variables structure and input shape.

    ``freeze(variables)`` gives the frozen variables, ``apply(frozen, x)`` the logits;
    both are the same objects for the same model, shapes and dtypes, so that jitted
    code taking ``jax.tree_util.Partial(apply, frozen)`` does not recompile.
    """

    model: nn.Module
    input_shape: tuple[int, ...]
    input_dtype: Any
    layers: tuple[Path, ...]  # the frozen layers, in call order
    folds: Mapping[Path, fold._Fold]  # every fold (frozen layers' and others')
    freeze: Callable = dataclasses.field(repr=False)
    apply: Callable = dataclasses.field(repr=False)


@functools.lru_cache(maxsize=64)
def _program(model: nn.Module, fold_batchnorm: bool, input_spec, signature) -> Program:
    treedef, specs = signature
    variables = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in specs])
    x = jax.ShapeDtypeStruct(*input_spec)
    folds = fold._find_folds(model, variables, x) if fold_batchnorm else {}
    paths: list[Path] = []

    def find(next_fun, args, kwargs, context):
        module = context.module
        if (
            context.method_name == "__call__"
            and _is_frozen_type(module)
            and len(args) == 1
            and not kwargs
            and module.scope.path not in paths
        ):
            paths.append(module.scope.path)
        return next_fun(*args, **kwargs)

    with analysis(), nn.intercept_methods(find):
        jax.eval_shape(model.apply, variables, x)
    frozen_paths = tuple(paths)
    frozen_folds = {p: f for p, f in folds.items() if p in frozen_paths}
    other_folds = {p: f for p, f in folds.items() if p not in frozen_paths}
    frozen_bns = {f.bn_path for f in frozen_folds.values()}

    def freeze(variables):
        entries: dict[str, dict[str, jax.Array]] = {}

        def collect(next_fun, args, kwargs, context):
            module = context.module
            path = module.scope.path if module.scope is not None else None
            if context.method_name == "__call__" and path in frozen_paths:
                key = _key(path)
                if key not in entries:
                    params = module.variables["params"]
                    scale = shift = None
                    if path in frozen_folds:
                        scale, shift = fold._batchnorm_affine(frozen_folds[path], variables)
                    kernel, alpha, bias = module.quantized_kernel(
                        params["kernel"],
                        params.get("bias"),
                        *(() if scale is None else (scale,)),
                    )
                    entry = {"kernel": kernel}
                    if alpha is not None:
                        entry["scale"] = alpha
                    if bias is not None:
                        entry["bias"] = bias
                    if shift is not None:
                        entry["shift"] = shift
                    entries[key] = entry
            return next_fun(*args, **kwargs)

        with analysis(), nn.intercept_methods(collect):
            # traced for the layers' calls only: XLA drops the unused forward pass
            model.apply(variables, jnp.zeros((1, *x.shape[1:]), x.dtype))
        rest = variables
        for path in frozen_paths:
            rest = {**rest, "params": _without(rest["params"], path, ("kernel", "bias"))}
        return {"variables": rest, "layers": entries}

    freeze_jit = jax.jit(freeze)

    def apply(frozen, x):
        dtype = jax.dtypes.canonicalize_dtype(x.dtype)
        if tuple(x.shape[1:]) != input_spec[0][1:] or dtype != input_spec[1]:
            built = ", ".join(map(str, input_spec[0][1:]))
            raise ValueError(
                f"this inference function was built for inputs (B, {built}) of dtype "
                f"{input_spec[1]} (input_like), got shape {tuple(x.shape)} of dtype {x.dtype}; "
                "build one for these: jbnn.models.apply_fn(model, variables, input_like=x)."
            )
        entries = frozen["layers"]
        variables = frozen["variables"]

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__" and module.scope is not None:
                path = module.scope.path
                entry = entries.get(_key(path)) if path in frozen_paths else None
                if entry is not None and len(args) == 1 and not kwargs:
                    y = module.forward_quantized(
                        args[0], entry["kernel"], entry.get("scale"), entry.get("bias")
                    )
                    if path in frozen_folds:  # the BatchNorm's shift, in its output dtype
                        y = y + entry["shift"].astype(y.dtype)
                        y = y.astype(frozen_folds[path].out_dtype)
                    return y
                if path in frozen_bns:
                    return args[0]  # folded into the convolution that produced its input
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            if other_folds:
                with nn.intercept_methods(fold._folding_interceptor(other_folds, variables)):
                    return model.apply(variables, x)
            return model.apply(variables, x)

    return Program(model, input_spec[0], input_spec[1], frozen_paths, folds, freeze_jit, apply)


def program(model: nn.Module, variables, input_like: Any, fold_batchnorm: bool = False) -> Program:
    """The frozen form of ``model`` for variables like ``variables`` and inputs like
    ``input_like`` (cached: the same object for the same shapes and dtypes)."""
    return _program(model, bool(fold_batchnorm), _input_spec(input_like), _signature(variables))


def frozen_layers(model: nn.Module, variables, input_like: Any) -> list[str]:
    """The paths of the layers whose kernels :func:`freeze` computes once, in call order."""
    return [_key(p) for p in program(model, variables, input_like).layers]


def freeze(model: nn.Module, variables, input_like: Any, fold_batchnorm: bool = False):
    """``(apply, frozen)``: ``apply(frozen, x)`` is ``model.apply(variables, x)`` in
    inference mode (with BatchNorms folded if asked), with every quantized kernel computed
    now, once. See the module's docstring."""
    p = program(model, variables, input_like, fold_batchnorm)
    return p.apply, p.freeze(variables)
