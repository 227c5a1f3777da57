"""A/B of the split input layer: SmoothGrad and IG with and without it, in one run.

``jbnn.saliency.smoothgrad`` and ``integrated_gradients`` sum the gradients at the
output of a model's affine input layer (a ResNet's stem convolution) and pull the sum
back through that layer once per example (``split_input_layer=True``, the default);
``split_input_layer=False`` computes every noisy copy's (path point's) input gradient
in full. Both are timed alternately on the same inputs, and their maps compared (equal
up to float rounding).

Usage (repository root):
  python benchmarks/split_ab.py                          # birealnet18 BNN and twin, 112 px
  python benchmarks/split_ab.py --size 224 --batch 2 --samples 50
  python benchmarks/split_ab.py --smoke                  # tiny: checks the script
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

from jbnn import models, saliency  # noqa: E402


def _calls(fn, x, target, key, args) -> dict:
    """method -> (split -> the map) on one model and batch."""
    chunk = args.chunk or None
    return {
        "smoothgrad": lambda split: saliency.smoothgrad(
            fn,
            x,
            target,
            key,
            num_samples=args.samples,
            batch_size=chunk,
            split_input_layer=split,
        ),
        "integrated_gradients": lambda split: saliency.integrated_gradients(
            fn, x, target, num_steps=args.samples, batch_size=chunk, split_input_layer=split
        ),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="birealnet18")
    p.add_argument("--variants", default="bnn,twin")
    p.add_argument("--stem", default="imagenet")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=16, help="SmoothGrad samples and IG steps")
    p.add_argument("--chunk", type=int, default=0, help="batch_size of the scan (0: all at once)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny sizes")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.samples, args.rounds = 32, 2, 4, 2
    print(f"# split_ab: {common.machine()}")
    rows = []
    for name in args.models.split(","):
        for variant in args.variants.split(","):
            kw = dict(binary=variant == "bnn", num_classes=1000, stem=args.stem)
            model = models.get(name, **kw)
            x = common.random_images(jax.random.key(1), args.batch, args.size)
            variables = common.calibrated(model, model.init(jax.random.key(0), x[:1]), x)
            if args.dtype != "float32":
                model = models.get(name, dtype=jnp.dtype(args.dtype), **kw)
            fn = models.apply_fn(model, variables)
            target = jnp.argmax(fn(x), axis=-1).astype(jnp.int32)
            calls = _calls(fn, x, target, jax.random.key(42), args)
            for method, call in calls.items():
                err = common.rel_error(call(False), call(True))
                t = common.alternate(
                    {"split": lambda c=call: c(True), "full": lambda c=call: c(False)}, args.rounds
                )
                rows.append(
                    [
                        name,
                        variant,
                        method,
                        f"{t['full'].median * 1e3:.0f}",
                        f"{t['split'].median * 1e3:.0f}",
                        f"{t['full'].median / t['split'].median:.2f}x",
                        f"{common.paired_ratio(t['full'], t['split']):.2f}x",
                        f"{100 * max(t['full'].spread, t['split'].spread):.0f}%",
                        f"{err:.1e}",
                    ]
                )
                print("  " + " | ".join(rows[-1]), flush=True)
    print(
        f"\n{args.size} px, batch {args.batch}, {args.samples} samples / steps, "
        f"{'all at once' if not args.chunk else f'chunks of {args.chunk}'}, {args.dtype}, "
        f"{args.rounds} alternating rounds:"
    )
    header = [
        "model",
        "variant",
        "method",
        "full ms",
        "split ms",
        "speed-up",
        "paired",
        "spread",
        "max rel diff",
    ]
    print(common.fmt_table(rows, header))


if __name__ == "__main__":
    main()
