"""Input checks shared by the metrics: shapes, dtypes and finiteness, on the host.

Every public metric validates its inputs here before calling its jitted core, so that a
bad input fails at the boundary with a message that names it. Shape checks also run on
tracers (inside ``jit`` or ``vmap`` the shapes are known); the NaN/inf check needs the
values, so it runs only on concrete arrays and is skipped while tracing (then the
jitted cores set that sample's result to NaN with :func:`nonfinite_samples` and
:func:`nan_where`, as :mod:`jbnn.metrics` documents).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
    """True if ``x`` is a JAX tracer (we are inside ``jit``, ``vmap`` or ``grad``)."""
    return isinstance(x, jax.core.Tracer)


def as_float_array(name: str, x, ndim: int | None = None, what: str = "") -> jax.Array:
    """``x`` as a float32 JAX array of rank ``ndim``, or a clear error."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            x = np.asarray(x)
        except Exception as e:  # pragma: no cover - exotic inputs
            raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e
    dtype = np.dtype(x.dtype) if not is_traced(x) else x.dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)) and not (
        jnp.issubdtype(dtype, jnp.bool_)
    ):
        raise TypeError(f"{name} must be a real-valued array, got dtype {dtype}")
    if ndim is not None and x.ndim != ndim:
        hint = f"; add a batch axis with {name}[None] for one item" if x.ndim == ndim - 1 else ""
        raise ValueError(
            f"{name} must have rank {ndim}{' ' + what if what else ''}, got shape "
            f"{tuple(x.shape)}{hint}"
        )
    return jnp.asarray(x, jnp.float32)


def check_finite(name: str, x) -> None:
    """Raises ValueError if a concrete ``x`` holds NaN or inf (skipped on tracers)."""
    if is_traced(x):
        return
    finite = np.isfinite(np.asarray(x))
    if not finite.all():
        bad = np.argwhere(~finite)
        samples = sorted({int(i[0]) for i in bad}) if finite.ndim > 0 else []
        shown = ", ".join(map(str, samples[:10])) + (", ..." if len(samples) > 10 else "")
        raise ValueError(
            f"{name} holds {bad.shape[0]} non-finite value(s) (NaN or inf)"
            + (f" in sample(s) {shown}" if samples else "")
            + "; metrics need finite inputs"
        )


_SIGN_BIT = np.int32(np.iinfo(np.int32).min)  # 0x80000000
_MAGNITUDE_BITS = np.int32(0x7FFFFFFF)
_FRACTION_BITS = np.int32(0x7FFFFF)


def float_bits(x: jax.Array) -> jax.Array:
    """The bits of float32 ``x`` read as int32 (no arithmetic, so no denormal flushing)."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def order_keys(v: jax.Array) -> jax.Array:
    """int32 keys in the order of the float32 values ``v``: equal iff the values are equal.

    The float's bits read as a signed int, with the magnitude bits of negative values
    flipped (so that a larger magnitude sorts lower), and -0.0 made +0.0 (one tie, as in
    scipy and as float compares). Being bitwise, it also orders denormals (subnormals),
    where float compares and sorts on XLA:CPU, which flush denormals to zero, tie them
    with 0. XLA:CPU sorts and compares int32 several times faster than float32 (whose
    sort comparator maps each operand to this total order on every comparison).
    NaN gets keys above +inf (positive sign bit) or below -inf (negative).
    """
    bits = float_bits(v)
    bits = jnp.where(bits == _SIGN_BIT, 0, bits)  # -0.0 -> +0.0
    return jnp.where(bits < 0, bits ^ _MAGNITUDE_BITS, bits)


def _normalised_fields(bits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Biased exponent and 23-bit fraction of float32 bit patterns, subnormals normalised.

    A subnormal ``f * 2**-149`` gets the fraction of its leading bit moved to bit 23 and a
    biased exponent <= 0, so that every nonzero finite value is ``(1 + frac / 2**23) *
    2**(exponent - 127)``. Zero keeps (0, 0).
    """
    biased = (bits >> 23) & 0xFF
    frac = bits & _FRACTION_BITS
    shift = jax.lax.clz(frac) - 8  # 1..23 for a subnormal's nonzero fraction
    subnormal = (biased == 0) & (frac != 0)
    frac = jnp.where(subnormal, (frac << shift) & _FRACTION_BITS, frac)
    biased = jnp.where(subnormal, 1 - shift, biased)
    return biased, frac


