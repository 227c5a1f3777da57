"""Inference BatchNorm folded into the convolution before it, for fast explanations.

In inference mode a BatchNorm is a per-channel affine map, ``y = x * s + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. When it reads a
convolution's output directly, ``BN(conv(x, k))`` equals ``conv(x, k * s) + t`` (the
kernel scaled per output channel, after its quantizer: a binary kernel keeps its signs),
so the BatchNorm's own passes over the activations, forward and backward, disappear.
The function is the same up to float rounding; the input gradient too. On an H100 this
made a twin Bi-Real Net 18's bfloat16 SmoothGrad 1.11x faster (444 -> 493 img/s, 224 px,
batch 16, 50 samples; float32 286 -> 305 img/s; `benchmarks/saliency_gpu.py --ab fold-bn`).
On CPU it is no faster: on this project's 2-core VM (112 px, batch 4) SmoothGrad ran
1.01-1.02x and the twin's Gradient 0.79x (the scaled kernels are recomputed per call and
outweigh the BatchNorm passes there). With ``apply_fn(..., input_like=x)``
(:mod:`jbnn.models.frozen`) they are computed once: a twin XNOR-Net's folded Gradient at
224 px then ran 2.21x faster than folded per call, about as fast as unfolded (88 against
84 ms, two runs of ``benchmarks/frozen_ab.py``). Leave it off on CPU.

Which BatchNorm follows which convolution is found by tracing the model (shapes only)
under ``flax.linen.intercept_methods``: a BatchNorm in inference mode whose input is the
very array a :class:`~jbnn.layers.QuantConv` returned, and whose feature axis is the
last, is a candidate; a second trace keeps the candidates whose convolution's output
nothing else reads (DenseNet's stem output is also concatenated: not folded). Every other
BatchNorm (after a pooling, an activation or a sum) runs as it is, as do subclasses of
``QuantConv`` or ``nn.BatchNorm`` (which may compute anything); ``tests/test_fold.py``
checks every jbnn model against its unfolded self. Module interceptors of the caller
still see every module call, but a folded convolution returns its BatchNorm's output,
and the BatchNorm returns its input: capture a BatchNorm's output, not its
convolution's, from a folded model (GradCAM's layers are stages and blocks, whose outputs
do not change). A function folded per call (``apply_fn(..., fold_batchnorm=True)``
without ``input_like``) finds its folds by tracing the model inside each call, so a
caller's interceptor also sees the module calls of those shape-only traces
(``jbnn._tracing.in_analysis()`` is True during them; jbnn's own interceptors skip
them); with ``input_like`` the folds are found once, outside the call.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbnn import layers
from jbnn._tracing import analysis, inputs_read

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Fold:
    bn_path: Path
    epsilon: float
    use_scale: bool
    use_bias: bool
    out_dtype: Any
    conv_out: jax.ShapeDtypeStruct  # the convolution's output


def _find_folds(model: nn.Module, variables, x: jax.Array) -> dict[Path, _Fold]:
    """Convolution path -> the inference BatchNorm that reads its output directly.

    The traces are marked as jbnn's analysis (:func:`jbnn._tracing.analysis`): an
    explainer tracing the folded function does not rewrite module calls in them.
    """
    with analysis():
        return _find_folds_traced(model, variables, x)


def _find_folds_traced(model, variables, x) -> dict[Path, _Fold]:
    outputs: dict[int, tuple[Path, jax.Array]] = {}  # id(conv output) -> (path, output)
    folds: dict[Path, _Fold] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        # Exact types only: a subclass may compute anything around (or instead of) the
        # base class's call, which the fold would skip.
        if type(module) is layers.QuantConv:
            outputs[id(out)] = (module.scope.path, out)  # the array kept: ids stay unique
        elif (
            type(module) is nn.BatchNorm
            and module.use_running_average is True
            and module.axis in (-1, out.ndim - 1)
            and module.axis_name is None
            and args
            and id(args[0]) in outputs
            and outputs[id(args[0])][1] is args[0]
        ):
            conv_path, conv_out = outputs.pop(id(args[0]))  # one BatchNorm per convolution
            folds[conv_path] = _Fold(
                module.scope.path,
                module.epsilon,
                module.use_scale,
                module.use_bias,
                out.dtype,
                jax.ShapeDtypeStruct(conv_out.shape, conv_out.dtype),
            )
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    if not folds:
        return folds
    return {path: folds[path] for path in _read_only_by_their_batchnorm(model, variables, x, folds)}


def _read_only_by_their_batchnorm(model, variables, x, folds: dict[Path, _Fold]) -> list[Path]:
    """The folds whose convolution's output nothing but its BatchNorm reads.

    Each candidate convolution's output gets ``+ delta`` (a traced input of its own)
    while its BatchNorm is handed the output without it; ``delta`` then reaches the
    model's output only through another reader. Which deltas the output depends on is
    read off the traced program (:func:`jbnn._tracing.inputs_read`).
    """
    paths = list(folds)
    bn_of = {folds[p].bn_path: p for p in paths}

    def traced(deltas, variables, x):
        clean: dict[int, jax.Array] = {}  # id(conv output + delta) -> conv output

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__":
                path = module.scope.path
                if isinstance(module, layers.QuantConv) and path in folds:
                    out = next_fun(*args, **kwargs)
                    tainted = out + deltas[paths.index(path)]
                    clean[id(tainted)] = (tainted, out)
                    return tainted
                if path in bn_of and args and id(args[0]) in clean:
                    tainted, out = clean[id(args[0])]
                    if tainted is args[0]:
                        return next_fun(out, *args[1:], **kwargs)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return model.apply(variables, x)

    deltas = [folds[p].conv_out for p in paths]  # abstract: nothing is allocated
    jaxpr = jax.make_jaxpr(traced)(deltas, variables, x).jaxpr
    read = inputs_read(jaxpr)[: len(paths)]
    return [p for p, r in zip(paths, read, strict=True) if not r]


def _lookup(tree, path: Path):
    for name in path:
        tree = tree[name]
    return tree


def _batchnorm_affine(fold: _Fold, variables) -> tuple[jax.Array, jax.Array]:
    """The folded BatchNorm's ``(s, t)``: in inference mode it computes ``x * s + t``."""
    stats = _lookup(variables["batch_stats"], fold.bn_path)
    bn = _lookup(variables["params"], fold.bn_path) if (fold.use_scale or fold.use_bias) else {}
    # In the statistics' precision, at least float32 (float64 stats folded in float32
    # were off by 6e-8, enough to flip a binarized activation near zero).
    dtype = jnp.promote_types(stats["var"].dtype, jnp.float32)
    mean = stats["mean"].astype(dtype)
    scale = jax.lax.rsqrt(stats["var"].astype(dtype) + fold.epsilon)
    if fold.use_scale:
        scale = scale * bn["scale"]
    shift = -mean * scale
    if fold.use_bias:
        shift = shift + bn["bias"]
    return scale, shift


