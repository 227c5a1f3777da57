"""SmoothGrad throughput and achieved TFLOP/s on one GPU: jbnn against Captum.

Prepared for a GPU machine (one H100 or H200); ``--smoke`` runs the whole script end to
end on CPU with tiny sizes, so that it is known to work before GPU time is spent.

For each model (default ``birealnet18``, ImageNet stem, 224 px; BNN and twin) the
float32 Flax variables (BatchNorm statistics calibrated on the batch) are copied into
the PyTorch port (:mod:`torch_port`), the logits are checked to agree (full float32
precision on both sides: no TF32), and then four contestants are timed alternately
after a warm-up of each:

* ``jbnn f32``: ``jbnn.saliency.smoothgrad`` on the float32 model;
* ``captum f32``: ``NoiseTunnel(Saliency)`` with the same sigma and sample count;
* ``jbnn bf16``: the same jbnn model built with ``dtype=jnp.bfloat16`` (bfloat16
  activations and matmuls, float32 parameters and BatchNorm statistics);
* ``captum bf16``: Captum under ``torch.autocast("cuda", dtype=torch.bfloat16)``;
* ``captum-cl``: Captum again with the port and images in channels-last memory (often
  faster on tensor cores);
* ``jbnn-plain bf16`` (``--ab plain``, the default): the bf16 jbnn model traced with
  plain ``lax``/``flax`` ops instead of :mod:`jbnn.ops` (whose custom VJPs were written
  for XLA's CPU backend);
* ``jbnn-prevpool f32`` / ``bf16`` (``--ab prev-pool``): jbnn with the max-pool VJP
  before the first-maximum index moved to the forward pass (``ops_ab.previous_max_pool``);
* ``jbnn-padpool f32`` / ``bf16`` (``--ab pad-pool``): jbnn with the max-pool backward
  pass as a sum of interior-padded taps (``ops_ab.pad_max_pool``);
* ``jbnn-nativepool f32`` / ``bf16`` (``--ab native-pool``): jbnn with flax's max-pool,
  whose gradient is XLA's own select-and-scatter (``ops_ab.native_max_pool``);
* ``jbnn-foldbn f32`` / ``bf16`` (``--ab fold-bn``): jbnn with the inference
  BatchNorms folded into the convolutions before them
  (``models.apply_fn(..., fold_batchnorm=True)``);
* ``jbnn-nosplit f32`` / ``bf16`` (``--ab no-split``): jbnn with
  ``split_input_layer=False``, every noisy copy's gradient pulled back through the stem
  convolution (the default sums them at the stem's output and pulls back once);
* ``jbnn-frozen f32`` / ``bf16`` (``--ab frozen``): jbnn over kernels quantized once
  (``models.apply_fn(..., input_like=x)``, what ``explain_dataset`` and so ``explain.py``
  run) instead of at every call;
* ``jbnn-frozenfold f32`` / ``bf16`` (``--ab frozen-fold``): the same with the
  BatchNorms folded, the folded kernels computed once.

The jbnn/Captum ratio of each jbnn row is taken against the faster Captum layout of the
same dtype.

All samples of a batch go through the network together on both sides (jbnn
``batch_size=None``, Captum ``nt_samples_batch_size=None``). Float32 convolutions use
each framework's GPU default: TF32 tensor cores in both (XLA's default precision,
``torch.backends.cudnn.allow_tf32 = True``). The FLOPs of one SmoothGrad call are
counted analytically, the same for every contestant: ``4 x MACs x images x samples``
(2 FLOPs per multiply-accumulate, for the forward pass and again for the input
gradient; the model's MACs from :func:`jbnn.summary.summary`); achieved TFLOP/s =
FLOPs / median time. jbnn's default SmoothGrad skips part of that count: the stem's
input gradient runs once per image instead of once per sample (the stem's MACs, about
6.5% of a Bi-Real Net 18's, so about 3% of the count); the count is not reduced for it,
so its TFLOP/s are those of the computation it replaces. ``--xla-flops`` also prints
XLA's own count of the compiled float32 computation (one more compilation; on CPU it
agrees with the analytic count to about 10%, BatchNorm and the kernel-free ops making
up the difference). XLA's count of
the *lowered* computation, used by an earlier version, read 52 GFLOP instead of about
5.8 TFLOP on the H100 (jax 0.11.2): do not use it. The bf16 matrix peak of the device
(dense, from ``--peak-tflops`` or the device name) gives the fraction of peak.

Targets (issue 7): SmoothGrad >= 2.5x Captum's speed in float32 and in bfloat16, and
>= 30% of the bf16 matrix peak on a ResNet-18 at 224 px.

Usage (repository root):
  python benchmarks/saliency_gpu.py                 # 224 px, batch 16, 50 samples
  python benchmarks/saliency_gpu.py --smoke         # tiny, on CPU: checks the script
  python benchmarks/saliency_gpu.py --variants twin --rounds 9
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

# JAX and PyTorch share the GPU: JAX must not take 75% of its memory at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import ops_ab  # noqa: E402

from jbnn import models, saliency  # noqa: E402
from jbnn.saliency import _checks, gradients  # noqa: E402
from jbnn.summary import summary  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) of the devices this may run on.
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="birealnet18")
    p.add_argument("--variants", default="bnn,twin")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--noise-sigma", type=float, default=0.15)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak")
    p.add_argument("--xla-flops", action="store_true", help="also print XLA's FLOP count")
    p.add_argument(
        "--ab",
        default="plain",
        help="extra jbnn contestants, comma-separated: plain, prev-pool, pad-pool, "
        "native-pool, fold-bn, no-split, frozen, frozen-fold (or none)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU")
    args = p.parse_args(argv)
    args.ab = [a for a in args.ab.split(",") if a and a != "none"]
    known = (
        "plain",
        "prev-pool",
        "pad-pool",
        "native-pool",
        "fold-bn",
        "no-split",
        "frozen",
        "frozen-fold",
    )
    unknown = set(args.ab) - set(known)
    if unknown:
        p.error(f"unknown --ab contestant(s) {sorted(unknown)}; known: {', '.join(known)}")
    if args.smoke:
        args.size, args.batch, args.samples, args.width, args.rounds = 32, 2, 2, 0.125, 2
    return args


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAKS.items() if k in kind), None)


def smoothgrad_flops(model, args) -> float:
    """FLOPs of one SmoothGrad call: 2 per MAC, forward pass plus input gradient."""
    macs = summary(model, (1, args.size, args.size, 3), print_fn=None).total_macs
    return 4.0 * macs * args.batch * args.samples


def xla_smoothgrad_flops(fn, x, target, keys, sigma, num_samples) -> float:
    """FLOPs of one jbnn SmoothGrad call as XLA counts them on the compiled computation."""
    static = dict(relative=False, num_samples=num_samples, variant="smoothgrad")
    compiled = gradients._smoothgrad_jit.lower(
        fn, x, target, keys, sigma, batch_size=num_samples, **static
    ).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def bench_model(name: str, variant: str, args, device: str, peak: float | None) -> list:
    """Table rows (f32 and bf16, jbnn and Captum) of one model variant."""
    import torch
    import torch_port
    from captum.attr import NoiseTunnel, Saliency

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    binary = {"bnn": True, "twin": False}[variant]
    kw = dict(binary=binary, num_classes=1000, stem="imagenet", width=args.width)
    model = models.get(name, **kw)
    model_bf16 = models.get(name, dtype=jnp.bfloat16, **kw)
    x = common.random_images(jax.random.key(1), args.batch, args.size)
    variables = model.init(jax.random.key(0), x[:1])
    variables = common.calibrated(model, variables, x)
    target = jnp.argmax(model.apply(variables, x), axis=-1).astype(jnp.int32)

    tm = torch_port.port(name, model, variables).to(device)
    tm_cl = torch_port.port(name, model, variables, channels_last=True).to(device)
    xt = torch_port.to_torch_images(x).to(device)
    xt_cl = torch_port.to_torch_images(x, channels_last=True).to(device)
    tgt = torch.from_numpy(np.array(target)).long().to(device)
    torch.backends.cudnn.allow_tf32 = False  # the logit check at full float32 precision
    with jax.default_matmul_precision("highest"), torch.no_grad():
        ref = np.asarray(model.apply(variables, x))
        got = tm(xt).float().cpu().numpy()
    torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions
    errors = np.max(np.abs(ref - got), axis=1) / np.maximum(1.0, np.max(np.abs(ref), axis=1))
    try:
        print(f"{name} {variant}: torch port {torch_port.check_port(errors, binary, 1e-3)}")
    except ValueError as e:
        raise SystemExit(f"{name} {variant}: {e}") from None

    fn32 = models.apply_fn(model, variables)
    fn16 = models.apply_fn(model_bf16, variables)
    # The same bf16 model traced with plain lax/flax ops instead of jbnn.ops (an A/B of
    # jbnn's custom VJPs, written for XLA's CPU backend, on this device). A function of
    # its own, so that jit's cache never mixes the two traces.
    fn16_plain = jax.tree_util.Partial(lambda v, xx: model_bf16.apply(v, xx), variables)
    key = jax.random.key(42)
    keys = _checks.per_example_keys(key, args.batch, "smoothgrad")
    sigma = jnp.float32(args.noise_sigma)
    flops = smoothgrad_flops(model, args)
    print(f"  FLOPs per SmoothGrad call (4 x MACs x images x samples): {flops / 1e12:.4g} T")
    if args.xla_flops:
        xla = xla_smoothgrad_flops(fn32, x, target, keys, sigma, args.samples)
        print(f"  XLA's count of the compiled float32 call: {xla / 1e12:.4g} T")

    def captum(module, images):
        nt = NoiseTunnel(Saliency(module))

        def run():
            out = nt.attribute(
                images,
                nt_type="smoothgrad",
                nt_samples=args.samples,
                stdevs=args.noise_sigma,
                target=tgt,
                abs=False,
            )
            sync()
            return out

        return run

    def bf16(run):
        def autocast():
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                return run()

        return autocast

    def jbnn(fn, context=contextlib.nullcontext, split=True):
        def run():
            with context():
                return saliency.smoothgrad(
                    fn,
                    x,
                    target,
                    key,
                    num_samples=args.samples,
                    noise_sigma=args.noise_sigma,
                    split_input_layer=split,
                )

        return run

    runs = {
        "jbnn f32": jbnn(fn32),
        "captum f32": captum(tm, xt),
        "captum-cl f32": captum(tm_cl, xt_cl),
        "jbnn bf16": jbnn(fn16),
        "captum bf16": bf16(captum(tm, xt)),
        "captum-cl bf16": bf16(captum(tm_cl, xt_cl)),
    }
    if "plain" in args.ab:
        runs["jbnn-plain bf16"] = jbnn(fn16_plain, ops_ab.plain_ops)
    for ab, context in (
        ("prev-pool", ops_ab.previous_max_pool),
        ("pad-pool", ops_ab.pad_max_pool),
        ("native-pool", ops_ab.native_max_pool),
    ):
        if ab not in args.ab:
            continue
        for dtype, m in (("f32", model), ("bf16", model_bf16)):
            # functions of their own, for the same reason
            fn = jax.tree_util.Partial(lambda v, xx, m=m: m.apply(v, xx), variables)
            runs[f"jbnn-{ab.replace('-', '')} {dtype}"] = jbnn(fn, context)
    if "fold-bn" in args.ab:
        for dtype, m in (("f32", model), ("bf16", model_bf16)):
            fn = models.apply_fn(m, variables, fold_batchnorm=True)
            runs[f"jbnn-foldbn {dtype}"] = jbnn(fn)
    if "no-split" in args.ab:
        runs["jbnn-nosplit f32"] = jbnn(fn32, split=False)
        runs["jbnn-nosplit bf16"] = jbnn(fn16, split=False)
    for ab, fold in (("frozen", False), ("frozen-fold", True)):
        if ab in args.ab:
            for dtype, m in (("f32", model), ("bf16", model_bf16)):
                fn = models.apply_fn(m, variables, fold_batchnorm=fold, input_like=x)
                runs[f"jbnn-{ab.replace('-', '')} {dtype}"] = jbnn(fn)
    t = common.alternate(runs, args.rounds)
    rows = []
    for dtype in ("f32", "bf16"):
        c = min(
            (t[k] for k in t if k.startswith("captum") and k.endswith(dtype)),
            key=lambda timing: timing.median,
        )
        for who in [k for k in t if k.endswith(dtype)]:
            timing = t[who]
            tflops = flops / timing.median / 1e12
            rows.append(
                [
                    name,
                    variant,
                    dtype,
                    who.split()[0],
                    f"{args.batch / timing.median:.1f}",
                    f"{tflops:.3g}",
                    f"{100 * tflops / peak:.1f}%" if peak else "-",
                    f"{c.median / timing.median:.2f}x" if who.startswith("jbnn") else "",
                    f"{100 * timing.spread:.0f}%",
                ]
            )
            print(f"  {dtype} {who}: {rows[-1][4]} img/s, {rows[-1][5]} TFLOP/s", flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    print(f"# saliency_gpu: {common.machine()}; torch device {device}")
    peak = peak_tflops(args)
    print(
        f"# {args.size} px, batch {args.batch}, SmoothGrad {args.samples} samples, sigma "
        f"{args.noise_sigma}, width {args.width}, {args.rounds} alternating rounds; bf16 "
        f"peak {peak or 'unknown'} TFLOP/s"
    )
    rows = []
    for name in args.models.split(","):
        for variant in args.variants.split(","):
            rows += bench_model(name, variant, args, device, peak)
    header = [
        "model",
        "variant",
        "dtype",
        "who",
        "img/s",
        "TFLOP/s",
        "of bf16 peak",
        "jbnn/Captum",
        "spread",
    ]
    print()
    print(common.fmt_table(rows, header))


if __name__ == "__main__":
    main()
