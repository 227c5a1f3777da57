"""A model's affine input layer, split off so that gradient sums are pulled back once.

When ``fn(x) = head(A x + c)`` for an affine ``A`` (a convolution or dense layer with
no input quantizer that alone reads the input), the input gradient at any point is
``A^T`` of the gradient at the layer's output, and a weighted sum of input gradients
(SmoothGrad's mean, Integrated Gradients' quadrature) is ``A^T`` of the same sum taken
at the layer's output. The layer's input gradient then runs once per example instead
of once per noisy copy or path point: the same map up to float rounding, and the
forward pass is unchanged. The first convolution of an image model is the costliest
input gradient there is (few input channels, full resolution).

The layer is found by tracing ``fn`` (shapes only) under ``flax.linen.intercept_methods``:
the one module call whose first argument is the very input array, whose module is a
:class:`~jbnn.layers.QuantConv` or :class:`~jbnn.layers.QuantDense` without input
quantizer or a plain ``flax.linen.Conv`` / ``Dense`` (exact types: a subclass may
compute anything; and with Flax's own arithmetic: one given a custom
``conv_general_dilated``, ``dot_general`` or ``promote_dtype``, or their ``_cls``
fields, may too), and whose module is called once. A second trace, with that call's
output replaced by an input of its own, checks that nothing else reads ``x`` (the
program's output must not depend on it). Any other model (input preprocessed inside
it, two layers reading the input, an input quantizer) is explained the plain way.
Module calls in the traces jbnn makes to analyse a model (:func:`jbnn._tracing.analysis`,
e.g. to fold BatchNorms) are left alone, so a folded model splits too: its input
layer's output is then the folded convolution's, i.e. its BatchNorm's.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import flax.linen as nn
import jax

from jbnn import layers
from jbnn._tracing import in_analysis, inputs_read

Path = tuple[str, ...]

_FLAX_LINEAR = (nn.Conv, nn.Dense)
_JBNN_LINEAR = (layers.QuantConv, layers.QuantDense)


# Fields of nn.Conv / nn.Dense that replace the layer's own arithmetic: a custom
# convolution, dot product or input cast (e.g. an int8 quantized one) may compute any
# function of the input, not the affine map the split relies on.
_FLAX_HOOKS = (
    "conv_general_dilated",
    "conv_general_dilated_cls",
    "dot_general",
    "dot_general_cls",
    "promote_dtype",
)


def _affine_in_input(module: nn.Module) -> bool:
    if type(module) in _JBNN_LINEAR:
        return module.input_quantizer is None
    if type(module) not in _FLAX_LINEAR:
        return False
    fields = type(module).__dataclass_fields__
    return all(
        getattr(module, hook) is fields[hook].default for hook in _FLAX_HOOKS if hook in fields
    )


def _is_call(context, path: Path) -> bool:
    """Whether this is the call of the layer at ``path`` in the traced function itself
    (not in a trace that jbnn makes to analyse the model, e.g. to fold BatchNorms)."""
    return (
        context.method_name == "__call__"
        and context.module.scope.path == path
        and not in_analysis()
    )


def _replacing(path: Path, z: jax.Array) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        if _is_call(context, path):
            return z
        return next_fun(*args, **kwargs)

    return interceptor


def head(fn: Callable, path: Path, x: jax.Array, z: jax.Array) -> jax.Array:
    """``fn(x)`` with the output of the layer at ``path`` replaced by ``z``."""
    with nn.intercept_methods(_replacing(path, z)):
        return fn(x)


class _Stop(BaseException):  # noqa: N818 (control flow, not an error)
    """Carries the layer's output out of ``fn``; a BaseException, so that an
    ``except Exception`` inside ``fn`` does not swallow it."""

    def __init__(self, out):
        super().__init__()
        self.out = out


def stem(fn: Callable, path: Path, x: jax.Array) -> jax.Array:
    """The output of the layer at ``path`` in ``fn(x)``; the rest of ``fn`` is not run."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if _is_call(context, path):
            raise _Stop(out)
        return out

    try:
        with nn.intercept_methods(interceptor):
            fn(x)
    except _Stop as stop:
        return stop.out
    raise RuntimeError(f"the input layer {'/'.join(path)} was not called")  # pragma: no cover


def find(fn: Callable, x: jax.Array) -> Path | None:
    """The path of ``fn``'s affine input layer for inputs like ``x``, or None.

    Only shapes are traced. See the module's docstring for what qualifies.
    """
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    calls: collections.Counter[Path] = collections.Counter()
    found: list[tuple[Path, jax.ShapeDtypeStruct]] = []

    def traced(fn, x):
        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if (
                context.method_name == "__call__"
                and context.module.scope is not None
                and not in_analysis()
            ):
                path = context.module.scope.path
                calls[path] += 1
                if (
                    len(args) == 1
                    and not kwargs
                    and args[0] is x
                    and _affine_in_input(context.module)
                    and isinstance(out, jax.Array)
                ):
                    found.append((path, jax.ShapeDtypeStruct(out.shape, out.dtype)))
            return out

        with nn.intercept_methods(interceptor):
            return fn(x)

    jax.eval_shape(traced, fn, spec)
    if len(found) != 1 or calls[found[0][0]] != 1:
        return None
    path, out = found[0]
    jaxpr = jax.make_jaxpr(lambda x, z, fn: head(fn, path, x, z))(spec, out, fn).jaxpr
    x_read = inputs_read(jaxpr)[0]
    return None if x_read else path
