"""Noise and complexity of single saliency maps: total variation, Gini sparseness, entropy.

Each function takes maps (B, H, W) and returns (B,) float32; all are jittable and
vmappable. Every map is normalised on its own (per sample): Quantus normalises by the
maximum over the whole batch unless told otherwise, which makes one map's score depend
on the others in its batch; here it never does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jbnn.metrics import _checks


def _normalise_by_max_abs(m: jax.Array) -> jax.Array:
    """Each map (B, H, W) divided by its own max |m|; an all-zero map stays zero."""
    # Exactly rescaled first: a max above ~8.5e37 would otherwise zero the map.
    p, mantissa = _checks.scale_by_power_of_two(m, (1, 2))
    return p / jnp.where(mantissa > 0, mantissa, 1.0)


@jax.jit
def _total_variation(m: jax.Array) -> jax.Array:
    # The differences of the exactly rescaled map, divided once by its max: equal pixels
    # give exactly 0 (dividing each pixel by max |m| first can round equal pixels apart).
    p, mantissa = _checks.scale_by_power_of_two(m, (1, 2))
    down = jnp.sum(jnp.abs(p[:, 1:, :] - p[:, :-1, :]), axis=(1, 2))
    right = jnp.sum(jnp.abs(p[:, :, 1:] - p[:, :, :-1]), axis=(1, 2))
    mantissa = mantissa[:, 0, 0]
    return (down + right) / jnp.where(mantissa > 0, mantissa, 1.0)


def total_variation(m: jax.typing.ArrayLike) -> jax.Array:
    """Anisotropic total variation of each map, normalised by its own max ``|m|``.

    ``S = m / max|m|`` (signed, values in [-1, 1]; an all-zero map stays zero), then
    ``sum_ij |S(i+1, j) - S(i, j)| + sum_ij |S(i, j+1) - S(i, j)|`` over the pixel pairs
    inside the map. Pass ``|m|`` to measure the noise of the magnitude only. The
    normalisation makes the score independent of the map's scale, so that maps of models
    with different gradient magnitudes (a BNN and its twin) can be compared.

    Args:
      m: maps (B, H, W).

    Returns:
      (B,) float32 >= 0; 0 for constant maps.

    Raises:
      ValueError: maps not (B, H, W), or non-finite values (checked for concrete inputs).
    """
    return _total_variation(_checks.maps("m", m))


@jax.jit
def _sparseness(m: jax.Array) -> jax.Array:
    a = jnp.abs(_normalise_by_max_abs(m)).reshape(m.shape[0], -1)
    n = a.shape[1]
    # a > 0: positive floats order as their bits read as int32, which XLA:CPU sorts ~6x
    # faster than float32 (whose comparator maps each operand to a total order).
    a = jax.lax.bitcast_convert_type(jnp.sort(_checks.float_bits(a + 1e-7), axis=1), jnp.float32)
    i = jnp.arange(1, n + 1, dtype=jnp.float32)
    return jnp.sum((2 * i - n - 1) * a, axis=1) / (n * jnp.sum(a, axis=1))


def sparseness(m: jax.typing.ArrayLike) -> jax.Array:
    """Gini index of ``|m|``, as Quantus's ``Sparseness`` (Chalasani et al. 2020).

    As ``quantus.Sparseness()`` with its defaults (``abs=True, normalise=True``,
    ``normalise_by_max``) applied to one map at a time: ``a = |m| / max|m| + 1e-7``,
    flattened and sorted ascending, ``sum_i (2i - n - 1) a_i / (n sum_i a_i)`` for
    i = 1..n. The 1e-7 makes an all-zero map uniform.

    Args:
      m: maps (B, H, W).

    Returns:
      (B,) float32 in [0, 1): 0 for a uniform |m| (and an all-zero map), near 1 for a
      single salient pixel.

    Raises:
      ValueError: as :func:`total_variation`.
    """
    return _sparseness(_checks.maps("m", m))


@jax.jit
def _complexity(m: jax.Array) -> jax.Array:
    a = jnp.abs(_normalise_by_max_abs(m)).reshape(m.shape[0], -1)
    total = jnp.sum(a, axis=1, keepdims=True)
    n = a.shape[1]
    p = jnp.where(total > 0, a / jnp.where(total > 0, total, 1.0), 1.0 / n)
    entropy = -jnp.sum(p * jnp.log(p + 1e-12), axis=1)
    return _checks.nan_where(_checks.nonfinite_samples(m), entropy)


def complexity(m: jax.typing.ArrayLike) -> jax.Array:
    """Entropy of ``p = |m| / sum |m|``, as Quantus's ``Complexity`` (Bhatt et al. 2020).

    As ``quantus.Complexity()`` with its defaults (``abs=True, normalise=True``,
    ``normalise_by_max``) applied to one map at a time: ``-sum_i p_i log(p_i + 1e-12)``
    (natural log). Scale-invariant. An all-zero map, where Quantus returns NaN, is given
    the entropy of the uniform distribution, ``log(H * W)``, the limit of a constant map.

    Args:
      m: maps (B, H, W).

    Returns:
      (B,) float32 in [0, log(H W)]: 0 for a single salient pixel.

    Raises:
      ValueError: as :func:`total_variation`.
    """
    return _complexity(_checks.maps("m", m))
