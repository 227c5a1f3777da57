"""Uncertainty for per-image scores: bootstrap confidence intervals, paired tests.

A metric gives one number per image; a finding ("SmoothGrad maps are noisier for the
BNN") is a statement about their mean, so it comes with a percentile-bootstrap interval
(:func:`bootstrap_ci`, :func:`paired_difference`) and, for paired scores on the same
images, a Wilcoxon signed-rank test (:func:`wilcoxon`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Interval(NamedTuple):
    """A mean with the bounds of its confidence interval (0-d float32 arrays)."""

    mean: jax.Array
    low: jax.Array
    high: jax.Array


class WilcoxonResult(NamedTuple):
    """The signed-rank statistic and its p-value (Python floats)."""

    statistic: float
    p_value: float


def _key(key_or_seed) -> jax.Array:
    if isinstance(key_or_seed, int | np.integer) and not isinstance(key_or_seed, bool):
        return jax.random.key(int(key_or_seed))
    if isinstance(key_or_seed, jax.Array) and (
        jnp.issubdtype(key_or_seed.dtype, jax.dtypes.prng_key)
        or (key_or_seed.dtype == jnp.uint32 and key_or_seed.shape == (2,))
    ):
        return key_or_seed
    raise TypeError(
        f"key_or_seed must be a jax.random key or an int seed, got {type(key_or_seed).__name__}"
    )


def _values(name: str, values, *, float32: bool = True) -> jax.Array:
    """``values`` checked (1-D, non-empty, finite; with ``float32``, also within the range
    of float32, the precision of the resampling) and cast to float32."""
    if not hasattr(values, "shape"):
        values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D array of per-item values, got shape "
            f"{tuple(values.shape)}"
        )
    if not isinstance(values, jax.core.Tracer):
        if not np.isfinite(np.asarray(values)).all():
            raise ValueError(f"{name} holds NaN or inf; drop or fix those items first")
        if float32 and np.abs(np.asarray(values, np.float64)).max() > np.finfo(np.float32).max:
            raise ValueError(
                f"{name} holds values beyond the float32 range (|x| > "
                f"{float(np.finfo(np.float32).max):.4g}) that the resampling computes in; "
                "rescale them first"
            )
    with np.errstate(over="ignore"):
        return jnp.asarray(values, jnp.float32)


def resample_means(values: jax.Array, key: jax.Array, num_resamples: int) -> jax.Array:
    """(num_resamples,) means of bootstrap resamples of ``values`` (n,).

    Resample r draws ``jax.random.randint(jax.random.fold_in(key, r), (n,), 0, n)`` as
    its indices (with replacement), so any resample can be reproduced on its own; they
    are computed vectorised, in chunks that keep the index arrays near 16 MB.

    Args:
      values: (n,) float32.
      key: a ``jax.random`` key.
      num_resamples: number of resamples (static).

    Returns:
      (num_resamples,) float32 means.
    """
    n = values.shape[0]

    def one(r):
        idx = jax.random.randint(jax.random.fold_in(key, r), (n,), 0, n)
        return jnp.mean(values[idx])

    chunk = max(1, min(num_resamples, (1 << 22) // max(n, 1)))  # bound memory to ~16 MB
    return jax.lax.map(one, jnp.arange(num_resamples), batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("num_resamples",))
def _bootstrap(values, key, confidence, num_resamples: int):
    means = resample_means(values, key, num_resamples)
    alpha = 1.0 - confidence
    low, high = jnp.quantile(means, jnp.stack([alpha / 2, 1 - alpha / 2]))
    return Interval(jnp.mean(values), low, high)


def bootstrap_ci(
    values: jax.typing.ArrayLike,
    *,
    key_or_seed: jax.Array | int,
    num_resamples: int = 10_000,
    confidence: float = 0.95,
) -> Interval:
    """Mean of ``values`` with a percentile-bootstrap confidence interval.

    ``num_resamples`` resamples of the n values with replacement (see
    :func:`resample_means`), all vectorised; the bounds are the ``(1 - confidence) / 2``
    and ``(1 + confidence) / 2`` quantiles of the resample means, linearly interpolated
    (as ``numpy.percentile``).

    Args:
      values: (n,) per-item scores, finite.
      key_or_seed: a ``jax.random`` key or an int seed.
      num_resamples: number of bootstrap resamples.
      confidence: coverage of the interval, in (0, 1).

    Returns:
      ``Interval(mean, low, high)`` of 0-d float32 arrays.

    Raises:
      ValueError: values not 1-D, empty, non-finite or beyond the float32 range; bad
        num_resamples or confidence.
    """
    v = _values("values", values)
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 1:
        raise ValueError(f"num_resamples must be an int >= 1, got {num_resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return _bootstrap(v, _key(key_or_seed), jnp.float32(confidence), num_resamples=num_resamples)


def paired_difference(
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    *,
    key_or_seed: jax.Array | int,
    num_resamples: int = 10_000,
    confidence: float = 0.95,
) -> Interval:
    """Mean of the paired differences ``a - b`` with a bootstrap interval.

    The pairs (a[i], b[i]) are resampled together (:func:`bootstrap_ci` of ``a - b``): use
    it for two scores of the same images, e.g. the BNN's and the twin's. The differences
    are taken in float64 before the float32 resampling (under ``jit``, in float32), so
    that two close scores far from zero keep their difference.

    Args:
      a: (n,) scores.
      b: (n,) scores of the same items.
      key_or_seed: a ``jax.random`` key or an int seed.
      num_resamples: number of bootstrap resamples.
      confidence: coverage of the interval.

    Returns:
      ``Interval(mean, low, high)`` of the mean difference.

    Raises:
      ValueError: a and b of different shapes, or as :func:`bootstrap_ci` (the range check
        applies to the differences).
    """
    a_checked = _values("a", a, float32=False)
    b_checked = _values("b", b, float32=False)
    if a_checked.shape != b_checked.shape:
        raise ValueError(
            f"a and b must pair up: got shapes {tuple(a_checked.shape)} and "
            f"{tuple(b_checked.shape)}"
        )
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        diff = a_checked - b_checked
    else:  # in float64, as wilcoxon: float32 scores would round their differences
        diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return bootstrap_ci(
        diff, key_or_seed=key_or_seed, num_resamples=num_resamples, confidence=confidence
    )


def wilcoxon(
    a: jax.typing.ArrayLike, b: jax.typing.ArrayLike, *, alternative: str = "two-sided"
) -> WilcoxonResult:
    """Wilcoxon signed-rank test of paired scores (``scipy.stats.wilcoxon(a, b)``).

    Zero differences are dropped (scipy's default ``zero_method="wilcox"``); scipy picks
    the exact null distribution for small samples and the normal approximation otherwise.
    When every difference is zero (where scipy returns NaN) the result is documented as
    ``(0.0, 1.0)``: no evidence of a difference.

    Args:
      a: (n,) scores.
      b: (n,) scores of the same items.
      alternative: ``"two-sided"``, ``"greater"`` (a tends to exceed b) or ``"less"``.

    Returns:
      ``WilcoxonResult(statistic, p_value)`` as Python floats.

    Raises:
      ValueError: shapes that differ, empty or non-finite inputs, an unknown alternative.
    """
    from scipy import stats

    _values("a", a, float32=False)
    _values("b", b, float32=False)
    a = np.asarray(a, np.float64)  # full precision: float32 could turn differences to 0
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must pair up: got shapes {a.shape} and {b.shape}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(
            f"Unknown alternative {alternative!r}; expected two-sided, greater or less"
        )
    if np.all(a == b):
        return WilcoxonResult(0.0, 1.0)
    res = stats.wilcoxon(a, b, alternative=alternative)
    return WilcoxonResult(float(res.statistic), float(res.pvalue))
