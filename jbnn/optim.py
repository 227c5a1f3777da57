"""Optimizers for BNNs: Bop, latent-weight clipping, and the routing between them.

A BNN has two kinds of parameters. *Binary kernels* are the kernels of layers with a
``kernel_quantizer``; the forward pass only sees their sign. Every other parameter
(BatchNorm, real-valued stems and heads, biases) is *real*.

Two ways to train binary kernels, picked by ``binary_optimizer.name`` in the config:

* ``"latent"``: the binary kernels are latent float weights trained by the same Adam /
  AdamW as the real parameters (without weight decay), then clipped to
  ``[-kernel_clip, kernel_clip]`` after every step, as Larq's ``weight_clip``
  constraint does (:func:`project_binary_kernels`).
* ``"bop"``: the binary kernels are trained by :func:`bop` (Helwegen et al. 2019,
  "Latent weights do not exist"), an optax ``GradientTransformation`` that keeps an
  exponential moving average ``m`` of the gradient and flips a weight when
  ``w * m > threshold``. The kernels stay exactly +-1.

:func:`make_optimizer` routes the two groups with ``optax.multi_transform``, using the
labels of :func:`param_labels`, which come from :func:`jbnn.layers.quantized_layers`.
:func:`flip_ratio` measures the fraction of binary weights whose sign changed in a step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jbnn.layers import quantized_layers

__all__ = [
    "BINARY",
    "LATENT",
    "REAL",
    "BinaryKernels",
    "BopState",
    "binary_kernels",
    "bop",
    "check_count",
    "check_number",
    "flip_ratio",
    "flip_ratio_of_update",
    "make_optimizer",
    "make_schedule",
    "param_labels",
    "project_binary_kernels",
]

# Labels of the parameter groups routed by ``optax.multi_transform``.
REAL = "real"  # real-valued parameters: Adam / AdamW
LATENT = "latent"  # latent binary kernels: Adam (no weight decay), then clipped
BINARY = "bop"  # binary kernels trained by Bop

BINARY_OPTIMIZERS = ("latent", "bop")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "constant")

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]
Path = tuple[str, ...]


# --------------------------------------------------------------------------- checks
def check_number(
    name: str,
    value: Any,
    *,
    minimum: float,
    above: bool = False,
    maximum: float | None = None,
) -> float:
    """``value`` as a float, or a ValueError naming ``name`` and the value.

    A hyperparameter must be a finite real number (not a bool, NaN or inf) that is
    ``>= minimum`` (``> minimum`` when ``above``) and, if given, ``<= maximum``.
    """
    real = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    number = float(value) if real else math.nan
    low_ok = number > minimum if above else number >= minimum
    if not (math.isfinite(number) and low_ok and (maximum is None or number <= maximum)):
        wanted = f"{'>' if above else '>='} {minimum:g}"
        if maximum is not None:
            wanted = f"in {'(' if above else '['}{minimum:g}, {maximum:g}]"
        raise ValueError(f"{name} must be a finite number {wanted}, got {value!r}")
    return number


def check_count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int (a step count), or a ValueError naming ``name`` and the value."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- Bop
class BopState(NamedTuple):
    """State of :func:`bop`: the step count and the gradient moving average ``m``."""

    count: jax.Array  # int32 scalar
    momentum: optax.Updates


def _sign(x: jax.Array) -> jax.Array:
    """sign with sign(0) = +1, as Larq's ``lq.math.sign``."""
    return jnp.where(x >= 0, jnp.ones_like(x), -jnp.ones_like(x))