def scale_by_power_of_two(m: jax.Array, axis) -> tuple[jax.Array, jax.Array]:
    """``(m / 2**e, max|m| / 2**e)``, ``e`` the binary exponent of max ``|m|`` over ``axis``.

    Multiplying by a power of two is exact (equal values stay equal, ratios and ranks are
    unchanged), and afterwards ``max|m|`` lies in [0.5, 1) (0 for an all-zero slice), so
    sums and squares of a map cannot overflow, and dividing by the max cannot go through a
    reciprocal that XLA on CPU flushes to zero (a subnormal, for a max above ~8.5e37).

    It works on the bits alone (integer max and exponent arithmetic): XLA:CPU flushes
    subnormal (denormal) floats to zero in arithmetic and compares, so ``max|m|`` of a
    map whose values all lie below ~1.2e-38, or ``ldexp`` of its values, would be 0 and
    the map scored as all zeros. Here such a map, and the subnormal values of any map,
    are scaled exactly into the normal range. Only values below 2**-126 times the max
    (far under float32 rounding of the max) are flushed to 0. A slice holding NaN or
    +-inf is returned unchanged, with that NaN or inf as its max.

    Args:
      m: float array.
      axis: the axes that one scale covers (e.g. (1, 2) for each map of a batch).

    Returns:
      The rescaled ``m`` and its max ``|.|`` over ``axis`` (kept as size-1 axes).
    """
    m = m.astype(jnp.float32)
    bits = float_bits(m)
    top = jnp.max(bits & _MAGNITUDE_BITS, axis=axis, keepdims=True)  # bits of max |m|
    special = (top >> 23) >= 0xFF  # inf or NaN in the slice
    top_biased, _ = _normalised_fields(top)
    # max |m| = mantissa * 2**e with mantissa in [0.5, 1): biased exponent e + 126.
    shift = jnp.where((top == 0) | special, 0, top_biased - 126)

    def scaled(b):  # bits of b / 2**shift; selects on int32 (float selects can flush)
        biased, frac = _normalised_fields(b)
        new = biased - shift
        out = (b & _SIGN_BIT) | (jnp.maximum(new, 0) << 23) | frac
        keep = ((b & _MAGNITUDE_BITS) != 0) & (new >= 1)  # else a (signed) zero
        return jnp.where(special, b, jnp.where(keep, out, b & _SIGN_BIT))

    as_float = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.float32)
    rescaled, mantissa = as_float(scaled(bits)), as_float(scaled(top))
    return rescaled, mantissa


def nonfinite_samples(*arrays: jax.Array) -> jax.Array:
    """(B,) bool, traceable: True where sample i of any array (B, ...) holds NaN or inf.

    The jitted cores use it so that a non-finite input that reaches them while tracing
    (where :func:`check_finite` cannot look at the values) gives NaN for that sample.
    """
    bad = jnp.zeros(arrays[0].shape[0], bool)
    for a in arrays:
        bad = bad | ~jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1)
    return bad


def nan_where(bad: jax.Array, score: jax.Array) -> jax.Array:
    """``score`` (B, ...) with the rows where ``bad`` (B,) is True set to NaN."""
    return jnp.where(bad.reshape(bad.shape + (1,) * (score.ndim - 1)), jnp.nan, score)


def zero_one(name: str, x) -> None:
    """Raises ValueError if a concrete ``x`` holds anything but 0 and 1 (NaN included)."""
    if is_traced(x):
        return
    values = np.asarray(x)
    ok = np.isin(values, (0, 1))
    if not ok.all():
        bad = values[~ok].ravel()[:3]
        raise ValueError(
            f"{name} must be boolean or hold only 0 and 1, got values such as {bad.tolist()}"
        )


def maps(name: str, m) -> jax.Array:
    """A batch of saliency maps (B, H, W): float32, finite (checked when concrete)."""
    out = as_float_array(name, m, 3, "(B, H, W)")
    check_finite(name, m)
    if out.shape[0] == 0 or out.shape[1] == 0 or out.shape[2] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(out.shape)}")
    return out


def same_shape(name_a: str, a, name_b: str, b) -> None:
    """Raises ValueError unless ``a`` and ``b`` have the same shape."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def images(name: str, x) -> jax.Array:
    """A batch of NHWC images (B, H, W, C): float32, finite (checked when concrete)."""
    out = as_float_array(name, x, 4, "(B, H, W, C), NHWC")
    check_finite(name, x)
    return out


def images_and_maps(x, m) -> tuple[jax.Array, jax.Array]:
    """Checks images (B, H, W, C) against maps (B, H, W): same batch and spatial dims."""
    x = images("x", x)
    m_checked = maps("maps", m)
    if tuple(x.shape[:3]) != tuple(m_checked.shape):
        raise ValueError(
            f"maps must have the batch and spatial shape of x: x is {tuple(x.shape)} "
            f"(B, H, W, C), so maps must be {tuple(x.shape[:3])}, got {tuple(m_checked.shape)}"
        )
    return x, m_checked


def targets(target, batch: int) -> jax.Array:
    """Class indices (B,) as int32; a scalar is broadcast to the batch."""
    if not hasattr(target, "shape"):
        target = np.asarray(target)
    dtype = np.dtype(target.dtype) if not is_traced(target) else target.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"target must hold integer class indices, got dtype {dtype}")
    if target.ndim == 0:
        target = jnp.broadcast_to(jnp.asarray(target), (batch,))
    if target.shape != (batch,):
        raise ValueError(
            f"target must have shape ({batch},) (one class per image), got {tuple(target.shape)}"
        )
    if not is_traced(target):
        t = np.asarray(target)
        if (t < 0).any():
            raise ValueError(f"target must be non-negative class indices, got {t.min()}")
    return jnp.asarray(target, jnp.int32)


def positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as a Python int >= ``minimum``, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def choice(name: str, value, options: tuple[str, ...]) -> str:
    """``value`` if it is one of ``options``, or a clear error."""
    if value not in options:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(options)}")
    return value
