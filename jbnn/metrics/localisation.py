"""Localisation of saliency maps against ground-truth masks: pointing game, relevance mass.

Maps are (B, H, W), masks (B, H, W) of booleans or 0/1 numbers (1 inside the relevant
region); both return (B,) float32 and are jittable and vmappable. An empty mask scores
0.0 (nothing can fall inside it), where Quantus returns NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jbnn.metrics import _checks


def _maps_and_masks(maps, masks) -> tuple[jax.Array, jax.Array]:
    m = _checks.maps("maps", maps)
    s = _checks.as_float_array("masks", masks, 3, "(B, H, W)")
    _checks.same_shape("maps", m, "masks", s)
    _checks.zero_one("masks", masks)
    return m, s > 0


@jax.jit
def _pointing_game(m: jax.Array, s: jax.Array) -> jax.Array:
    m = m.reshape(m.shape[0], -1)
    s = s.reshape(s.shape[0], -1)
    # Compared by their bits: XLA:CPU compares subnormal floats (below ~1.2e-38) as 0, so
    # every pixel of a map of such values would tie for the maximum.
    keys = _checks.order_keys(m)
    at_max = keys == jnp.max(keys, axis=1, keepdims=True)
    hit = jnp.any(at_max & s, axis=1).astype(jnp.float32)
    return _checks.nan_where(_checks.nonfinite_samples(m), hit)


def pointing_game(maps: jax.typing.ArrayLike, masks: jax.typing.ArrayLike) -> jax.Array:
    """1.0 where the maximum of a map lies inside its mask, else 0.0 (Zhang et al. 2018).

    As ``quantus.PointingGame`` (unweighted) on the signed map as given (pass ``|m|`` to
    point with the magnitude; rescaling a map does not change its maximum): when several
    pixels tie for the maximum, it is a hit if any of them is inside the mask, so a
    constant map hits every non-empty mask.

    Args:
      maps: (B, H, W).
      masks: (B, H, W), boolean or 0/1.

    Returns:
      (B,) float32 of 0.0 / 1.0; 0.0 for an empty mask.

    Raises:
      ValueError: shapes that differ, masks with values other than 0/1, non-finite maps.
    """
    m, s = _maps_and_masks(maps, masks)
    return _pointing_game(m, s)


@functools.partial(jax.jit, static_argnames=("absolute",))
def _relevance_mass(m: jax.Array, s: jax.Array, absolute: bool) -> jax.Array:
    bad = _checks.nonfinite_samples(m)
    m = _checks.scale_by_power_of_two(m.reshape(m.shape[0], -1), 1)[0]  # sums cannot overflow
    if absolute:
        m = jnp.abs(m)
    s = s.reshape(s.shape[0], -1)
    inside = jnp.sum(jnp.where(s, m, 0.0), axis=1)
    total = jnp.sum(m, axis=1)
    share = jnp.where(total != 0, inside / jnp.where(total != 0, total, 1.0), 0.0)
    return _checks.nan_where(bad, share)


def relevance_mass_accuracy(
    maps: jax.typing.ArrayLike, masks: jax.typing.ArrayLike, *, absolute: bool = True
) -> jax.Array:
    """Share of each map's relevance inside its mask (Arras et al. 2022).

    ``sum(r inside the mask) / sum(r)`` with ``r = |m|`` (``absolute=True``, the default,
    so the score lies in [0, 1]), or the signed map as ``quantus.RelevanceMassAccuracy``
    with its default ``abs=False`` (``absolute=False``; the ratio can then leave [0, 1]).
    Scale-invariant, so no normalisation is applied.

    Args:
      maps: (B, H, W).
      masks: (B, H, W), boolean or 0/1.
      absolute: use ``|m|`` (default) or the signed map.

    Returns:
      (B,) float32; 0.0 for an empty mask or a map whose relevance sums to 0.

    Raises:
      ValueError: as :func:`pointing_game`.
    """
    m, s = _maps_and_masks(maps, masks)
    return _relevance_mass(m, s, absolute=bool(absolute))
