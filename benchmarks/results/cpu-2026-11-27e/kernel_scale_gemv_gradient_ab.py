"""Throwaway A/B (2026-11-27e), kept with its log: Bi-Real Net 18's BNN Gradient per call
(kernels quantized inside the explainer's CPU program), with magnitude_aware_sign's
per-channel mean |w| as XLA's reduction (jbnn's) or as a GEMV with a ones vector behind
an optimization barrier. ImageNet stem, 112 px, batch 4, as the explainers compile.

Usage (repository root):
  python benchmarks/results/cpu-2026-11-27e/kernel_scale_gemv_gradient_ab.py
"""

import sys

sys.path.insert(0, "benchmarks")

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jbnn import models, saliency  # noqa: E402
from jbnn import quantizers as qz  # noqa: E402

print(f"# {common.machine()}")
x = common.random_images(jax.random.key(0), 4, 112)
model = models.get("birealnet18", binary=True, num_classes=1000, stem="imagenet")
variables = common.calibrated(model, model.init(jax.random.key(1), x[:1]), x)
reduction = qz._QUANTIZERS["magnitude_aware_sign"]


def mas_gemv(x, clip_value=1.0):
    x = jnp.asarray(x)
    m = jnp.abs(x).reshape(-1, x.shape[-1])
    ones = jax.lax.optimization_barrier(jnp.ones((m.shape[0],), m.dtype))
    scale = jax.lax.stop_gradient(jnp.dot(ones, m, precision="highest") / m.shape[0])
    return (scale * qz.ste_sign(x, clip_value)).astype(x.dtype)


calls, outs = {}, {}
for tag, quantizer in (("reduction", reduction), ("gemv", mas_gemv)):
    qz._QUANTIZERS["magnitude_aware_sign"] = quantizer
    # an equal spec spelled differently: a model that the explainers' jit caches miss
    spec = "magnitude_aware_sign" if tag == "reduction" else "magnitude_aware_sign(clip_value=1.0)"
    fn = models.apply_fn(model.clone(kernel_quantizer=spec), variables)
    g = common.explainer_compiled(lambda fn, x: saliency.gradient(fn, x, 0), fn, x)
    text = g.as_text()
    print(f"{tag}: dot ops {text.count(' dot(')}, reduce-window ops {text.count('reduce-window(')}")
    outs[tag] = g(fn, x)
    calls[tag] = lambda g=g, fn=fn: g(fn, x)
qz._QUANTIZERS["magnitude_aware_sign"] = reduction
a, b = outs["reduction"], outs["gemv"]
rel = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
print(f"max |gemv - reduction| / max |reduction| = {rel:.2g}")
t = common.alternate(calls, 15, warmup=1)
for k, v in t.items():
    print(f"{k}: {v.median * 1e3:.1f} ms (median), spread {100 * v.spread:.0f}%")
print(
    f"speed gemv / reduction: {t['reduction'].median / t['gemv'].median:.2f} "
    f"(paired {common.paired_ratio(t['reduction'], t['gemv']):.2f})"
)
