"""Training a BNN and its full-precision twin from one config, with resumable checkpoints.

:func:`train_and_evaluate` trains, into ``workdir``:

* ``bnn/``: the BNN, ``jbnn.models.get(config.model, binary=True, ...)``;
* ``fp/``: its full-precision twin (``binary=False``), with the same config, the same
  seed (hence the same initial parameters: the trees are identical) and the same data
  order;
* ``control/`` (when ``config.train_control``): a second twin with seed ``seed + 1``
  (other initial parameters, other data order, same data), the seed-to-seed control of
  the BNN-versus-twin comparison.

Each run directory holds ``config.json``, ``metrics.jsonl`` (one JSON line every
``log_every_steps`` steps: step, epoch, loss, accuracy, learning_rate, flip_ratio for
BNNs, examples_per_sec), orbax checkpoints under ``checkpoints/`` and, once finished,
``results.json`` (test_accuracy, test_loss, num_params, train_time_s, steps, ...).

Resuming. Checkpoints are written by an orbax ``CheckpointManager`` (atomic: a
checkpoint is written to a temporary directory and renamed when complete), every
``checkpoint_every_steps`` steps and at the end. The data order is a pure function of
``(seed, epoch)`` and a run restarted at step ``s`` skips the first ``s mod
steps_per_epoch`` batches of its epoch, so a run killed at any moment and started again
continues from its last checkpoint and ends with the same parameters and the same
metrics (bit for bit, on the same machine) as an uninterrupted run. The running sums of
the metrics window are part of the checkpointed state, and ``metrics.jsonl`` lines
after the restored step are dropped on resume. A finished run (``results.json``
present) is not trained again unless ``force=True``.

Data parallelism. The train step is ``jax.jit``-compiled once per run with explicit
shardings over a ``Mesh`` of all devices (axis ``"data"``): batches are split over the
devices along the batch axis (``NamedSharding(mesh, P("data"))``), the parameters and
optimizer state are replicated, and XLA inserts the gradient all-reduce (BatchNorm
statistics are those of the global batch, so the loss does not depend on the device
count). ``batch_size`` and ``eval_batch_size`` must divide by ``jax.device_count()``.

Multi-host (several machines, e.g. a TPU pod slice or GPU nodes): start the same command
on every host, and call ``jax.distributed.initialize()`` before anything else touches
JAX (``train.py --multihost`` does; on Cloud TPU and SLURM it needs no arguments,
elsewhere pass ``coordinator_address``, ``num_processes`` and ``process_id`` or set
``JAX_COORDINATOR_ADDRESS`` etc.). ``jax.devices()`` then lists the devices of all
hosts; every host reads the same global batch and feeds its own contiguous slice of
``batch_size // jax.process_count()`` examples
(``jax.make_array_from_process_local_data``). ``workdir`` must be on a file system that
all hosts share; only process 0 writes the JSON files, orbax coordinates checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jbnn import models, optim

__all__ = [
    "NON_TRAINING_FIELDS",
    "ConfigError",
    "ConfigMismatchError",
    "DamagedCheckpointError",
    "NonFiniteLossError",
    "RunSpec",
    "TrainState",
    "build_model",
    "create_train_state",
    "evaluate",
    "load_run",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "run_specs",
    "shard_batch",
    "train_and_evaluate",
]

DATA_AXIS = "data"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"

# Config fields that do not change what a run computes: a workdir trained with other
# values of these is still the same run (the explain study writes its own section).
NON_TRAINING_FIELDS = (
    "explain",
    "data_dir",
    "manual_dir",
    "log_every_steps",
    "checkpoint_every_steps",
    "train_control",
    "eval_batch_size",
    "progress_bar",
)

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad config or workdir, found before anything is written or trained.

    ``train.py`` prints it as one line; the original error, if any, is its cause.
    """


class ConfigMismatchError(ConfigError):
    """A run directory already holds a run of another config."""


class DamagedCheckpointError(ConfigError):
    """A complete checkpoint in a run directory cannot be read back (its files are
    damaged, or were written for another model). The run directory is left as it was;
    the message names the checkpoint, the folders to delete and the earlier step that
    would then be used (a run never falls back to an older checkpoint by itself).
    orbax's error is the cause."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------- runs
@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a study: its directory name, BNN or twin, and its seed."""

    name: str
    binary: bool
    seed: int


def run_specs(config: ml_collections.ConfigDict) -> list[RunSpec]:
    """The runs ``config`` asks for: bnn and fp (seed), and control (seed + 1) if set."""
    specs = [RunSpec("bnn", True, config.seed), RunSpec("fp", False, config.seed)]
    if config.get("train_control", False):
        specs.append(RunSpec("control", False, config.seed + 1))
    return specs


