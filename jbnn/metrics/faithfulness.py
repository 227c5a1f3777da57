"""Faithfulness of saliency maps: deletion and insertion curves (RISE), ROAD.

A faithful map ranks first the pixels the model relies on: deleting them first makes the
class probability fall fast (low deletion AUC), revealing them first on an uninformative
substrate makes it rise fast (high insertion AUC) (Petsiuk et al., RISE, 2018). ROAD
(Rong et al. 2022) removes the most (or least) relevant pixels and fills them by noisy
linear imputation, so that the filled image leaks less of the removed shape.

``fn`` is a callable ``x (N, H, W, C) -> logits (N, K)``, e.g.
``jbnn.models.apply_fn(model, variables)``: a ``jax.tree_util.Partial`` whose cached
function lets the jitted code here run again without recompiling. A plain Python
callable works too (it is wrapped, and a new callable object means a new compilation).

Pixel ranking: by the map values as given, largest first (``|map|`` must be passed to
rank by magnitude); ties are broken by the lower flat (row-major) index. All perturbed
images of a batch are built with ``vmap`` and evaluated in chunks of ``batch_size``
images (``None``: all at once).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jbnn.metrics import _checks
from jbnn.metrics.similarity import gaussian_filter2d
from jbnn.ops import platform_jit
from jbnn.saliency._checks import as_partial, logits_shape

SUBSTRATES = ("zero", "blur", "mean")
OUTPUTS = ("probability", "logit", "accuracy")

# ---------------------------------------------------------------------------------------
# Shared pieces


def _check_model_output(fn, x: jax.Array, target, name: str) -> None:
    """Checks that ``fn`` maps (1, H, W, C) images to (1, K) float logits with every
    target < K (the saliency functions' check, :func:`logits_shape`: Flax's errors about
    the variables named, the shape kept per ``fn``)."""
    _, num_classes = logits_shape(fn, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype), name)
    if not _checks.is_traced(target):
        t = np.asarray(target)
        if (t >= num_classes).any():
            raise ValueError(
                f"{name}: target holds class {int(t.max())} but fn gives only {num_classes} logits"
            )


def _score(logits: jax.Array, target: jax.Array, output: str) -> jax.Array:
    """Per-row score of the target class: softmax probability, logit, or top-1 hit."""
    logits = logits.astype(jnp.float32)
    if output == "probability":
        picked = jax.nn.log_softmax(logits, axis=-1)
        return jnp.exp(jnp.take_along_axis(picked, target[:, None], axis=-1)[:, 0])
    if output == "logit":
        return jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
    return (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)


def _ranks(maps: jax.Array, descending) -> jax.Array:
    """(B, H*W) int32: position of each pixel in the removal order (0 = first).

    ``descending`` may be a traced boolean (largest first when True)."""
    b, n = maps.shape[0], maps.shape[1] * maps.shape[2]
    # Ranked by the values' bits: XLA:CPU compares subnormal floats (below ~1.2e-38) as
    # 0, so a map of such values would be ranked by pixel index alone. ~k reverses the
    # order of the int32 keys without overflow.
    keys = _checks.order_keys(maps.reshape(b, n))
    order = jnp.argsort(jnp.where(descending, ~keys, keys), axis=1, stable=True)
    rows = jnp.arange(b)[:, None]
    return jnp.zeros((b, n), jnp.int32).at[rows, order].set(jnp.arange(n, dtype=jnp.int32))


def _chunked(run: Callable, total: int, batch_size: int | None) -> jax.Array:
    """``run(ids)`` over ids 0..total-1 in chunks of ``batch_size``, concatenated."""
    chunk = total if batch_size is None else min(batch_size, total)
    num_chunks = math.ceil(total / chunk)
    ids = jnp.minimum(jnp.arange(num_chunks * chunk), total - 1).reshape(num_chunks, chunk)
    return jax.lax.map(run, ids).reshape(-1)[:total]


def blur(x: jax.Array, sigma: float = 5.0) -> jax.Array:
    """Gaussian blur of each channel of NHWC images (B, H, W, C).

    As ``scipy.ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="reflect",
    truncate=4.0)``.

    Args:
      x: images (B, H, W, C).
      sigma: standard deviation in pixels.

    Returns:
      Blurred images, same shape.

    Raises:
      ValueError: ``sigma`` not a positive finite number.
    """
    sigma = _positive_sigma("sigma", sigma)
    return jnp.moveaxis(gaussian_filter2d(jnp.moveaxis(x, -1, 1), sigma), 1, -1)


def _positive_sigma(name: str, sigma) -> float:
    """``sigma`` as a Python float, or a ValueError unless it is a finite number > 0."""
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
        raise ValueError(f"{name} must be a positive number, got {sigma!r}")
    return float(sigma)


def make_substrate(x: jax.Array, substrate, blur_sigma: float = 5.0) -> jax.Array:
    """The image (B, H, W, C) that removed pixels are replaced with.

    ``"zero"``: zeros; ``"blur"``: :func:`blur` of ``x`` with ``blur_sigma`` (RISE's
    insertion start); ``"mean"``: each image's per-channel mean; or an array of the shape
    of ``x``.

    Args:
      x: images (B, H, W, C), float32.
      substrate: a name or an array (B, H, W, C).
      blur_sigma: Gaussian sigma of ``"blur"``, in pixels.

    Returns:
      (B, H, W, C) float32.

    Raises:
      ValueError: an unknown name, an array of another shape, a bad ``blur_sigma``.
    """
    if not isinstance(substrate, str):
        base = _checks.images("substrate", substrate)
        _checks.same_shape("substrate", base, "x", x)
        return base
    _checks.choice("substrate", substrate, SUBSTRATES)
    if substrate == "zero":
        return jnp.zeros_like(x)
    if substrate == "mean":
        return jnp.broadcast_to(jnp.mean(x, axis=(1, 2), keepdims=True), x.shape)
    return _blur(x, _positive_sigma("blur_sigma", blur_sigma))


_blur = jax.jit(blur, static_argnames=("sigma",))

# ---------------------------------------------------------------------------------------
# Deletion and insertion


@functools.partial(platform_jit, static_argnames=("num_steps", "insertion", "batch_size", "output"))
def _curve(fn, x, maps, target, base, *, num_steps, insertion, batch_size, output):
    b, h, w, _ = x.shape
    n = h * w
    steps = num_steps + 1
    counts = np.round(np.linspace(0, n, steps)).astype(np.int32)  # pixels changed per step
    rank = _ranks(maps, descending=True)
    counts_j = jnp.asarray(counts)

    def image(i, s):
        changed = (rank[i] < counts_j[s]).reshape(h, w, 1)
        if insertion:
            return jnp.where(changed, x[i], base[i])
        return jnp.where(changed, base[i], x[i])

    def run(ids):
        i, s = ids // steps, ids % steps
        return _score(fn(jax.vmap(image)(i, s)), target[i], output)

    curves = _chunked(run, b * steps, batch_size).reshape(b, steps)
    curves = _checks.nan_where(_checks.nonfinite_samples(x, maps, base), curves)
    auc = jnp.trapezoid(curves, jnp.asarray(counts / n, jnp.float32), axis=1)
    return curves, auc


def _faithfulness_curve(
    fn, x, maps, target, num_steps, substrate, batch_size, output, blur_sigma, insertion
):
    x, maps = _checks.images_and_maps(x, maps)
    target = _checks.targets(target, x.shape[0])
    num_steps = _checks.positive_int("num_steps", num_steps)
    if batch_size is not None:
        batch_size = _checks.positive_int("batch_size", batch_size)
    _checks.choice("output", output, OUTPUTS)
    name = "insertion_curve" if insertion else "deletion_curve"
    fn = as_partial(fn, name)
    _check_model_output(fn, x, target, name)
    base = make_substrate(x, substrate, blur_sigma)
    return _curve(
        fn,
        x,
        maps,
        target,
        base,
        num_steps=num_steps,
        insertion=insertion,
        batch_size=batch_size,
        output=output,
    )


def deletion_curve(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.typing.ArrayLike,
    maps: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    *,
    num_steps: int = 100,
    substrate: str | jax.typing.ArrayLike = "zero",
    batch_size: int | None = None,
    output: str = "probability",
    blur_sigma: float = 5.0,
) -> tuple[jax.Array, jax.Array]:
    """Class score as the most salient pixels are deleted (replaced by a substrate).

    Step s = 0..num_steps replaces the ``round(s * H * W / num_steps)`` highest-ranked
    pixels (all channels) by the substrate; the score of the target class is recorded on
    each of the num_steps + 1 images. The AUC is the trapezoid rule over the fraction of
    pixels deleted, in [0, 1]. No normalisation of the maps is needed (only their order
    counts). Lower AUC = more faithful.

    Args:
      fn: ``x (N, H, W, C) -> logits (N, K)``.
      x: images (B, H, W, C).
      maps: saliency maps (B, H, W), ranked by value (largest first).
      target: class per image (B,) (or a scalar for all).
      num_steps: number of deletion steps (step size = 1 / num_steps of the pixels).
      substrate: ``"zero"`` (RISE's deletion), ``"blur"``, ``"mean"`` (per image and
        channel), or an array (B, H, W, C).
      batch_size: images per model call (``None``: all B * (num_steps + 1) at once).
      output: ``"probability"`` (softmax of the logits, at the target), ``"logit"``, or
        ``"accuracy"`` (1.0 while the arg-max is the target).
      blur_sigma: Gaussian sigma of the ``"blur"`` substrate, in pixels.

    Returns:
      ``(curves, auc)``: (B, num_steps + 1) float32 scores, starting with the intact image,
      and (B,) float32 areas under them.

    Raises:
      ValueError: shapes that do not match (maps vs x, target vs batch), non-finite
        images or maps, an unknown substrate or output, a target beyond fn's classes.
    """
    return _faithfulness_curve(
        fn, x, maps, target, num_steps, substrate, batch_size, output, blur_sigma, False
    )


def insertion_curve(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.typing.ArrayLike,
    maps: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    *,
    num_steps: int = 100,
    substrate: str | jax.typing.ArrayLike = "blur",
    batch_size: int | None = None,
    output: str = "probability",
    blur_sigma: float = 5.0,
) -> tuple[jax.Array, jax.Array]:
    """Class score as the most salient pixels are revealed on a substrate.

    Step s = 0..num_steps starts from the substrate (a blurred copy of the image by
    default, as RISE) and puts back the ``round(s * H * W / num_steps)`` highest-ranked
    pixels of the image. Higher AUC = more faithful. Arguments and returns as
    :func:`deletion_curve` (curves start with the substrate and end with the image).
    """
    return _faithfulness_curve(
        fn, x, maps, target, num_steps, substrate, batch_size, output, blur_sigma, True
    )


# ---------------------------------------------------------------------------------------
# ROAD: noisy linear imputation

# Neighbour (row, column) offsets and weights of Rong et al.'s imputer (as Quantus).
_NEIGHBOURS = (
    (1, 1, 1 / 12),
    (0, 1, 1 / 6),
    (-1, 1, 1 / 12),
    (1, -1, 1 / 12),
    (0, -1, 1 / 6),
    (-1, -1, 1 / 12),
    (1, 0, 1 / 6),
    (-1, 0, 1 / 6),
)


def _neighbour_sum(v: jax.Array) -> jax.Array:
    """sum_j w_j v(pixel + offset_j) over the 8 neighbours inside the image; v (H, W, C)."""
    h, w = v.shape[:2]
    p = jnp.pad(v, ((1, 1), (1, 1), (0, 0)))
    return sum(wt * p[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] for dr, dc, wt in _NEIGHBOURS)


def _linear_imputation(x: jax.Array, removed: jax.Array, tol, max_iter: int | None):
    """Removed pixels of ``x`` (H, W, C) filled so that each equals the weighted mean of
    its in-image neighbours (removed ones included): a sparse SPD system, solved by
    conjugate gradients with a Jacobi preconditioner. ``removed`` is (H, W, 1) of 0/1."""
    weight_sum = _neighbour_sum(jnp.ones(removed.shape, x.dtype))  # (H, W, 1)
    rhs = removed * _neighbour_sum((1 - removed) * x)

    def matvec(v):
        return removed * (weight_sum * v - _neighbour_sum(removed * v))

    def precondition(v):
        return removed * v / weight_sum

    filled, _ = jax.scipy.sparse.linalg.cg(
        matvec, rhs, x0=jnp.zeros_like(x), tol=tol, maxiter=max_iter, M=precondition
    )
    return jnp.where(removed > 0, filled, x)


def _tolerance(tol) -> jax.Array:
    """``tol`` as a float32 scalar, traced by the jitted cores: a new value (or a NumPy
    scalar) reuses the compiled program, where a static float compiled it again."""
    if jnp.ndim(tol) != 0:
        raise ValueError(f"tol must be a scalar, got shape {np.shape(tol)}")
    return jnp.asarray(tol, jnp.float32)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _imputation(x, removed, tol, max_iter):
    return jax.vmap(lambda xi, ri: _linear_imputation(xi, ri, tol, max_iter))(x, removed)


def noisy_linear_imputation(
    x: jax.typing.ArrayLike,
    removed: jax.typing.ArrayLike,
    *,
    key: jax.Array,
    noise: float = 0.01,
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> jax.Array:
    """ROAD's noisy linear imputation of the removed pixels of NHWC images.

    Each removed pixel is set, in every channel, to the weighted mean of its 8 in-image
    neighbours (weight 1/6 for the 4 direct ones, 1/12 for the diagonals), removed
    neighbours included, which is a sparse linear system (as
    ``quantus.functions.perturb_func.noisy_linear_imputation``, solved here by
    preconditioned conjugate gradients instead of a sparse LU), then Gaussian noise of
    standard deviation ``noise`` is added to the filled values only.

    Args:
      x: images (B, H, W, C).
      removed: (B, H, W) mask of the pixels to fill (bool or 0/1); at least one pixel of
        each image must be kept.
      key: PRNG key for the noise.
      noise: standard deviation of the noise (0 for the plain linear imputation).
      tol: relative residual at which conjugate gradients stop (traced, as in
        :func:`road`).
      max_iter: cap on conjugate-gradient iterations (None: 10 x the number of values).

    Returns:
      (B, H, W, C) float32 images; kept pixels are unchanged.

    Raises:
      ValueError: shapes that do not match, non-finite images, ``removed`` holding values
        other than 0/1, an image with every pixel removed, a negative noise.
    """
    x = _checks.images("x", x)
    r = _checks.as_float_array("removed", removed, 3, "(B, H, W)")
    if tuple(r.shape) != tuple(x.shape[:3]):
        raise ValueError(f"removed must have shape {tuple(x.shape[:3])}, got {tuple(r.shape)}")
    _checks.zero_one("removed", removed)
    if not _checks.is_traced(removed) and bool(np.all(np.asarray(r) > 0, axis=(1, 2)).any()):
        raise ValueError("removed covers a whole image: at least one pixel must be kept")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    mask = (r > 0).astype(jnp.float32)[..., None]
    filled = _imputation(x, mask, _tolerance(tol), max_iter)
    eps = jax.random.normal(key, x.shape, jnp.float32)
    return jnp.where(mask > 0, filled + noise * eps, x)


@functools.partial(platform_jit, static_argnames=("counts", "batch_size", "output", "max_iter"))
def _road(fn, x, maps, target, key, noise, lerf, *, counts, batch_size, output, tol, max_iter):
    b, h, w, c = x.shape
    num = len(counts)
    rank = _ranks(maps, descending=jnp.logical_not(lerf))  # traced: MoRF and LeRF share code
    counts_j = jnp.asarray(counts, jnp.int32)

    def image(i, p, item):
        removed = (rank[i] < counts_j[p]).reshape(h, w, 1).astype(jnp.float32)
        filled = _linear_imputation(x[i], removed, tol, max_iter)
        eps = jax.random.normal(jax.random.fold_in(key, item), (h, w, c), jnp.float32)
        return jnp.where(removed > 0, filled + noise * eps, x[i])

    def run(ids):
        i, p = ids // num, ids % num
        return _score(fn(jax.vmap(image)(i, p, ids)), target[i], output)

    scores = _chunked(run, b * num, batch_size).reshape(b, num)
    return _checks.nan_where(_checks.nonfinite_samples(x, maps), scores)


def road(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.typing.ArrayLike,
    maps: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    *,
    key: jax.Array,
    percentages: Sequence[float] = tuple(range(1, 100, 2)),
    order: str = "morf",
    noise: float = 0.01,
    output: str = "accuracy",
    batch_size: int | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> jax.Array:
    """ROAD: score after removing a share of pixels by noisy linear imputation.

    For each percentage p, the ``int(H * W * p / 100)`` highest-ranked pixels (``"morf"``,
    most relevant first) or lowest-ranked (``"lerf"``, least relevant first) are filled
    by :func:`noisy_linear_imputation` and the model is run on the result; the defaults
    (p = 1, 3, ..., 99, noise 0.01, accuracy) are Quantus's ``ROAD``. The noise of image
    i at percentage index j uses ``jax.random.fold_in(key, i * P + j)``.

    Args:
      fn: ``x (N, H, W, C) -> logits (N, K)``.
      x: images (B, H, W, C).
      maps: saliency maps (B, H, W).
      target: class per image (B,) (or a scalar).
      key: PRNG key for the imputation noise.
      percentages: P shares of pixels to remove, each in [0, 100).
      order: ``"morf"`` or ``"lerf"``.
      noise: standard deviation of the imputation noise.
      output: ``"accuracy"`` (1.0 where the arg-max is the target, as ROAD),
        ``"probability"`` or ``"logit"``.
      batch_size: images per model call (``None``: all B * P at once).
      tol: conjugate-gradient relative residual (traced: a new value, or a NumPy
        scalar, reuses the compiled program).
      max_iter: conjugate-gradient iteration cap (None: 10 x the values of one image).

    Returns:
      (B, P) float32 scores. For MoRF a faithful map makes them fall fast; for LeRF stay.

    Raises:
      ValueError: as :func:`deletion_curve`, or a percentage outside [0, 100).
    """
    x, maps = _checks.images_and_maps(x, maps)
    target = _checks.targets(target, x.shape[0])
    _checks.choice("order", order, ("morf", "lerf"))
    _checks.choice("output", output, OUTPUTS)
    if batch_size is not None:
        batch_size = _checks.positive_int("batch_size", batch_size)
    percentages = tuple(float(p) for p in np.atleast_1d(np.asarray(percentages, np.float64)))
    if not percentages or any(not 0 <= p < 100 for p in percentages):
        raise ValueError(
            f"percentages must be a non-empty list of values in [0, 100), got {percentages}"
        )
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    n = x.shape[1] * x.shape[2]
    counts = tuple(int(n * p / 100) for p in percentages)
    fn = as_partial(fn, "road")
    _check_model_output(fn, x, target, "road")
    return _road(
        fn,
        x,
        maps,
        target,
        key,
        jnp.float32(noise),
        jnp.bool_(order == "lerf"),
        counts=counts,
        batch_size=batch_size,
        output=output,
        tol=_tolerance(tol),
        max_iter=max_iter,
    )
