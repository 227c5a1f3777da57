"""SmoothGrad and IG on CPU: time against the chunk size (``batch_size``), one run.

jbnn's ``batch_size="auto"`` (the default of ``smoothgrad``, ``integrated_gradients`` and
``explain_dataset``) evaluates, on a CPU, chunks of ``AUTO_CHUNK_PIXELS // (B*H*W)``
noisy copies (or path points) of the batch instead of all of them at once. This script
times the same explainer with several chunk sizes alternately, ``all, auto, 1, 2, ...``,
after a warm-up of each, and prints ms per call, the spread of the rounds, the rows per
chunk (copies x images), the pixels per chunk and the speed-up over all at once (> 1:
faster). It also checks that every chunking gives the map of all at once to float
rounding. Models: any of :func:`jbnn.models.get` (ImageNet stem by default).

Usage (repository root):
  python benchmarks/chunk_cpu.py                        # birealnet18 twin, 112 px, batch 4
  python benchmarks/chunk_cpu.py --size 224 --batch 2 --samples 8 --chunks all,auto,1,2,4
  python benchmarks/chunk_cpu.py --models binarynet --variants twin,bnn --channels 1 \\
      --model-kwargs "width=0.125,stem='small',num_classes=10" --size 32 --batch 50 \\
      --samples 50 --chunks all,auto,2,5,10,25
  python benchmarks/chunk_cpu.py --method integrated_gradients
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
from jbnn.saliency import gradients  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="birealnet18")
    p.add_argument("--variants", default="twin", help="bnn, twin or both (comma-separated)")
    p.add_argument("--model-kwargs", default="stem='imagenet',num_classes=1000")
    p.add_argument("--method", default="smoothgrad", choices=("smoothgrad", "integrated_gradients"))
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=16, help="noisy copies / IG steps")
    p.add_argument("--chunks", default="all,auto,1,2,4,8", help="'all', 'auto' or numbers")
    p.add_argument("--rounds", type=int, default=5)
    return p.parse_args(argv)


def batch_size(chunk: str):
    """``--chunks`` entry -> jbnn's batch_size."""
    return {"all": None, "auto": "auto"}[chunk] if chunk in ("all", "auto") else int(chunk)


def explainer(method, fn, x, target, samples, batch_size):
    if method == "smoothgrad":
        key = jax.random.key(42)
        return lambda: saliency.smoothgrad(
            fn, x, target, key, num_samples=samples, noise_sigma=0.15, batch_size=batch_size
        )
    return lambda: saliency.integrated_gradients(
        fn, x, target, num_steps=samples, method="gausslegendre", batch_size=batch_size
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    kwargs = eval(f"dict({args.model_kwargs})")  # benchmark-only: the command line's
    pixels = args.batch * args.size * args.size
    print(f"# chunk_cpu: {common.machine()}")
    print(
        f"# {args.method}, {args.size} px x {args.channels} ch, batch {args.batch}, "
        f"{args.samples} samples, {args.rounds} alternating rounds; auto = "
        f"{gradients._chunk_size('auto', args.samples, (args.batch, args.size, args.size), '')}"
        f" ({saliency.AUTO_CHUNK_PIXELS} px per chunk)"
    )
    for name in args.models.split(","):
        for variant in args.variants.split(","):
            model = models.get(name, binary=variant == "bnn", **kwargs)
            shape = (args.batch, args.size, args.size, args.channels)
            if args.channels == 3:
                x = common.random_images(jax.random.key(1), args.batch, args.size)
            else:
                x = jax.random.uniform(jax.random.key(1), shape)
            variables = model.init(jax.random.key(0), x[:1])
            variables = common.calibrated(model, variables, x)
            target = jnp.argmax(model.apply(variables, x), axis=-1).astype(jnp.int32)
            fn = models.apply_fn(model, variables)
            runs = {}
            for chunk in args.chunks.split(","):
                runs[chunk] = explainer(args.method, fn, x, target, args.samples, batch_size(chunk))
            timings = common.alternate(runs, args.rounds)
            maps = {chunk: np.asarray(run()) for chunk, run in runs.items()}
            ref = maps[next(iter(maps))]
            base = timings[next(iter(timings))]
            print(f"\n{name} {variant}:")
            rows = []
            for chunk, t in timings.items():
                size = gradients._chunk_size(
                    batch_size(chunk),
                    args.samples,
                    shape,
                    "chunk_cpu",
                )
                rows.append(
                    [
                        f"{chunk}" + (f" ({size})" if chunk == "auto" else ""),
                        f"{t.median * 1e3:.1f}",
                        f"{t.best * 1e3:.1f}",
                        f"{t.spread:.0%}",
                        f"{size * args.batch}",
                        f"{size * pixels}",
                        f"{base.median / t.median:.2f}x",
                        f"{common.rel_error(maps[chunk], ref):.1e}",
                    ]
                )
            header = [
                "chunk",
                "ms median",
                "ms best",
                "spread",
                "rows",
                "pixels",
                "vs first",
                "map err",
            ]
            print(common.fmt_table(rows, header))


if __name__ == "__main__":
    main()
