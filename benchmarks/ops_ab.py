"""A/B of jbnn.ops against the plain JAX ops inside jbnn's models, in one process.

``jbnn.ops.conv`` / ``jbnn.ops.max_pool`` (used by ``QuantConv`` and the models) are
swapped for plain ``lax.conv_general_dilated`` (with a materialised padded copy where a
layer pads with +1) / ``flax.linen.max_pool``, i.e. what jbnn did before, and the same
computations are timed alternately: Gradient, SmoothGrad with all samples at once and in
chunks (``lax.scan``), and a training step (BNN). The results are compared too: the
forward passes and saliency maps are expected to agree bit for bit or to float rounding.

Usage (repository root):
  python benchmarks/ops_ab.py                        # birealnet18 BNN, 112 px
  python benchmarks/ops_ab.py --model quicknet_small --size 32 --stem small
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jbnn import models, ops  # noqa: E402
from jbnn.saliency import _checks, gradients  # noqa: E402


def _plain_conv(x, kernel, strides=(1, 1), padding="SAME", feature_group_count=1, pad_value=0.0):
    pads = ops._explicit_pads(padding, x.shape[1:3], kernel.shape[:2], tuple(strides), "conv")
    if pad_value != 0.0:
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=pad_value)
        pads = ((0, 0), (0, 0))
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        tuple(strides),
        pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=feature_group_count,
    )


def _prev_max_pool_fwd(x, window, strides, pads):
    y = ops._reduce_window_max(x, window, strides, pads)
    return y, (x, y)


def _prev_max_pool_bwd(window, strides, pads, residuals, g):
    x, y = residuals
    taps = window[0] * window[1]
    index = jnp.full(y.shape, taps, jnp.int32)
    for k in reversed(range(taps)):
        tap = ops._window_tap(x, k // window[1], k % window[1], y.shape[1:3], strides, pads)
        index = jnp.where(tap == y, jnp.int32(k), index)
    # a no-op that XLA counts as expensive: keeps the index materialised
    index = jax.lax.rem(index, jnp.int32(taps + 1))
    x_like = jnp.zeros((0, *x.shape[1:3], 0), x.dtype)
    return ops._max_pool_bwd(window, strides, pads, (index, x_like), g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _prev_max_pool(x, window, strides, pads):
    return ops._reduce_window_max(x, window, strides, pads)


_prev_max_pool.defvjp(_prev_max_pool_fwd, _prev_max_pool_bwd)


@contextlib.contextmanager
def previous_max_pool():
    """Within the block, ops.max_pool's VJP is the one before commit "max-pool index in
    the forward pass": x and y saved, the int32 first-maximum index found in the backward
    pass. The same gradient, bit for bit."""
    saved = ops._max_pool
    ops._max_pool = _prev_max_pool
    try:
        yield
    finally:
        ops._max_pool = saved


def _pad_max_pool_bwd(window, strides, pads, residuals, g):
    """The max-pool VJP as a sum of interior-padded copies of the cotangent, one per tap.

    Tap (kh, kw) of window (i, j) reads input (i*sh + kh - top, j*sw + kw - left): its
    share of the cotangent, where(index == tap, g, 0), lands there through ``lax.pad``
    with interior padding sh - 1 (and a negative edge where it falls outside). The taps
    are added in reverse order, which is the windows' row-major order at every input:
    the same sums as ``ops._max_pool_bwd`` (up to the sign of a zero).
    """
    index, x_like = residuals
    height, width = x_like.shape[1:3]
    (wh, ww), (sh, sw) = window, strides
    (top, _), (left, _) = pads
    out_h, out_w = g.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    dx = None
    for k in reversed(range(wh * ww)):
        kh, kw = divmod(k, ww)
        lo_h, lo_w = kh - top, kw - left
        hi_h = height - (lo_h + (out_h - 1) * sh + 1)
        hi_w = width - (lo_w + (out_w - 1) * sw + 1)
        term = jnp.where(index == k, g, zero)
        placed = jax.lax.pad(
            term, zero, ((0, 0, 0), (lo_h, hi_h, sh - 1), (lo_w, hi_w, sw - 1), (0, 0, 0))
        )
        dx = placed if dx is None else dx + placed
    return (dx,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _pad_max_pool(x, window, strides, pads):
    return ops._reduce_window_max(x, window, strides, pads)


_pad_max_pool.defvjp(ops._max_pool_fwd, _pad_max_pool_bwd)


@contextlib.contextmanager
def pad_max_pool():
    """Within the block, ops.max_pool's backward pass is :func:`_pad_max_pool_bwd`."""
    saved = ops._max_pool
    ops._max_pool = _pad_max_pool
    try:
        yield
    finally:
        ops._max_pool = saved


