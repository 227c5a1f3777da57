"""Saliency throughput on CPU: jbnn against Captum on the same architecture and weights.

For each model (``birealnet18``, ``binary_resnet_e18``; BNN and full-precision twin,
ImageNet stem) the Flax variables (BatchNorm statistics calibrated on the batch) are
copied into a PyTorch port of the same architecture (:mod:`torch_port`; logits are
checked to agree before anything is timed), then every method is timed alternately,
jbnn, Captum, jbnn, Captum, ..., after a warm-up of each:

* Gradient: ``jbnn.saliency.gradient`` vs ``captum.attr.Saliency(abs=False)``;
* SmoothGrad: ``jbnn.saliency.smoothgrad(noise_sigma=s, num_samples=n)`` (jbnn's
  default ``batch_size="auto"``: on a CPU, chunks of about 200k input pixels, 4 samples
  of a batch of 4 at 112 px) vs ``NoiseTunnel(Saliency).attribute(nt_type="smoothgrad",
  nt_samples=n, stdevs=s)`` (Captum's default: all samples in one batch). Each library
  runs its default; ``--sg-batch-size all`` runs both all at once, ``auto`` gives
  Captum jbnn's chunk too, a number gives both that chunk;
* GradCAM at ``stage4``, ReLU, bilinear upsampling: ``jbnn.saliency.gradcam`` vs
  ``LayerGradCam(relu_attributions=True)`` + ``LayerAttribution.interpolate``.

With ``--frozen`` jbnn runs over kernels quantized once (``models.apply_fn(model,
variables, input_like=x)``, GradCAM through the same function), as
``explain_dataset`` (so ``explain.py``) does; by default it quantizes them in every
call, as ``saliency.gradcam`` and an ``apply_fn(model, variables)`` do (and as the
PyTorch port does).

Gradient and GradCAM maps are also compared (same weights, same targets: they must
agree to float rounding). Prints images/s (median over rounds), the spread of the
rounds and the speed ratio jbnn/Captum (> 1: jbnn faster).

Usage (repository root):
  python benchmarks/saliency_cpu.py                       # 112 px, batch 4, 16 samples
  python benchmarks/saliency_cpu.py --size 224 --samples 50
  python benchmarks/saliency_cpu.py --models birealnet18 --variants bnn --methods smoothgrad
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
import numpy as np  # noqa: E402

from jbnn import models, saliency  # noqa: E402
from jbnn.saliency import _checks as saliency_checks  # noqa: E402
from jbnn.saliency import cam as jbnn_cam  # noqa: E402

METHODS = ("gradient", "smoothgrad", "gradcam")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="birealnet18,binary_resnet_e18")
    p.add_argument("--variants", default="bnn,twin", help="bnn, twin or both")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--size", type=int, default=112, help="image size (112; 224 for ImageNet)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=16, help="SmoothGrad samples")
    p.add_argument("--noise-sigma", type=float, default=0.15, help="absolute SmoothGrad sigma")
    p.add_argument(
        "--sg-batch-size",
        default="default",
        help="SmoothGrad samples per chunk (jbnn batch_size, Captum nt_samples_batch_size): "
        "'default' (each library's: jbnn 'auto', Captum all at once), 'all' (both all at "
        "once), 'auto' (both jbnn's auto chunk) or a number (both)",
    )
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument(
        "--frozen",
        action="store_true",
        help="jbnn over kernels quantized once (explain_dataset's form)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="only print SmoothGrad's compiled memory for several num_samples / batch_size",
    )
    p.add_argument(
        "--torch-layout",
        default="both",
        choices=("nchw", "channels_last", "both"),
        help="Captum's memory format; with both, the faster one is the reference",
    )
    return p.parse_args(argv)


def build(name: str, binary: bool, size: int, batch: int, num_classes: int):
    """Model, calibrated variables, images (B, size, size, 3) and targets (B,)."""
    model = models.get(name, binary=binary, num_classes=num_classes, stem="imagenet")
    x = common.random_images(jax.random.key(1), batch, size)
    variables = model.init(jax.random.key(0), x[:1])
    variables = common.calibrated(model, variables, x)
    target = jnp.argmax(model.apply(variables, x), axis=-1).astype(jnp.int32)
    return model, variables, x, target


def contestants(method, args, model, variables, x, target, torch_models):
    """name -> zero-argument callable, plus a function comparing the maps."""
    import torch
    import torch_port
    from captum.attr import LayerAttribution, LayerGradCam, NoiseTunnel, Saliency

    fn = models.apply_fn(model, variables, input_like=x if args.frozen else None)
    key = jax.random.key(42)
    tgt = torch.from_numpy(np.asarray(target)).long()
    runs, maps = {}, {}
    if method == "gradient":
        runs["jbnn"] = lambda: saliency.gradient(fn, x, target)
    elif method == "smoothgrad":
        runs["jbnn"] = lambda: saliency.smoothgrad(
            fn,
            x,
            target,
            key,
            num_samples=args.samples,
            noise_sigma=args.noise_sigma,
            batch_size=sg_chunks(args, x.shape)[0],
        )
    elif args.frozen:  # as explain_dataset runs it
        path, _ = saliency_checks.check_layer(model, x.shape, "stage4", "gradcam")
        static = dict(
            path=path, plus_plus=False, relu=True, interpolation="bilinear", return_low_res=False
        )
        runs["jbnn"] = lambda: jbnn_cam._cam_jit(fn, x, target, **static)
    else:
        runs["jbnn"] = lambda: saliency.gradcam(model, variables, x, target, layer="stage4")
    for layout, tm in torch_models.items():
        xt = torch_port.to_torch_images(x, channels_last=layout == "channels_last")
        name = f"captum_{layout}"
        if method == "gradient":
            sal = Saliency(tm)
            runs[name] = lambda sal=sal, xt=xt: sal.attribute(xt, target=tgt, abs=False)
        elif method == "smoothgrad":
            nt = NoiseTunnel(Saliency(tm))
            runs[name] = lambda nt=nt, xt=xt: nt.attribute(
                xt,
                nt_type="smoothgrad",
                nt_samples=args.samples,
                nt_samples_batch_size=sg_chunks(args, x.shape)[1],
                stdevs=args.noise_sigma,
                target=tgt,
                abs=False,
            )
        else:
            cam = LayerGradCam(tm, tm.stage4)

            def run(cam=cam, xt=xt):
                low = cam.attribute(xt, target=tgt, relu_attributions=True)
                return LayerAttribution.interpolate(low, tuple(xt.shape[2:]), "bilinear")

            runs[name] = run
    if method != "smoothgrad":  # same weights, same targets: same maps
        ref = np.asarray(runs["jbnn"]())
        for name in runs:
            if name != "jbnn":
                got = runs[name]().detach().numpy()
                got = got.transpose(0, 2, 3, 1) if method == "gradient" else got[:, 0]
                maps[name] = common.rel_error(ref, got)
    return runs, maps


def sg_chunks(args, x_shape) -> tuple:
    """(jbnn batch_size, Captum nt_samples_batch_size) for ``--sg-batch-size``."""
    from jbnn.saliency import gradients

    auto = gradients._chunk_size("auto", args.samples, x_shape, "saliency_cpu")
    choice = args.sg_batch_size
    if choice == "default":
        return auto, None
    if choice == "all":
        return None, None
    if choice == "auto":
        return auto, auto
    return int(choice), int(choice)


def sg_label(args) -> str:
    """How SmoothGrad's samples are chunked, for the header."""
    shape = (args.batch, args.size, args.size, 3)
    jbnn_bs, captum_bs = sg_chunks(args, shape)
    return f"chunks of {jbnn_bs or 'all'} (jbnn) / {captum_bs or 'all'} (Captum)"


