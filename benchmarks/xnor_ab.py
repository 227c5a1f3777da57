"""XNOR-Net's explainers now against the earlier form of its kernel (alpha in the kernel).

Until 2026-11-27 an XNOR-Net layer multiplied by the scaled kernel ``alpha * q(clip(w))``;
it now multiplies by ``q(clip(w))`` and scales its output by alpha (``jbnn.layers``).
This script compiles SmoothGrad and Gradient of the XNOR-Net BNN in both forms, as the
explainers compile on this platform (on CPU: XLA's classic kernels, ``platform_jit``),
times them alternately and prints how far the maps and logits differ (relative to the
largest magnitude). With binary inputs the two forms can binarize a sum of exactly
zero differently (the earlier form left a rounding residue of either sign); at
initialisation (BatchNorm offsets 0) that flips many signs and the maps differ by
O(1). The network here has BatchNorm statistics from train-mode passes on the batch.

Usage (repository root):
  python benchmarks/xnor_ab.py                            # 224 px, batch 2, 8 samples
  python benchmarks/xnor_ab.py --size 32 --stem small --batch 8 --samples 16
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
import train_step  # noqa: E402

from jbnn import layers, models, saliency  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--stem", default="imagenet")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--samples", type=int, default=8, help="SmoothGrad samples")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=7)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    classes = 1000 if args.stem == "imagenet" else 10
    model = models.get(
        "xnornet", binary=True, num_classes=classes, stem=args.stem, width=args.width
    )
    x = jax.random.uniform(jax.random.key(0), (args.batch, args.size, args.size, 3))
    # BatchNorm statistics from train-mode passes (as a trained network's, roughly)
    variables = common.calibrated(model, model.init(jax.random.key(1), x[:1]), x)
    fn = models.apply_fn(model, variables)
    key = jax.random.key(2)
    print(f"# xnor_ab: {common.machine()}")
    print(
        f"# XNOR-Net BNN, {args.size} px, stem {args.stem}, width {args.width}, batch "
        f"{args.batch}, SmoothGrad {args.samples} samples, {args.rounds} alternating rounds"
    )
    calls, outputs = {}, {}
    for form in ("now", "before"):
        saved = layers._binary_kernel_and_scale
        if form == "before":
            layers._binary_kernel_and_scale = train_step._kernel_scaled_layers
        try:
            jax.clear_caches()  # the model's apply is cached per model: trace it again
            sg = common.explainer_compiled(
                lambda fn, x, k: saliency.smoothgrad(fn, x, 0, k, num_samples=args.samples),
                fn,
                x,
                key,
            )
            grad = common.explainer_compiled(lambda fn, x: saliency.gradient(fn, x, 0), fn, x)
            logits = common.explainer_compiled(lambda fn, x: fn(x), fn, x)
        finally:
            layers._binary_kernel_and_scale = saved
        outputs[form] = (sg(fn, x, key), grad(fn, x), logits(fn, x))
        calls[f"smoothgrad-{form}"] = lambda sg=sg: sg(fn, x, key)
        calls[f"gradient-{form}"] = lambda grad=grad: grad(fn, x)
    t = common.alternate(calls, args.rounds, warmup=1)
    for method in ("smoothgrad", "gradient"):
        now, before = t[f"{method}-now"], t[f"{method}-before"]
        print(
            f"{method}: now {now.median * 1e3:.1f} ms, before {before.median * 1e3:.1f} ms, "
            f"speed now / before {before.median / now.median:.2f}x (paired "
            f"{common.paired_ratio(before, now):.2f}), spread "
            f"{100 * max(now.spread, before.spread):.0f}%"
        )
    for name, a, b in zip(("smoothgrad", "gradient", "logits"), *outputs.values(), strict=True):
        rel = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        print(f"{name}: max |now - before| / max |before| = {rel:.2g}")


if __name__ == "__main__":
    main()
