"""Training step time of every registered BNN against its full-precision twin.

Both run ``jbnn.training.make_train_step`` (the jitted, donated step that training
uses: forward in train mode, loss, gradients, optimizer update, latent-weight clip,
flip ratio, finiteness check) on the same batch, with the optimizer of the default
config (Adam; binary kernels as clipped latent weights, or Bop with ``--bop``). Steps
are timed alternately, BNN, twin, BNN, twin, ..., after a warm-up (compilation) of
each; the report gives medians, the spread of the rounds and the ratio BNN / twin
(the target: at most 1.15), also as the median of the rounds' ratios ("paired": robust
to load that drifts) and as the ratio of each one's fastest round ("fastest": the
rounds least disturbed by other load on a shared machine).

Usage (repository root):
  python benchmarks/train_step.py                      # every model, 32 px, batch 64
  python benchmarks/train_step.py --models birealnet18,binarynet --width 1.0 --rounds 9
  python benchmarks/train_step.py --size 224 --stem imagenet --batch 16 --models birealnet18
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from jbnn import layers, models, ops, optim, training  # noqa: E402
from jbnn import quantizers as qz  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(models.names()))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=float, default=0.5, help="channel multiplier (if any)")
    p.add_argument("--stem", default="small", help="stem of models that have one")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--bop", action="store_true", help="Bop for the binary kernels")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--steps-per-round",
        type=int,
        default=1,
        help="steps per timed call (times are per step); more for short steps (mlp)",
    )
    p.add_argument(
        "--bnn-variants",
        default="",
        help="extra BNN contestants, comma-separated: noflip (no flip count), notie "
        "(counted, update not tied to it), sumflip (an int32 sum of the comparison, "
        "tied), xnorplain (XNOR kernel scale differentiated by JAX), xnorkernel (XNOR's "
        "scale in the kernel, as before 2026-11-27, not on the output), wholeconv (a kernel "
        "as large as its input as a convolution, not a matrix product), nonan (quantizers "
        "without NaN propagation), mulmask (the straight-through mask multiplied in, not "
        "selected), nogradcheck (only the loss checked for NaN/inf, not the gradients); "
        "NAME+NAME: "
        "both; twin-NAME: the twin with that change",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="also trace this many steps of each contestant (jax.profiler) and print the "
        "device ops that cost most (GPU)",
    )
    p.add_argument("--top", type=int, default=15, help="ops printed per contestant")
    args = p.parse_args(argv)
    args.bnn_variants = [v for v in args.bnn_variants.split(",") if v]
    names = {n for v in args.bnn_variants for n in v.removeprefix("twin-").split("+")}
    unknown = names - set(FLIP_VARIANTS)
    if unknown:
        p.error(f"unknown --bnn-variants {sorted(unknown)}; known: {', '.join(FLIP_VARIANTS)}")
    return args


def _no_flip_count(params, updates, kernels):
    return jnp.zeros([], jnp.float32), updates


def _untied_flip_count(params, updates, kernels):
    old, upd = traverse_util.flatten_dict(params), traverse_util.flatten_dict(updates)
    count = sum(optim._count_changed_signs(old[p], old[p] + upd[p]) for p in kernels.paths)
    return count.astype(jnp.float32) / sum(old[p].size for p in kernels.paths), updates


def _int32_sum_count(old, new):
    return jnp.sum((old >= 0) != (new >= 0), dtype=jnp.int32)


def _plain_xnor_kernel(kernel, quantizer):
    """XNOR-Net's binary kernel and scale as the formula, differentiated by JAX."""
    clipped = jnp.clip(kernel, -1.0, 1.0)
    return quantizer(clipped), jnp.mean(jnp.abs(clipped), axis=tuple(range(kernel.ndim - 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scaled_xnor_kernel(kernel, quantizer):
    """jbnn's XNOR-Net kernel before 2026-11-27: ``alpha * quantizer(clip(w))`` as the
    MAC op's kernel, with its VJP (one contraction for alpha's gradient, one
    elementwise pass)."""
    return _scaled_xnor_kernel_fwd(kernel, quantizer)[0]


def _scaled_xnor_kernel_fwd(kernel, quantizer):
    clipped = jnp.clip(kernel, -1.0, 1.0)
    alpha = jnp.mean(jnp.abs(clipped), axis=tuple(range(kernel.ndim - 1)), keepdims=True)
    return alpha * quantizer(clipped), (kernel, alpha)


def _scaled_xnor_kernel_bwd(quantizer, residuals, g):
    kernel, alpha = residuals
    c_out = kernel.shape[-1]
    clipped = jnp.clip(kernel, -1.0, 1.0)
    binary, quantizer_pullback = jax.vjp(quantizer, clipped)
    d_alpha = jnp.einsum("ic,ic->c", g.reshape(-1, c_out), binary.reshape(-1, c_out))
    (d_clipped,) = quantizer_pullback((alpha * g).astype(binary.dtype))
    abs_grad = jnp.where(clipped >= 0, 1.0, -1.0).astype(kernel.dtype)
    d_clipped = d_clipped + abs_grad * (d_alpha.reshape(alpha.shape) * c_out / kernel.size)
    magnitude = jnp.abs(kernel)
    clip_grad = jnp.where(magnitude < 1.0, 1.0, jnp.where(magnitude == 1.0, 0.5, 0.0))
    return ((d_clipped * clip_grad.astype(kernel.dtype)).astype(kernel.dtype),)


_scaled_xnor_kernel.defvjp(_scaled_xnor_kernel_fwd, _scaled_xnor_kernel_bwd)


def _kernel_scaled_layers(kernel, spec, kernel_scale):
    """XNOR-Net's scale in the kernel, not on the layer's output (the earlier form)."""
    if spec is None or not kernel_scale:
        return layers._quantize_kernel(kernel, spec), None
    return _scaled_xnor_kernel(kernel, qz.get(spec)), None


# name -> (module, attribute, replacement) patched while the variant's step is traced
FLIP_VARIANTS = {
    "noflip": (optim, "flip_ratio_of_update", _no_flip_count),
    "notie": (optim, "flip_ratio_of_update", _untied_flip_count),
    "sumflip": (optim, "_count_changed_signs", _int32_sum_count),
    "xnorplain": (layers, "_xnor_kernel", _plain_xnor_kernel),
    "xnorkernel": (layers, "_binary_kernel_and_scale", _kernel_scaled_layers),
    # a kernel as large as its input as a convolution (before 2026-11-27 on CPUs)
    "wholeconv": (ops, "_is_whole_input_window", lambda *a: False),
    # quantizers without NaN propagation (a NaN input gave -1 / 0 before 2026-11-27)
    "nonan": (qz, "_propagate_nan", lambda x, q: q),
    # the loss's finiteness checked, not the gradients' (what the check costs)
    "nogradcheck": (training, "_loss_and_grads_finite", lambda loss, grads: jnp.isfinite(loss)),
    # the straight-through mask multiplied in, not selected (before 2026-11-28)
    "mulmask": (
        qz,
        "_clipped_gradient",
        lambda x, g, c: g if c is None else g * qz._clip_mask(x, c).astype(g.dtype),
    ),
}


@contextlib.contextmanager
def patched(variant: str | None):
    """Applies a variant's patches ("a+b": both) while the step is traced."""
    if variant is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        for name in variant.removeprefix("twin-").split("+"):
            module, attr, replacement = FLIP_VARIANTS[name]
            stack.callback(setattr, module, attr, getattr(module, attr))
            setattr(module, attr, replacement)
        yield


def _model_kwargs(name: str, args) -> dict:
    fields = getattr(models._REGISTRY[name], "__dataclass_fields__", {})
    kwargs = {}
    if "width" in fields:
        kwargs["width"] = args.width
    if "stem" in fields:
        kwargs["stem"] = args.stem
    return kwargs


def step_runner(name: str, binary: bool, args, mesh, batch):
    """A zero-argument callable running one training step (state threaded through)."""
    from configs.default import get_config

    config = get_config()
    if args.bop:
        config.binary_optimizer.name = "bop"
    model = models.get(
        name, binary=binary, num_classes=args.num_classes, **_model_kwargs(name, args)
    )
    input_shape = (1, args.size, args.size, 3)
    kernels = optim.binary_kernels(model, input_shape)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
    tx, _ = training.make_optimizer(config, abstract["params"], kernels, total_steps=1000)
    state = training.create_train_state(model, tx, input_shape, 0, mesh)
    step = training.make_train_step(model, tx, kernels, config.binary_optimizer.name, mesh)
    holder = {"state": state}

    def run():
        for _ in range(args.steps_per_round):
            holder["state"] = step(holder["state"], batch)
        return holder["state"].loss_sum

    run.hlo = lambda: step.lower(holder["state"], batch).compile().as_text()
    return run, len(kernels)


def profile(contestants: dict, steps: int, top: int) -> None:
    """Device time per op of ``steps`` steps of each contestant, the costliest first."""
    import collections
    import tempfile
    import time

    import profile_gpu

    out = tempfile.mkdtemp(prefix="jbnn-train-trace-")
    for name, run in contestants.items():
        hlo = run.hlo()
        index, fusions = profile_gpu.hlo_index(hlo), profile_gpu.fused_ops(hlo)
        trace_dir = os.path.join(out, name)
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                common.block(run())
        time.sleep(0.5)
        ops, _ = profile_gpu.device_op_times(trace_dir)
        if not ops:
            print(f"## {name}: no device op line in the trace")
            continue
        total = sum(ops.values())
        kinds = collections.Counter()
        for op, sec in ops.items():
            kinds[profile_gpu.kind_of(index.get(op, op))] += sec
        print(f"\n## {name}: device time per step {1e3 * total / steps:.2f} ms; by kind:")
        for kind, sec in kinds.most_common(6):
            print(f"  {kind:<44} {1e3 * sec / steps:7.3f} ms")
        for op, sec in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
            what = index.get(op, "?")
            called = re.search(r"calls ([\w.\-]+)", what)
            inner = ""
            if called and called.group(1) in fusions:
                counts = fusions[called.group(1)].most_common(6)
                inner = " [" + ", ".join(f"{k}x{v}" for k, v in counts) + "]"
            print(f"  {1e3 * sec / steps:7.3f} ms  {op[:60]}: {what[:110]}{inner}")


def main(argv=None):
    args = parse_args(argv)
    mesh = training.make_mesh()
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    labels = rng.integers(0, args.num_classes, args.batch).astype(np.int32)
    batch = training.shard_batch({"image": images, "label": labels}, mesh)
    print(f"# train_step: {common.machine()}")
    print(
        f"# {args.size} px, batch {args.batch}, width {args.width}, stem {args.stem}, "
        f"{'Bop' if args.bop else 'latent weights (Adam)'}, {args.rounds} alternating rounds "
        f"of {args.steps_per_round} step(s)"
    )
    rows = []
    for name in args.models.split(","):
        bnn, num_kernels = step_runner(name, True, args, mesh, batch)
        twin, _ = step_runner(name, False, args, mesh, batch)
        contestants = {"bnn": bnn, "twin": twin}
        for variant in args.bnn_variants:
            binary = not variant.startswith("twin-")
            with patched(variant):  # traced (first call) while patched
                run, _ = step_runner(name, binary, args, mesh, batch)
                common.block(run())
            contestants[f"bnn-{variant}" if binary else variant] = run
        t = common.alternate(contestants, args.rounds, warmup=2)
        for timing in t.values():  # seconds per step
            timing.seconds = [sec / args.steps_per_round for sec in timing.seconds]
        ratio = t["bnn"].median / t["twin"].median
        paired = common.paired_ratio(t["bnn"], t["twin"])
        best = t["bnn"].best / t["twin"].best
        print(
            f"{name}: BNN {t['bnn'].median * 1e3:.1f} ms, twin {t['twin'].median * 1e3:.1f} "
            f"ms, BNN/twin {ratio:.2f} (median of paired rounds {paired:.2f}, fastest "
            f"rounds {best:.2f}); {num_kernels} binary kernels"
        )
        for variant in args.bnn_variants:
            variant = variant if variant.startswith("twin-") else f"bnn-{variant}"
            v = t[variant]
            print(
                f"  {variant}: {v.median * 1e3:.1f} ms, /twin "
                f"{v.median / t['twin'].median:.2f} (paired "
                f"{common.paired_ratio(v, t['twin']):.2f}, fastest "
                f"{v.best / t['twin'].best:.2f}), /bnn {v.median / t['bnn'].median:.2f} "
                f"(paired {common.paired_ratio(v, t['bnn']):.2f}, fastest "
                f"{v.best / t['bnn'].best:.2f})"
            )
        rows.append(
            [
                name,
                f"{t['bnn'].median * 1e3:.1f}",
                f"{t['twin'].median * 1e3:.1f}",
                f"{ratio:.2f}",
                f"{paired:.2f}",
                f"{best:.2f}",
                f"{100 * max(t['bnn'].spread, t['twin'].spread):.0f}%",
            ]
        )
        if args.profile:
            profile(contestants, args.profile, args.top)
    header = ["model", "BNN ms/step", "twin ms/step", "BNN/twin", "paired", "fastest", "spread"]
    print()
    print(common.fmt_table(rows, header))


if __name__ == "__main__":
    main()