def smoothgrad_memory(args) -> None:
    """Compiled temporary memory of SmoothGrad: grows with num_samples only without chunks.

    ``compiled.memory_analysis()`` of jbnn's jitted SmoothGrad (nothing is run) for
    num_samples in (16, 64, 256), all samples at once (``batch_size=None``) and in chunks
    of ``batch_size=16``.
    """
    from jbnn.saliency import _checks, gradients

    name = args.models.split(",")[0]
    model, variables, x, target = build(name, True, args.size, args.batch, args.num_classes)
    fn = models.apply_fn(model, variables)
    keys = _checks.per_example_keys(jax.random.key(0), args.batch, "smoothgrad")
    rows = []
    for num_samples in (16, 64, 256):
        for batch_size in (None, 16):
            static = dict(
                relative=False,
                num_samples=num_samples,
                variant="smoothgrad",
                batch_size=batch_size or num_samples,
            )
            lowered = gradients._smoothgrad_jit.lower(
                fn, x, target, keys, jnp.float32(args.noise_sigma), **static
            )
            mem = lowered.compile().memory_analysis()
            rows.append(
                [
                    str(num_samples),
                    "None (all)" if batch_size is None else str(batch_size),
                    f"{mem.temp_size_in_bytes / 2**20:.0f}",
                    f"{mem.argument_size_in_bytes / 2**20:.0f}",
                ]
            )
            print(f"  num_samples {rows[-1][0]}, batch_size {rows[-1][1]}: {rows[-1][2]} MiB")
    print(f"\nSmoothGrad compiled memory, {name} BNN, {args.size} px, batch {args.batch}:")
    header = ["num_samples", "batch_size", "temporaries MiB", "arguments MiB"]
    print(common.fmt_table(rows, header))


