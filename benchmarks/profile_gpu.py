"""Where a jbnn SmoothGrad call spends its GPU time, op by op (one device, one run).

For birealnet18 (ImageNet stem, 224 px, batch 16, 50 samples by default) in bfloat16,
BNN and twin, this script

1. times ``jbnn.saliency.smoothgrad`` with all samples at once (``batch_size=None``)
   and in chunks (``--chunk``), reporting images/s and the achieved TFLOP/s from the
   analytic count (``4 x MACs x images x samples``: 2 FLOPs per multiply-accumulate,
   forward pass plus input gradient; MACs from :func:`jbnn.summary.summary`);
2. traces a few calls with ``jax.profiler`` and sums the device time of every XLA op
   (the ``/device:GPU:*`` planes of the trace), printing the ops that cost most, each
   with what it is in the optimised HLO (a cuDNN convolution and its shapes, a fusion
   and the ops it fuses), and the totals by kind: convolutions, fusions, the rest.

The trace itself is written under ``--out`` (default: a temporary folder).

Usage (repository root):
  python benchmarks/profile_gpu.py                  # on a GPU
  python benchmarks/profile_gpu.py --smoke          # tiny sizes: checks the script on CPU
"""

from __future__ import annotations

import argparse
import collections
import glob
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

from jbnn import models, saliency  # noqa: E402
from jbnn.saliency import _checks, gradients  # noqa: E402
from jbnn.summary import summary  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="birealnet18")
    p.add_argument("--variants", default="bnn,twin")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--chunk", type=int, default=10, help="batch_size of the chunked run")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--trace-calls", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="folder for the trace")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.samples, args.width, args.rounds = 32, 2, 4, 0.125, 2
        args.chunk, args.trace_calls = 2, 1
    return args


