"""Input-gradient saliency: Gradient, Input x Gradient, SmoothGrad (and variants), IG.

Every method takes ``fn``, a function ``x -> logits`` of shape (B, K) that treats the
examples of a batch independently (a model in inference mode: BatchNorm with its
running statistics, as :func:`jbnn.models.apply_fn` gives), and explains the logit of
``target`` (int (B,), or None for the predicted class). The gradient of the target
logit of every example is one vector-Jacobian product of the whole batch with the
one-hot cotangent of the targets.

Each public function checks its input on the host and then calls one jitted
implementation with its options as static arguments. ``fn`` is passed to it as a
pytree: a ``jax.tree_util.Partial`` (what ``apply_fn`` returns) carries the variables
as traced leaves, so a second call with new variables of the same shapes reuses the
compiled code; any other callable is a static argument compared by equality.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jbnn.ops import _default_platform, platform_jit
from jbnn.saliency import _checks, _input_layer

SMOOTHGRAD_VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")
IG_METHODS = (
    "riemann_trapezoid",
    "gausslegendre",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
)

AUTO_CHUNK_PIXELS = 16 * 112 * 112
"""Input pixels per chunk of ``batch_size="auto"`` on a CPU (16 images of 112x112).

SmoothGrad's noisy copies and IG's path points are evaluated in chunks of
``max(1, AUTO_CHUNK_PIXELS // (B * H * W))`` copies of the batch there: a working set
that stays near the CPU's caches. Measured on 2-core AMD EPYC VMs (2026-11-29,
``benchmarks/chunk_cpu.py``), SmoothGrad in these chunks ran 1.02-1.24x as fast as
all copies at once (Bi-Real Net 18 at 112 and 224 px, BinaryNet at 32 px); Integrated
Gradients 0.99x (no gain measured); see docs/performance.md. On GPUs and TPUs
``"auto"`` evaluates all copies at once.
"""

__all__ = [
    "AUTO_CHUNK_PIXELS",
    "IG_METHODS",
    "SMOOTHGRAD_VARIANTS",
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "quadrature",
    "smoothgrad",
]


# --------------------------------------------------------------------------- core
def _target_grad(fn: Callable, x: jax.Array, target: jax.Array | None) -> jax.Array:
    """d logits[b, target[b]] / d x[b] for every example b: (B, H, W, C).

    One forward and one backward pass of the whole batch (examples are independent).
    With ``target`` None, the class predicted for ``x`` itself.
    """
    logits, pullback = jax.vjp(fn, x)  # (B, K)
    if target is None:
        target = jnp.argmax(logits, axis=-1)
    cotangent = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)  # (B, K)
    (grad,) = pullback(cotangent)
    return grad


def _stacked_target_grad(fn: Callable, xs: jax.Array, target: jax.Array, path=None) -> jax.Array:
    """:func:`_target_grad` of n stacked batches (n, B, H, W, C) as one batch of B * n.

    The same numbers as ``jax.vmap`` over the stack (examples are independent, and vmap
    folds the stack into the batch of every convolution anyway), but the model's layers
    see the batch they really run on: jbnn.ops picks its CPU input-gradient kernels by
    batch size, which vmap hides from them. Examples go first (B-major), so that a batch
    sharded over devices stays sharded, each device's examples contiguous.

    With ``path`` (an affine input layer, :mod:`jbnn.saliency._input_layer`), the
    gradient is taken at that layer's output, (n, B, ...): the layer's own input
    gradient is left out, to be applied once to a sum of these (:func:`_pull_back`).
    """
    n, b = xs.shape[:2]
    flat = jnp.swapaxes(xs, 0, 1).reshape(b * n, *xs.shape[2:])  # (B * n, H, W, C)
    if path is None:
        at, at_fn = flat, fn
    else:
        at = _input_layer.stem(fn, path, flat)  # (B * n, ...)
        at_fn = lambda z: _input_layer.head(fn, path, flat, z)
    grads = _target_grad(at_fn, at, jnp.repeat(target, n))  # (B * n, ...)
    return jnp.swapaxes(grads.reshape(b, n, *at.shape[1:]), 0, 1)  # (n, B, ...)


def _grad_shape(fn: Callable, x: jax.Array, path) -> tuple[int, ...]:
    """The shape of the gradients :func:`_stacked_target_grad` takes, per stacked batch."""
    if path is None:
        return x.shape
    return jax.eval_shape(lambda x: _input_layer.stem(fn, path, x), x).shape


def _pull_back(fn: Callable, path, x: jax.Array, cotangent: jax.Array) -> jax.Array:
    """The input gradient of the (affine) input layer at ``path`` applied to ``cotangent``;
    ``cotangent`` itself without a layer (``path`` None)."""
    if path is None:
        return cotangent
    z, pull = jax.vjp(lambda x: _input_layer.stem(fn, path, x), x)
    (grad,) = pull(cotangent.astype(z.dtype))
    return grad


def _predicted(fn: Callable, x: jax.Array) -> jax.Array:
    return jnp.argmax(fn(x), axis=-1).astype(jnp.int32)  # (B,)


def _prepare(fn, x, target, name: str):
    """The common boundary checks: fn as a Partial, x (B,H,W,C), target (B,) or None."""
    x = _checks.check_images(x, name)
    fn = _checks.as_partial(fn, name)
    batch, num_classes = _checks.logits_shape(fn, x, name)
    target = _checks.check_target(target, batch, num_classes, name)
    return fn, x, target


# --------------------------------------------------------------------------- gradient
@functools.partial(platform_jit, static_argnames=("times_input",))
def _gradient_jit(fn, x, target, *, times_input: bool):
    grad = _target_grad(fn, x, target)  # (B, H, W, C)
    return grad * x if times_input else grad


def gradient(fn: Callable, x: ArrayLike, target: ArrayLike | int | None = None) -> jax.Array:
    """Signed gradient of the target logit with respect to the input (Simonyan et al.).

    Captum's ``Saliency`` returns the absolute value by default and tf-keras-vis its
    channel max; this returns the signed gradient, as PAIR's ``GradientSaliency``
    does: use :func:`reduce_channels` for the display reductions.

    Args:
      fn: ``x -> logits`` (B, K), e.g. ``jbnn.models.apply_fn(model, variables)``.
      x: float images (B, H, W, C), finite.
      target: class per example, int (B,) (or one int for all) in [0, K); None for
        the predicted class.

    Returns:
      d logit[target] / dx, shape (B, H, W, C), x's dtype.
    """
    fn, x, target = _prepare(fn, x, target, "gradient")
    return _gradient_jit(fn, x, target, times_input=False)


def input_x_gradient(fn: Callable, x: ArrayLike, target: ArrayLike | int | None = None):
    """Input times gradient (Shrikumar et al.): ``x * gradient(fn, x, target)``.

    Args:
      fn: ``x -> logits`` (B, K).
      x: float images (B, H, W, C), finite.
      target: int (B,) in [0, K), or None for the predicted class.

    Returns:
      Attributions of shape (B, H, W, C).
    """
    fn, x, target = _prepare(fn, x, target, "input_x_gradient")
    return _gradient_jit(fn, x, target, times_input=True)


# --------------------------------------------------------------------------- SmoothGrad
def _chunk_size(batch_size, num: int, x_shape, name: str) -> int:
    """The number of copies of the batch evaluated together (a static int in [1, num]).

    ``None``: all ``num`` at once; ``"auto"``: all at once on accelerators, chunks of
    about :data:`AUTO_CHUNK_PIXELS` input pixels when the default device is a CPU; an
    int: at most that many.
    """
    if batch_size is None:
        return num
    if isinstance(batch_size, str):
        if batch_size != "auto":
            raise ValueError(
                f"{name}: batch_size must be a positive int, None (all at once) or 'auto', "
                f"got {batch_size!r}."
            )
        if _default_platform() != "cpu":
            return num
        pixels = int(np.prod(x_shape[:3]))  # B * H * W
        return max(1, min(num, AUTO_CHUNK_PIXELS // pixels))
    return min(_checks.check_positive_int(batch_size, "batch_size", name), num)


def _chunked(num: int, batch_size: int, compute: Callable, merge: Callable, init):
    """Folds ``compute(ids)`` over ``num`` indices in chunks of ``batch_size``.

    Full chunks go through ``lax.scan`` (one chunk alive at a time, so memory does not
    grow with ``num``); a remainder chunk of ``num % batch_size`` is computed once after.
    ``merge(carry, chunk_result, offset)`` folds a chunk into the carry.
    """
    num_full, remainder = divmod(num, batch_size)
    carry = init
    if num_full:

        def body(carry, chunk):
            ids = chunk * batch_size + jnp.arange(batch_size)
            return merge(carry, compute(ids), chunk * batch_size), None

        carry, _ = jax.lax.scan(body, carry, jnp.arange(num_full))
    if remainder:
        ids = num_full * batch_size + jnp.arange(remainder)
        carry = merge(carry, compute(ids), num_full * batch_size)
    return carry


@functools.partial(
    platform_jit,
    static_argnames=("relative", "num_samples", "variant", "batch_size", "split_input_layer"),
)
def _smoothgrad_jit(
    fn,
    x,
    target,
    keys,
    noise_scale,
    *,
    relative,
    num_samples,
    variant,
    batch_size,
    split_input_layer=True,
):
    if target is None:
        target = _predicted(fn, x)  # the class predicted for the clean input
    batch = x.shape[0]
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)  # accumulate in >= float32
    noise_scale = noise_scale.astype(acc_dtype)  # float64 for float64 x, not float32
    if relative:  # PAIR / SmoothGrad paper: a fraction of each example's value range
        spread = jnp.max(x, axis=(1, 2, 3)) - jnp.min(x, axis=(1, 2, 3))  # (B,)
        sigma = noise_scale * spread
    else:  # Captum: an absolute standard deviation
        sigma = jnp.broadcast_to(noise_scale, (batch,))
    sigma = sigma.astype(x.dtype)[:, None, None, None]  # (B, 1, 1, 1)

    def noisy_copy(s):  # the noisy copy number s of every example
        # Drawn in >= float32: jax.random.normal in bfloat16 takes 128 values in
        # [-2.89, 2.52] with mean -0.012, not a rounded standard normal.
        noise = jax.vmap(
            lambda k: jax.random.normal(jax.random.fold_in(k, s), x.shape[1:], acc_dtype)
        )(keys)  # (B, H, W, C)
        return x + sigma * noise.astype(x.dtype)

    # The mean of the gradients is linear in them: with an affine input layer it is
    # summed at the layer's output and pulled back through the layer once.
    split = split_input_layer and variant == "smoothgrad"
    path = _input_layer.find(fn, x) if split else None

    def compute(ids):  # (n,) -> (n, B, ...): gradients at x (or the input layer's output)
        noisy = jax.vmap(noisy_copy)(ids)  # (n, B, H, W, C)
        return _stacked_target_grad(fn, noisy, target, path).astype(acc_dtype)

    zeros = jnp.zeros(_grad_shape(fn, x, path), acc_dtype)
    if variant == "vargrad":
        # Chan et al.'s pairwise update of (mean, sum of squared deviations): stable,
        # unlike E[g^2] - E[g]^2.
        def merge(carry, grads, offset):
            mean, m2 = carry
            n_new = grads.shape[0]
            chunk_mean = jnp.mean(grads, axis=0)
            chunk_m2 = jnp.sum(jnp.square(grads - chunk_mean), axis=0)
            total = offset + n_new
            delta = chunk_mean - mean
            mean = mean + delta * jnp.asarray(n_new / total, acc_dtype)
            m2 = m2 + chunk_m2 + jnp.square(delta) * jnp.asarray(offset * n_new / total, acc_dtype)
            return mean, m2

        _, m2 = _chunked(num_samples, batch_size, compute, merge, (zeros, zeros))
        return (m2 / num_samples).astype(x.dtype)
    square = variant == "smoothgrad_sq"

    def merge(total, grads, offset):
        del offset
        return total + jnp.sum(jnp.square(grads) if square else grads, axis=0)

    total = _chunked(num_samples, batch_size, compute, merge, zeros)
    return _pull_back(fn, path, x, total / num_samples).astype(x.dtype)


def _smoothgrad_options(
    x_shape, num_samples, noise_level, noise_sigma, variant, batch_size, split_input_layer, name
):
    num_samples = _checks.check_positive_int(num_samples, "num_samples", name)
    _checks.check_choice(variant, SMOOTHGRAD_VARIANTS, "variant", name)
    batch_size = _chunk_size(batch_size, num_samples, x_shape, name)
    batch = x_shape[0]
    if noise_sigma is None:
        relative, scale, arg = True, noise_level, "noise_level"
    else:
        relative, scale, arg = False, noise_sigma, "noise_sigma"
    scale_np = np.asarray(scale, dtype=np.float64)
    if scale_np.shape not in ((), (batch,)) or not np.all(np.isfinite(scale_np)):
        raise ValueError(
            f"{name}: {arg} must be a finite number (or one per example, shape ({batch},)), "
            f"got {scale!r}."
        )
    if np.any(scale_np < 0):
        raise ValueError(f"{name}: {arg} must be >= 0, got {scale!r}.")
    static = dict(
        relative=relative,
        num_samples=num_samples,
        variant=variant,
        batch_size=batch_size,
        split_input_layer=bool(split_input_layer),
    )
    # float64 where x64 is on (cast to the accumulation dtype in the jitted code)
    return jnp.asarray(scale_np), static


def smoothgrad(
    fn: Callable,
    x: ArrayLike,
    target: ArrayLike | int | None,
    key: jax.Array,
    *,
    num_samples: int = 50,
    noise_level: float = 0.15,
    noise_sigma: float | ArrayLike | None = None,
    variant: str = "smoothgrad",
    batch_size: int | str | None = "auto",
    split_input_layer: bool = True,
) -> jax.Array:
    """SmoothGrad (Smilkov et al. 2017) and its squared and variance variants.

    Noisy copy ``s`` of example ``b`` is ``x[b] + sigma[b] * z`` with
    ``z = jax.random.normal(fold_in(key_b, s), (H, W, C))`` (drawn in float32, or
    float64 for float64 ``x``, then cast to x's dtype), where ``key_b`` is
    ``fold_in(key, b)`` for a single ``key`` (or ``key[b]`` when one key per example is
    given). ``sigma[b] = noise_level * (max(x[b]) - min(x[b]))``, the spread of that
    example as in the SmoothGrad paper and PAIR's ``stdev_spread`` (tf-keras-vis uses
    0.20 by default); or ``noise_sigma`` in absolute input units when given, as
    Captum's ``NoiseTunnel(stdevs=...)``. The same key gives the same map; the result
    does not depend on ``batch_size``. The target is the class predicted for the clean
    input when ``target`` is None.

    Variants (g_s is the gradient of the target logit at noisy copy s):

    * ``"smoothgrad"``: mean_s g_s (PAIR ``magnitude=False``, Captum ``smoothgrad``);
    * ``"smoothgrad_sq"``: mean_s g_s^2 (PAIR ``magnitude=True``, Captum ``smoothgrad_sq``);
    * ``"vargrad"``: mean_s (g_s - mean g)^2, the population variance (Captum ``vargrad``).

    Samples are evaluated with ``vmap`` in chunks of ``batch_size`` that ``lax.scan``
    folds into running statistics, so memory holds one chunk (``batch_size`` noisy
    copies of the batch), whatever ``num_samples`` is. ``batch_size=None`` evaluates all
    samples at once (memory grows with ``num_samples``; Captum's default). The default
    ``"auto"`` does so on GPUs and TPUs, where it is fastest; on a CPU it takes chunks
    of about :data:`AUTO_CHUNK_PIXELS` input pixels (``max(1, 200704 // (B*H*W))``
    copies), which run faster there than one large batch. The chunking changes the map
    by float rounding only (the noise does not depend on it).

    For ``"smoothgrad"``, when the model's input layer is affine (a convolution or
    dense layer without input quantizer that alone reads ``x``, e.g. a ResNet's stem),
    the gradients are summed at that layer's output and pulled back through the layer
    once per example, not once per noisy copy (:mod:`jbnn.saliency._input_layer`): the
    same map up to float rounding, the forward passes unchanged.

    Args:
      fn: ``x -> logits`` (B, K), in inference mode.
      x: float images (B, H, W, C), finite.
      target: int (B,) (or one int) in [0, K), or None for the predicted class.
      key: a ``jax.random.key`` (one for the batch, or shape (B,) one per example).
      num_samples: number of noisy copies per example (> 0).
      noise_level: sigma as a fraction of each example's (max - min).
      noise_sigma: absolute sigma (a number or one per example), overrides
        ``noise_level`` when not None.
      variant: ``"smoothgrad"``, ``"smoothgrad_sq"`` or ``"vargrad"``.
      batch_size: noisy copies evaluated together, None for all, or ``"auto"`` (above).
      split_input_layer: pull the summed gradient back through an affine input layer
        once (above); False computes every copy's input gradient in full.

    Returns:
      The map, shape (B, H, W, C), x's dtype.
    """
    name = "smoothgrad"
    fn, x, target = _prepare(fn, x, target, name)
    keys = _checks.per_example_keys(key, x.shape[0], name)
    scale, static = _smoothgrad_options(
        x.shape,
        num_samples,
        noise_level,
        noise_sigma,
        variant,
        batch_size,
        split_input_layer,
        name,
    )
    return _smoothgrad_jit(fn, x, target, keys, scale, **static)


# --------------------------------------------------------------------------- IG
def quadrature(method: str, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points ``alpha`` in [0, 1] and weights of the path integral of IG.

    ``gausslegendre`` and the left / right / middle Riemann sums are Captum's
    (``approximation_methods``). ``riemann_trapezoid`` is the trapezoid rule on
    ``linspace(0, 1, n)`` with step ``1 / (n - 1)`` (end weights halved), whose weights
    sum to 1; Captum uses step ``1 / n`` there, whose weights sum to ``(n - 1) / n``.

    Args:
      method: one of :data:`IG_METHODS`.
      num_steps: number of points (>= 2 for the trapezoid rule).

    Returns:
      ``(alphas, weights)``, float64 arrays of shape (num_steps,).
    """
    n = num_steps
    if method == "gausslegendre":
        points, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (points + 1.0), 0.5 * weights
    if method == "riemann_trapezoid":
        if n < 2:
            raise ValueError(
                f"integrated_gradients: riemann_trapezoid needs num_steps >= 2, got {n}."
            )
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2.0
        return np.linspace(0.0, 1.0, n), weights
    weights = np.full(n, 1.0 / n)
    if method == "riemann_left":
        return np.linspace(0.0, 1.0 - 1.0 / n, n), weights
    if method == "riemann_right":
        return np.linspace(1.0 / n, 1.0, n), weights
    if method == "riemann_middle":
        return np.linspace(0.5 / n, 1.0 - 0.5 / n, n), weights
    raise ValueError(
        f"integrated_gradients: unknown method {method!r}; expected one of {', '.join(IG_METHODS)}."
    )


@functools.partial(
    platform_jit, static_argnames=("num_steps", "method", "batch_size", "split_input_layer")
)
def _ig_jit(fn, x, target, baseline, *, num_steps, method, batch_size, split_input_layer=True):
    if target is None:
        target = _predicted(fn, x)
    alphas, weights = quadrature(method, num_steps)
    alphas = jnp.asarray(alphas, x.dtype)
    weights = jnp.asarray(weights, x.dtype)
    baseline = jnp.broadcast_to(baseline.astype(x.dtype), x.shape)  # (B, H, W, C)
    diff = x - baseline

    def point(i):  # point alphas[i] of the path
        return baseline + alphas[i] * diff  # (B, H, W, C)

    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    # The weighted sum of the gradients is linear in them: with an affine input layer it
    # is taken at the layer's output and pulled back through the layer once.
    path = _input_layer.find(fn, x) if split_input_layer else None

    def compute(ids):  # (n,) -> (n, B, ...): weighted gradients at the points ids
        grads = _stacked_target_grad(fn, jax.vmap(point)(ids), target, path)
        w = weights[ids].reshape((-1,) + (1,) * (grads.ndim - 1))
        return (w * grads).astype(acc_dtype)

    def merge(total, grads, offset):
        del offset
        return total + jnp.sum(grads, axis=0)

    zeros = jnp.zeros(_grad_shape(fn, x, path), acc_dtype)
    total = _chunked(num_steps, batch_size, compute, merge, zeros)
    return diff * _pull_back(fn, path, x, total).astype(x.dtype)


def _ig_options(x_shape, baseline, num_steps, method, batch_size, split_input_layer, name):
    num_steps = _checks.check_positive_int(num_steps, "num_steps", name)
    _checks.check_choice(method, IG_METHODS, "method", name)
    quadrature(method, num_steps)  # checks num_steps for the method
    batch_size = _chunk_size(batch_size, num_steps, x_shape, name)
    base = np.asarray(baseline) if not isinstance(baseline, jax.Array) else baseline
    real = jnp.issubdtype(base.dtype, jnp.integer) or jnp.issubdtype(base.dtype, jnp.floating)
    if not real:
        raise TypeError(f"{name}: baseline must be a real number or array, got dtype {base.dtype}.")
    try:
        np.broadcast_shapes(tuple(base.shape), tuple(x_shape))
        ok = base.ndim <= len(x_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name}: baseline of shape {tuple(base.shape)} does not broadcast to x's shape "
            f"{tuple(x_shape)}; give a number, an image (H, W, C) or a batch (B, H, W, C)."
        )
    if not isinstance(base, jax.core.Tracer) and not bool(np.isfinite(np.asarray(base)).all()):
        raise ValueError(f"{name}: baseline contains NaN or inf values.")
    static = dict(
        num_steps=num_steps,
        method=method,
        batch_size=batch_size,
        split_input_layer=bool(split_input_layer),
    )
    return jnp.asarray(base), static


def integrated_gradients(
    fn: Callable,
    x: ArrayLike,
    target: ArrayLike | int | None,
    *,
    baseline: float | ArrayLike = 0.0,
    num_steps: int = 50,
    method: str = "riemann_trapezoid",
    batch_size: int | str | None = "auto",
    split_input_layer: bool = True,
) -> jax.Array:
    """Integrated Gradients (Sundararajan et al. 2017).

    ``(x - x') * sum_i w_i * grad(x' + alpha_i (x - x'))`` with the quadrature of
    :func:`quadrature` (``alpha_i``, ``w_i``) along the straight path from the baseline
    ``x'`` to ``x``. Captum's defaults are 50 steps of ``gausslegendre``, PAIR's 25
    uniform steps; the baseline is zero in both. Path points are evaluated with
    ``vmap`` in chunks of ``batch_size`` (None: all at once; ``"auto"``: all at once on
    accelerators, chunks of about :data:`AUTO_CHUNK_PIXELS` pixels on a CPU), as in
    :func:`smoothgrad`, and the weighted sum is taken at the output of an affine input
    layer and pulled back through it once, as there.

    Args:
      fn: ``x -> logits`` (B, K), in inference mode.
      x: float images (B, H, W, C), finite.
      target: int (B,) (or one int) in [0, K), or None for the predicted class.
      baseline: a number, an image (H, W, C) or a batch (B, H, W, C).
      num_steps: number of path points (> 0; >= 2 for the trapezoid rule).
      method: one of :data:`IG_METHODS`.
      batch_size: path points evaluated together, None for all, or ``"auto"``.
      split_input_layer: as in :func:`smoothgrad`.

    Returns:
      Attributions of shape (B, H, W, C); they sum (per example) to about
      ``logit(x) - logit(x')`` of the target (completeness).
    """
    name = "integrated_gradients"
    fn, x, target = _prepare(fn, x, target, name)
    base, static = _ig_options(
        x.shape, baseline, num_steps, method, batch_size, split_input_layer, name
    )
    return _ig_jit(fn, x, target, base, **static)