def time_method(method, args, name, variant, model, variables, x, target, torch_models):
    """Times one method alternately against Captum; returns its table row."""
    runs, maps = contestants(method, args, model, variables, x, target, torch_models)
    for k, e in maps.items():
        print(f"  {method}: max relative difference of the maps, jbnn vs {k}: {e:.1e}")
    t = common.alternate(runs, args.rounds)
    best = min((n for n in t if n != "jbnn"), key=lambda n: t[n].median)
    ratio = t[best].median / t["jbnn"].median
    paired = common.paired_ratio(t[best], t["jbnn"])
    fastest = min((n for n in t if n != "jbnn"), key=lambda n: t[n].best)
    best_ratio = t[fastest].best / t["jbnn"].best

    def fmt(n):
        return f"{args.batch / t[n].median:.2f} (±{50 * t[n].spread:.0f}%)"

    others = ", ".join(f"{n} {fmt(n)}" for n in t if n != "jbnn")
    print(
        f"  {method}: jbnn {fmt('jbnn')} img/s; {others}; jbnn/captum {ratio:.2f}x "
        f"(paired rounds {paired:.2f}x, best rounds {best_ratio:.2f}x)"
    )
    return [
        name,
        variant,
        method,
        f"{args.batch / t['jbnn'].median:.2f}",
        f"{args.batch / t[best].median:.2f} ({best.removeprefix('captum_')})",
        f"{ratio:.2f}x",
        f"{paired:.2f}x",
        f"{best_ratio:.2f}x",
        f"{100 * max(t[n].spread for n in t):.0f}%",
    ]


def main(argv=None):
    args = parse_args(argv)
    if args.memory:
        print(f"# saliency_cpu --memory: {common.machine()}")
        smoothgrad_memory(args)
        return
    common.set_threads(args.threads)
    import torch_port

    print(f"# saliency_cpu: {common.machine()}")
    print(
        f"# size {args.size} px, batch {args.batch}, SmoothGrad {args.samples} samples "
        f"(sigma {args.noise_sigma}, {sg_label(args)}), "
        f"{args.rounds} alternating rounds, torch threads {args.threads}, jbnn kernels "
        f"{'quantized once (--frozen)' if args.frozen else 'quantized per call'}"
    )
    layouts = ("nchw", "channels_last") if args.torch_layout == "both" else (args.torch_layout,)
    rows = []
    for name in args.models.split(","):
        for variant in args.variants.split(","):
            binary = {"bnn": True, "twin": False}[variant]
            model, variables, x, target = build(
                name, binary, args.size, args.batch, args.num_classes
            )
            torch_models = {
                layout: torch_port.port(name, model, variables, layout == "channels_last")
                for layout in layouts
            }
            errors = torch_port.logit_errors(model, variables, torch_models[layouts[0]], x)
            try:
                print(f"{name} {variant}: torch port {torch_port.check_port(errors, binary)}")
            except ValueError as e:
                raise SystemExit(f"{name} {variant}: {e}") from None
            for method in args.methods.split(","):
                rows.append(
                    time_method(
                        method, args, name, variant, model, variables, x, target, torch_models
                    )
                )
    header = [
        "model",
        "variant",
        "method",
        "jbnn img/s",
        "Captum img/s",
        "jbnn/Captum",
        "paired",
        "best rounds",
        "spread",
    ]
    print()
    print(common.fmt_table(rows, header))


if __name__ == "__main__":
    main()
