"""Where the CPU time of jbnn's saliency goes: per-op profile of the compiled XLA program.

Runs a jitted computation under ``jax.profiler`` (a Perfetto trace of XLA's CPU
thunks), then sums the time of every HLO instruction and groups it by what the
instruction comes from (its ``op_name`` metadata): forward convolutions, input-gradient
convolutions, kernel-gradient convolutions, max-pool, average-pool, the rest
(elementwise fusions: BatchNorm, quantizers, ReLU, adds, copies). Also checks in the
optimised HLO that a saliency computation contains no kernel-gradient convolution
(dead code: only input gradients are needed) and prints the compiled memory figures.

Usage (repository root):
  python benchmarks/profile_cpu.py                           # birealnet18 BNN SmoothGrad
  python benchmarks/profile_cpu.py --model resnet18 --method gradient --ops lax
  python benchmarks/profile_cpu.py --model binary_resnet_e18 --variant twin
  python benchmarks/profile_cpu.py --conv-micro               # conv fwd / dx / dw vs torch
  python benchmarks/profile_cpu.py --conv-layers --batch 64   # ResNet-18's convs vs torch
  python benchmarks/profile_cpu.py --jbnn-options   # as jbnn's explainers compile on CPU

By default the saliency programs compile with XLA's default flags (YNNPACK fusions), whose
thunks the trace times faithfully; jbnn's explainers compile without them
(``jbnn.ops.platform_jit``), see ``--jbnn-options``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


# --------------------------------------------------------------------------- profile
def _instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (result shape text, op_name metadata), entry-level."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.+?) (\w[\w\-]*)\(", line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            out[m.group(1)] = (m.group(2), m.group(3), op.group(1) if op else "", line)
    return out


def categorize(name: str, info, kernel_shapes=frozenset()) -> str:
    """A coarse category of one HLO instruction (by its kind and op_name metadata).

    ``kernel_shapes``: sorted dimension tuples of the model's 4-D kernels; a convolution
    (or library fusion) whose result has one of them is a kernel gradient.
    """
    shape, kind, op, line = info
    backward = "transpose(" in op
    dims = re.match(r"\w+\[([\d,]+)\]", shape)
    if dims and ("ynn" in name or kind == "convolution" or "convolution" in name):
        if tuple(sorted(int(d) for d in dims.group(1).split(","))) in kernel_shapes:
            return "conv kernel-gradient"
    if "conv_general_dilated" in op or kind == "convolution":
        if not backward:
            return "conv forward"
        if re.search(r"f32\[\d+,\d+,\d+,\d+\]", shape) and "dim_labels=" in line:
            labels = re.search(r"dim_labels=(\S+?)[,\s]", line)
            if labels and labels.group(1).endswith("->01io"):
                return "conv kernel-gradient"
        if "lhs_dilate" in line:
            return "conv input-gradient (dilated, generic)"
        return "conv input-gradient"
    if "dot_general" in op:
        return "dense"
    if any(k in op for k in ("reduce_window_max", "select_and_scatter", "max_pool")):
        return "max-pool"
    if "reduce_window_sum" in op or "avg_pool" in op or "reduce_window" in kind:
        return "avg-pool / reduce-window"
    if kind in ("iota",) or name.startswith("wrapped_iota"):
        return "max-pool"
    if "random" in op or "threefry" in op or "erf_inv" in op:
        return "random noise"
    return "elementwise / copies / other"


def profile(jitted, *args, repeats=3, top=15, show=True, show_category=None):
    """Runs ``jitted(*args)`` under the profiler; returns {category: ms per call}."""
    kernel_shapes = frozenset(
        tuple(sorted(a.shape)) for a in jax.tree.leaves(args) if getattr(a, "ndim", 0) == 4
    )
    jax.block_until_ready(jitted(*args))
    hlo = jitted.lower(*args).compile().as_text()
    info = _instructions(hlo)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(repeats):
            jax.block_until_ready(jitted(*args))
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_instr = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in info:
            per_instr[e["name"]] += e["dur"] / 1e3 / repeats
    per_cat = collections.Counter()
    for name, ms in per_instr.items():
        per_cat[categorize(name, info[name], kernel_shapes)] += ms
    if show:
        total = sum(per_cat.values())
        print(f"  total in XLA thunks: {total:.1f} ms per call")
        for cat, ms in per_cat.most_common():
            print(f"  {ms:9.1f} ms {100 * ms / total:5.1f}%  {cat}")
        print("  top instructions:")
        shown = [
            (name, ms)
            for name, ms in per_instr.most_common()
            if not show_category or categorize(name, info[name], kernel_shapes) == show_category
        ]
        for name, ms in shown[:top]:
            shape, kind, op, _ = info[name]
            print(f"  {ms:9.1f} ms  {name[:32]:32s} {shape[:40]:40s} {op[-60:]}")
    return per_cat, hlo


def kernel_gradient_convs(hlo: str) -> list[str]:
    """Convolutions of the optimised HLO that compute a kernel gradient (-> HWIO)."""
    found = []
    for line in hlo.splitlines():
        labels = re.search(r"dim_labels=(\S+?)->(\w+)", line)
        if labels and labels.group(2) == "01io":
            found.append(line.strip()[:160])
    return found


def memory(jitted, *args) -> str:
    """Compiled memory figures (bytes of arguments, outputs, temporaries)."""
    m = jitted.lower(*args).compile().memory_analysis()
    if m is None:
        return "memory analysis unavailable"
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    return (
        f"arguments {mib(m.argument_size_in_bytes)}, outputs {mib(m.output_size_in_bytes)}, "
        f"temporaries {mib(m.temp_size_in_bytes)}"
    )


# --------------------------------------------------------------------------- targets
def saliency_target(args):
    """(jitted function, its arguments) of one saliency call on one model."""
    from jbnn import models, saliency
    from jbnn.saliency import cam, gradients

    x = common.random_images(jax.random.key(1), args.batch, args.size)
    if args.model == "resnet18":
        import plain_resnet

        model = plain_resnet.ResNet18(num_classes=1000, ops=args.ops)
    else:
        model = models.get(
            args.model, binary=args.variant == "bnn", num_classes=1000, stem="imagenet"
        )
    variables = model.init(jax.random.key(0), x[:1])
    variables = common.calibrated(model, variables, x)
    target = jnp.argmax(model.apply(variables, x), axis=-1).astype(jnp.int32)
    fn = models.apply_fn(model, variables, input_like=x if args.frozen else None)
    if args.method == "gradient":
        jitted = _jit(args, lambda fn, x, t: gradients._target_grad(fn, x, t))
        return jitted, (fn, x, target)
    if args.method == "smoothgrad":
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(args.batch))
        static = dict(
            relative=False,
            num_samples=args.samples,
            variant="smoothgrad",
            batch_size=args.batch_size or args.samples,
        )
        sigma = jnp.float32(0.15)
        sg = lambda fn, x, t, k, s: gradients._smoothgrad_jit(fn, x, t, k, s, **static)
        jitted = _jit(args, sg)
        return jitted, (fn, x, target, keys, sigma)
    path = ("stage4",)
    jitted = _jit(args, lambda fn, x, t: cam._activation_and_gradient(fn, path, x, t)[:2])
    del saliency
    return jitted, (fn, x, target)


def _jit(args, fun):
    """jax.jit, or as jbnn's explainers compile if asked (``ops.platform_jit``: on CPU its
    compiler options, and the ops' choices for XLA's classic kernels while tracing)."""
    from jbnn import ops

    return ops.platform_jit(fun) if args.jbnn_options else jax.jit(fun)


def train_target(args):
    """(jitted training step without buffer donation, its arguments), BNN or twin."""
    import functools

    import numpy as np

    from configs.default import get_config
    from jbnn import models, optim, training

    config = get_config()
    fields = getattr(models._REGISTRY[args.model], "__dataclass_fields__", {})
    kwargs = {k: v for k, v in (("width", args.width), ("stem", "small")) if k in fields}
    model = models.get(args.model, binary=args.variant == "bnn", num_classes=10, **kwargs)
    input_shape = (1, args.size, args.size, 3)
    kernels = optim.binary_kernels(model, input_shape)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
    tx, _ = training.make_optimizer(config, abstract["params"], kernels, total_steps=1000)
    mesh = training.make_mesh()
    state = training.create_train_state(model, tx, input_shape, 0, mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.uniform(0, 1, (args.batch, args.size, args.size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32),
    }
    step = jax.jit(functools.partial(training._train_step, model, tx, kernels, "latent"))
    return step, (state, batch)


def conv_micro(args):
    """3x3 convolution, 64 -> 64 channels, 56 px, batch 16: forward, dx, dw vs torch."""
    import torch
    import torch.nn.functional as F

    common.set_threads(args.threads)
    n, h, c = 16, 56, 64
    x = jax.random.normal(jax.random.key(0), (n, h, h, c))
    w = jax.random.normal(jax.random.key(1), (3, 3, c, c)) * 0.05
    r = jax.random.normal(jax.random.key(2), (n, h, h, c))
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, r: jax.vjp(lambda x: conv(x, w), x)[1](r)[0])
    dw = jax.jit(lambda x, w, r: jax.vjp(lambda w: conv(x, w), w)[1](r)[0])
    xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
    wt = torch.from_numpy(np.asarray(w)).permute(3, 2, 0, 1).contiguous()
    rt = torch.from_numpy(np.asarray(r)).permute(0, 3, 1, 2).contiguous()
    t_dx = lambda: torch.nn.grad.conv2d_input(xt.shape, wt, rt, padding=1)
    t_dw = lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, rt, padding=1)
    runs = {
        "jax forward": lambda: fwd(x, w),
        "torch forward": lambda: F.conv2d(xt, wt, padding=1),
        "jax input-gradient": lambda: dx(x, w, r),
        "torch input-gradient": t_dx,
        "jax kernel-gradient": lambda: dw(x, w, r),
        "torch kernel-gradient": t_dw,
    }
    t = common.alternate(runs, args.rounds)
    flops = 2 * n * h * h * c * c * 9
    for name, timing in t.items():
        gflops = flops / timing.median / 1e9
        print(f"  {name:24s} {timing.median * 1e3:8.1f} ms  {gflops:6.1f} GFLOP/s")


# ResNet-18's convolution shapes with the ImageNet stem at 112 px:
# (input size, C_in, C_out, kernel, stride), one of each.
RESNET18_112_CONVS = (
    (112, 3, 64, 7, 2),
    (28, 64, 64, 3, 1),
    (28, 64, 128, 3, 2),
    (14, 128, 128, 3, 1),
    (14, 128, 256, 3, 2),
    (7, 256, 256, 3, 1),
    (7, 256, 512, 3, 2),
    (4, 512, 512, 3, 1),
)


def conv_layers(args):
    """ResNet-18's convolutions at 112 px, batch ``--batch``: jbnn's CPU programs vs torch.

    Forward pass and input gradient of each layer shape, as jbnn's explainers compile
    them (:func:`jbnn.ops.platform_jit`, XLA's classic kernels) against PyTorch's
    oneDNN convolutions in channels-last layout (Captum's faster layout for these
    models), plus the forward pass under XLA's defaults (YNNPACK) and with XLA's oneDNN
    custom calls enabled. Ratios > 1: jbnn's program faster. Stride-2 layers use
    torch's symmetric padding (the same output size and FLOPs as SAME's).
    """
    from jbnn import ops

    # XLA CPU options tried against jbnn's (CPU_COMPILER_OPTIONS), forward pass only.
    variants = {
        "xla-defaults": {},
        "onednn-custom-call": {
            **ops.CPU_COMPILER_OPTIONS,
            "xla_cpu_experimental_onednn_custom_call": True,
        },
    }
    common.set_threads(args.threads)
    n = args.batch
    print(f"ResNet-18 convolutions at 112 px, batch {n}, {args.rounds} alternating rounds (ms)")
    head = "  layer                      jbnn fwd  torch fwd  ratio   jbnn dx  torch dx  ratio"
    print(head + "   " + "  ".join(f"{k} fwd" for k in variants))
    for size, c_in, c_out, k, stride in RESNET18_112_CONVS:
        runs = _conv_layer_runs(n, size, c_in, c_out, k, stride, variants)
        m = {key: t.median * 1e3 for key, t in common.alternate(runs, args.rounds).items()}
        label = f"{size:3d} px {c_in:3d}->{c_out:3d} {k}x{k}/{stride}"
        others = "  ".join(f"{m[key]:{len(key) + 4}.2f}" for key in variants)
        print(
            f"  {label:24s} {m['jbnn fwd']:9.2f} {m['torch fwd']:10.2f} "
            f"{m['torch fwd'] / m['jbnn fwd']:6.2f}x {m['jbnn dx']:8.2f} {m['torch dx']:9.2f} "
            f"{m['torch dx'] / m['jbnn dx']:6.2f}x   {others}",
            flush=True,
        )


def _conv_layer_runs(n, size, c_in, c_out, k, stride, variants):
    """name -> zero-argument callable for one convolution shape (:func:`conv_layers`)."""
    import torch
    import torch.nn.functional as F

    from jbnn import ops

    x = jax.random.normal(jax.random.key(0), (n, size, size, c_in))
    w = jax.random.normal(jax.random.key(1), (k, k, c_in, c_out)) * 0.05
    conv = lambda x, w: ops.conv(x, w, (stride, stride), "SAME")
    fwd = ops.platform_jit(conv)
    g = jax.random.normal(jax.random.key(2), fwd(x, w).shape)
    dx = ops.platform_jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    cl = torch.channels_last
    xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous(memory_format=cl)
    wt = torch.from_numpy(np.asarray(w)).permute(3, 2, 0, 1).contiguous(memory_format=cl)
    gt = torch.from_numpy(np.asarray(g)).permute(0, 3, 1, 2).contiguous(memory_format=cl)
    pad = (k - 1) // 2
    runs = {
        "jbnn fwd": lambda: fwd(x, w),
        "torch fwd": lambda: F.conv2d(xt, wt, stride=stride, padding=pad),
        "jbnn dx": lambda: dx(x, w, g),
        "torch dx": lambda: torch.nn.grad.conv2d_input(
            xt.shape, wt, gt, stride=stride, padding=pad
        ),
    }
    for name, options in variants.items():
        f = jax.jit(conv, compiler_options=options)
        runs[name] = lambda f=f: f(x, w)
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="birealnet18", help="a jbnn model name, or resnet18")
    p.add_argument("--variant", default="bnn", choices=("bnn", "twin"))
    p.add_argument("--ops", default="jbnn", choices=("jbnn", "lax"), help="plain resnet18 ops")
    p.add_argument(
        "--method", default="smoothgrad", choices=("gradient", "smoothgrad", "gradcam", "train")
    )
    p.add_argument("--width", type=float, default=0.5, help="width of --method train models")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=None, help="SmoothGrad chunk")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--conv-micro", action="store_true", help="conv fwd/dx/dw, jax vs torch")
    p.add_argument(
        "--conv-layers",
        action="store_true",
        help="ResNet-18's convolutions at 112 px (batch --batch): jbnn's CPU programs vs torch",
    )
    p.add_argument(
        "--jbnn-options",
        action="store_true",
        help="compile saliency with jbnn.ops.CPU_COMPILER_OPTIONS, as jbnn's explainers run "
        "(XLA's classic convolutions run asynchronously: their thunks read near zero and "
        "overlapping work absorbs their time; compare wall times, not the table)",
    )
    p.add_argument(
        "--frozen",
        action="store_true",
        help="saliency over kernels quantized once (apply_fn(..., input_like=x))",
    )
    p.add_argument("--show-category", default=None, help="list the top ops of one category")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    print(f"# profile_cpu: {common.machine()}")
    if args.conv_micro:
        conv_micro(args)
        return
    if args.conv_layers:
        conv_layers(args)
        return
    target = train_target if args.method == "train" else saliency_target
    jitted, call_args = target(args)
    print(
        f"{args.model} {args.variant} {args.method}: {args.size} px, batch {args.batch}"
        + (f", {args.samples} samples" if args.method == "smoothgrad" else "")
    )
    start = time.perf_counter()
    jax.block_until_ready(jitted(*call_args))
    print(f"  first call (compile + run) {time.perf_counter() - start:.1f} s")
    _, hlo = profile(jitted, *call_args, top=args.top, show_category=args.show_category)
    dead = kernel_gradient_convs(hlo)
    print(f"  kernel-gradient convolutions in the optimised HLO: {len(dead)}")
    for line in dead[:5]:
        print("    " + line)
    print("  compiled memory: " + memory(jitted, *call_args))


if __name__ == "__main__":
    main()
