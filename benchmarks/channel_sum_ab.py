"""Kernel scales summed in two stages (``jbnn.ops.channel_sum``) against one reduction.

Bi-Real Net's ``magnitude_aware_sign`` and XNOR-Net's alpha take a per-output-channel
sum of the kernel's magnitudes. In the explainers' CPU programs (``platform_jit``: XLA's
classic kernels) one reduction becomes a reduce-window that writes |w| out first;
``channel_sum`` takes it in two stages there. This script compiles Gradient, SmoothGrad
and GradCAM of a BNN per call (kernels quantized in every call, as
``apply_fn(model, variables)`` runs) with the two-stage sums and with one reduction, and
over frozen kernels (``input_like``, computed once, as ``explain_dataset`` runs), times
them alternately in one run and prints the speed-ups and how far the maps differ.

Usage (repository root):
  python benchmarks/channel_sum_ab.py                                  # Bi-Real Net 18
  python benchmarks/channel_sum_ab.py --model xnornet --size 224 --batch 2 --samples 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jbnn import models, ops  # noqa: E402

METHODS = ("gradient", "smoothgrad", "gradcam")
FORMS = ("two-stage", "one-reduction", "frozen")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="birealnet18")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=16, help="SmoothGrad samples")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="0: all cores")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        common.set_threads(args.threads)
    cls = models._REGISTRY[args.model]
    kw = {"num_classes": args.classes}
    if "stem" in cls.__dataclass_fields__:
        kw["stem"] = "imagenet" if args.size >= 112 else "small"
    model = models.get(args.model, binary=True, **kw)
    spec = model.kernel_quantizer
    x = common.random_images(jax.random.key(0), args.batch, args.size)
    key, target = jax.random.key(2), jnp.zeros((args.batch,), jnp.int32)
    variables = common.calibrated(model, model.init(jax.random.key(1), x[:1]), x)
    layer = common.last_spatial_layer(model, x.shape)
    print(f"# channel_sum_ab: {common.machine()}")
    print(
        f"# {args.model} BNN {kw}, {args.size} px, batch {args.batch}, SmoothGrad "
        f"{args.samples} samples, GradCAM at {layer!r}, {args.rounds} alternating rounds"
    )
    calls, maps, block = {}, {}, ops._CHANNEL_SUM_BLOCK
    for form in FORMS:
        # one reduction: a block as large as any kernel. The same quantizer spelled
        # differently for each form, so that no jit cache holds another form's trace.
        ops._CHANNEL_SUM_BLOCK = 2**62 if form == "one-reduction" else block
        spelled = {"two-stage": spec, "one-reduction": f"{spec}(clip_value=1.0)"}
        m = model.clone(kernel_quantizer=spelled.get(form, spec))
        fn = models.apply_fn(m, variables, input_like=x if form == "frozen" else None)
        run = common.explainers_compiled(fn, x, key, target, layer, args.samples)
        maps[form] = tuple(run[method](fn) for method in METHODS)
        for method in METHODS:
            calls[f"{method} {form}"] = lambda f=run[method], fn=fn: f(fn)
    ops._CHANNEL_SUM_BLOCK = block
    t = common.alternate(calls, args.rounds, warmup=1)
    for method in METHODS:
        new, old, frozen = (t[f"{method} {form}"] for form in FORMS)
        print(
            f"{method}: two-stage {new.median * 1e3:.1f} ms, one reduction "
            f"{old.median * 1e3:.1f} ms, frozen {frozen.median * 1e3:.1f} ms; speed two-stage "
            f"/ one reduction {old.median / new.median:.2f}x (paired "
            f"{common.paired_ratio(old, new):.2f}), spread "
            f"{100 * max(new.spread, old.spread):.0f}%"
        )
    for i, method in enumerate(METHODS):
        rel = common.rel_error(maps["one-reduction"][i], maps["two-stage"][i])
        rel_frozen = common.rel_error(maps["frozen"][i], maps["two-stage"][i])
        print(
            f"{method}: max |two-stage - one reduction| / max = {rel:.2g}; "
            f"|two-stage - frozen| {rel_frozen:.2g}"
        )


if __name__ == "__main__":
    main()
