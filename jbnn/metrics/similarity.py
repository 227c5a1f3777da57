"""Similarity between two batches of saliency maps: rank and linear correlation, SSIM, HOG.

Each function takes two batches of maps (B, H, W) and returns (B,) float32, one score per
pair of maps; all are jittable and vmappable (the NaN check on the inputs runs on the host
for concrete arrays only, see :mod:`jbnn.metrics`).

Conventions for degenerate maps (correlation is undefined when a map is constant):

* both maps constant: 1.0 (neither orders its pixels, so they agree);
* exactly one map constant: 0.0 (no association can be measured).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jbnn.metrics import _checks

# ---------------------------------------------------------------------------------------
# Correlations


def _average_ranks(v: jax.Array) -> jax.Array:
    """Ranks 1..N of ``v`` (N,), ties given their average rank (as scipy.stats.rankdata)."""
    n = v.shape[0]
    k = _checks.order_keys(v)  # (N,) int32 keys in the order of the values, bitwise
    s = jax.lax.sort(k, is_stable=False)
    # A value's tie spans sorted positions lo .. last: lo by a binary search (unrolled,
    # log2 N steps of N gathers: much cheaper than method="sort", which sorts the 2N
    # concatenated values again), last, the end of the run of equal keys starting there,
    # by a reverse running minimum over the run ends (cheaper than a second search).
    lo = jnp.searchsorted(s, k, side="left", method="scan_unrolled")  # values < v[i]
    pos = jnp.arange(n, dtype=jnp.int32)
    run_end = jnp.concatenate([s[1:] != s[:-1], jnp.ones((1,), bool)])
    last = jax.lax.cummin(jnp.where(run_end, pos, n), reverse=True)  # values <= v[i], -1
    return (lo + last[lo] + 2).astype(jnp.float32) / 2  # ranks lo+1 .. last+1, averaged


def _pearson_flat(x: jax.Array, y: jax.Array) -> jax.Array:
    """Pearson r of two vectors (N,), with the constant-vector conventions of the module."""
    # Exactly rescaled to max |.| < 1 so that the means cannot overflow, and subnormal
    # values (which XLA:CPU compares and adds as 0) into the normal range, before the
    # constant test.
    x = _checks.scale_by_power_of_two(x, 0)[0]
    y = _checks.scale_by_power_of_two(y, 0)[0]
    const_x = jnp.max(x) == jnp.min(x)
    const_y = jnp.max(y) == jnp.min(y)
    x = x - jnp.mean(x)
    y = y - jnp.mean(y)
    # Scale to max |.| = 1 first so that squares neither overflow nor underflow.
    x = x / jnp.where(const_x, 1.0, jnp.max(jnp.abs(x)))
    y = y / jnp.where(const_y, 1.0, jnp.max(jnp.abs(y)))
    den = jnp.sqrt(jnp.sum(x * x)) * jnp.sqrt(jnp.sum(y * y))
    r = jnp.sum(x * y) / jnp.where(den > 0, den, 1.0)
    r = jnp.clip(r, -1.0, 1.0)
    return jnp.where(const_x & const_y, 1.0, jnp.where(const_x | const_y, 0.0, r))


def _spearman_flat(x: jax.Array, y: jax.Array) -> jax.Array:
    """Spearman rho of two vectors (N,): Pearson r of their average ranks; NaN in, NaN out."""
    r = _pearson_flat(_average_ranks(x), _average_ranks(y))
    return jnp.where(jnp.any(jnp.isnan(x)) | jnp.any(jnp.isnan(y)), jnp.nan, r)


# Pairs ranked at once by spearman: ranking a pair of 224 x 224 maps needs ~8 MB of
# scratch (13.6 MB with two binary searches), so a vmap over all of 500 pairs needed
# 4.0 GB (6.8 GB); chunks of 8 pairs bound it to ~61 MB for any batch, and run as fast.
_SPEARMAN_CHUNK = 8


def _chunked_pairs(f, a: jax.Array, b: jax.Array, chunk: int) -> jax.Array:
    """``vmap(f)(a, b)`` (B,), computed ``chunk`` rows at a time to bound scratch memory.

    A loop over slices of the inputs (no copy of them): the last chunk starts at
    B - chunk, recomputing a few rows of the one before (same values)."""
    n = a.shape[0]
    if n <= chunk:
        return jax.vmap(f)(a, b)

    def body(i, out):
        start = jnp.minimum(i * chunk, n - chunk)
        part = jax.vmap(f)(
            jax.lax.dynamic_slice_in_dim(a, start, chunk),
            jax.lax.dynamic_slice_in_dim(b, start, chunk),
        )
        return jax.lax.dynamic_update_slice_in_dim(out, part, start, 0)

    return jax.lax.fori_loop(0, -(-n // chunk), body, jnp.zeros((n,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("absolute",))
def _spearman(a: jax.Array, b: jax.Array, absolute: bool) -> jax.Array:
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    f = _spearman_flat
    if absolute:  # per chunk: |a| and |b| of the whole batch would be two more copies
        f = lambda x, y: _spearman_flat(jnp.abs(x), jnp.abs(y))
    return _chunked_pairs(f, a, b, _SPEARMAN_CHUNK)


@jax.jit
def _pearson(a: jax.Array, b: jax.Array) -> jax.Array:
    r = jax.vmap(_pearson_flat)(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
    # NaN or +-inf (only while traced: concrete ones are refused) give NaN; an all-inf
    # map would otherwise pass the constant test and score 1.0 or 0.0.
    return _checks.nan_where(_checks.nonfinite_samples(a, b), r)


def _pair(a, b) -> tuple[jax.Array, jax.Array]:
    a_checked = _checks.maps("a", a)
    b_checked = _checks.maps("b", b)
    _checks.same_shape("a", a_checked, "b", b_checked)
    return a_checked, b_checked


def spearman(a: jax.typing.ArrayLike, b: jax.typing.ArrayLike, *, absolute: bool = False):
    """Spearman rank correlation between each pair of flattened maps.

    Equal to ``scipy.stats.spearmanr(a[i].ravel(), b[i].ravel())`` (ties get their average
    rank). No normalisation is needed: ranks are invariant to any increasing transform of a
    map. Adebayo et al. report it on signed maps and on absolute maps (``absolute=True``).
    Pairs are ranked 8 at a time, so scratch memory does not grow with B (~60 MB for
    224 x 224 maps).

    Args:
      a: maps (B, H, W).
      b: maps (B, H, W).
      absolute: compare ``|a|`` with ``|b|`` instead of the signed maps.

    Returns:
      (B,) float32 in [-1, 1]; 1.0 when both maps of a pair are constant, 0.0 when exactly
      one is (the correlation is undefined there). Traced inputs (inside ``jit``), which
      cannot be checked: NaN in a pair gives NaN, +-inf are ranked as scipy ranks them.

    Raises:
      ValueError: maps not (B, H, W), ``a`` and ``b`` of different shapes, or non-finite
        values (checked for concrete inputs).
    """
    a, b = _pair(a, b)
    return _spearman(a, b, absolute=bool(absolute))


def pearson(a: jax.typing.ArrayLike, b: jax.typing.ArrayLike) -> jax.Array:
    """Pearson correlation between each pair of flattened maps.

    Equal to ``scipy.stats.pearsonr(a[i].ravel(), b[i].ravel())``; invariant to a per-map
    affine rescaling, so no normalisation is applied.

    Args:
      a: maps (B, H, W).
      b: maps (B, H, W).

    Returns:
      (B,) float32 in [-1, 1]; 1.0 when both maps are constant, 0.0 when exactly one is.

    Raises:
      ValueError: as :func:`spearman`.
    """
    a, b = _pair(a, b)
    return _pearson(a, b)


# ---------------------------------------------------------------------------------------
# Min-max scaling and Gaussian filtering


def minmax_scale(m: jax.Array) -> jax.Array:
    """Each map scaled to [0, 1] by its own min and max.

    Args:
      m: maps (..., H, W).

    Returns:
      ``(m - min) / (max - min)`` per map, same shape; a constant map becomes all zeros.
    """
    m = _checks.scale_by_power_of_two(m, (-2, -1))[0]  # exact; max - min cannot overflow
    lo = jnp.min(m, axis=(-2, -1), keepdims=True)
    hi = jnp.max(m, axis=(-2, -1), keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, (m - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def gaussian_kernel1d(sigma: float, radius: int) -> np.ndarray:
    """The normalised 1-D Gaussian of ``scipy.ndimage.gaussian_filter1d``.

    Args:
      sigma: standard deviation in pixels.
      radius: half-width; the kernel has 2 radius + 1 taps.

    Returns:
      (2 radius + 1,) float32 weights summing to 1.
    """
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_filter2d(img: jax.Array, sigma: float, truncate: float = 4.0) -> jax.Array:
    """Gaussian filter over the two axes (-2, -1) of ``img`` (..., H, W).

    As ``scipy.ndimage.gaussian_filter(img, sigma, mode="reflect", truncate=truncate)`` on
    each 2-D slice: radius ``int(truncate * sigma + 0.5)``, edges reflected (d c b a | a b
    c d), separable.

    Args:
      img: array (..., H, W).
      sigma: standard deviation in pixels (static).
      truncate: kernel radius in standard deviations (static).

    Returns:
      The filtered array, same shape.
    """
    radius = int(truncate * float(sigma) + 0.5)
    k = gaussian_kernel1d(float(sigma), radius)
    h, w = img.shape[-2:]
    pad = [(0, 0)] * (img.ndim - 2) + [(radius, radius), (radius, radius)]
    p = jnp.pad(img, pad, mode="symmetric")
    rows = sum(float(k[i]) * p[..., i : i + h, :] for i in range(len(k)))
    return sum(float(k[i]) * rows[..., :, i : i + w] for i in range(len(k)))


# ---------------------------------------------------------------------------------------
# SSIM

_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # scikit-image: an 11-tap window for sigma 1.5 (Wang et al. 2004)
_SSIM_WIN = 2 * int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5) + 1


@jax.jit
def _ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    x, y = minmax_scale(a), minmax_scale(b)
    f = functools.partial(gaussian_filter2d, sigma=_SSIM_SIGMA, truncate=_SSIM_TRUNCATE)
    ux, uy = f(x), f(y)
    vx = f(x * x) - ux * ux
    vy = f(y * y) - uy * uy
    vxy = f(x * y) - ux * uy
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2  # K1, K2, data_range = 1
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (_SSIM_WIN - 1) // 2
    score = jnp.mean(s[:, pad:-pad, pad:-pad], axis=(1, 2))
    return _checks.nan_where(_checks.nonfinite_samples(a, b), score)


def ssim(a: jax.typing.ArrayLike, b: jax.typing.ArrayLike) -> jax.Array:
    """Mean structural similarity of each pair of maps, each min-max scaled to [0, 1].

    Each map is scaled by its own min and max to [0, 1] (a constant map becomes all
    zeros), then compared as ``skimage.metrics.structural_similarity(x, y,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``:
    11-tap Gaussian windows, edges reflected, the mean taken over the pixels at least 5
    from the border.

    Args:
      a: maps (B, H, W), H and W at least 11.
      b: maps (B, H, W).

    Returns:
      (B,) float32 in [-1, 1]; two constant maps give 1.0.

    Raises:
      ValueError: as :func:`spearman`, or maps smaller than 11 x 11.
    """
    a, b = _pair(a, b)
    if min(a.shape[1:]) < _SSIM_WIN:
        raise ValueError(
            f"ssim needs maps of at least {_SSIM_WIN}x{_SSIM_WIN} pixels (its Gaussian "
            f"window), got {a.shape[1]}x{a.shape[2]}"
        )
    return _ssim(a, b)


# ---------------------------------------------------------------------------------------
# HOG


_GRADIENT_NOISE = 8 * float(np.finfo(np.float32).eps)  # ~1e-6 of the largest |value|


def _hog_single(m: jax.Array, cell_size: int, block_size: int, orientations: int) -> jax.Array:
    """HOG features of one map (H, W), as skimage.feature.hog with L2-Hys blocks."""
    h, w = m.shape
    g_row = jnp.zeros_like(m).at[1:-1, :].set(m[2:, :] - m[:-2, :])
    g_col = jnp.zeros_like(m).at[:, 1:-1].set(m[:, 2:] - m[:, :-2])
    # Differences below float32 rounding of the map's values are noise (they can differ
    # between compiled variants of the same code); L2-Hys would blow a flat block's noise
    # up to O(1) features, so they are set to exactly 0.
    noise_floor = _GRADIENT_NOISE * jnp.max(jnp.abs(m))
    g_row = jnp.where(jnp.abs(g_row) <= noise_floor, 0.0, g_row)
    g_col = jnp.where(jnp.abs(g_col) <= noise_floor, 0.0, g_col)
    magnitude = jnp.hypot(g_col, g_row)
    orientation = jnp.rad2deg(jnp.arctan2(g_row, g_col)) % 180.0
    # Exact angles on the axes, where float32 rounding could cross a bin edge (0 == 180).
    orientation = jnp.where(g_row == 0, 0.0, jnp.where(g_col == 0, 90.0, orientation))
    width = 180.0 / orientations
    bins = jnp.clip(jnp.floor(orientation / width).astype(jnp.int32), 0, orientations - 1)
    n_rows, n_cols = h // cell_size, w // cell_size
    crop = (slice(0, n_rows * cell_size), slice(0, n_cols * cell_size))
    votes = jax.nn.one_hot(bins[crop], orientations) * magnitude[crop][..., None]
    votes = votes.reshape(n_rows, cell_size, n_cols, cell_size, orientations)
    hist = votes.sum(axis=(1, 3)) / (cell_size * cell_size)  # (n_rows, n_cols, O)
    nb_rows, nb_cols = n_rows - block_size + 1, n_cols - block_size + 1
    r = (jnp.arange(nb_rows)[:, None] + jnp.arange(block_size)[None, :])[:, None, :, None]
    c = (jnp.arange(nb_cols)[:, None] + jnp.arange(block_size)[None, :])[None, :, None, :]
    blocks = hist[r, c]  # (nb_rows, nb_cols, block, block, O)
    eps = 1e-5
    sq = lambda v: jnp.sqrt(jnp.sum(v * v, axis=(2, 3, 4), keepdims=True) + eps**2)
    out = jnp.minimum(blocks / sq(blocks), 0.2)
    return (out / sq(out)).reshape(-1)


@functools.partial(jax.jit, static_argnames=("cell_size", "block_size", "orientations"))
def _hog(m: jax.Array, cell_size: int, block_size: int, orientations: int) -> jax.Array:
    return jax.vmap(
        functools.partial(
            _hog_single, cell_size=cell_size, block_size=block_size, orientations=orientations
        )
    )(m)


def _check_hog_args(shape, cell_size, block_size, orientations) -> tuple[int, int, int]:
    cell_size = _checks.positive_int("cell_size", cell_size)
    block_size = _checks.positive_int("block_size", block_size)
    orientations = _checks.positive_int("orientations", orientations)
    cells = (shape[1] // cell_size, shape[2] // cell_size)
    if min(cells) < block_size:
        raise ValueError(
            f"HOG with cell_size={cell_size} gives {cells[0]}x{cells[1]} cells on "
            f"{shape[1]}x{shape[2]} maps, fewer than one block of {block_size}x{block_size} "
            f"cells; use a smaller cell_size (e.g. 8 for 32 px maps) or block_size"
        )
    return cell_size, block_size, orientations


def hog(
    maps: jax.typing.ArrayLike,
    *,
    cell_size: int = 16,
    block_size: int = 2,
    orientations: int = 9,
) -> jax.Array:
    """Histogram-of-oriented-gradients features of each map, no rescaling.

    As ``skimage.feature.hog(m, orientations=orientations, pixels_per_cell=(cell_size,
    cell_size), cells_per_block=(block_size, block_size), block_norm="L2-Hys",
    transform_sqrt=False, feature_vector=True)``: central-difference gradients (zero on the
    border rows/columns), unsigned orientations in [0, 180) hard-binned, per-cell mean
    magnitude per bin, L2-Hys normalisation of overlapping blocks (clip 0.2, eps 1e-5).
    Pixels beyond the last whole cell are ignored. One difference: gradient components
    smaller than 8 float32 epsilons (about 1e-6) times the map's max ``|value|``, which
    are rounding noise, are set to 0, so that flat regions give exactly zero features
    (L2-Hys would otherwise scale that noise up to O(1) values).

    Args:
      maps: (B, H, W).
      cell_size: pixels per (square) cell.
      block_size: cells per (square) block.
      orientations: number of orientation bins.

    Returns:
      (B, F) float32 features, F = blocks x block_size^2 x orientations.

    Raises:
      ValueError: bad maps, or maps too small for one block.
    """
    m = _checks.maps("maps", maps)
    args = _check_hog_args(m.shape, cell_size, block_size, orientations)
    return _hog(m, *args)


@functools.partial(jax.jit, static_argnames=("cell_size", "block_size", "orientations"))
def _hog_similarity(a, b, cell_size: int, block_size: int, orientations: int) -> jax.Array:
    fa = _hog(minmax_scale(a), cell_size, block_size, orientations)
    fb = _hog(minmax_scale(b), cell_size, block_size, orientations)
    score = jax.vmap(_spearman_flat)(fa, fb)
    return _checks.nan_where(_checks.nonfinite_samples(a, b), score)


def hog_similarity(
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    *,
    cell_size: int = 16,
    block_size: int = 2,
    orientations: int = 9,
) -> jax.Array:
    """Spearman correlation between the HOG features of each pair of maps.

    Each map is min-max scaled to [0, 1] by its own range (constant maps become zeros),
    its HOG features computed as :func:`hog` (skimage's ``hog`` with 16 x 16-pixel cells,
    2 x 2-cell L2-Hys blocks and 9 orientations by default), and the two feature vectors
    compared with :func:`spearman`'s rank correlation (with its constant conventions: a
    constant map has all-zero features).

    Args:
      a: maps (B, H, W).
      b: maps (B, H, W).
      cell_size: pixels per cell (the 16 of Adebayo et al.; 32 px maps have only 2 x 2
        cells of 16 px, 28 px maps need ``cell_size=8`` or ``block_size=1``).
      block_size: cells per block.
      orientations: orientation bins.

    Returns:
      (B,) float32 in [-1, 1].

    Raises:
      ValueError: as :func:`spearman`, or maps too small for one block.
    """
    a, b = _pair(a, b)
    args = _check_hog_args(a.shape, cell_size, block_size, orientations)
    return _hog_similarity(a, b, *args)


# ---------------------------------------------------------------------------------------
# Top-k intersection


@functools.partial(jax.jit, static_argnames=("k",))
def _topk_intersection(a: jax.Array, b: jax.Array, k: int) -> jax.Array:
    n = a.shape[1] * a.shape[2]

    def top_mask(m):
        _, idx = jax.lax.top_k(jnp.abs(m.reshape(-1)), k)
        return jnp.zeros((n,), jnp.float32).at[idx].set(1.0)

    ma = jax.vmap(top_mask)(a)
    mb = jax.vmap(top_mask)(b)
    share = jnp.sum(ma * mb, axis=1) / k
    return _checks.nan_where(_checks.nonfinite_samples(a, b), share)


def topk_intersection(a: jax.typing.ArrayLike, b: jax.typing.ArrayLike, *, k: int) -> jax.Array:
    """Fraction of the ``k`` most salient pixels (by ``|map|``) that two maps share.

    Invariant to per-map rescaling, so no normalisation is applied. Ties are broken by the
    lower flat (row-major) index, as ``jax.lax.top_k``.

    Args:
      a: maps (B, H, W).
      b: maps (B, H, W).
      k: number of pixels, 1 <= k <= H * W.

    Returns:
      (B,) float32 in [0, 1]: |top_k(a) & top_k(b)| / k.

    Raises:
      ValueError: as :func:`spearman`, or k out of range.
    """
    a, b = _pair(a, b)
    n = a.shape[1] * a.shape[2]
    k = _checks.positive_int("k", k)
    if k > n:
        raise ValueError(f"k must be at most H * W = {n}, got {k}")
    return _topk_intersection(a, b, k=k)