def _folding_interceptor(folds: dict[Path, _Fold], variables) -> Callable:
    bn_paths = {fold.bn_path for fold in folds.values()}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__":
            path = module.scope.path
            if isinstance(module, layers.QuantConv) and path in folds:
                fold = folds[path]
                scale, shift = _batchnorm_affine(fold, variables)
                params = module.variables["params"]
                (x,) = args
                y = module.forward(x, params["kernel"], params.get("bias"), out_scale=scale)
                return (y + shift.astype(y.dtype)).astype(fold.out_dtype)
            if isinstance(module, nn.BatchNorm) and path in bn_paths:
                return args[0]  # folded into the convolution that produced its input
        return next_fun(*args, **kwargs)

    return interceptor


@functools.lru_cache(maxsize=256)
def folded_apply(model: nn.Module) -> Callable:
    """``(variables, x) -> model.apply(variables, x)`` with inference BatchNorms folded.

    Cached per model (jitted callers see one function). The folds are found when the
    function is traced, from ``x``'s shape.
    """

    def apply(variables, x):
        folds = _find_folds(model, variables, x)
        with nn.intercept_methods(_folding_interceptor(folds, variables)):
            return model.apply(variables, x)

    return apply


def batchnorm_folds(model: nn.Module, variables, x: jax.Array) -> dict[str, str]:
    """Which BatchNorm :func:`folded_apply` folds into which convolution.

    Args:
      model: a Flax model whose inference pass is ``model.apply(variables, x)``.
      variables: its variables.
      x: an input batch (only its shape and dtype are used).

    Returns:
      ``{"conv/path": "bn/path"}`` for every fold, in call order.
    """
    folds = _find_folds(model, variables, x)
    return {"/".join(conv): "/".join(fold.bn_path) for conv, fold in folds.items()}