@contextlib.contextmanager
def native_max_pool():
    """Within the block, ops.max_pool is flax's: its gradient is XLA's select-and-scatter."""
    saved = ops.max_pool
    ops.max_pool = nn.max_pool
    try:
        yield
    finally:
        ops.max_pool = saved


BASELINES = {
    "plain": lambda: plain_ops(),
    "native-pool": lambda: native_max_pool(),
    "prev-pool": lambda: previous_max_pool(),
    "pad-pool": lambda: pad_max_pool(),
}


@contextlib.contextmanager
def plain_ops():
    """Within the block, jbnn's layers and models trace the plain JAX ops."""
    saved = ops.conv, ops.max_pool
    ops.conv, ops.max_pool = _plain_conv, nn.max_pool
    try:
        yield
    finally:
        ops.conv, ops.max_pool = saved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="birealnet18")
    p.add_argument("--variant", default="bnn", choices=("bnn", "twin"))
    p.add_argument("--stem", default="imagenet")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--chunk", type=int, default=4, help="SmoothGrad batch_size of the scan")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--baseline",
        default="plain",
        choices=tuple(BASELINES),
        help="plain: flax/lax ops; prev-pool: the previous max-pool VJP; pad-pool: padded taps",
    )
    args = p.parse_args(argv)
    print(f"# ops_ab: {common.machine()}; baseline {args.baseline}")
    model = models.get(args.model, binary=args.variant == "bnn", num_classes=1000, stem=args.stem)
    x = common.random_images(jax.random.key(1), args.batch, args.size)
    variables = common.calibrated(model, model.init(jax.random.key(0), x[:1]), x)
    target = jnp.argmax(model.apply(variables, x), axis=-1).astype(jnp.int32)
    keys = _checks.per_example_keys(jax.random.key(0), args.batch, "smoothgrad")
    sigma = jnp.float32(0.15)
    xt = common.random_images(jax.random.key(2), args.train_batch, args.size)
    labels = jnp.arange(args.train_batch) % 1000

    def loss_grad(params, stats, xt):  # a plain train-mode gradient (BN batch statistics)
        def loss(params):
            logits, _ = model.apply(
                {"params": params, "batch_stats": stats}, xt, train=True, mutable=["batch_stats"]
            )
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

        return jax.grad(loss)(params)

    def programs():  # fresh jitted functions: traced under whichever ops are active
        # the undecorated function: jax.jit caches the traces of a jitted callee
        smoothgrad = gradients._smoothgrad_jit.__wrapped__
        sg = lambda bs: jax.jit(
            functools.partial(
                smoothgrad,
                relative=False,
                num_samples=args.samples,
                variant="smoothgrad",
                batch_size=bs,
            )
        )
        fn = models.apply_fn(model, variables)
        return {
            # fresh lambdas: jax.jit shares the traces of one function object, so jitting
            # _target_grad / loss_grad themselves twice would time one trace twice
            "gradient": (
                jax.jit(lambda fn, x, t: gradients._target_grad(fn, x, t)),
                (fn, x, target),
            ),
            "smoothgrad": (sg(args.samples), (fn, x, target, keys, sigma)),
            f"smoothgrad chunks of {args.chunk}": (sg(args.chunk), (fn, x, target, keys, sigma)),
            "train gradient": (
                jax.jit(lambda p, s, xt: loss_grad(p, s, xt)),
                (variables["params"], variables["batch_stats"], xt),
            ),
        }

    fast = programs()
    with BASELINES[args.baseline]():
        plain = programs()
        for f, a in plain.values():  # compile (trace) while the plain ops are active
            jax.block_until_ready(f(*a))
    rows = []
    for name in fast:
        (ff, fa), (pf, pa) = fast[name], plain[name]
        got, ref = jax.block_until_ready(ff(*fa)), pf(*pa)
        err = max(
            common.rel_error(r, g)
            for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True)
        )
        runs = {"jbnn.ops": functools.partial(ff, *fa), "plain": functools.partial(pf, *pa)}
        t = common.alternate(runs, args.rounds)
        speedup = t["plain"].median / t["jbnn.ops"].median
        best = t["plain"].best / t["jbnn.ops"].best
        rows.append(
            [
                name,
                f"{t['plain'].median * 1e3:.0f}",
                f"{t['jbnn.ops'].median * 1e3:.0f}",
                f"{speedup:.2f}x",
                f"{best:.2f}x",
                f"{err:.1e}",
            ]
        )
        print("  " + " | ".join(rows[-1]))
    print(
        f"\n{args.model} {args.variant}, {args.size} px, batch {args.batch}, "
        f"{args.samples} SmoothGrad samples; train gradient batch {args.train_batch}:"
    )
    header = ["computation", "plain ms", "jbnn.ops ms", "speed-up", "best rounds", "max rel diff"]
    print(common.fmt_table(rows, header))


if __name__ == "__main__":
    main()
