"""Model registry: BNNs after larq-zoo's designs, each with its full-precision twin.

``get(name, binary=..., num_classes=..., **kwargs)`` returns a Linen module;
``binary=False`` gives the twin, whose parameter tree is identical to the BNN's.
``twin(model)`` flips a model to its twin; ``with_surrogate(model, spec)`` gives the
same model with another backward surrogate for its input quantizers (same parameters,
bit-identical forward pass). ``layer_paths(model, input_shape)`` lists every submodule's
'/'-separated path with its output shape, e.g. for choosing a GradCAM layer.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbnn.models import fold, frozen
from jbnn.models.birealnet import BiRealNet18
from jbnn.models.common import ACTIVATIONS, check_images, variables_fit
from jbnn.models.densenet import BinaryDenseNet28
from jbnn.models.quicknet import QuickNetSmall
from jbnn.models.resnet_e import BinaryResNetE18
from jbnn.models.simple import MLP, BinaryNet
from jbnn.models.xnornet import XNORNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "binarynet": BinaryNet,
    "birealnet18": BiRealNet18,
    "binary_resnet_e18": BinaryResNetE18,
    "xnornet": XNORNet,
    "quicknet_small": QuickNetSmall,
    "binary_densenet28": BinaryDenseNet28,
}


def register(name: str, constructor: Callable[..., nn.Module]) -> None:
    """Adds a model constructor to the registry under ``name``."""
    _REGISTRY[name] = constructor


def names() -> tuple[str, ...]:
    """The registered model names."""
    return tuple(sorted(_REGISTRY))


def get(name: str, *, binary: bool, num_classes: int, **kwargs) -> nn.Module:
    """Builds a registered model.

    Args:
      name: a registered name (see :func:`names`).
      binary: True for the BNN, False for its full-precision twin.
      num_classes: number of logits.
      **kwargs: architecture fields (``width``, ``stem``, ``surrogate``, ``dtype``...).

    Returns:
      A Flax Linen module; ``model.apply(variables, x)`` gives logits (B, num_classes).

    Raises:
      ValueError: for an unknown name or field.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; registered models: {', '.join(names())}")
    if (
        not isinstance(num_classes, numbers.Integral)
        or isinstance(num_classes, bool | np.bool_)
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    num_classes = int(num_classes)
    # Lists (from code or JSON) as tuples: a module must be hashable, as apply_fn's
    # caches need it (hidden=[16, 16] failed there with "Failed to hash Flax Module").
    kwargs = {key: _as_tuples(value) for key, value in kwargs.items()}
    constructor = _REGISTRY[name]
    fields = getattr(constructor, "__dataclass_fields__", {})
    unknown = sorted(set(kwargs) - set(fields))
    if fields and unknown:
        known = sorted(f for f in fields if f not in ("parent", "name", "num_classes", "binary"))
        raise ValueError(f"Unknown field(s) {unknown} for model {name!r}; it takes {known}")
    if "fp_activation" in kwargs and kwargs["fp_activation"] not in ACTIVATIONS:
        raise ValueError(
            f"Unknown fp_activation {kwargs['fp_activation']!r}; known: {', '.join(ACTIVATIONS)}"
        )
    return constructor(num_classes=num_classes, binary=binary, **kwargs)


def _as_tuples(value):
    """``value`` with every list (nested too) turned into a tuple."""
    if isinstance(value, list) or type(value) is tuple:
        return tuple(_as_tuples(v) for v in value)
    return value


def twin(model: nn.Module, binary: bool = False) -> nn.Module:
    """The same architecture with ``binary`` set (False: the full-precision twin)."""
    return model.clone(binary=binary)


def with_surrogate(model: nn.Module, surrogate: str | None) -> nn.Module:
    """The same model whose input quantizers back-propagate through ``surrogate``.

    The forward pass and the parameters are unchanged; only gradients differ. Accepts
    the specs of :func:`jbnn.quantizers.surrogate_gradient` (``"ste_sign"``,
    ``"ste_sign(clip_value=2.0)"``, ``"approx_sign"``, ``"swish_sign"``, ``"identity"``),
    or None to restore each quantizer's own backward pass.
    """
    from jbnn.quantizers import surrogate_gradient

    if surrogate is not None:
        surrogate_gradient(surrogate)  # validate early, with a clear error
    return model.clone(surrogate=surrogate)


def layer_paths(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Every submodule's path ('/'-separated module names) and its output shape.

    Computed with ``jax.eval_shape`` (nothing is allocated) and
    ``nn.intercept_methods``; in call order. The top-level module itself is left out.

    Args:
      model: any Flax Linen module called as ``model(x)``.
      input_shape: the input batch shape, e.g. (1, 32, 32, 3).

    Returns:
      A dict path -> output shape (a tuple, or a tuple of shapes for tuple outputs).
    """
    paths: dict[str, tuple] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        record = context.method_name == "__call__" and bool(mod.path)
        key = "/".join(mod.path)
        if record:
            paths.setdefault(key, ())  # reserve the slot: call order, not return order
        out = next_fun(*args, **kwargs)
        if record and paths[key] == ():
            paths[key] = jax.tree_util.tree_map(lambda a: tuple(a.shape), out)
        return out

    def init(key):
        with nn.intercept_methods(interceptor):
            return model.init(key, jnp.zeros(tuple(input_shape), jnp.float32))

    jax.eval_shape(init, jax.random.key(0))
    return paths


@functools.lru_cache(maxsize=256)
def _eval_apply(model: nn.Module) -> Callable:
    def apply(variables, x):
        return model.apply(variables, x)

    return apply


def apply_fn(
    model: nn.Module, variables, fold_batchnorm: bool = False, input_like=None
) -> jax.tree_util.Partial:
    """``x -> model.apply(variables, x)`` in inference mode, as a pytree.

    The result is a ``jax.tree_util.Partial`` whose function is cached per model (and
    shapes), so that jitted code taking it as an argument (all of :mod:`jbnn.saliency`)
    does not recompile when called again with other variables of the same shapes.

    Args:
      model: the Flax model.
      variables: its variables (``params``, ``batch_stats``).
      fold_batchnorm: fold every BatchNorm that reads a convolution's output into that
        convolution (:mod:`jbnn.models.fold`): the same function up to float rounding.
        Without ``input_like`` the scaled kernels are recomputed at every call, which
        costs more than the BatchNorm passes on CPUs (a twin's Gradient 0.79x on a
        2-core VM); on an H100 a twin Bi-Real Net 18's bfloat16 SmoothGrad ran 1.11x.
        A binarized activation within rounding of zero can take the other sign, so a
        BNN's maps can differ for a few examples, as between two float precisions.
      input_like: an array (or ``jax.ShapeDtypeStruct``) of the inputs' shape and
        dtype, any batch size: every quantized kernel (and folded BatchNorm) is then
        computed now, once, instead of at every call (:mod:`jbnn.models.frozen`): for
        explaining. The function takes inputs of that shape and dtype only, and its
        pytree holds the quantized kernels in place of the latent ones (differentiate
        with respect to inputs, not to its leaves). None: the latent variables.

    Returns:
      The function, a pytree holding ``variables`` (or their frozen form).

    Raises:
      ValueError: ``input_like`` of an image size or channel count the variables were
        not made for.
    """
    if input_like is not None:
        with variables_fit(tuple(getattr(input_like, "shape", ())), "apply_fn(input_like=...)"):
            program = frozen.program(model, variables, input_like, fold_batchnorm)
        return jax.tree_util.Partial(program.apply, program.freeze(variables))
    apply = fold.folded_apply(model) if fold_batchnorm else _eval_apply(model)
    return jax.tree_util.Partial(apply, variables)


__all__ = [
    "MLP",
    "BiRealNet18",
    "BinaryDenseNet28",
    "BinaryNet",
    "BinaryResNetE18",
    "QuickNetSmall",
    "XNORNet",
    "apply_fn",
    "check_images",
    "get",
    "layer_paths",
    "names",
    "register",
    "twin",
    "with_surrogate",
]
