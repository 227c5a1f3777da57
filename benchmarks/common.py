"""Shared pieces of the benchmark scripts: alternating timing, models with real BN stats.

Benchmark-only code (scripts, not tests). Timing runs every contestant in turn,
``a, b, a, b, ...``, after a warm-up of each, so that the load of a shared machine falls
on all of them alike; the report gives medians and the spread (min-max) of the rounds.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def set_threads(num_threads: int) -> None:
    """Limits torch (if imported) to ``num_threads``; XLA's CPU pool uses every core."""
    try:
        import torch

        torch.set_num_threads(num_threads)
    except ImportError:
        pass


@dataclasses.dataclass
class Timing:
    """Seconds per call of one contestant over the alternating rounds."""

    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        """The fastest round: the least disturbed by other load on a shared machine."""
        return min(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: the noise of the rounds."""
        return (max(self.seconds) - min(self.seconds)) / self.median


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a's time / b's time in the same round (load-drift robust)."""
    return statistics.median(x / y for x, y in zip(a.seconds, b.seconds, strict=True))


def block(out):
    """Waits for jax arrays (torch CPU ops are synchronous)."""
    return jax.block_until_ready(out)


def alternate(contestants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1):
    """Times each contestant once per round, in turn, after ``warmup`` calls of each.

    Args:
      contestants: name -> a callable running one complete call (results ready).
      rounds: number of alternating rounds.
      warmup: untimed calls of each contestant first (compilation, caches).

    Returns:
      A dict name -> :class:`Timing`.
    """
    for fn in contestants.values():
        for _ in range(warmup):
            block(fn())
    seconds = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, fn in contestants.items():
            start = time.perf_counter()
            block(fn())
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(name, s) for name, s in seconds.items()}


def calibrated(model, variables, x, steps: int = 3):
    """``variables`` with BatchNorm running statistics set by train-mode passes on ``x``.

    Freshly initialised BN layers are identities (mean 0, var 1); a few passes in train
    mode move the running statistics towards the batch statistics, so that activations
    have realistic scales (the BNN's sign inputs straddle zero, logits are O(1)).
    """
    params, stats = variables["params"], variables["batch_stats"]

    @jax.jit
    def step(params, stats, x):
        _, new = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return new["batch_stats"]

    for _ in range(steps):
        stats = step(params, stats, x)
    return {"params": params, "batch_stats": stats}


def explainer_compiled(fun, *args):
    """``fun`` compiled now, as jbnn's explainers compile at the top level
    (``jbnn.ops.platform_jit``: on CPU, XLA's classic kernels)."""
    from jbnn import ops

    return ops.platform_jit(fun).lower(*args).compile()


def last_spatial_layer(model, shape) -> str:
    """The last top-level module whose output is (B, h, w, C) with h, w > 1 (GradCAM's)."""
    from jbnn import models

    paths = models.layer_paths(model, (1, *shape[1:]))
    return [p for p, s in paths.items() if "/" not in p and len(s) == 4 and min(s[1:3]) > 1][-1]


def explainers_compiled(fn, x, key, target, layer: str, samples: int) -> dict:
    """Gradient, SmoothGrad (``samples``) and GradCAM (at ``layer``, towards ``target``)
    of the model function ``fn`` on ``x``, compiled now as the explainers compile
    (:func:`explainer_compiled`): {method: call}, where ``call(fn)`` runs the explainer
    (class 0 for Gradient and SmoothGrad, noise ``key``)."""
    from jbnn import saliency
    from jbnn.saliency import cam

    grad = explainer_compiled(lambda fn, x: saliency.gradient(fn, x, 0), fn, x)
    sg = explainer_compiled(
        lambda fn, x, k: saliency.smoothgrad(fn, x, 0, k, num_samples=samples), fn, x, key
    )
    gc = explainer_compiled(
        lambda fn, x: cam._cam_jit(
            fn,
            x,
            target,
            path=tuple(layer.split("/")),
            plus_plus=False,
            relu=True,
            interpolation="bilinear",
            return_low_res=False,
        ),
        fn,
        x,
    )
    return {
        "gradient": lambda fn: grad(fn, x),
        "smoothgrad": lambda fn: sg(fn, x, key),
        "gradcam": lambda fn: gc(fn, x),
    }


def random_images(key, batch: int, size: int) -> jax.Array:
    """Smooth random images (B, size, size, 3) in [0, 1] (low-pass noise, like photos)."""
    low = jax.random.uniform(key, (batch, max(2, size // 16), max(2, size // 16), 3))
    return jax.image.resize(low, (batch, size, size, 3), "linear")


def machine() -> str:
    """A one-line description of the host (CPU model, cores, library versions)."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [cpu, f"{os.cpu_count()} cores", f"jax {jax.__version__}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        import captum

        parts.append(f"captum {captum.__version__}")
    except ImportError:
        pass
    devices = {d.device_kind for d in jax.devices()}
    parts.append("jax devices: " + ", ".join(sorted(devices)))
    return "; ".join(parts)


def rel_error(a, b) -> float:
    """max |a - b| / max |a| (0 when both vanish)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(a)))
    return float(np.max(np.abs(a - b))) / scale if scale > 0 else float(np.max(np.abs(b)))


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub markdown table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    cells = lambda r: (str(c).ljust(w) for c, w in zip(r, widths, strict=True))
    line = lambda r: "| " + " | ".join(cells(r)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *map(line, rows)])


def tree_bytes(tree) -> int:
    """Total bytes of the arrays of a pytree."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