# --------------------------------------------------------------------------- state
class TrainState(struct.PyTreeNode):
    """Everything a run needs to continue: parameters, optimizer, metric sums.

    The ``*_sum`` fields accumulate over the steps since the last log line and are
    reset when a line is written, so that a resumed run logs exactly what an
    uninterrupted one does.
    """

    step: jax.Array  # int32 (): completed steps
    params: Any
    batch_stats: Any
    opt_state: Any
    loss_sum: jax.Array  # float32 (): sum of batch-mean losses in the window
    correct_sum: jax.Array  # int32 (): correct predictions in the window
    flip_sum: jax.Array  # float32 (): sum of per-step flip ratios in the window
    window_steps: jax.Array  # int32 (): steps in the window
    nonfinite_step: jax.Array  # int32 (): first step (1-based) with a non-finite loss or
    # gradient, or -1
    train_time_s: jax.Array  # float32 (): wall time spent training, over all attempts

    def variables(self) -> dict[str, Any]:
        """``{"params": ..., "batch_stats": ...}`` for ``model.apply``."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def reset_window(self) -> TrainState:
        """The state with the metric window emptied."""
        # Distinct buffers: the state is donated, and a buffer may be donated once.
        zeros = functools.partial(jax.device_put, device=self.loss_sum.sharding)
        return self.replace(
            loss_sum=zeros(np.zeros([], np.float32)),
            correct_sum=zeros(np.zeros([], np.int32)),
            flip_sum=zeros(np.zeros([], np.float32)),
            window_steps=zeros(np.zeros([], np.int32)),
        )


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D data-parallel mesh (axis ``"data"``) over ``devices`` (default: all)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a global batch on ``mesh``, split along the batch axis.

    Every process passes the same global batch; each contributes its own contiguous
    slice (``jax.make_array_from_process_local_data``).

    Args:
      batch: dict of numpy arrays with a leading batch axis of the global batch size.
      mesh: the data-parallel mesh.

    Returns:
      The same dict of global ``jax.Array`` sharded with ``P("data")``.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    n_proc, pid = jax.process_count(), jax.process_index()
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        local = value.shape[0] // n_proc
        part = value[pid * local : (pid + 1) * local] if n_proc > 1 else value
        out[key] = jax.make_array_from_process_local_data(sharding, part, value.shape)
    return out


def make_optimizer(
    config: ml_collections.ConfigDict,
    params: Any,
    kernels: optim.BinaryKernels,
    total_steps: int,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and learning-rate schedule that ``config`` describes.

    Args:
      config: a run config (fields ``optimizer`` and ``binary_optimizer``).
      params: ``variables["params"]`` (arrays or shape structs).
      kernels: the model's binary kernels.
      total_steps: the number of training steps.

    Returns:
      ``(tx, schedule)``.
    """
    n = _optimizer_numbers(config)
    opt = config.optimizer
    schedule = optim.make_schedule(n["learning_rate"], total_steps, opt.schedule, n["warmup_steps"])
    tx = optim.make_optimizer(
        params,
        kernels,
        schedule=schedule,
        name=opt.name,
        weight_decay=n["weight_decay"],
        binary_optimizer=config.binary_optimizer.name,
        threshold=n["threshold"],
        gamma=n["gamma"],
    )
    return tx, schedule


def _optimizer_numbers(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The optimizer's numbers in the config, with the defaults of :mod:`jbnn.optim`
    where the config leaves one out."""
    opt, bin_opt = config.optimizer, config.binary_optimizer
    return dict(
        learning_rate=opt.get("learning_rate"),
        warmup_steps=opt.get("warmup_steps", 0),
        weight_decay=opt.get("weight_decay", 0.0),
        threshold=bin_opt.get("threshold", _BOP_DEFAULTS["threshold"]),
        gamma=bin_opt.get("gamma", _BOP_DEFAULTS["gamma"]),
    )


_BOP_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(optim.bop).parameters.items()
    if name in ("threshold", "gamma")
}


def _init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    input_shape: tuple[int, ...],
    seed: jax.typing.ArrayLike,
) -> TrainState:
    variables = model.init(jax.random.key(seed), jnp.zeros(input_shape, jnp.float32))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        loss_sum=jnp.zeros([], jnp.float32),
        correct_sum=jnp.zeros([], jnp.int32),
        flip_sum=jnp.zeros([], jnp.float32),
        window_steps=jnp.zeros([], jnp.int32),
        nonfinite_step=jnp.full([], -1, jnp.int32),
        train_time_s=jnp.zeros([], jnp.float32),
    )


@functools.lru_cache(maxsize=64)
def _jitted_init(
    model: nn.Module,
    tx: optax.GradientTransformation,
    input_shape: tuple[int, ...],
    mesh: Mesh,
) -> Callable[[jax.Array], TrainState]:
    return jax.jit(
        functools.partial(_init_state, model, tx, input_shape),
        out_shardings=NamedSharding(mesh, P()),
    )


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    input_shape: tuple[int, ...],
    seed: int,
    mesh: Mesh,
) -> TrainState:
    """Initialises a run's state, replicated over ``mesh``.

    The jitted initialiser is cached per ``(model, tx, input_shape, mesh)``: other seeds
    do not recompile.

    Args:
      model: the Linen model.
      tx: its optimizer.
      input_shape: one input batch's shape, e.g. (1, 32, 32, 1).
      seed: the init seed (``jax.random.key(seed)`` goes to ``model.init``).
      mesh: the data-parallel mesh.

    Returns:
      A :class:`TrainState` at step 0.
    """
    init = _jitted_init(model, tx, tuple(input_shape), mesh)
    return init(jnp.asarray(seed, jnp.uint32))


def _loss_and_grads_finite(loss: jax.Array, grads: Any) -> jax.Array:
    """Whether the loss and every gradient are finite (a bool scalar).

    The gradients are checked, not only the loss: a NaN or inf gradient (an overflow in
    the backward pass) is then reported at its own step, and under Bop, which flips a
    weight only where ``w * m > threshold``, a NaN moment would otherwise stop every
    flip with a finite loss. The sum of |g| is finite exactly when every gradient is
    (short of a sum beyond 3.4e38); unlike a sum of squares it shares no g * g with
    Adam's second moment, which XLA would otherwise materialise for both. What the check
    costs a BNN's step: ``docs/performance.md`` (``benchmarks/train_step.py
    --bnn-variants nogradcheck``).
    """
    grad_abs = sum(jnp.sum(jnp.abs(g)) for g in jax.tree_util.tree_leaves(grads))
    return jnp.isfinite(loss) & jnp.isfinite(grad_abs)


def _train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    kernels: optim.BinaryKernels,
    binary_optimizer: str,
    state: TrainState,
    batch: dict[str, jax.Array],
) -> TrainState:
    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],  # (B, H, W, C)
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # Sign flips counted before the update is applied: the new kernel then overwrites
    # the donated old one in place (optim.flip_ratio_of_update).
    flips, param_updates = optim.flip_ratio_of_update(state.params, param_updates, kernels)
    params = optax.apply_updates(state.params, param_updates)
    params = optim.project_binary_kernels(params, kernels, binary_optimizer)
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == batch["label"], dtype=jnp.int32)
    first_bad = (state.nonfinite_step < 0) & ~_loss_and_grads_finite(loss, grads)
    return state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state=opt_state,
        loss_sum=state.loss_sum + loss,
        correct_sum=state.correct_sum + correct,
        flip_sum=state.flip_sum + flips,
        window_steps=state.window_steps + 1,
        nonfinite_step=jnp.where(first_bad, state.step + 1, state.nonfinite_step),
    )


@functools.lru_cache(maxsize=64)
def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    kernels: optim.BinaryKernels,
    binary_optimizer: str,
    mesh: Mesh,
) -> Callable[[TrainState, dict[str, jax.Array]], TrainState]:
    """The jitted, data-parallel train step ``(state, batch) -> state``.

    BatchNorm runs in training mode (batch statistics of the global batch, running
    averages updated); the loss is the mean softmax cross-entropy; after the optimizer
    update binary kernels are clipped (latent) or set to their sign (Bop). The state is
    donated; batches must be sharded with :func:`shard_batch`.

    Args:
      model: the Linen model.
      tx: its optimizer (from :func:`make_optimizer`).
      kernels: the model's binary kernels.
      binary_optimizer: ``"latent"`` or ``"bop"``.
      mesh: the data-parallel mesh.

    Returns:
      The jitted step (compiled on first call, once). Cached per arguments, so that
      runs with the same model and optimizer share one compiled step.
    """
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(DATA_AXIS))
    return jax.jit(
        functools.partial(_train_step, model, tx, kernels, binary_optimizer),
        in_shardings=(replicated, data),
        out_shardings=replicated,
        donate_argnums=0,
    )


def _eval_step(model: nn.Module, variables: Any, batch: dict[str, jax.Array]) -> jax.Array:
    logits = model.apply(variables, batch["image"])  # (B, num_classes), inference mode
    weight = batch["weight"]  # (B,) 1 for real examples, 0 for padding
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
    return jnp.stack([jnp.sum(loss * weight), jnp.sum(correct * weight), jnp.sum(weight)])


@functools.lru_cache(maxsize=64)
def make_eval_step(model: nn.Module, mesh: Mesh) -> Callable[[Any, dict[str, jax.Array]], Any]:
    """The jitted eval step ``(variables, batch) -> [loss_sum, correct_sum, count]``.

    BatchNorm uses its running statistics. ``batch["weight"]`` (B,) masks padding.
    """
    return jax.jit(
        functools.partial(_eval_step, model),
        in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))),
        out_shardings=NamedSharding(mesh, P()),
    )


def _padded_batches(source: Any, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The whole split in order, the last batch padded to ``batch_size`` (weight 0)."""
    for batch in source.batches(batch_size, seed=0, epoch=0, shuffle=False, drop_remainder=False):
        n = batch["label"].shape[0]
        out = {"image": batch["image"], "label": batch["label"]}
        out["weight"] = np.ones(n, np.float32)
        if n < batch_size:
            pad = batch_size - n
            out = {
                k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                for k, v in out.items()
            }
        yield out


