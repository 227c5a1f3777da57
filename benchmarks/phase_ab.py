"""A/B of the phase form of strided input gradients in the explainers' CPU programs.

In :func:`jbnn.ops.platform_jit`'s CPU programs (XLA's classic kernels) the input
gradient of a strided convolution over a large input is one stride-1 convolution per
stride phase (``jbnn.ops._phase_input_grad``; ``PHASE_INPUT_GRAD_MIN_SIZE`` /
``_MIN_POSITIONS`` say when); the other contestant traces the same explainer with that
choice off, so the dilated convolution of JAX's transpose rule stays. Both are timed
alternately on the same inputs and their maps compared (equal up to float rounding).
Each contestant has its own model function (the same model under another name), so each
compiles once, with its own form.

Usage (repository root):
  python benchmarks/phase_ab.py                        # Bi-Real Net 18 and ResNet-E 18, 112 px
  python benchmarks/phase_ab.py --size 224 --batch 4 --methods gradient
  python benchmarks/phase_ab.py --layers               # single layers: where the rule comes from
  python benchmarks/phase_ab.py --smoke                # tiny: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jbnn import models, ops, saliency  # noqa: E402


@contextlib.contextmanager
def phase_form_off():
    """While tracing inside this block, strided input gradients keep the dilated form."""
    saved = ops._use_phase_input_grad
    ops._use_phase_input_grad = lambda *args: False
    try:
        yield
    finally:
        ops._use_phase_input_grad = saved


def _call(method, fn, x, target, args):
    if method == "gradient":
        return saliency.gradient(fn, x, target)
    return saliency.smoothgrad(
        fn, x, target, jax.random.key(42), num_samples=args.samples, batch_size=args.chunk or None
    )


# (batch, input size, C_in, C_out, kernel, stride): ResNet-18's strided convolutions
LAYERS = [
    (batch, size, c_in, c_in * 2, k, 2)
    for batch in (4, 64)
    for size, c_in in ((56, 64), (28, 64), (14, 128), (7, 256))
    for k in (3, 1)
]


def _layer_forms(batch, size, c_in, c_out, k, stride):
    """Both forms of one layer's input gradient, compiled, and their arguments."""
    x_shape = (batch, size, size, c_in)
    w = jax.random.normal(jax.random.key(1), (k, k, c_in, c_out)) * 0.05
    strides = (stride, stride)
    pads = ops._explicit_pads("SAME", (size, size), (k, k), strides, "layers")
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    out = jax.eval_shape(lambda x: ops._conv(x, w, strides, pads), x).shape
    g = jax.random.normal(jax.random.key(2), out)
    forms = {
        "dilated": ops.platform_jit(
            lambda w, g: ops._conv_input_grad(x_shape, jnp.float32, w, g, strides, pads)
        ),
        "phase": ops.platform_jit(
            lambda w, g: ops._phase_input_grad(x_shape, jnp.float32, w, g, strides, pads)
        ),
    }
    return forms, (w, g), ops._use_phase_input_grad(x_shape, strides, pads)


def layers(args):
    """The input gradient of single strided convolutions: dilated form against phases."""
    print(
        "batch  size  C_in -> C_out  kernel  uses phases  dilated ms  phase ms  speed-up  rel diff"
    )
    for batch, size, c_in, c_out, k, stride in LAYERS:
        forms, call_args, used = _layer_forms(batch, size, c_in, c_out, k, stride)
        err = common.rel_error(forms["phase"](*call_args), forms["dilated"](*call_args))
        runs = {n: lambda f=f, a=call_args: f(*a) for n, f in forms.items()}
        t = common.alternate(runs, args.rounds)
        print(
            f"{batch:5d} {size:5d} {c_in:5d} -> {c_out:5d}  {k}x{k}/{stride}  {str(used):>11s}  "
            f"{t['dilated'].median * 1e3:10.2f} {t['phase'].median * 1e3:9.2f} "
            f"{t['dilated'].median / t['phase'].median:8.2f}x  {err:.1e}",
            flush=True,
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="birealnet18,binary_resnet_e18")
    p.add_argument("--variants", default="twin,bnn")
    p.add_argument("--methods", default="gradient,smoothgrad")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=16, help="SmoothGrad samples")
    p.add_argument("--chunk", type=int, default=0, help="SmoothGrad batch_size (0: all at once)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--smoke", action="store_true", help="tiny sizes")
    p.add_argument("--layers", action="store_true", help="single strided layers, both forms")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.samples, args.rounds = 56, 2, 4, 2
    print(f"# phase_ab: {common.machine()}")
    if args.layers:
        layers(args)
        return
    rows = []
    for name in args.models.split(","):
        for variant in args.variants.split(","):
            model = models.get(name, binary=variant == "bnn", num_classes=1000, stem="imagenet")
            x = common.random_images(jax.random.key(1), args.batch, args.size)
            variables = common.calibrated(model, model.init(jax.random.key(0), x[:1]), x)
            fn_phase = models.apply_fn(model, variables)
            # an equal model under another name: a function of its own for jit's caches
            fn_dilated = models.apply_fn(model.clone(name="dilated"), variables)
            target = jnp.argmax(fn_phase(x), axis=-1).astype(jnp.int32)
            for method in args.methods.split(","):
                want = _call(method, fn_phase, x, target, args)
                with phase_form_off():  # traced and compiled here, with the dilated form
                    got = _call(method, fn_dilated, x, target, args)
                err = common.rel_error(got, want)
                t = common.alternate(
                    {
                        "phase": lambda m=method, f=fn_phase, x=x, t=target: _call(
                            m, f, x, t, args
                        ),
                        "dilated": lambda m=method, f=fn_dilated, x=x, t=target: _call(
                            m, f, x, t, args
                        ),
                    },
                    args.rounds,
                )
                rows.append(
                    [
                        name,
                        variant,
                        method,
                        f"{t['dilated'].median * 1e3:.1f}",
                        f"{t['phase'].median * 1e3:.1f}",
                        f"{t['dilated'].median / t['phase'].median:.3f}x",
                        f"{common.paired_ratio(t['dilated'], t['phase']):.3f}x",
                        f"{100 * max(t['dilated'].spread, t['phase'].spread):.0f}%",
                        f"{err:.1e}",
                    ]
                )
                print("  " + " | ".join(rows[-1]), flush=True)
    print(
        f"\n{args.size} px, batch {args.batch}, SmoothGrad {args.samples} samples "
        f"({'all at once' if not args.chunk else f'chunks of {args.chunk}'}), "
        f"{args.rounds} alternating rounds:"
    )
    header = ["model", "variant", "method", "dilated ms", "phase ms", "speed-up", "paired"]
    print(common.fmt_table(rows, header + ["spread", "max rel diff"]))


if __name__ == "__main__":
    main()
