"""Throwaway A/B (2026-11-27e), kept with its log: Bi-Real Net 18's BNN forward pass and
Gradient, per call (kernels quantized inside the call) and frozen (``input_like``), as
the explainers compile on CPU. ImageNet stem, 112 px, batch 4.

Usage (repository root):
  python benchmarks/results/cpu-2026-11-27e/forward_per_call_vs_frozen.py
"""

import sys

sys.path.insert(0, "benchmarks")

import common  # noqa: E402
import jax  # noqa: E402

from jbnn import models, saliency  # noqa: E402

print(f"# {common.machine()}")
x = common.random_images(jax.random.key(0), 4, 112)
model = models.get("birealnet18", binary=True, num_classes=1000, stem="imagenet")
variables = common.calibrated(model, model.init(jax.random.key(1), x[:1]), x)
calls = {}
for form, fn in (
    ("per call", models.apply_fn(model, variables)),
    ("frozen", models.apply_fn(model, variables, input_like=x)),
):
    grad = common.explainer_compiled(lambda fn, x: saliency.gradient(fn, x, 0), fn, x)
    fwd = common.explainer_compiled(lambda fn, x: fn(x), fn, x)
    calls[f"gradient {form}"] = lambda g=grad, fn=fn: g(fn, x)
    calls[f"forward {form}"] = lambda f=fwd, fn=fn: f(fn, x)
    temp = grad.memory_analysis().temp_size_in_bytes / 2**20
    print(f"gradient {form}: compiled temporaries {temp:.1f} MiB")
t = common.alternate(calls, 9, warmup=1)
for k, v in t.items():
    print(f"{k}: {v.median * 1e3:.1f} ms (median), spread {100 * v.spread:.0f}%")
for what in ("forward", "gradient"):
    a, b = t[f"{what} per call"], t[f"{what} frozen"]
    print(f"{what}: per call - frozen = {(a.median - b.median) * 1e3:.1f} ms")