def evaluate(
    model: nn.Module, variables: Any, source: Any, batch_size: int, mesh: Mesh
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` over a whole split, in inference mode.

    Args:
      model: the Linen model.
      variables: its variables (replicated on ``mesh``).
      source: a ``jbnn.data`` source.
      batch_size: eval batch size (divisible by the device count).
      mesh: the data-parallel mesh.

    Returns:
      ``{"loss": ..., "accuracy": ..., "num_examples": ...}``.
    """
    step = make_eval_step(model, mesh)
    total = jnp.zeros(3, jnp.float32)
    for batch in _padded_batches(source, batch_size):
        total = total + step(variables, shard_batch(batch, mesh))
    loss_sum, correct, count = (float(v) for v in jax.device_get(total))
    return {"loss": loss_sum / count, "accuracy": correct / count, "num_examples": int(count)}


# --------------------------------------------------------------------------- config
def _json_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))


def _training_view(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config_dict.items() if k not in NON_TRAINING_FIELDS}


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            name = f"{prefix}.{key}" if prefix else key
            if key not in a:
                out.append(f"{name}: (absent) -> {b[key]!r}")
            elif key not in b:
                out.append(f"{name}: {a[key]!r} -> (absent)")
            else:
                out += _diff(a[key], b[key], name)
        return out
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_REQUIRED = (
    "seed",
    "dataset",
    "model",
    "model_kwargs",
    "batch_size",
    "num_epochs",
    "optimizer",
    "binary_optimizer",
    "checkpoint_every_steps",
    "log_every_steps",
)


def _check_config(config: ml_collections.ConfigDict) -> None:
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"config lacks field(s) {missing}; start from configs/default.py")
    if config.model not in models.names():
        raise ValueError(
            f"Unknown model {config.model!r}; registered models: {', '.join(models.names())}"
        )
    for name in ("seed", "batch_size", "num_epochs", "checkpoint_every_steps", "log_every_steps"):
        value = config[name]
        minimum = 0 if name == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"config.{name} must be an int >= {minimum}, got {value!r}")
    if config.optimizer.name not in optim.OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {config.optimizer.name!r}; expected one of {optim.OPTIMIZERS}"
        )
    if config.optimizer.schedule not in optim.SCHEDULES:
        raise ValueError(
            f"Unknown schedule {config.optimizer.schedule!r}; expected one of {optim.SCHEDULES}"
        )
    if config.binary_optimizer.name not in optim.BINARY_OPTIMIZERS:
        raise ValueError(
            f"Unknown binary optimizer {config.binary_optimizer.name!r}; expected one of "
            f"{optim.BINARY_OPTIMIZERS}"
        )
    _check_optimizer_numbers(config)
    eval_batch = config.get("eval_batch_size", None)
    if eval_batch is not None and (
        isinstance(eval_batch, bool) or not isinstance(eval_batch, int) or eval_batch < 1
    ):
        raise ValueError(
            f"config.eval_batch_size must be an int >= 1 (or None), got {eval_batch!r}"
        )
    from jbnn.data import parse_augment

    try:
        parse_augment(config.get("augment"))
    except ValueError as e:
        raise ValueError(f"config.augment: {e}") from None
    n_dev = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        value = config.get(name, config.batch_size) or config.batch_size
        if value % n_dev:
            raise ValueError(
                f"config.{name}={value} does not divide by the {n_dev} devices of the "
                "data-parallel mesh; use a multiple of jax.device_count()."
            )


def _check_optimizer_numbers(config: ml_collections.ConfigDict) -> None:
    """The optimizer's numbers are finite and in range (NaN and inf refused), checked
    before the data is loaded; ``warmup_steps < total_steps`` needs the data (the steps
    per epoch) and is checked when the optimizer is built."""
    n = _optimizer_numbers(config)
    optim.check_number(
        "config.optimizer.learning_rate", n["learning_rate"], minimum=0.0, above=True
    )
    optim.check_count("config.optimizer.warmup_steps", n["warmup_steps"], 0)
    decay = optim.check_number("config.optimizer.weight_decay", n["weight_decay"], minimum=0.0)
    if config.optimizer.name == "adam" and decay:
        raise ValueError(
            f"config.optimizer.weight_decay={decay!r}: optimizer 'adam' takes no weight "
            "decay; set config.optimizer.name='adamw' (or weight_decay=0)."
        )
    optim.check_number("config.binary_optimizer.threshold", n["threshold"], minimum=0.0)
    optim.check_number(
        "config.binary_optimizer.gamma", n["gamma"], minimum=0.0, above=True, maximum=1.0
    )


def _load_data(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    from jbnn import data as jdata

    kwargs = dict(
        image_size=config.get("image_size"),
        data_dir=config.get("data_dir"),
        manual_dir=config.get("manual_dir"),
        seed=config.get("data_seed", 0),
    )
    kwargs.update(dict(config.get("data_kwargs", {}) or {}))
    train = jdata.load(config.dataset, split=config.get("train_split", "train"), **kwargs)
    test = jdata.load(config.dataset, split=config.get("eval_split", "test"), **kwargs)
    return train, test


def _augment(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    aug = config.get("augment")
    if aug is None:
        return None
    aug = aug.to_dict() if hasattr(aug, "to_dict") else dict(aug)
    if not aug.get("crop_padding", 0) and not aug.get("flip", False):
        return None
    return aug


def build_model(config: ml_collections.ConfigDict, binary: bool, num_classes: int) -> nn.Module:
    """``jbnn.models.get(config.model, binary=binary, num_classes=..., **model_kwargs)``."""
    kwargs = config.model_kwargs.to_dict() if config.model_kwargs else {}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return models.get(config.model, binary=binary, num_classes=num_classes, **kwargs)


# --------------------------------------------------------------------------- one run
def _read_metrics(path: Path, max_step: int) -> list[dict[str, Any]]:
    """The complete metric lines with ``step <= max_step`` (a torn last line is dropped)."""
    if not path.exists():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= max_step:
            lines.append(record)
    return lines


def _checkpoint_manager(run_dir: Path, config: ml_collections.ConfigDict):
    """The training run's manager (loading uses :func:`_restore_latest` instead)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=2,
        create=True,
        cleanup_tmp_directories=True,  # debris of a save that was killed
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager((run_dir / CHECKPOINT_DIR).absolute(), options=options)


def _restore(manager: Any, step: int, state: TrainState) -> TrainState:
    import orbax.checkpoint as ocp

    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


_ORBAX_READ = "_read_array_index_and_device_put"  # orbax's coroutine reading one array


def _is_abandoned_read(error: BaseException | None, obj: Any) -> bool:
    """An unraisable error of a read that orbax abandoned (see _quiet_abandoned_reads)."""
    if getattr(obj, "__qualname__", None) == _ORBAX_READ:
        return True
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


class _AbandonedTaskFilter(logging.Filter):
    """Drops asyncio's "<Task|Future|...> exception was never retrieved" for orbax's reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        first = message.partition("\n")[0]
        ours = any(s in message for s in ("orbax", "reading array index", "OCDBT"))
        return not (first.endswith(" exception was never retrieved") and ours)


@contextlib.contextmanager
def _quiet_abandoned_reads() -> Iterator[None]:
    """Silences what an orbax restore leaves behind when one array cannot be read.

    The restore fails at the first unreadable array and stops its event loop, abandoning
    the reads of the other arrays. As those finish or are collected, Python reports each
    one's error (with a TensorStore spec: hundreds of lines after train.py's or
    explain.py's one-line message, at any later time, even at exit) as an unraisable
    exception ("Exception ignored in: <coroutine _read_array_index_and_device_put>",
    "RuntimeError: Event loop is closed"), as asyncio's "Task (Future, _GatheringFuture)
    exception was never retrieved" or as a "never awaited" RuntimeWarning. Within this
    context those, and nothing else, are dropped; :func:`_release_abandoned_reads`
    collects them in it. The first error, the one that names the damage, is raised as
    usual.
    """
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_abandoned_read(unraisable.exc_value, unraisable.object):
            previous(unraisable)

    log_filter = _AbandonedTaskFilter()
    asyncio_log = logging.getLogger("asyncio")
    sys.unraisablehook = hook
    asyncio_log.addFilter(log_filter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", f"coroutine '{_ORBAX_READ}' was never awaited", RuntimeWarning
            )
            yield
    finally:
        asyncio_log.removeFilter(log_filter)
        sys.unraisablehook = previous


def _release_abandoned_reads(error: BaseException) -> None:
    """Frees the reads a failed restore abandoned, now (inside _quiet_abandoned_reads),
    not at some later time: drops the tracebacks of ``error``'s chain, whose frames hold
    them (the messages are kept), and collects them."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__
    gc.collect()


def _short_reason(error: BaseException, limit: int = 200) -> str:
    """One line on why orbax could not read a checkpoint: ``Type: first line`` of the
    innermost explicit cause (orbax wraps TensorStore's read error, which names the array
    and the fault, in a bare ``Exception`` whose message is a kilobytes-long spec dump),
    with the notes of the errors on the way."""
    notes = list(getattr(error, "__notes__", []))
    while error.__cause__ is not None:
        error = error.__cause__
        notes += getattr(error, "__notes__", [])
    lines = str(error).strip().splitlines()
    text = re.sub(r' at local file "[^"]*"', "", lines[0]) if lines else ""
    if len(text) > limit or len(lines) > 1:
        text = text[:limit].rstrip() + " ..."
    reason = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return "; ".join([reason, *(" ".join(n.split()) for n in notes)])


def _intact_earlier_step(
    directory: Path, step: int, restore: Callable[[int, Path], Any]
) -> tuple[int | None, list[int]]:
    """The latest complete checkpoint before ``step`` that ``restore(step, path)`` reads
    back, and the complete ones after it that it cannot read (latest first)."""
    from orbax.checkpoint.path import step as ocp_step

    found = ocp_step.standard_name_format().find_all(directory.absolute())
    earlier = sorted((m for m in found if m.step < step), key=lambda m: m.step, reverse=True)
    damaged = []
    for meta in earlier:
        try:
            restore(meta.step, Path(meta.path))
        except Exception:  # noqa: BLE001 - any failure: not a checkpoint to resume from
            damaged.append(meta.step)
            continue
        return meta.step, damaged
    return None, damaged


def _resume_error(
    manager: Any, run_dir: Path, step: int, state: TrainState, error: Exception
) -> DamagedCheckpointError:
    """The one-line error for a run whose latest checkpoint cannot be restored.

    Says which earlier checkpoint reads back, and which folders to delete to resume from
    it; the run is never resumed from an older checkpoint unasked (a researcher must know
    that steps are trained again).
    """
    directory = run_dir / CHECKPOINT_DIR
    intact, damaged = _intact_earlier_step(
        directory, step, lambda s, _: _restore(manager, s, state)
    )
    reason = _short_reason(error)
    lead = f"checkpoint of step {step} in {directory} is damaged or unreadable ({reason})"
    rerun = "rerun train.py (same --config and --workdir)"
    if intact is not None:
        folders = [directory / str(s) for s in (step, *damaged)]
        what = (
            f"that step's folder, {folders[0]},"
            if len(folders) == 1
            else f"the folders of steps {', '.join(str(s) for s in (step, *damaged))} (which do "
            f"not read back either), {', '.join(str(f) for f in folders)},"
        )
        return DamagedCheckpointError(
            f"{lead}; delete {what} and {rerun} to resume from the checkpoint of step "
            f"{intact}, which reads back intact."
        )
    earlier = (
        f"no earlier checkpoint reads back either ({_steps_text(damaged)})"
        if damaged
        else "there is no earlier checkpoint"
    )
    return DamagedCheckpointError(
        f"{lead}; {earlier}: delete {directory} and {rerun} to train the run in {run_dir} "
        "from scratch."
    )


def _steps_text(steps: list[int]) -> str:
    return ("step " if len(steps) == 1 else "steps ") + ", ".join(str(s) for s in steps)


def _check_finite(state: TrainState, spec: RunSpec, run_dir: Path, last_ckpt: int | None):
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
        kept = f"the checkpoint of step {last_ckpt} is kept" if last_ckpt else "no checkpoint"
        raise NonFiniteLossError(
            f"Run {spec.name!r} ({run_dir}): the training loss or its gradient became "
            f"non-finite (NaN or inf) at step {bad}; {kept}. Lower "
            "config.optimizer.learning_rate or check the data for NaN/inf values."
        )


class _Run:
    """The pieces of one run, built from the config (no training yet)."""

    def __init__(self, config, spec: RunSpec, run_dir: Path, train_src, test_src, mesh):
        self.config, self.spec, self.run_dir = config, spec, run_dir
        self.train_src, self.test_src, self.mesh = train_src, test_src, mesh
        self.input_shape = (1, *train_src.image_shape)
        self.model = build_model(config, spec.binary, train_src.num_classes)
        _check_model_takes(self.model, self.input_shape, config)
        self.kernels = optim.binary_kernels(self.model, self.input_shape)
        self.steps_per_epoch = train_src.steps_per_epoch(config.batch_size)
        self.total_steps = self.steps_per_epoch * config.num_epochs
        self.tx, self.schedule = _cached_optimizer(
            self.model, _optimizer_json(config), self.input_shape, self.total_steps
        )


@functools.lru_cache(maxsize=64)
def _model_init_error(model: nn.Module, input_shape: tuple[int, ...]) -> Exception | None:
    """The exception ``model.init`` raises on inputs of ``input_shape`` (traced only)."""
    try:
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
    except Exception as e:  # noqa: BLE001 - any failure is reported with the shape
        return e
    return None


def _check_model_takes(
    model: nn.Module, input_shape: tuple[int, ...], config: ml_collections.ConfigDict
) -> None:
    """Raises a ValueError naming the image size when ``model`` cannot take it.

    A model too deep for small images (BinaryNet's three 2x2 pools need 8 px) otherwise
    fails inside an initializer (a division by a zero fan-in). The smallest square size
    that works is searched for (doubling, then bisection; traced, not run). When no size
    up to 1024 works, the size is not the problem: the model's own error is raised.
    """
    error = _model_init_error(model, input_shape)
    if error is None:
        return
    _, height, width, channels = input_shape
    shape_at = lambda s: (1, s, s, channels)
    hi = max(height, width) + 1
    while hi <= 1024 and _model_init_error(model, shape_at(hi)) is not None:
        hi *= 2
    if hi > 1024:
        raise error
    lo = max(height, width)  # fails; hi works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _model_init_error(model, shape_at(mid)) is None else (mid, hi)
    raise ValueError(
        f"model {config.model!r} cannot take {height} x {width} x {channels} images "
        f"(config.image_size={config.get('image_size')!r}); it takes {hi} x {hi} images and "
        f"larger: set config.image_size >= {hi}. The model's error: "
        f"{type(error).__name__}: {error}"
    ) from error


def _optimizer_json(config: ml_collections.ConfigDict) -> str:
    sections = {k: config[k].to_dict() for k in ("optimizer", "binary_optimizer")}
    return json.dumps(sections, sort_keys=True)


@functools.lru_cache(maxsize=64)
def _cached_optimizer(
    model: nn.Module, optimizer_json: str, input_shape: tuple[int, ...], total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """One optimizer object per (model, optimizer config, steps): the jitted init and
    step functions are cached on it, so identical runs compile once per process."""
    config = ml_collections.ConfigDict(json.loads(optimizer_json))
    kernels = optim.binary_kernels(model, input_shape)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
    return make_optimizer(config, abstract["params"], kernels, total_steps)


def _train_run(run: _Run, on_step: Callable[[str, int], None] | None) -> dict[str, Any]:
    config, spec, run_dir, mesh = run.config, run.spec, run.run_dir, run.mesh
    is_main = jax.process_index() == 0
    metrics_path = run_dir / METRICS_FILE
    state = create_train_state(run.model, run.tx, run.input_shape, spec.seed, mesh)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    manager = _checkpoint_manager(run_dir, config)
    last_ckpt = manager.latest_step()
    if last_ckpt is not None:
        with _quiet_abandoned_reads():
            try:
                restored = _restore(manager, last_ckpt, state)
            except Exception as e:  # noqa: BLE001 - orbax raises bare Exceptions
                error = _resume_error(manager, run_dir, last_ckpt, state, e)
                manager.close()
                _release_abandoned_reads(e)
                raise error from e
        state = restored
        log.info("%s: resuming from the checkpoint of step %d", spec.name, last_ckpt)
    if is_main:  # after the restore: a run refused for a damaged checkpoint is left as it was
        _atomic_write_json(run_dir / CONFIG_FILE, _json_config(config))
    start = int(jax.device_get(state.step))
    if is_main:  # drop lines logged after the checkpoint, and any torn line
        kept = _read_metrics(metrics_path, start)
        tmp = metrics_path.with_name(METRICS_FILE + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, metrics_path)

    step_fn = make_train_step(run.model, run.tx, run.kernels, config.binary_optimizer.name, mesh)
    augment = _augment(config)
    total, spe, bs = run.total_steps, run.steps_per_epoch, config.batch_size
    prior_time = float(jax.device_get(state.train_time_s))
    t_start = time.perf_counter()
    t_window, n_window = t_start, 0

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        initial=start,
        desc=f"{spec.name}",
        unit="step",
        dynamic_ncols=True,
        disable=(None if config.get("progress_bar", True) else True) if is_main else True,
    )
    step, record = start, None
    with open(metrics_path, "a") if is_main else open(os.devnull, "w") as metrics_file:
        for epoch in range(start // spe, config.num_epochs):
            skip = start - epoch * spe if epoch == start // spe else 0
            for batch in run.train_src.batches(
                bs, seed=spec.seed, epoch=epoch, augment=augment, skip_batches=skip
            ):
                batch = shard_batch({"image": batch["image"], "label": batch["label"]}, mesh)
                state = step_fn(state, batch)
                step += 1
                n_window += bs
                bar.update(1)
                if on_step is not None:
                    on_step(spec.name, step)
                logged = step % config.log_every_steps == 0 or step == total
                if logged:
                    sums = jax.device_get(
                        (state.loss_sum, state.correct_sum, state.flip_sum, state.window_steps)
                    )
                    _check_finite(state, spec, run_dir, manager.latest_step())
                    now = time.perf_counter()
                    loss_sum, correct, flip_sum, k = (float(v) for v in sums)
                    window = int(k)  # the steps this record averages (the epoch line's)
                    record = {
                        "step": step,
                        "epoch": round(step / spe, 4),
                        "loss": loss_sum / k,
                        "accuracy": correct / (k * bs),
                        "learning_rate": float(run.schedule(step - 1)),
                        "examples_per_sec": n_window / max(now - t_window, 1e-9),
                    }
                    if len(run.kernels):
                        record["flip_ratio"] = flip_sum / k
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        acc=f"{record['accuracy']:.3f}",
                        ex_s=f"{record['examples_per_sec']:.0f}",
                    )
                    state = state.reset_window()
                    t_window, n_window = now, 0
                if step % config.checkpoint_every_steps == 0 or step == total:
                    _check_finite(state, spec, run_dir, manager.latest_step())
                    elapsed = prior_time + time.perf_counter() - t_start
                    state = state.replace(
                        train_time_s=jax.device_put(jnp.float32(elapsed), NamedSharding(mesh, P()))
                    )
                    if is_main:
                        os.fsync(metrics_file.fileno())
                    manager.save(step, args=_standard_save(state), force=step == total)
                    manager.wait_until_finished()
            if record is not None and is_main:  # one line per epoch for non-TTY logs
                rate = (step - start) / max(time.perf_counter() - t_start, 1e-9)
                log.info(
                    "%s: epoch %d/%d, step %d/%d, loss %.4f, accuracy %.4f (steps %d-%d), "
                    "%.0f examples/s, ETA %.0f s",
                    spec.name,
                    epoch + 1,
                    config.num_epochs,
                    step,
                    total,
                    record["loss"],
                    record["accuracy"],
                    record["step"] - window + 1,
                    record["step"],
                    record["examples_per_sec"],
                    (total - step) / max(rate, 1e-9),
                )
    bar.close()
    _check_finite(state, spec, run_dir, manager.latest_step())
    manager.close()
    train_time = float(jax.device_get(state.train_time_s))

    test = evaluate(run.model, state.variables(), run.test_src, _eval_batch_size(config), mesh)
    train_lines = _read_metrics(metrics_path, total) if is_main else []
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    num_binary = sum(
        int(np.prod(shape))
        for shape in (_leaf(state.params, path).shape for path in run.kernels.paths)
    )
    results = {
        "run": spec.name,
        "binary": spec.binary,
        "seed": spec.seed,
        "model": config.model,
        "dataset": config.dataset,
        "num_classes": run.train_src.num_classes,
        "image_shape": list(run.train_src.image_shape),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_examples": test["num_examples"],
        "final_train_loss": train_lines[-1]["loss"] if train_lines else None,
        "final_train_accuracy": train_lines[-1]["accuracy"] if train_lines else None,
        "num_params": num_params,
        "num_binary_params": num_binary,
        "steps": total,
        "epochs": config.num_epochs,
        "train_time_s": train_time,
        "examples_per_sec": total * bs / max(train_time, 1e-9),
        "num_devices": jax.device_count(),
    }
    if is_main:
        _atomic_write_json(run_dir / RESULTS_FILE, results)
    log.info(
        "%s: test accuracy %.4f, test loss %.4f, %.1f s",
        spec.name,
        results["test_accuracy"],
        results["test_loss"],
        train_time,
    )
    return results


def _standard_save(state: TrainState):
    import orbax.checkpoint as ocp

    return ocp.args.StandardSave(state)


def _leaf(params: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        params = params[key]
    return params


def _eval_batch_size(config: ml_collections.ConfigDict) -> int:
    return int(config.get("eval_batch_size", config.batch_size) or config.batch_size)


# --------------------------------------------------------------------------- public
def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    force: bool = False,
    on_step: Callable[[str, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Trains the BNN, its full-precision twin and (optionally) the control; evaluates.

    Everything is checked before anything is written: the config (model, optimizer,
    batch sizes), the dataset (a missing or unknown dataset raises here) and the run
    directories already in ``workdir`` (one holding a run of another config raises
    :class:`ConfigMismatchError`, unless ``force``).

    Args:
      config: a config from ``configs/`` (see ``configs/default.py`` for the fields).
      workdir: the study directory; runs go to ``workdir/bnn``, ``workdir/fp`` and
        ``workdir/control``.
      force: train every run from scratch, replacing what its directory holds (even a
        run of another config; a non-empty directory without a jbnn run is not
        deleted: ConfigError). Without it, finished runs are read back, and
        unfinished ones resume from their last checkpoint.
      on_step: optional ``f(run_name, step)`` called on the host after each step is
        dispatched (no device sync); an exception it raises stops training, as a kill
        would (used by the resume tests).

    Returns:
      ``{run name: results dict}`` (the content of each ``results.json``).

    Raises:
      ConfigError: (a ValueError) for a bad config, an unknown dataset or model, images
        the model cannot take, a ``workdir`` that is a file (or lies under one), a
        ``config.json`` or ``results.json`` there that is damaged, found before anything
        is written.
      ConfigMismatchError: (a ConfigError) when ``workdir`` holds runs of another
        config.
      DamagedCheckpointError: (a ConfigError) when the checkpoint a run would resume from
        cannot be read back (the run is left as it was; the message names the earlier
        checkpoint that would be used once the damaged one is deleted).
      DatasetNotAvailableError: for a TFDS dataset missing from ``data_dir``.
      NonFiniteLossError: when the loss becomes NaN or inf (names the step).
    """
    workdir = Path(workdir)
    try:
        _, runs, finished = _preflight(config, workdir, force)
    except ConfigError:
        raise
    except ValueError as e:  # a bad field, found before anything is written
        raise ConfigError(str(e)) from e

    results, trained = {}, False
    for run in runs:
        if run.spec.name in finished:
            log.info(
                "%s: finished already (%s); pass --force (force=True) to retrain",
                run.spec.name,
                run.run_dir / RESULTS_FILE,
            )
            results[run.spec.name] = finished[run.spec.name]
            continue
        if force and run.run_dir.exists() and jax.process_index() == 0:
            shutil.rmtree(run.run_dir)
        results[run.spec.name] = _train_run(run, on_step)
        trained = True
    from jbnn.study import REPORT_DIR  # study imports training lazily: no cycle

    report = workdir / REPORT_DIR
    if trained and report.is_dir():  # kept (it may be all a user has of the old runs)
        log.warning(
            "%s was written by explain.py from the runs this call replaced: it no longer "
            "describes them. Run explain.py again to replace it.",
            report,
        )
    return results


def _check_workdir(workdir: Path) -> None:
    """``workdir`` is a directory or can be made one: neither it nor a parent is a file."""
    for path in (workdir, *workdir.parents):
        if path.exists() or path.is_symlink():
            if path.is_dir():
                return
            what = (
                "a file"
                if path.is_file()
                else "a broken link"
                if path.is_symlink()
                else "a special file"
            )
            where = f"is {what}" if path == workdir else f"lies under {path}, which is {what}"
            raise ConfigError(
                f"workdir {workdir} {where}, not a directory: pass a --workdir that is a "
                "directory or does not exist yet."
            )


def _read_run_json(path: Path, what: str, advice: str) -> dict[str, Any]:
    """The JSON object in ``path``; a ConfigError naming the file when it is not one."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); {advice}") from e
    if not isinstance(value, dict):
        raise ConfigError(
            f"{path} is not a jbnn {what} (a JSON object expected, found "
            f"{type(value).__name__}); {advice}"
        )
    return value


def _preflight(
    config: ml_collections.ConfigDict, workdir: Path, force: bool
) -> tuple[list[RunSpec], list[_Run], dict[str, dict[str, Any]]]:
    """Checks everything that can be checked before a write and builds the runs.

    Returns the specs, the runs and, unless ``force``, the ``results.json`` of the runs
    that are finished already.
    """
    _check_config(config)
    _check_workdir(workdir)
    specs = run_specs(config)
    current = _training_view(_json_config(config))
    finished = {}
    for spec in specs:  # before loading data: cheap, and nothing is touched
        stored = workdir / spec.name / CONFIG_FILE
        run_dir = workdir / spec.name
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(
                f"{run_dir} is a file, not a run directory: train.py writes the {spec.name} "
                "run there, so move it away or use another --workdir (nothing was written)."
            )
        if force and run_dir.exists() and not stored.exists():
            if not run_dir.is_dir() or any(run_dir.iterdir()):
                raise ConfigError(
                    f"--force retrains by deleting {run_dir}, which holds no jbnn run (no "
                    f"{CONFIG_FILE}): nothing deleted. Move it away or use another --workdir."
                )
        if stored.exists() and not force:
            advice = (
                f"it records the config the run in {run_dir} was trained with: restore it "
                f"from a copy, or delete {run_dir} and rerun train.py (same --config and "
                "--workdir) to train that run again (nothing was written)."
            )
            previous = _training_view(_read_run_json(stored, "config", advice))
            if previous != current:
                changes = "; ".join(_diff(previous, current)[:8])
                raise ConfigMismatchError(
                    f"{workdir / spec.name} holds a run of another config ({changes}). "
                    "Use another --workdir, delete that directory, or pass --force to "
                    "retrain from scratch there."
                )
        done = run_dir / RESULTS_FILE
        if done.exists() and not force:
            finished[spec.name] = _read_results(done, run_dir)
    train_src, test_src = _load_data(config)
    mesh = make_mesh()
    runs = [
        _Run(config, spec, workdir / spec.name, train_src, test_src, mesh) for spec in specs
    ]  # builds every model and optimizer: a bad model field raises before any write
    return specs, runs, finished


def _read_results(done: Path, run_dir: Path) -> dict[str, Any]:
    """A finished run's ``results.json``; a ConfigError naming it when it is damaged.

    Deleting the file is the way out: the run then resumes from its last checkpoint,
    which for a finished run is of its final step, so it is evaluated, not trained, again.
    """
    from orbax.checkpoint.path import step as ocp_step

    latest = ocp_step.latest_step_metadata(
        (run_dir / CHECKPOINT_DIR).absolute(), ocp_step.standard_name_format()
    )
    then = (
        f"the run resumes from its last checkpoint (step {latest.step}), so a finished run "
        "is only evaluated again"
        if latest is not None
        else f"{run_dir} holds no checkpoint, so the run is trained again from scratch"
    )
    advice = (
        f"it marks the run in {run_dir} as finished: delete it and rerun train.py (same "
        f"--config and --workdir): {then} (nothing was written)."
    )
    results = _read_run_json(done, "results file", advice)
    missing = [k for k in ("test_accuracy", "test_loss") if k not in results]
    if missing:
        raise ConfigError(f"{done} is not a jbnn results file (no {', '.join(missing)}); {advice}")
    return results


def load_run(
    run_dir: str | os.PathLike,
) -> tuple[nn.Module, dict[str, Any], ml_collections.ConfigDict]:
    """Restores a finished run: its model, final variables and config.

    Args:
      run_dir: a run directory, e.g. ``workdir/bnn``.

    Returns:
      ``(model, variables, config)``: ``model.apply(variables, x)`` gives the logits in
      inference mode; ``variables`` holds ``params`` and ``batch_stats`` (numpy-backed
      jax arrays on the default device).

    Raises:
      FileNotFoundError: if ``run_dir`` is not a finished run (missing, or half-trained:
        no ``results.json``), or holds no complete checkpoint.
      DamagedCheckpointError: (a ValueError) if its final checkpoint cannot be read back;
        the message says how to train it again.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists() and (run_dir / "bnn" / CONFIG_FILE).exists():
        runs = sorted(p.name for p in run_dir.iterdir() if (p / CONFIG_FILE).exists())
        raise FileNotFoundError(
            f"{run_dir} is a study workdir, not a run directory: pass one of its runs, "
            f"{', '.join(str(run_dir / r) for r in runs)}."
        )
    if not (run_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(
            f"{run_dir} is not a jbnn run directory (no {CONFIG_FILE}); train it with "
            "train.py --config ... --workdir ... first."
        )
    if not (run_dir / RESULTS_FILE).exists():
        raise FileNotFoundError(
            f"{run_dir} holds a half-trained run (no {RESULTS_FILE}); rerun train.py with "
            "the same --config and --workdir to finish it."
        )
    config = ml_collections.ConfigDict(json.loads((run_dir / CONFIG_FILE).read_text()))
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    model = build_model(config, results["binary"], results["num_classes"])
    input_shape = (1, *results["image_shape"])
    kernels = optim.binary_kernels(model, input_shape)
    abstract_vars = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
    tx, _ = make_optimizer(config, abstract_vars["params"], kernels, max(results["steps"], 1))
    abstract = jax.eval_shape(lambda: _init_state(model, tx, input_shape, 0))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract
    )
    state = _restore_latest(run_dir / CHECKPOINT_DIR, abstract, final_step=results["steps"])
    return model, state.variables(), config


def _restore_latest(directory: Path, abstract: TrainState, final_step: int) -> TrainState:
    """The final checkpoint under ``directory``, restored once, read-only.

    It must be the latest complete one and of ``final_step`` (the step ``results.json``
    was computed at): an earlier one left after the final one was deleted holds other
    weights than the run's reported accuracy describes, and is refused.

    Reads the layout the training ``CheckpointManager`` writes (``<step>/default``, a
    composite checkpoint with one item) with a one-off ``Checkpointer``: a manager made
    read-only for this (``CheckpointManagerOptions(read_only=True)``) logs absl warnings
    on every load ("read_only=True, setting max_to_keep=None", "... save_interval_steps=0",
    "Given directory is read only"). Temporary folders of a save that was killed are not
    complete steps and are skipped (orbax's own step discovery, as the manager's).

    Raises:
      FileNotFoundError: no complete checkpoint of ``final_step`` in ``directory``.
      DamagedCheckpointError: a complete but unreadable checkpoint (orbax's error is the
        cause), naming it and how to train the run again.
    """
    from orbax.checkpoint.path import step as ocp_step

    latest = ocp_step.latest_step_metadata(directory.absolute(), ocp_step.standard_name_format())
    retrain = "retrain the run with train.py (same --config and --workdir, --force)"
    if latest is None:
        raise FileNotFoundError(f"{directory} holds no checkpoint: {retrain}.")
    if latest.step != final_step:
        raise FileNotFoundError(
            f"{directory}: the run finished at step {final_step} (its {RESULTS_FILE}), but "
            f"the latest complete checkpoint is of step {latest.step}: the final weights are "
            f"missing; {retrain}."
        )
    with _quiet_abandoned_reads():
        try:
            return _restore_step(Path(latest.path), abstract)
        except Exception as e:  # noqa: BLE001 - orbax raises bare Exceptions for damaged files
            error = _final_checkpoint_error(directory, latest.step, abstract, e)
            _release_abandoned_reads(e)
            raise error from e


def _restore_step(path: Path, abstract: TrainState) -> TrainState:
    """The checkpoint in the step folder ``path``, restored read-only."""
    import orbax.checkpoint as ocp

    name = "default"  # the manager's name for its one unnamed item (StandardSave)
    item = ocp.args.Composite(**{name: ocp.args.StandardRestore(abstract)})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(path, args=item)[name]


def _final_checkpoint_error(
    directory: Path, step: int, abstract: TrainState, error: Exception
) -> DamagedCheckpointError:
    """The one-line error for a finished run whose final checkpoint cannot be restored."""
    run_dir = directory.parent
    intact, damaged = _intact_earlier_step(
        directory, step, lambda _, path: _restore_step(path, abstract)
    )
    lead = (
        f"{run_dir}: checkpoint of step {step} is damaged or unreadable "
        f"({_short_reason(error)}); it holds the run's final weights"
    )
    rerun = "rerun train.py (same --config and --workdir)"
    if intact is None:
        earlier = (
            f"no earlier checkpoint reads back either ({_steps_text(damaged)})"
            if damaged
            else "there is no earlier checkpoint"
        )
        return DamagedCheckpointError(
            f"{lead} and {earlier}: delete {run_dir} and {rerun} to train it again."
        )
    folders = ", ".join(str(directory / str(s)) for s in (step, *damaged))
    return DamagedCheckpointError(
        f"{lead}: to train them again, delete {folders} and {run_dir / RESULTS_FILE}, then "
        f"{rerun}: it resumes from the checkpoint of step {intact}, which reads back intact."
    )