def _value(v: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    # A schedule may return a Python float (optax.constant_schedule does).
    return jnp.asarray(v(count) if callable(v) else v)


def bop(
    threshold: ScalarOrSchedule = 1e-8, gamma: ScalarOrSchedule = 1e-4
) -> optax.GradientTransformation:
    """The Binary optimizer (Bop) of Helwegen et al. (2019), as Larq implements it.

    Per binary weight ``w`` with gradient ``g``:

    * ``m <- m + gamma * (g - m)`` (an exponential moving average of the gradient);
    * ``w <- -sign(w)`` if ``w * m > threshold``, else ``w <- sign(w)``, with
      ``sign(0) = +1``.

    This is Larq's ``Bop._resource_apply_dense`` (``m_t = m + gamma * (grad - m)``,
    ``var_t = sign(-tf.sign(var * m_t - threshold) * var)``): a weight whose sign agrees
    with the averaged gradient (so that a gradient step would push it through zero)
    flips. The one difference is the tie ``w * m == threshold`` exactly, where Larq's
    ``tf.sign(0) = 0`` sets the weight to +1 whatever its sign; here a weight flips only
    when ``w * m > threshold`` strictly. Weights that are not +-1 yet (a float
    initialisation) become +-1 on the first step, as in Larq.

    Being an optax transformation, it returns updates ``new_w - w``; adding them back
    with ``optax.apply_updates`` gives ``new_w`` exactly for weights that are already
    +-1 (use :func:`project_binary_kernels` after the update to make it exact on the
    first step too).

    Args:
      threshold: flip threshold tau >= 0 (a float or an optax schedule of the step).
      gamma: adaptivity rate in (0, 1] (a float or an optax schedule of the step).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

    Raises:
      ValueError: for a threshold that is negative, NaN or inf, or a gamma outside
        (0, 1].
    """
    if not callable(threshold):
        threshold = check_number("bop: threshold", threshold, minimum=0.0)
    if not callable(gamma):
        gamma = check_number("bop: gamma", gamma, minimum=0.0, above=True, maximum=1.0)

    def init_fn(params: optax.Params) -> BopState:
        return BopState(
            count=jnp.zeros([], jnp.int32),
            momentum=jax.tree_util.tree_map(jnp.zeros_like, params),
        )

    def update_fn(
        updates: optax.Updates, state: BopState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, BopState]:
        if params is None:
            raise ValueError("bop needs the current parameters: call update(grads, state, params).")
        tau = _value(threshold, state.count)
        rate = _value(gamma, state.count)

        def moment(grad, m):
            return m + rate.astype(m.dtype) * (grad.astype(m.dtype) - m)

        momentum = jax.tree_util.tree_map(moment, updates, state.momentum)

        def step(w, m):
            flip = w * m > tau.astype(w.dtype)
            new_w = jnp.where(flip, -_sign(w), _sign(w))
            return (new_w - w).astype(w.dtype)

        new_updates = jax.tree_util.tree_map(step, params, momentum)
        return new_updates, BopState(count=optax.safe_increment(state.count), momentum=momentum)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- routing
@dataclasses.dataclass(frozen=True)
class BinaryKernels:
    """The binary kernels of a model: parameter path -> latent clip (None: no clip).

    A path is the tuple of keys under ``variables["params"]``, e.g.
    ``("block2", "conv", "kernel")``. ``quantizers`` holds each path's kernel quantizer
    spec, as :func:`binary_kernels` finds it (empty when built by hand: then nothing is
    known of the kernels' bit widths). Hashable, so it can be a static argument.
    """

    clips: tuple[tuple[Path, float | None], ...]
    quantizers: tuple[tuple[Path, Any], ...] = ()

    @property
    def paths(self) -> tuple[Path, ...]:
        """The parameter paths of the binary kernels."""
        return tuple(path for path, _ in self.clips)

    def __len__(self) -> int:
        return len(self.clips)


def binary_kernels(model: nn.Module, input_shape: Sequence[int]) -> BinaryKernels:
    """Finds the binary kernels of ``model``: kernels of layers with a kernel quantizer.

    Args:
      model: a Flax Linen module (a jbnn model or any module using jbnn's layers).
      input_shape: the shape of one input batch, e.g. (1, 32, 32, 3).

    Returns:
      A :class:`BinaryKernels` (empty for a full-precision twin).
    """
    infos = [
        info for info in quantized_layers(model, input_shape) if info.kernel_quantizer is not None
    ]
    return BinaryKernels(
        clips=tuple(((*info.path, "kernel"), info.kernel_clip) for info in infos),
        quantizers=tuple(((*info.path, "kernel"), info.kernel_quantizer) for info in infos),
    )


def _check_bop_kernels(kernels: BinaryKernels) -> None:
    """Bop keeps its kernels at +-1: a kernel quantizer of more than one bit (ste_tern,
    dorefa with k_bit > 1) or none (identity) would silently lose its other levels."""
    from jbnn.summary import precision

    wrong = [
        f"{'/'.join(path[:-1])} ({spec!r}: {bits or 'full-precision'} bits)"
        for path, spec in kernels.quantizers
        if (bits := precision(spec)) != 1
    ]
    if wrong:
        raise ValueError(
            "binary_optimizer 'bop' trains binary (1-bit) kernels only, and sets them to "
            f"+-1; these layers' kernel quantizers are not 1-bit: {', '.join(wrong)}. "
            "Use binary_optimizer 'latent' for them."
        )


def _check_paths(params: Mapping[str, Any], kernels: BinaryKernels) -> dict[Path, Any]:
    flat = traverse_util.flatten_dict(params)
    missing = [p for p in kernels.paths if p not in flat]
    if missing:
        raise ValueError(
            f"Binary kernel path(s) {['/'.join(p) for p in missing]} are not in the "
            f"parameters (paths: {['/'.join(p) for p in flat]}); pass variables['params']."
        )
    return flat


def param_labels(params: Mapping[str, Any], kernels: BinaryKernels, binary_optimizer: str):
    """Labels every parameter with the group that trains it.

    Args:
      params: ``variables["params"]`` (arrays or shape structs).
      kernels: the model's :class:`BinaryKernels`.
      binary_optimizer: ``"latent"`` (binary kernels labelled :data:`LATENT`) or
        ``"bop"`` (labelled :data:`BINARY`).

    Returns:
      A pytree like ``params`` of labels :data:`REAL`, :data:`LATENT` or :data:`BINARY`.

    Raises:
      ValueError: an unknown binary optimizer, kernel paths not in ``params``, or
        ``"bop"`` for a kernel whose quantizer is not 1-bit.
    """
    if binary_optimizer not in BINARY_OPTIMIZERS:
        raise ValueError(
            f"Unknown binary optimizer {binary_optimizer!r}; expected one of {BINARY_OPTIMIZERS}"
        )
    flat = _check_paths(params, kernels)
    if binary_optimizer == "bop":
        _check_bop_kernels(kernels)
    binary_label = LATENT if binary_optimizer == "latent" else BINARY
    binary = set(kernels.paths)
    labels = {path: binary_label if path in binary else REAL for path in flat}
    return traverse_util.unflatten_dict(labels)


def make_schedule(
    learning_rate: float, total_steps: int, schedule: str = "cosine", warmup_steps: int = 0
) -> optax.Schedule:
    """The learning-rate schedule: linear warmup from 0, then cosine decay to 0 or constant.

    Args:
      learning_rate: peak learning rate (finite, > 0).
      total_steps: number of training steps (cosine decays to 0 at this step).
      schedule: ``"cosine"`` or ``"constant"``.
      warmup_steps: steps of linear warmup from 0 (an int; 0: none).

    Returns:
      An optax schedule ``step -> learning rate``.

    Raises:
      ValueError: for an unknown schedule, a learning rate that is not a finite number
        > 0 (NaN and inf included), or step counts that are not ints with
        ``0 <= warmup_steps < total_steps``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    learning_rate = check_number("learning_rate", learning_rate, minimum=0.0, above=True)
    total_steps = check_count("total_steps", total_steps, 1)
    warmup_steps = check_count("warmup_steps", warmup_steps, 0)
    if warmup_steps >= total_steps:
        raise ValueError(
            f"Need total_steps >= 1 and 0 <= warmup_steps < total_steps, got "
            f"total_steps={total_steps}, warmup_steps={warmup_steps}"
        )
    if schedule == "cosine":
        if warmup_steps == 0:
            return optax.cosine_decay_schedule(learning_rate, total_steps)
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, total_steps, end_value=0.0
        )
    if warmup_steps == 0:
        return optax.constant_schedule(learning_rate)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, learning_rate, warmup_steps),
            optax.constant_schedule(learning_rate),
        ],
        [warmup_steps],
    )


def make_optimizer(
    params: Mapping[str, Any],
    kernels: BinaryKernels,
    *,
    schedule: optax.Schedule,
    name: str = "adam",
    weight_decay: float = 0.0,
    binary_optimizer: str = "latent",
    threshold: float = 1e-8,
    gamma: float = 1e-4,
) -> optax.GradientTransformation:
    """The optimizer of a model: Adam/AdamW for real parameters, latent or Bop for binary.

    Real parameters get ``name`` (``"adam"`` or ``"adamw"``; AdamW decays only
    parameters of rank >= 2, i.e. kernels, not BatchNorm or biases). Binary kernels get
    Adam with the same schedule and no weight decay (``"latent"``; clip them afterwards
    with :func:`project_binary_kernels`) or :func:`bop` (``"bop"``).

    Args:
      params: ``variables["params"]`` (arrays or shape structs).
      kernels: the model's :class:`BinaryKernels`.
      schedule: learning-rate schedule of the real optimizer.
      name: ``"adam"`` or ``"adamw"``.
      weight_decay: AdamW's decoupled weight decay (finite, >= 0; 0 for ``"adam"``).
      binary_optimizer: ``"latent"`` or ``"bop"``.
      threshold: Bop's flip threshold.
      gamma: Bop's adaptivity rate.

    Returns:
      An ``optax.GradientTransformation`` (a ``multi_transform``) needing ``params``.

    Raises:
      ValueError: for an unknown optimizer, a weight decay that is negative, NaN or inf
        (or not 0 for ``"adam"``), and what :func:`param_labels` and :func:`bop` raise.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    weight_decay = check_number("weight_decay", weight_decay, minimum=0.0)
    if name == "adam" and weight_decay:
        raise ValueError(
            f"optimizer 'adam' takes no weight_decay (got {weight_decay}); use 'adamw'."
        )
    labels = param_labels(params, kernels, binary_optimizer)
    if name == "adamw":
        real = optax.adamw(
            schedule,
            weight_decay=weight_decay,
            mask=lambda p: jax.tree_util.tree_map(lambda x: jnp.ndim(x) >= 2, p),
        )
    else:
        real = optax.adam(schedule)
    transforms = {REAL: real, LATENT: optax.adam(schedule), BINARY: bop(threshold, gamma)}
    return optax.multi_transform(transforms, labels)


# --------------------------------------------------------------------------- after the step
def project_binary_kernels(
    params: Mapping[str, Any], kernels: BinaryKernels, binary_optimizer: str
) -> dict[str, Any]:
    """Applies the binary-kernel constraint after an optimizer step.

    ``"latent"``: clips each binary kernel to ``[-clip, clip]`` (Larq's ``weight_clip``;
    kernels whose layer has no clip are left alone). ``"bop"``: sets each binary kernel
    to its sign (sign(0) = +1), which removes the rounding of ``w + (new_w - w)``.

    Args:
      params: ``variables["params"]`` after ``optax.apply_updates``.
      kernels: the model's :class:`BinaryKernels`.
      binary_optimizer: ``"latent"`` or ``"bop"``.

    Returns:
      The parameters with the constraint applied (a new tree; others are untouched).
    """
    if binary_optimizer not in BINARY_OPTIMIZERS:
        raise ValueError(
            f"Unknown binary optimizer {binary_optimizer!r}; expected one of {BINARY_OPTIMIZERS}"
        )
    if not len(kernels):
        return params
    flat = dict(_check_paths(params, kernels))
    for path, clip in kernels.clips:
        if binary_optimizer == "bop":
            flat[path] = _sign(flat[path])
        elif clip is not None:
            flat[path] = jnp.clip(flat[path], -clip, clip)
    return traverse_util.unflatten_dict(flat)


def _count_changed_signs(old: jax.Array, new: jax.Array) -> jax.Array:
    """Number of entries whose sign (sign(0) = +1) differs, an exact int32 scalar.

    XLA's CPU backend writes the comparison out before it reduces it. The kernel is
    viewed as (fan_in, C_out); one whose size is a multiple of 32 is written as bits:
    entry ``i * n + j`` of the n = size / 32 blocks goes to bit i of word j (one pass
    over 32 contiguous blocks, which vectorises), and the words' population counts are
    summed, 1/32 of the entries to reduce. An MLP's training step (1.8M binary weights,
    2-core Xeon) took 4.72 ms where uint8 chunks took 4.91 (the twin's 4.20); uint8
    chunks, 3% faster than float32 row sums, which were 13-15% faster than an int32
    reduction of the whole kernel, remain for other sizes. Convolution kernels counted
    as an int32 reduction of the 4-D comparison had measured the same as this on small
    models (32 px, within 1%), but XNOR-Net's 224 px step (38M-weight fc6, batch 8)
    took 8% longer with it (``benchmarks/results/cpu-2026-11-27b``).
    """
    changed = (old >= 0) != (new >= 0)
    if changed.ndim != 2:
        changed = changed.reshape(-1, changed.shape[-1] if changed.ndim else 1)
    if changed.size % 32 == 0:
        blocks = changed.reshape(32, -1)
        words = functools.reduce(
            operator.or_, [blocks[i].astype(jnp.uint32) << i for i in range(32)]
        )
        return jnp.sum(jax.lax.population_count(words), dtype=jnp.int32)
    chunk = max(d for d in range(1, min(changed.shape[-1], 255) + 1) if changed.shape[-1] % d == 0)
    chunks = changed.reshape(-1, chunk).astype(jnp.uint8)
    return jnp.sum(jnp.sum(chunks, axis=-1, dtype=jnp.uint8), dtype=jnp.int32)


def flip_ratio_of_update(
    params: Mapping[str, Any], updates: Mapping[str, Any], kernels: BinaryKernels
) -> tuple[jax.Array, dict]:
    """The flip ratio an optimizer update will make, and the update tied to it.

    Counts, as :func:`flip_ratio` does, the binary weights whose sign the update
    changes, on ``optax.apply_updates(params, updates)`` before the latent clip or Bop's
    projection (both keep every sign: the clip is symmetric, Bop's update lands on +-1
    exactly). Each binary kernel's update is then multiplied by ``1 + 0 * count`` of its
    own kernel, exactly 1: the update keeps every bit, but XLA must count the kernel's
    flips, which reads the old kernel, before it applies the update. A training step
    that donates its state then writes the new kernel over the old one in place, where
    it would otherwise copy the old kernel first (an MLP's step: 0.4 ms of 5). XLA
    compiles the step's fusions differently then, which can change the last bit of some
    new weights (float rounding: in one BinaryNet step 12% of the weights moved by at
    most 1.5e-8 against the step that counts flips after the update).

    Args:
      params: ``variables["params"]`` before the step.
      updates: the optimizer's updates of them (``tx.update``).
      kernels: the model's :class:`BinaryKernels`.

    Returns:
      (float32 flip ratio in [0, 1], the updates with the binary kernels' tied).
    """
    if not len(kernels):
        return jnp.zeros([], jnp.float32), updates
    old = _check_paths(params, kernels)
    flat = dict(_check_paths(updates, kernels))
    counts = []
    for path in kernels.paths:
        new = jnp.asarray(old[path] + flat[path]).astype(old[path].dtype)  # apply_updates
        count = _count_changed_signs(old[path], new)
        one = 1.0 + 0.0 * count.astype(jnp.float32)
        flat[path] = flat[path] * one.astype(flat[path].dtype)
        counts.append(count)
    total = sum(old[p].size for p in kernels.paths)
    return sum(counts).astype(jnp.float32) / total, traverse_util.unflatten_dict(flat)


def flip_ratio(
    old_params: Mapping[str, Any], new_params: Mapping[str, Any], kernels: BinaryKernels
) -> jax.Array:
    """The fraction of binary weights whose sign (sign(0) = +1) changed.

    Args:
      old_params: parameters before the step.
      new_params: parameters after the step.
      kernels: the model's :class:`BinaryKernels`.

    Returns:
      A float32 scalar in [0, 1]; 0 for a model without binary kernels.
    """
    if not len(kernels):
        return jnp.zeros([], jnp.float32)
    old = _check_paths(old_params, kernels)
    new = _check_paths(new_params, kernels)
    flips = sum(_count_changed_signs(old[p], new[p]) for p in kernels.paths)
    total = sum(old[p].size for p in kernels.paths)
    return flips.astype(jnp.float32) / total
