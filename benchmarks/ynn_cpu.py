"""XLA's CPU defaults against jbnn's CPU compiler options, on jbnn's own explainers.

``jbnn.ops.platform_jit`` compiles jbnn's explainers on CPU with
``jbnn.ops.CPU_COMPILER_OPTIONS`` (no YNNPACK fusions: XLA's classic Eigen
convolutions). This script times both compilations of the same jitted function, the
plain ``jax.jit`` one (XLA defaults) and the tuned one, alternately in one process, for
Gradient, SmoothGrad and GradCAM on a BNN and its twin, and checks that their maps agree
to float rounding. Prints ms per call and the speed-up (> 1: the options are faster).

Usage (repository root):
  python benchmarks/ynn_cpu.py                          # birealnet18, 112 px, batch 4
  python benchmarks/ynn_cpu.py --models binary_resnet_e18 --methods smoothgrad --size 224
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import saliency_cpu  # noqa: E402

from jbnn import models, ops  # noqa: E402
from jbnn.saliency import _checks as saliency_checks  # noqa: E402
from jbnn.saliency import cam, gradients  # noqa: E402


def calls(method, args, model, variables, x, target):
    """jitted function (an ops.platform_jit) and its arguments for one method."""
    fn = models.apply_fn(model, variables)
    if method == "gradient":
        return gradients._gradient_jit, (fn, x, target), {"times_input": False}
    if method == "smoothgrad":
        keys = jax.random.split(jax.random.key(42), x.shape[0])
        static = dict(
            relative=False,
            num_samples=args.samples,
            variant="smoothgrad",
            batch_size=args.samples,
        )
        return gradients._smoothgrad_jit, (fn, x, target, keys, jnp.float32(0.15)), static
    path, _ = saliency_checks.check_layer(model, x.shape, "stage4", "gradcam")
    static = dict(
        path=path, plus_plus=False, relu=True, interpolation="bilinear", return_low_res=False
    )
    return cam._cam_jit, (fn, x, target), static


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="birealnet18")
    p.add_argument("--variants", default="bnn,twin")
    p.add_argument("--methods", default="gradient,smoothgrad,gradcam")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    print(f"# ynn_cpu: {common.machine()}")
    print(f"# options: {ops.CPU_COMPILER_OPTIONS}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"# {args.size} px, batch {args.batch}, SmoothGrad {args.samples} samples")
    rows = []
    for name in args.models.split(","):
        for variant in args.variants.split(","):
            model, variables, x, target = saliency_cpu.build(
                name, variant == "bnn", args.size, args.batch, 1000
            )
            for method in args.methods.split(","):
                jitted, call_args, static = calls(method, args, model, variables, x, target)
                run = lambda j, a=call_args, s=static: lambda: j(*a, **s)
                runs = {"xla_defaults": run(jitted._plain), "jbnn_options": run(jitted._cpu)}
                out = {k: jax.device_get(f()) for k, f in runs.items()}
                err = common.rel_error(out["xla_defaults"], out["jbnn_options"])
                t = common.alternate(runs, rounds=args.rounds)
                base, tuned = t["xla_defaults"], t["jbnn_options"]
                rows.append(
                    [
                        name,
                        variant,
                        method,
                        f"{base.median * 1e3:.1f}",
                        f"{tuned.median * 1e3:.1f}",
                        f"{base.median / tuned.median:.2f}x",
                        f"{common.paired_ratio(base, tuned):.2f}x",
                        f"{err:.1e}",
                    ]
                )
                print(" ", " | ".join(rows[-1]), flush=True)
    header = ["model", "variant", "method", "XLA defaults ms", "jbnn options ms"]
    header += ["speed-up", "paired", "max rel. diff"]
    print()
    print(common.fmt_table(rows, header))


if __name__ == "__main__":
    main()
