"""Explainers over frozen kernels (``apply_fn(..., input_like=x)``) against the latent form.

``jbnn.models.apply_fn(model, variables)`` quantizes every kernel inside each call;
with ``input_like`` the kernels (and folded BatchNorms) are computed once
(``jbnn.models.frozen``). This script compiles Gradient, SmoothGrad and GradCAM (at
``--cam-layer``, by default the model's last top-level layer with a spatial output
larger than 1 x 1) of
a BNN and its twin over both functions, as the explainers compile on this platform (on CPU:
XLA's classic kernels, ``platform_jit``), times them alternately in one run, and prints
the speed-ups, the BNN / twin ratio of each form, the one-off cost of freezing, and how
far the maps differ (relative to the largest magnitude: float rounding).

Usage (repository root):
  python benchmarks/frozen_ab.py                                   # XNOR-Net, 224 px
  python benchmarks/frozen_ab.py --model birealnet18 --size 112 --batch 4 --fold
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jbnn import models  # noqa: E402
from jbnn.models import frozen  # noqa: E402

METHODS = ("smoothgrad", "gradient", "gradcam")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="xnornet")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--samples", type=int, default=8, help="SmoothGrad samples")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--fold", action="store_true", help="fold BatchNorms (both forms)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="0: all cores")
    p.add_argument(
        "--stem",
        default=None,
        help="stem of models that have one (default: imagenet from 112 px on, else small)",
    )
    p.add_argument("--cam-layer", default=None, help="GradCAM's layer (module path)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        common.set_threads(args.threads)
    kw = {"num_classes": args.classes}
    if "width" in models._REGISTRY[args.model].__dataclass_fields__:
        kw["width"] = args.width
    if "stem" in models._REGISTRY[args.model].__dataclass_fields__:
        kw["stem"] = args.stem or ("imagenet" if args.size >= 112 else "small")
    x = common.random_images(jax.random.key(0), args.batch, args.size)
    key = jax.random.key(2)
    print(f"# frozen_ab: {common.machine()}")
    print(
        f"# {args.model} {kw}, {args.size} px, batch {args.batch}, SmoothGrad "
        f"{args.samples} samples, fold_batchnorm={args.fold}, {args.rounds} alternating rounds"
    )
    calls, outputs = {}, {}
    target = jnp.zeros((args.batch,), jnp.int32)
    for kind in ("bnn", "twin"):
        model = models.get(args.model, binary=kind == "bnn", **kw)
        layer = args.cam_layer or common.last_spatial_layer(model, x.shape)
        # BatchNorm statistics from train-mode passes (as a trained network's, roughly)
        variables = common.calibrated(model, model.init(jax.random.key(1), x[:1]), x)
        program = frozen.program(model, variables, x, args.fold)
        common.block(program.freeze(variables))  # compiled once
        took = []
        for _ in range(3):
            start = time.perf_counter()
            common.block(program.freeze(variables))
            took.append(time.perf_counter() - start)
        print(
            f"{kind}: freezing {len(program.layers)} layers took "
            f"{1e3 * sorted(took)[1]:.1f} ms (median of 3; once per variables)"
        )
        for form in ("latent", "frozen"):
            fn = models.apply_fn(
                model, variables, args.fold, input_like=x if form == "frozen" else None
            )
            run = common.explainers_compiled(fn, x, key, target, layer, args.samples)
            outputs[kind, form] = tuple(run[method](fn) for method in METHODS)
            for method in METHODS:
                calls[f"{kind}-{method}-{form}"] = lambda f=run[method], fn=fn: f(fn)
        print(f"{kind}: GradCAM at {layer!r}")
    t = common.alternate(calls, args.rounds, warmup=1)
    for kind in ("bnn", "twin"):
        for method in METHODS:
            new, old = t[f"{kind}-{method}-frozen"], t[f"{kind}-{method}-latent"]
            print(
                f"{kind} {method}: frozen {new.median * 1e3:.1f} ms, latent "
                f"{old.median * 1e3:.1f} ms, speed frozen / latent "
                f"{old.median / new.median:.2f}x (paired {common.paired_ratio(old, new):.2f}), "
                f"spread {100 * max(new.spread, old.spread):.0f}%"
            )
    for method in METHODS:
        for form in ("latent", "frozen"):
            bnn, twin = t[f"bnn-{method}-{form}"], t[f"twin-{method}-{form}"]
            print(f"{method} {form}: BNN / twin time {bnn.median / twin.median:.2f}")
    for kind in ("bnn", "twin"):
        for i, method in enumerate(METHODS):
            rel = common.rel_error(outputs[kind, "latent"][i], outputs[kind, "frozen"][i])
            print(f"{kind} {method}: max |frozen - latent| / max |latent| = {rel:.2g}")


if __name__ == "__main__":
    main()