def hlo_index(hlo_text: str) -> dict[str, str]:
    """Instruction name -> a short description of it, from optimised HLO text.

    Names inside fused computations can repeat those of the computations that run
    (the entry and loop bodies); the latter win.
    """
    inner, outer, current = {}, {}, ""
    for line in hlo_text.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\S+?)\(", line)
        if not m:
            continue
        name, shape, op = m.groups()
        target = re.search(r'custom_call_target="([^"]+)"', line)
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        what = op + (f" {target.group(1)}" if target else "")
        what += f" -> {shape}" if len(shape) < 80 else f" -> {shape[:77]}..."
        if calls and not target:
            what += f" (calls {calls.group(1)})"
        window = re.search(r"window=\{([^}]*)\}", line)
        if window:
            what += f" window {{{window.group(1)}}}"
        fused = current.startswith(("fused", "region", "wrapped", "triton"))
        (inner if fused else outer)[name] = what
    return {**inner, **outer}


def fused_ops(hlo_text: str) -> dict[str, collections.Counter]:
    """Fused computation name -> counts of the ops inside it."""
    out, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            out[current] = collections.Counter()
            continue
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = \S+ (\S+?)\(", line)
        if current and m and m.group(1) not in ("parameter", "constant", "bitcast"):
            out[current][m.group(1)] += 1
    return out


def device_op_times(trace_dir: str) -> tuple[dict[str, float], dict[str, float]]:
    """(op name -> summed device seconds, line name -> summed seconds) of a trace."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise SystemExit(f"no trace written under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
    per_line = collections.defaultdict(collections.Counter)
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            for event in line.events:
                per_line[line.name][event.name.lstrip("%")] += event.duration_ns * 1e-9
    lines = {name: sum(ops.values()) for name, ops in per_line.items()}
    # XLA's op line; without one, the busiest line that is not a module/step summary.
    candidates = [n for n in per_line if n == "XLA Ops"] or [
        n for n in per_line if "Module" not in n and "Step" not in n
    ]
    if not candidates:
        return {}, lines
    chosen = max(candidates, key=lambda n: (n == "XLA Ops", lines[n]))
    return dict(per_line[chosen]), lines


def kind_of(description: str) -> str:
    """The kind of a device op, from its HLO description or its kernel's name.

    Traces of XLA's GPU backend name the kernels a cuDNN convolution runs (``*fprop*``,
    ``*dgrad*``, ``*wgrad*``), cuBLAS matmuls (``nvjet*``, ``*gemm*``) and XLA's own
    fusions (``loop_*_fusion``, ``input_*_fusion``).
    """
    head = description.split(" -> ")[0]
    if "dgrad" in description:
        return "conv input gradient"
    if "wgrad" in description:
        return "conv kernel gradient"
    if "fprop" in description or "cudnn$conv" in head or head.startswith("convolution"):
        return "conv forward"
    if "AddPadding" in description or "nchwToNhwc" in description or "nhwcToNchw" in description:
        return "cuDNN padding/layout"
    if "nvjet" in description or "gemm" in description.lower() or head.startswith("dot"):
        return "matmul"
    if "fusion" in head or head.startswith(("loop_", "input_", "custom-call __triton")):
        return "XLA fusion (elementwise, reductions, layout)"
    if head.startswith(("Memset", "Memcpy")):
        return "memset/memcpy"
    return head.split(" ")[0] or "?"


def main(argv=None):
    args = parse_args(argv)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    print(f"# profile_gpu: {common.machine()}")
    print(
        f"# {args.model} {args.dtype}, {args.size} px, batch {args.batch}, SmoothGrad "
        f"{args.samples} samples, width {args.width}"
    )
    out = args.out or tempfile.mkdtemp(prefix="jbnn-trace-")
    x = common.random_images(jax.random.key(1), args.batch, args.size)
    key = jax.random.key(42)
    rows = []
    for variant in args.variants.split(","):
        kw = dict(binary=variant == "bnn", num_classes=1000, stem="imagenet", width=args.width)
        model = models.get(args.model, **kw)
        variables = common.calibrated(model, model.init(jax.random.key(0), x[:1]), x)
        macs = summary(model, (1, args.size, args.size, 3), print_fn=None).total_macs
        flops = 4.0 * macs * args.batch * args.samples
        fn = models.apply_fn(models.get(args.model, dtype=dtype, **kw), variables)
        target = jnp.argmax(fn(x), axis=-1).astype(jnp.int32)
        runs = {}
        for chunk in (None, args.chunk):
            runs[f"batch_size={chunk}"] = lambda chunk=chunk, fn=fn, target=target: (
                saliency.smoothgrad(fn, x, target, key, num_samples=args.samples, batch_size=chunk)
            )
        t = common.alternate(runs, args.rounds)
        for name, timing in t.items():
            tflops = flops / timing.median / 1e12
            rows.append(
                [
                    variant,
                    name,
                    f"{1e3 * timing.median:.1f}",
                    f"{args.batch / timing.median:.1f}",
                    f"{tflops:.3g}",
                    f"{100 * timing.spread:.0f}%",
                ]
            )
            print("  " + " | ".join(rows[-1]), flush=True)

        # The trace: all samples at once.
        keys = _checks.per_example_keys(key, args.batch, "smoothgrad")
        static = dict(relative=False, num_samples=args.samples, variant="smoothgrad")
        sigma = jnp.float32(0.15)
        hlo = (
            gradients._smoothgrad_jit.lower(
                fn, x, target, keys, sigma, batch_size=args.samples, **static
            )
            .compile()
            .as_text()
        )
        index, fusions = hlo_index(hlo), fused_ops(hlo)
        trace_dir = os.path.join(out, variant)
        with jax.profiler.trace(trace_dir):
            for _ in range(args.trace_calls):
                jax.block_until_ready(runs["batch_size=None"]())
        time.sleep(0.5)
        ops, lines = device_op_times(trace_dir)
        print(f"\n## {variant}: device time by trace line (seconds per call)")
        for name, seconds in sorted(lines.items(), key=lambda kv: -kv[1]):
            print(f"  {name}: {seconds / args.trace_calls:.4f}")
        if not ops:
            print("  (no device op line in the trace: no device plane on this backend)")
            continue
        total = sum(ops.values())
        kinds = collections.Counter()
        for name, seconds in ops.items():
            kinds[kind_of(index.get(name, name))] += seconds
        print(
            f"\n## {variant}: XLA op time per call {1e3 * total / args.trace_calls:.2f} ms, by kind"
        )
        for kind, seconds in kinds.most_common():
            ms = 1e3 * seconds / args.trace_calls
            print(f"  {kind:<20} {ms:8.2f} ms  {100 * seconds / total:5.1f}%")
        print(f"\n## {variant}: top {args.top} ops")
        for name, seconds in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
            what = index.get(name, "?")
            inner = ""
            called = re.search(r"calls ([\w.\-]+)", what)
            if called and called.group(1) in fusions:
                inner = (
                    " ["
                    + ", ".join(f"{k}x{v}" for k, v in fusions[called.group(1)].most_common(6))
                    + "]"
                )
            print(
                f"  {1e3 * seconds / args.trace_calls:7.3f} ms {100 * seconds / total:5.1f}%  "
                f"{name}: {what}{inner}"
            )
    print()
    print(common.fmt_table(rows, ["variant", "run", "ms/call", "img/s", "TFLOP/s", "spread"]))
    print(f"# trace under {out}")


if __name__ == "__main__":
    main()
