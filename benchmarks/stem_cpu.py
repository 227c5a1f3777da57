"""CPU time of the ImageNet stem's input gradient: direct form vs matrix product + col2im.

The stem of an ImageNet ResNet (7x7 convolution, stride 2, SAME, 3 -> 64 channels) runs
through ``jbnn.ops.conv``; on CPU its forward pass is the direct strided convolution and
its input gradient ``ops._conv_input_grad``: JAX's transpose rule, a convolution of the
cotangent dilated by the strides with 3 output channels, which XLA's CPU backend runs
in Eigen (its YNNPACK kernels take no dilated inputs). This script measures a candidate
replacement, alternately with the current form in one process (current, candidate,
current, ... after a warm-up of each):

* ``direct``: ``ops._conv_hwio_grad`` (jbnn's CPU stem);
* ``col2im``: the same forward pass; the input gradient as one matrix product, the
  patch gradients ``dP = g (B * H' * W', C_out) @ kernel^T (C_out, kh * kw * C_in)``
  (a YNNPACK dot: the minimal 49 x 64 x 3 multiply-adds per output pixel), whose taps
  are then overlap-added into the padded input stride phase by stride phase (dense
  sums of shifted copies, no scatter) and interleaved (:func:`col2im_input_grad`). The
  values equal JAX's up to float rounding.

Each timed call is ``grad(x -> sum(ct * tanh(conv(x, kernel))))``, i.e. the forward
convolution plus the input gradient (the kernel gradient is dead code), in three
settings: one batch under ``jit``; ``vmap`` over SmoothGrad's samples (samples x batch
images); ``lax.scan`` over chunks of samples, as chunked SmoothGrad runs it. Printed per
setting: median ms over rounds, min-max, the median of the per-round ratios direct /
col2im (> 1: col2im faster) with their spread, CPU ms per call (user + sys of this
process: what a call costs whatever else the cores run), the compiled temporary memory
of each form and the largest difference of the gradients. The 1-minute load average
is printed before and after: other jobs on the same cores slow everything down, so
compare ratios within one run only.

With ``--saliency MODEL`` the two forms are compared inside whole saliency calls
instead: Gradient and SmoothGrad (all samples at once, and ``lax.scan`` over chunks) of
the model's full-precision twin (or BNN, ``--variant bnn``), ImageNet stem, traced once
with each form of the stem's input gradient and timed alternately (the maps agree to
float rounding: their max relative difference is printed).

Measured on the 2-core Xeon (jax 0.10.2) while other engineers' jobs ran (load average
3-5.7 on the 2 cores: this process got 0.6-1 core; wall-clock ratios are noisy, the CPU
ms per call are the steadier measure). Stem alone, ratio direct/col2im of fwd + input
gradient, median [min, max] over the rounds; CPU ms per call direct vs col2im:

  64 images, 112 px   jit  1.12 [1.03, 1.36]  CPU 179 vs 160   temp 49 vs 162 MiB
  (4 x 16 samples)    vmap 1.21 [1.06, 1.63]  CPU 199 vs 164   temp 98 vs 162 MiB
                      scan 1.15 [1.01, 1.38]  CPU 139 vs 126   temp 25 vs 40 MiB
  16 images, 224 px   jit  1.05 [0.83, 1.61]  CPU 182 vs 163   temp 49 vs 162 MiB
  (4 x 4 samples)     vmap 1.27 [0.95, 2.30]  CPU 203 vs 163   temp 98 vs 162 MiB
                      scan 1.40 [1.16, 1.89]  CPU 215 vs 159   temp 49 vs 81 MiB

The input gradient alone (no forward pass, 64 x 112 px): direct 121-136 ms CPU, col2im
110-122 ms, both spread over XLA's threads. The YNNPACK dot with a 64-long contraction
runs at ~40-50 GFLOP per CPU second here, half the forward convolution's rate, and the
overlap-add costs ~23 ms: the formulation saves little work.

Whole calls, birealnet18 twin (paired wall ratio direct/col2im; CPU ms per call):

  112 px, batch 4, 16 samples   Gradient 0.93 (CPU 123 vs 123); SmoothGrad 1.12
                                (1464 vs 1371, 1.07); SmoothGrad chunks of 4 1.06
                                (1355 vs 1337, 1.01)
  224 px, batch 4, 8 samples    Gradient 1.13 (340 vs 321, 1.06); SmoothGrad 1.08
                                (2548 vs 2481, 1.03); chunks of 2 1.03 (2504 vs 2354)

The stem's input gradient is ~9% of a twin SmoothGrad call's CPU time here (125 of
1464 ms), so even a free one would speed the call up by ~1.1x.

Formulations measured and dropped on the way (same conditions): the matrix product
split by stride phase (4 dots: a little more CPU than one); patch gradients as planes
``(kh * kw * C_in, B, H', W')`` (overlap-add along the contiguous axis ~20 ms cheaper,
the transposed dot dearer: slower overall); ``g`` zero-padded so that the overlap-add
is plain slices (1.2x more dot work: slower); a stride-1 convolution of ``g`` with
each phase's taps (3 output channels) or all phases at once (12: the space-to-depth
backward), in Eigen (2.6x slower than direct) or, padding made explicit, in YNNPACK
(4-15x slower: its convolutions with few output channels are very slow here).

Verdict: below the 1.3x bar on the stem in most settings and 1-7% CPU on a twin's
saliency call, at up to 3x the stem's temporary memory: jbnn keeps the direct form.

Usage (repository root):
  python benchmarks/stem_cpu.py                   # 112 px, 4 images x 16 samples
  python benchmarks/stem_cpu.py --size 224 --batch 4 --samples 4 --rounds 7
  python benchmarks/stem_cpu.py --saliency birealnet18 --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from jbnn import models, ops  # noqa: E402
from jbnn.saliency import _checks, gradients  # noqa: E402


def col2im_input_grad(x_shape, dtype, kernel, g, strides, pads):
    """The input gradient of an NHWC / HWIO convolution: patch gradients, overlap-added.

    Padded input row ``sh * (i + p) + ra`` meets kernel row ``sh * p + ra`` at output
    row ``i``, so row ``m`` of stride phase ``ra`` (padded row ``sh * m + ra``) collects
    ``sum_p dP[i = m - p, tap sh * p + ra]``, the same along columns. Accumulates in
    float32; returns ``dtype``.
    """
    (sh, sw), (kh, kw, c_in, c_out) = strides, kernel.shape
    batch, height, width = x_shape[:3]
    out_h, out_w = g.shape[1:3]
    len_h, len_w = out_h + -(-kh // sh) - 1, out_w + -(-kw // sw) - 1  # rows of a phase
    patches = jnp.dot(  # (B, H', W', kh * kw * C_in)
        g, kernel.reshape(kh * kw * c_in, c_out).T, preferred_element_type=jnp.float32
    ).reshape(batch, out_h, out_w, kh, kw, c_in)
    zero = jnp.zeros((), jnp.float32)
    phases = []
    for ra in range(sh):
        row = []
        for rb in range(sw):
            total = jnp.zeros((batch, len_h, len_w, c_in), jnp.float32)
            for p, a in enumerate(range(ra, kh, sh)):
                for q, b in enumerate(range(rb, kw, sw)):
                    total = total + lax.pad(
                        patches[:, :, :, a, b],
                        zero,
                        ((0, 0, 0), (p, len_h - out_h - p, 0), (q, len_w - out_w - q, 0))
                        + ((0, 0, 0),),
                    )
            row.append(total)  # (B, len_h, len_w, C_in)
        phases.append(jnp.stack(row, axis=3))  # (B, len_h, len_w, sw, C_in)
    padded = jnp.stack(phases, axis=2).reshape(batch, len_h * sh, len_w * sw, c_in)
    (top, _), (left, _) = pads  # crop the padding; zeros where no output reads
    d_x = lax.pad(
        padded,
        zero,
        ((0, 0, 0), (-top, height + top - len_h * sh, 0), (-left, width + left - len_w * sw, 0))
        + ((0, 0, 0),),
    )
    return d_x.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def col2im_conv(x, kernel, strides, pads):
    """``ops._conv`` (the same forward bits) with :func:`col2im_input_grad` backward."""
    return ops._conv(x, kernel, strides, pads)


def _col2im_conv_fwd(x, kernel, strides, pads):
    return ops._conv(x, kernel, strides, pads), (x, kernel)


def _col2im_conv_bwd(strides, pads, residuals, g):
    x, kernel = residuals
    _, kernel_pullback = jax.vjp(lambda k: ops._conv(x, k, strides, pads), kernel)
    d_x = col2im_input_grad(x.shape, x.dtype, kernel, g, strides, pads)
    return d_x, kernel_pullback(g)[0]


col2im_conv.defvjp(_col2im_conv_fwd, _col2im_conv_bwd)

FORMS = {"direct": ops._conv_hwio_grad, "col2im": col2im_conv}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _programs(setting, size, batch, samples, chunk, channels):
    """{form: (jitted fn, args)} for one setting; the same inputs for every form."""
    strides = (2, 2)
    pads = ops._explicit_pads("SAME", (size, size), (7, 7), strides, "stem_cpu")
    keys = jax.random.split(jax.random.key(0), 3)
    kernel = 0.1 * jax.random.normal(keys[1], (7, 7, 3, channels))
    out = size // 2

    def make(conv):
        def grad(x, kernel, ct):  # x (N, H, W, 3), ct (N, H/2, W/2, C)
            return jax.grad(lambda x: jnp.sum(ct * jnp.tanh(conv(x, kernel, strides, pads))))(x)

        if setting == "jit":
            return jax.jit(grad)
        if setting == "vmap":
            return jax.jit(jax.vmap(grad, in_axes=(0, None, None)))

        def scanned(x, kernel, ct):  # x (samples / chunk, chunk, B, H, W, 3)
            def body(total, xs):
                g = jax.vmap(grad, in_axes=(0, None, None))(xs, kernel, ct)
                return total + jnp.sum(g, axis=0), None

            zeros = jnp.zeros(x.shape[2:], x.dtype)
            return jax.lax.scan(body, zeros, x)[0]

        return jax.jit(scanned)

    if setting == "jit":
        x = jax.random.normal(keys[0], (batch * samples, size, size, 3))
        ct = jax.random.normal(keys[2], (batch * samples, out, out, channels))
    else:
        x = jax.random.normal(keys[0], (samples, batch, size, size, 3))
        ct = jax.random.normal(keys[2], (batch, out, out, channels))
        if setting == "scan":
            x = x.reshape(samples // chunk, chunk, batch, size, size, 3)
    return {name: (make(conv), (x, kernel, ct)) for name, conv in FORMS.items()}


def run(setting, args) -> None:
    programs = _programs(setting, args.size, args.batch, args.samples, args.chunk, args.channels)
    results, temp = {}, {}
    for name, (fn, fn_args) in programs.items():
        memory = fn.lower(*fn_args).compile().memory_analysis()
        temp[name] = getattr(memory, "temp_size_in_bytes", float("nan")) / 2**20
        results[name] = fn(*fn_args).block_until_ready()
    error = float(jnp.max(jnp.abs(results["col2im"] - results["direct"])))
    scale = float(jnp.max(jnp.abs(results["direct"])))
    wall = {name: [] for name in programs}
    cpu = {name: [] for name in programs}
    for _ in range(args.rounds):
        for name, (fn, fn_args) in programs.items():
            c0, t0 = _cpu_seconds(), time.perf_counter()
            fn(*fn_args).block_until_ready()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(_cpu_seconds() - c0)
    ratio = np.array(wall["direct"]) / np.array(wall["col2im"])
    images = args.batch * args.samples
    print(
        f"{setting:5s} {images} images at {args.size} px"
        + (f" (scan over chunks of {args.chunk} samples)" if setting == "scan" else "")
        + f": max |col2im - direct| = {error:.2e} (max |grad| {scale:.2e})"
    )
    for name in programs:
        ms = 1e3 * np.array(wall[name])
        print(
            f"  {name:7s} median {np.median(ms):7.1f} ms  [{ms.min():7.1f}, {ms.max():7.1f}]"
            f"  cpu {1e3 * np.median(cpu[name]):7.1f} ms/call  temp {temp[name]:7.1f} MiB"
        )
    print(
        f"  ratio direct/col2im per round: median {np.median(ratio):.2f}"
        f"  [{ratio.min():.2f}, {ratio.max():.2f}]"
    )


def _timed_call(cpu_seconds: list, fn, args):
    """fn(*args), results ready; appends the CPU seconds the call took to cpu_seconds."""
    start = _cpu_seconds()
    out = jax.block_until_ready(fn(*args))
    cpu_seconds.append(_cpu_seconds() - start)
    return out


def run_saliency(args) -> None:
    """Gradient / SmoothGrad of a whole model, the stem's CPU backward in either form."""
    model = models.get(
        args.saliency, binary=args.variant == "bnn", num_classes=1000, stem="imagenet"
    )
    x = common.random_images(jax.random.key(1), args.batch, args.size)
    variables = common.calibrated(model, model.init(jax.random.key(0), x[:1]), x)
    target = jnp.argmax(model.apply(variables, x), axis=-1).astype(jnp.int32)
    keys = _checks.per_example_keys(jax.random.key(0), args.batch, "smoothgrad")
    sigma = jnp.float32(0.15)

    def programs():  # fresh jitted functions, traced under the active stem form
        smoothgrad = gradients._smoothgrad_jit.__wrapped__  # not the cached jitted callee
        sg = lambda chunk: jax.jit(
            lambda fn, x, target, keys, sigma: smoothgrad(
                fn,
                x,
                target,
                keys,
                sigma,
                relative=False,
                num_samples=args.samples,
                variant="smoothgrad",
                batch_size=chunk,
            )
        )
        fn = models.apply_fn(model, variables)
        out = {
            # a fresh function: jax.jit would reuse the trace of gradients._target_grad
            "gradient": (jax.jit(lambda *a: gradients._target_grad(*a)), (fn, x, target)),
            "smoothgrad": (sg(args.samples), (fn, x, target, keys, sigma)),
            f"smoothgrad chunks of {args.chunk}": (sg(args.chunk), (fn, x, target, keys, sigma)),
        }
        for f, a in out.values():  # trace and compile now, under the active form
            jax.block_until_ready(f(*a))
        return out

    old = programs()
    direct = ops._conv_hwio_grad

    def stem_col2im(x, kernel, strides, pads):  # only where ops.conv's CPU stem branch is
        if ops._use_space_to_depth(x.shape[-1], tuple(strides)):
            return col2im_conv(x, kernel, strides, pads)
        return direct(x, kernel, strides, pads)

    ops._conv_hwio_grad = stem_col2im  # looked up by ops.conv when a program is traced
    try:
        new = programs()
    finally:
        ops._conv_hwio_grad = direct
    print(
        f"{args.saliency} {args.variant}, {args.size} px, batch {args.batch}, "
        f"{args.samples} SmoothGrad samples, {args.rounds} alternating rounds:"
    )
    for name in new:
        (nf, na), (of, oa) = new[name], old[name]
        err = common.rel_error(of(*oa), nf(*na))
        cpu = {"direct": [], "col2im": []}

        runs = {
            "direct": functools.partial(_timed_call, cpu["direct"], of, oa),
            "col2im": functools.partial(_timed_call, cpu["col2im"], nf, na),
        }
        t = common.alternate(runs, args.rounds)
        d, c = (1e3 * np.array(t[k].seconds) for k in ("direct", "col2im"))
        cpu_d, cpu_c = (1e3 * np.median(cpu[k][1:]) for k in ("direct", "col2im"))
        print(
            f"  {name:22s} direct {np.median(d):6.0f} ms [{d.min():.0f}, {d.max():.0f}]"
            f"  col2im {np.median(c):6.0f} ms [{c.min():.0f}, {c.max():.0f}]"
            f"  paired ratio {common.paired_ratio(t['direct'], t['col2im']):.2f}"
            f" (best rounds {d.min() / c.min():.2f})  CPU ms/call {cpu_d:.0f} vs {cpu_c:.0f}"
            f" ({cpu_d / cpu_c:.2f})  max rel diff {err:.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=112, help="image size (224: ImageNet)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16, help="SmoothGrad samples")
    parser.add_argument("--chunk", type=int, default=4, help="samples per scan step")
    parser.add_argument("--channels", type=int, default=64, help="stem output channels")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--settings", default="jit,vmap,scan")
    parser.add_argument("--saliency", default=None, help="a model name: whole saliency calls")
    parser.add_argument("--variant", default="twin", choices=("twin", "bnn"))
    args = parser.parse_args()
    if args.samples % args.chunk:
        parser.error(f"--samples ({args.samples}) must be a multiple of --chunk ({args.chunk})")
    print(f"{common.machine()}; load average {os.getloadavg()}")
    if args.saliency:
        run_saliency(args)
        print(f"load average {os.getloadavg()}")
        return
    for setting in args.settings.split(","):
        if setting not in ("jit", "vmap", "scan"):
            parser.error(f"--settings: unknown setting {setting!r} (jit, vmap or scan)")
        run(setting, args)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
