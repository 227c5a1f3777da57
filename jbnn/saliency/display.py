"""Channel reductions and display normalisations of saliency maps (per example).

``normalize_captum`` is Captum's ``visualize_image_attr`` scaling (sum over channels,
then divide by the value below which ``100 - outlier_perc`` % of the cumulative
attribution lies, clip); ``normalize_pair`` is PAIR's ``VisualizeImageGrayscale`` /
``VisualizeImageDiverging``. Both work per example, and a map whose scale is 0 (all
zeros, or constant) comes out as zeros (0.5 for PAIR's diverging display, the value it
gives to zero attribution) instead of NaN. Maps holding NaN or inf are refused with a
ValueError that names the examples (checked when the maps are concrete, not under the
caller's own ``jit``): a percentile scale would otherwise turn them into plausible maps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jbnn.saliency import _checks


def _wide(dtype) -> jnp.dtype:
    """``dtype`` or float32, the wider: where sums of squares and running sums are taken
    (float16 squares overflow past 255, and a float16 running sum stops growing)."""
    return jnp.promote_types(dtype, jnp.float32)


_REDUCTIONS = {
    "abs_max": lambda a: jnp.max(jnp.abs(a), axis=-1),
    "max": lambda a: jnp.max(a, axis=-1),
    "sum": lambda a: jnp.sum(a, axis=-1),
    "abs_sum": lambda a: jnp.sum(jnp.abs(a), axis=-1),
    "sum_abs": lambda a: jnp.sum(jnp.abs(a), axis=-1),
    "mean": lambda a: jnp.mean(a, axis=-1),
    "abs_mean": lambda a: jnp.mean(jnp.abs(a), axis=-1),
    "l2": lambda a: jnp.sqrt(jnp.sum(jnp.square(a.astype(_wide(a.dtype))), axis=-1)).astype(
        a.dtype
    ),
}
REDUCTIONS = tuple(_REDUCTIONS)
CAPTUM_SIGNS = ("absolute_value", "all", "positive", "negative")

__all__ = ["CAPTUM_SIGNS", "REDUCTIONS", "normalize_captum", "normalize_pair", "reduce_channels"]


def _as_maps(maps: ArrayLike, name: str, ranks=(3, 4)) -> jax.Array:
    if not hasattr(maps, "ndim"):
        maps = jnp.asarray(maps)
    if not jnp.issubdtype(maps.dtype, jnp.floating):
        raise TypeError(f"{name}: maps must be floating-point, got dtype {maps.dtype}.")
    if maps.ndim not in ranks:
        shapes = " or ".join({3: "(B, H, W)", 4: "(B, H, W, C)"}[r] for r in ranks)
        raise ValueError(f"{name}: maps must have shape {shapes}, got {tuple(maps.shape)}.")
    _checks.check_finite(maps, name, "maps", "a display scale of them would hide it")
    return maps


@functools.partial(jax.jit, static_argnames=("reduction",))
def _reduce_jit(maps, *, reduction):
    return _REDUCTIONS[reduction](maps)


def reduce_channels(maps: ArrayLike, reduction: str = "abs_max") -> jax.Array:
    """Reduces (B, H, W, C) attributions over channels to (B, H, W).

    Args:
      maps: attributions (B, H, W, C).
      reduction: ``"abs_max"`` (max |a|, Simonyan et al.'s saliency map; tf-keras-vis
        with ``keepdims=False``), ``"max"``, ``"sum"`` (Captum's visualisation),
        ``"abs_sum"`` / ``"sum_abs"`` (sum |a|, PAIR's grayscale), ``"mean"``,
        ``"abs_mean"`` or ``"l2"`` (Euclidean norm, computed in at least float32).

    Returns:
      The reduced maps (B, H, W), the dtype of ``maps``.
    """
    name = "reduce_channels"
    _checks.check_choice(reduction, REDUCTIONS, "reduction", name)
    maps = _as_maps(maps, name, ranks=(4,))
    return _reduce_jit(maps, reduction=reduction)


def _cumulative_sum_threshold(values: jax.Array, percentile) -> jax.Array:
    """Captum's threshold: the smallest sorted value whose cumulative sum reaches
    ``percentile`` % of the total (``values`` non-negative, flat). The sum runs in at
    least float32: in float16 it overflows past 65504 (a 64 x 64 map of |a| ~ 20: the
    display was 0.11 off) and may round at every step."""
    ordered = jnp.sort(values)
    cumulative = jnp.cumsum(ordered.astype(_wide(ordered.dtype)))
    index = jnp.argmax(cumulative >= cumulative[-1] * 0.01 * percentile)
    return ordered[index]


def _safe_scale(attr: jax.Array, scale: jax.Array) -> jax.Array:
    ok = scale != 0
    return jnp.where(ok, jnp.clip(attr / jnp.where(ok, scale, 1.0), -1.0, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("sign",))
def _captum_jit(maps, outlier_perc, *, sign):
    if maps.ndim == 4:
        maps = jnp.sum(maps, axis=-1)  # (B, H, W)
    percentile = 100.0 - outlier_perc

    def one(attr):  # (H, W)
        flat = attr.reshape(-1)
        if sign == "all":
            return _safe_scale(attr, _cumulative_sum_threshold(jnp.abs(flat), percentile))
        if sign == "positive":
            attr = jnp.where(attr > 0, attr, 0.0)
            return _safe_scale(attr, _cumulative_sum_threshold(attr.reshape(-1), percentile))
        if sign == "negative":
            attr = jnp.where(attr < 0, attr, 0.0)
            threshold = -_cumulative_sum_threshold(jnp.abs(attr).reshape(-1), percentile)
            return _safe_scale(attr, threshold)
        attr = jnp.abs(attr)
        return _safe_scale(attr, _cumulative_sum_threshold(attr.reshape(-1), percentile))

    return jax.vmap(one)(maps)


def normalize_captum(
    maps: ArrayLike, outlier_perc: float = 2, sign: str = "absolute_value"
) -> jax.Array:
    """Captum's display scaling (``visualize_image_attr``), per example.

    Sums (B, H, W, C) maps over channels, keeps the values of ``sign``, divides by the
    threshold above which the top ``outlier_perc`` % of the cumulative |attribution|
    lies and clips: [-1, 1] for ``"all"``, [0, 1] for the others (``"negative"`` keeps
    the negative attributions and shows their magnitude, as Captum does).

    Args:
      maps: (B, H, W, C) or (B, H, W).
      outlier_perc: percentage of the cumulative attribution treated as outliers.
      sign: ``"absolute_value"`` (Captum's default), ``"all"``, ``"positive"`` or
        ``"negative"``.

    Returns:
      Display maps (B, H, W); zero maps stay zero.
    """
    name = "normalize_captum"
    _checks.check_choice(sign, CAPTUM_SIGNS, "sign", name)
    maps = _as_maps(maps, name)
    if not 0 <= outlier_perc <= 100:
        raise ValueError(f"{name}: outlier_perc must be in [0, 100], got {outlier_perc!r}.")
    return _captum_jit(maps, jnp.asarray(outlier_perc, jnp.float32), sign=sign)


@functools.partial(jax.jit, static_argnames=("diverging",))
def _pair_jit(maps, percentile, *, diverging):
    if diverging:
        image = jnp.sum(maps, axis=-1) if maps.ndim == 4 else maps  # (B, H, W)
    else:
        image = jnp.sum(jnp.abs(maps), axis=-1) if maps.ndim == 4 else jnp.abs(maps)

    def one(img):  # (H, W)
        if diverging:
            span = jnp.abs(jnp.percentile(img, percentile))
            ok = span > 0
            scaled = (img + span) / jnp.where(ok, 2.0 * span, 1.0)
            return jnp.where(ok, jnp.clip(scaled, -1.0, 1.0), 0.5)
        vmax = jnp.percentile(img, percentile)
        vmin = jnp.min(img)
        ok = vmax > vmin
        scaled = (img - vmin) / jnp.where(ok, vmax - vmin, 1.0)
        return jnp.where(ok, jnp.clip(scaled, 0.0, 1.0), 0.0)

    return jax.vmap(one)(image)


def normalize_pair(maps: ArrayLike, percentile: float = 99, diverging: bool = False) -> jax.Array:
    """PAIR saliency's display scaling, per example.

    Grayscale (``VisualizeImageGrayscale``): sum |a| over channels, then
    ``clip((a - min) / (percentile_p - min), 0, 1)``. Diverging
    (``VisualizeImageDiverging``): sum a over channels, ``span = |percentile_p|``, then
    ``clip((a + span) / (2 span), -1, 1)``, as PAIR does: zero attribution at 0.5,
    ``+span`` at 1, ``-span`` at 0, and attributions below ``-span`` negative, down to
    -1 (PAIR clips to [-1, 1], not [0, 1]).

    Args:
      maps: (B, H, W, C) or (B, H, W) (then |a|, resp. a, is used directly).
      percentile: the percentile that maps to 1.
      diverging: signed display instead of grayscale.

    Returns:
      Display maps (B, H, W): in [0, 1] (grayscale) or [-1, 1] (diverging); a map of
      zero spread comes out as zeros (grayscale) or 0.5 (diverging).
    """
    name = "normalize_pair"
    maps = _as_maps(maps, name)
    if not 0 <= percentile <= 100:
        raise ValueError(f"{name}: percentile must be in [0, 100], got {percentile!r}.")
    return _pair_jit(maps, jnp.asarray(percentile, jnp.float32), diverging=bool(diverging))
