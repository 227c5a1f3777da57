"""A precision-aware model summary after ``larq.models.summary``.

For every layer that owns variables (or is a quantized layer) the summary reports the
input precision, the output shape, the parameter count by bit width, the memory of the
parameters and the multiply-accumulates (MACs) by precision; for the model, the totals,
the model size, the size it would have with float-32 parameters, the compression ratio
and the fraction of MACs that are binary.

Conventions, as Larq's:

* a kernel quantized to 1 bit (``ste_sign``, ``approx_sign``, ``swish_sign``,
  ``magnitude_aware_sign``, ``ste_heaviside``; XNOR-scaled kernels included) counts as
  1-bit parameters, ``ste_tern`` as 2-bit, ``dorefa`` as ``k_bit``; every other
  parameter (biases, BatchNorm scale and offset, real layers) as its dtype's width;
* memory: 8 x 1024 one-bit parameters = 1 KiB, a 32-bit parameter = 4 bytes;
* MACs are counted per example: ``kernel size x output pixels`` for each convolution
  and dense layer; their precision is the larger of the input precision (32 bits when
  the input is not quantized) and the kernel's: a MAC is binary only when both the
  layer's input and its kernel are binarized;
* compression ratio = model size / float-32 size (Larq's "Compression Ratio of
  Memory": smaller is better).

Unlike Larq, BatchNorm's running statistics (``batch_stats``) are not parameters here:
they are neither counted nor included in the memory; the summary reports their number
apart. Fixed operations without variables (pooling, QuickNet's blur) have no row.

Shapes come from :func:`jax.eval_shape` with :func:`flax.linen.intercept_methods`:
nothing is computed and no weight is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbnn import quantizers as qz
from jbnn.layers import QuantConv, QuantDense

__all__ = ["LayerSummary", "ModelSummary", "precision", "summary"]

_ONE_BIT = ("ste_sign", "approx_sign", "swish_sign", "magnitude_aware_sign", "ste_heaviside")
_MAC_LAYERS = (QuantConv, QuantDense, nn.Conv, nn.Dense)


def precision(spec: str | Callable | None) -> int | None:
    """The bit width a quantizer spec produces, or None for no quantization.

    Args:
      spec: a quantizer spec as :func:`jbnn.quantizers.get` takes it, or None. A
        callable counts as its ``precision`` attribute, else as unquantized.

    Returns:
      1 for the sign-like quantizers and ``ste_heaviside``, 2 for ``ste_tern``, ``k_bit``
      for ``dorefa``, None for None / ``identity`` / a callable without ``precision``.
    """
    if spec is None:
        return None
    if callable(spec):
        return getattr(spec, "precision", None)
    name, hparams = qz.parse_spec(spec)
    if name in _ONE_BIT:
        return 1
    if name == "ste_tern":
        return 2
    if name == "dorefa":
        return int(hparams.get("k_bit", 2))
    if name == "identity":
        return None
    raise ValueError(f"Unknown quantizer {name!r} in spec {spec!r}; known: {', '.join(qz.names())}")


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """One row of the summary.

    Attributes:
      path: the module path, '/'-separated (``""`` for the top-level module).
      kind: the module's class name.
      input_precision: bits of the input quantizer, or None when the input is real.
      output_shape: output shape, batch axis included.
      params: bit width -> number of parameters of that width.
      macs: precision in bits -> multiply-accumulates per example.
      batch_stats: number of BatchNorm running statistics (not parameters).
    """

    path: str
    kind: str
    input_precision: int | None
    output_shape: tuple
    params: Mapping[int, int]
    macs: Mapping[int, int]
    batch_stats: int = 0

    @property
    def num_params(self) -> int:
        """All parameters of the layer."""
        return sum(self.params.values())

    @property
    def memory_bits(self) -> int:
        """Memory of the parameters in bits."""
        return sum(bits * count for bits, count in self.params.items())

    @property
    def memory_kib(self) -> float:
        """Memory of the parameters in KiB (8 x 1024 bits)."""
        return self.memory_bits / (8 * 1024)


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """A model's precision-aware summary: its layers and their totals.

    Attributes:
      name: the model's class name.
      input_shape: the input shape it was computed for.
      layers: one :class:`LayerSummary` per layer with variables, in call order.
    """

    name: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerSummary, ...]

    @property
    def params_by_bits(self) -> dict[int, int]:
        """Bit width -> number of parameters, over all layers."""
        return _merge(layer.params for layer in self.layers)

    @property
    def total_params(self) -> int:
        """All parameters (``params`` collection; running statistics excluded)."""
        return sum(self.params_by_bits.values())

    @property
    def batch_stats(self) -> int:
        """Number of BatchNorm running statistics (not counted as parameters)."""
        return sum(layer.batch_stats for layer in self.layers)

    @property
    def memory_bits(self) -> int:
        """Size of the parameters in bits, each at its own width."""
        return sum(layer.memory_bits for layer in self.layers)

    @property
    def fp32_memory_bits(self) -> int:
        """Size the parameters would take as float-32, in bits."""
        return 32 * self.total_params

    @property
    def model_size_mib(self) -> float:
        """Model size in MiB (8 x 1024 x 1024 bits)."""
        return self.memory_bits / (8 * 1024 * 1024)

    @property
    def fp32_size_mib(self) -> float:
        """Float-32 equivalent size in MiB."""
        return self.fp32_memory_bits / (8 * 1024 * 1024)

    @property
    def compression_ratio(self) -> float:
        """Model size / float-32 size (Larq's definition; 1.0 for a real model)."""
        return self.memory_bits / self.fp32_memory_bits if self.total_params else 1.0

    @property
    def macs_by_precision(self) -> dict[int, int]:
        """Precision in bits -> multiply-accumulates per example."""
        return _merge(layer.macs for layer in self.layers)

    @property
    def total_macs(self) -> int:
        """All multiply-accumulates per example."""
        return sum(self.macs_by_precision.values())

    @property
    def binary_mac_fraction(self) -> float:
        """Fraction of the MACs whose input and kernel are both binary (0 if no MACs)."""
        total = self.total_macs
        return self.macs_by_precision.get(1, 0) / total if total else 0.0

    def totals(self) -> dict[str, Any]:
        """The model totals as a plain dict."""
        return {
            "total_params": self.total_params,
            "params_by_bits": self.params_by_bits,
            "batch_stats": self.batch_stats,
            "memory_bits": self.memory_bits,
            "model_size_mib": self.model_size_mib,
            "fp32_size_mib": self.fp32_size_mib,
            "compression_ratio": self.compression_ratio,
            "total_macs": self.total_macs,
            "macs_by_precision": self.macs_by_precision,
            "binary_mac_fraction": self.binary_mac_fraction,
        }

    def as_dict(self) -> dict[str, Any]:
        """Everything as plain Python data (for JSON reports)."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "layers": [
                {
                    "path": layer.path,
                    "kind": layer.kind,
                    "input_precision": layer.input_precision,
                    "output_shape": _jsonable_shape(layer.output_shape),
                    "params": dict(layer.params),
                    "memory_kib": layer.memory_kib,
                    "macs": dict(layer.macs),
                    "batch_stats": layer.batch_stats,
                }
                for layer in self.layers
            ],
            **self.totals(),
        }

    def table(self) -> str:
        """The summary as Larq prints it: a layer table, then the totals."""
        bits = sorted(self.params_by_bits)
        mac_bits = sorted(self.macs_by_precision)
        header = [
            "Layer",
            "Input prec. (bit)",
            "Outputs",
            *(f"# {b}-bit" for b in bits),
            "Memory (KiB)",
            *(f"{b}-bit MACs" for b in mac_bits),
        ]
        rows = []
        for layer in self.layers:
            rows.append(
                [
                    layer.path or "(top)",
                    "-" if layer.input_precision is None else str(layer.input_precision),
                    str(layer.output_shape),
                    *(str(layer.params.get(b, 0)) for b in bits),
                    f"{layer.memory_kib:.2f}",
                    *(str(layer.macs.get(b, 0)) for b in mac_bits),
                ]
            )
        total_row = [
            "Total",
            "",
            "",
            *(str(self.params_by_bits[b]) for b in bits),
            f"{self.memory_bits / (8 * 1024):.2f}",
            *(str(self.macs_by_precision[b]) for b in mac_bits),
        ]
        widths = [max(len(r[i]) for r in (header, *rows, total_row)) for i in range(len(header))]

        def fmt(row: list[str]) -> str:
            cells = [row[0].ljust(widths[0])]
            cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            return "| " + "  ".join(cells) + " |"

        rule = "+" + "-" * (sum(widths) + 2 * (len(widths) - 1) + 2) + "+"
        lines = [f"{self.name} stats", rule, fmt(header), rule]
        lines += [fmt(r) for r in rows]
        lines += [rule, fmt(total_row), rule, "", f"{self.name} summary"]
        totals = [
            ("Total params", str(self.total_params)),
            ("Non-trainable (batch_stats, not counted)", str(self.batch_stats)),
            ("Model size", f"{self.model_size_mib:.2f} MiB"),
            ("Float-32 equivalent", f"{self.fp32_size_mib:.2f} MiB"),
            ("Compression ratio of memory", f"{self.compression_ratio:.4f}"),
            ("Number of MACs", str(self.total_macs)),
            ("Ratio of MACs that are binarized", f"{self.binary_mac_fraction:.4f}"),
        ]
        key_width = max(len(k) for k, _ in totals)
        value_width = max(len(v) for _, v in totals)
        lines += [f"  {k.ljust(key_width)}  {v.rjust(value_width)}" for k, v in totals]
        return "\n".join(lines)


def _merge(dicts) -> dict[int, int]:
    out: dict[int, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def _jsonable_shape(shape):
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return list(shape)
    return [_jsonable_shape(s) for s in shape]


def _direct_leaves(tree: Mapping, path: tuple[str, ...]) -> dict[str, Any]:
    """The arrays stored directly under ``path`` (not those of submodules)."""
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return {}
        node = node[key]
    if not isinstance(node, Mapping):
        return {}
    return {k: v for k, v in node.items() if not isinstance(v, Mapping)}


def _bits(leaf) -> int:
    return jnp.dtype(leaf.dtype).itemsize * 8


def _check_input_shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if not shape or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ValueError(
            f"input_shape must be a sequence of positive ints with the batch axis first, "
            f"e.g. (1, 32, 32, 3); got {input_shape!r}."
        )
    return shape


def summary(
    model: nn.Module,
    input_shape: Sequence[int],
    print_fn: Callable[[str], Any] | None = print,
) -> ModelSummary:
    """Computes, prints and returns a Larq-style precision-aware summary of ``model``.

    Args:
      model: a Flax Linen module called as ``model(x)`` (e.g. from
        :func:`jbnn.models.get`).
      input_shape: the input batch shape, batch axis first, e.g. (1, 32, 32, 3).
      print_fn: called once with the table (a string); None prints nothing.

    Returns:
      A :class:`ModelSummary`: the per-layer rows and, as properties and via
      ``totals()`` / ``as_dict()``, the parameter counts by bit width, model size,
      float-32 equivalent size, compression ratio, MACs by precision and the fraction
      of binary MACs.

    Raises:
      TypeError: if ``model`` is not a Flax Linen module.
      ValueError: if ``input_shape`` is not a sequence of positive ints.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"summary expects a flax.linen Module, got {type(model).__name__}.")
    shape = _check_input_shape(input_shape)

    calls: dict[tuple[str, ...], dict[str, Any]] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        key = tuple(mod.path)
        if key not in calls:  # reserve the slot: rows in call order, not return order
            calls[key] = {"module": mod, "outputs": []}
        out = next_fun(*args, **kwargs)
        calls[key]["outputs"].append(out)
        return out

    def init(rng):
        with nn.intercept_methods(interceptor):
            return model.init(rng, jnp.zeros(shape, jnp.float32))

    variables = jax.eval_shape(init, jax.random.key(0))
    variables = dict(variables)
    params = variables.get("params", {})

    layers = []
    for key, call in calls.items():
        mod = call["module"]
        direct = {
            col: _direct_leaves(tree, key)
            for col, tree in variables.items()
            if isinstance(tree, Mapping)
        }
        is_quant = isinstance(mod, QuantConv | QuantDense)
        if not is_quant and not any(direct.values()):
            continue
        kernel_bits = precision(mod.kernel_quantizer) if is_quant else None
        in_bits = precision(mod.input_quantizer) if is_quant else None
        counts: dict[int, int] = {}
        for name, leaf in _direct_leaves(params, key).items():
            bits = kernel_bits if (name == "kernel" and kernel_bits is not None) else _bits(leaf)
            counts[bits] = counts.get(bits, 0) + math.prod(leaf.shape)
        macs: dict[int, int] = {}
        kernel = _direct_leaves(params, key).get("kernel")
        if isinstance(mod, _MAC_LAYERS) and kernel is not None:
            mac_bits = max(in_bits or 32, kernel_bits or 32)
            for out in call["outputs"]:
                pixels = math.prod(out.shape[1:-1])  # 1 for a (B, F) dense output
                macs[mac_bits] = macs.get(mac_bits, 0) + pixels * math.prod(kernel.shape)
        stats = sum(
            math.prod(leaf.shape)
            for col, d in direct.items()
            if col != "params"
            for leaf in d.values()
        )
        outs = call["outputs"]
        out_shape = jax.tree_util.tree_map(lambda a: tuple(a.shape), outs[0])
        layers.append(
            LayerSummary(
                path="/".join(key),
                kind=type(mod).__name__,
                input_precision=in_bits,
                output_shape=out_shape,
                params=dict(sorted(counts.items())),
                macs=dict(sorted(macs.items())),
                batch_stats=stats,
            )
        )
    result = ModelSummary(name=type(model).__name__, input_shape=shape, layers=tuple(layers))
    if print_fn is not None:
        print_fn(result.table())
    return result
