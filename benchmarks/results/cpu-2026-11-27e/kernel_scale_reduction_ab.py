"""Throwaway A/B (2026-11-27e), kept with its log: a kernel's per-output-channel sum of |w|.

The sum is compiled as jbnn's explainers compile on CPU (``jbnn.ops.platform_jit``:
XLA's classic kernels), in two forms:
- as a reduction, which XLA makes a reduce-window over 32-channel windows plus a
  reduce, with |w| written out first;
- as a GEMV with a ones vector, behind an optimization barrier (XLA turns a dot with a
  broadcast constant back into a reduction).

It prints the ops in each program, the error against a float64 sum, and alternating
timings.

Usage (repository root):
  python benchmarks/results/cpu-2026-11-27e/kernel_scale_reduction_ab.py [threads]
"""

import sys

sys.path.insert(0, "benchmarks")

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

if len(sys.argv) > 1:
    common.set_threads(int(sys.argv[1]))
print(f"# {common.machine()}")
w = jax.random.normal(jax.random.key(0), (3, 3, 512, 512))
K, C = 3 * 3 * 512, 512


def reduction(w):
    return jnp.sum(jnp.abs(w).reshape(K, C), axis=0)


def gemv(w):
    ones = lax.optimization_barrier(jnp.ones((K,), w.dtype))
    return jnp.dot(ones, jnp.abs(w).reshape(K, C), precision="highest")


compiled = {}
for name, f in (("reduction", reduction), ("gemv", gemv)):
    compiled[name] = common.explainer_compiled(f, w)
    text = compiled[name].as_text()
    print(
        f"{name}: reduce-window ops {text.count('reduce-window(')}, dot ops "
        f"{text.count(' dot(')}, reduce ops {text.count(' reduce(')}"
    )
exact = np.abs(np.asarray(w, np.float64)).reshape(K, C).sum(0)
for name, f in compiled.items():
    err = float(np.max(np.abs(np.asarray(f(w), np.float64) - exact) / exact))
    print(f"{name}: max relative error against the float64 sum {err:.2g}")
t = common.alternate({k: (lambda f=f: f(w)) for k, f in compiled.items()}, 31, warmup=2)
for name, timing in t.items():
    print(f"{name}: {timing.median * 1e3:.2f} ms (median), spread {100 * timing.spread:.0f}%")
print(f"reduction / gemv time: {t['reduction'].median / t['gemv'].median:.2f}")
