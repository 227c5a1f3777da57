"""Larq-exact quantizers as `jax.custom_vjp` straight-through estimators.

Every quantizer follows the forward and backward formulas of Larq (see
``shared/REFERENCE.md`` section 1):

* ``sign(x)`` is +1 for ``x >= 0`` and -1 otherwise (``sign(0) = +1``);
* the clip in the backward pass is inclusive (``|x| == clip_value`` passes), and it
  selects rather than multiplies, as Larq's ``tf.where(mask, dy, zeros)``: outside the
  clip the gradient is 0 even where the incoming one is inf or NaN (``approx_sign`` and
  :func:`with_surrogate` likewise; ``swish_sign`` multiplies, as Larq's does);
* rounding is half-to-even, as ``jnp.round`` and TensorFlow do;
* a NaN input gives a NaN output, as Larq's ``tf.sign(tf.sign(x) + 0.1)`` does (a NaN
  in a network is not hidden as -1, 0 or +1);
* the output dtype is the input dtype (float32, bfloat16, float16, ...); the input
  must be floating-point (a TypeError otherwise: an integer input was silently
  truncated, e.g. the 0.05 threshold of ``ste_tern`` became 0).

Second-order reverse derivatives (``jax.grad`` of ``jax.grad``) see the
straight-through derivative of the quantized output too: each ``_fwd`` computes it
with the quantizer itself.

Quantizers are picked by name with :func:`get`, which also accepts a call-like string
spec (``"ste_sign(clip_value=1.25)"``) so that specs can live in configs and in module
fields, which must be hashable. Hyper-parameters are checked there (type and range), and
by each quantizer when it is called (in Python, once per trace under ``jit``).

Surrogate override: :func:`with_surrogate` keeps a quantizer's forward pass bit for bit
and replaces its backward pass by the derivative of another surrogate (``ste_sign``
with any clip, ``approx_sign``, ``swish_sign``, ``identity``...). The quantized layers
take a ``surrogate`` field that does this for their *input* quantizer, which is the one
that input gradients (and therefore saliency maps) pass through.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jbnn import ops

Quantizer = Callable[[jax.Array], jax.Array]

__all__ = [
    "approx_sign",
    "dorefa",
    "get",
    "identity",
    "integer_valued",
    "magnitude_aware_sign",
    "names",
    "parse_spec",
    "ste_heaviside",
    "ste_sign",
    "ste_tern",
    "surrogate_gradient",
    "swish_sign",
    "with_surrogate",
]


# --------------------------------------------------------------------------- helpers
def _float_input(x: ArrayLike, name: str) -> jax.Array:
    """x as an array; a TypeError unless its dtype is floating-point."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} expects a floating-point input, got dtype {x.dtype}.")
    return x


def _scale_dtype(dtype) -> jnp.dtype:
    """The dtype in which a per-channel mean of |x| is summed and divided: float32 for a
    float type with a narrower exponent range than float32's (float16, the float8s),
    where a channel sum or a fan-in above the type's max (65504 in float16) is inf; the
    type itself otherwise (float32, bfloat16 and float64 scales are unchanged)."""
    if jnp.finfo(dtype).maxexp < jnp.finfo(jnp.float32).maxexp:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def _channel_mean(magnitude: jax.Array, fan_in: int) -> jax.Array:
    """``channel_sum(magnitude) / fan_in``: (..., C) -> (C,) in magnitude's dtype, summed
    and divided in :func:`_scale_dtype` (float32 for float16: one rounding at the end)."""
    dtype = _scale_dtype(magnitude.dtype)
    if dtype == magnitude.dtype:
        return ops.channel_sum(magnitude) / fan_in
    return (ops.channel_sum(magnitude.astype(dtype)) / fan_in).astype(magnitude.dtype)


def _propagate_nan(x: jax.Array, q: jax.Array) -> jax.Array:
    """q, with x's NaNs put back where x is NaN (the comparisons made them -1 or 0)."""
    return jnp.where(jnp.isnan(x), x, q)


def _sign(x: jax.Array) -> jax.Array:
    """Larq's sign: +1 for x >= 0 (so sign(0) = +1), -1 for x < 0, NaN for NaN; keeps
    the dtype."""
    return _propagate_nan(x, jnp.where(x >= 0, jnp.ones_like(x), -jnp.ones_like(x)))


def _surrogate_dtype(x: jax.Array):
    """Surrogate derivatives are computed in float32, or in x's dtype if wider."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _clip_mask(x: jax.Array, clip_value: float | None) -> jax.Array:
    """1[|x| <= clip_value] (inclusive) in x's dtype; all ones when clip_value is None."""
    if clip_value is None:
        return jnp.ones_like(x)
    return (jnp.abs(x) <= clip_value).astype(x.dtype)


def _clipped_gradient(x: jax.Array, g: jax.Array, clip_value: float | None) -> jax.Array:
    """g where |x| <= clip_value, else 0: Larq's ``tf.where(mask, dy, zeros)``, so an
    inf or NaN cotangent outside the clip gives 0, not NaN (as ``g * mask`` would)."""
    if clip_value is None:
        return g
    return jnp.where(jnp.abs(x) <= clip_value, g, jnp.zeros_like(g))


def _approx_sign_grad(x: jax.Array) -> jax.Array:
    """Bi-Real Net's piecewise-polynomial derivative: (2 - 2|x|) * 1[|x| <= 1]."""
    xf = x.astype(_surrogate_dtype(x))
    return jnp.where(jnp.abs(xf) <= 1.0, 2.0 - 2.0 * jnp.abs(xf), 0.0).astype(x.dtype)


def _swish_sign_grad(x: jax.Array, beta: float) -> jax.Array:
    """BNN+'s SignSwish derivative: b(2 - b x tanh(b x / 2)) / (1 + cosh(b x))."""
    xf = x.astype(_surrogate_dtype(x))
    bx = beta * xf
    grad = beta * (2.0 - bx * jnp.tanh(bx / 2.0)) / (1.0 + jnp.cosh(bx))
    # cosh overflows to inf for |b x| > ~89, where the exact derivative underflows to 0.
    return jnp.where(jnp.isfinite(grad), grad, 0.0).astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _jvp_form(value, tangent, x, *aux):
    """``value(x, *aux)`` as a ``jax.custom_jvp`` with tangent ``tangent(x, t, *aux)``
    (linear in t; aux gets no derivative, as the VJPs give it none): the quantizers'
    form under :func:`jbnn.ops.forward_mode`. Reverse mode transposes the tangent, so
    it gives the same gradient as the quantizer's VJP."""
    return value(x, *aux)


@_jvp_form.defjvp
def _jvp_form_jvp(value, tangent, primals, tangents):
    x, *aux = primals
    return _jvp_form(value, tangent, *primals), tangent(x, tangents[0], *aux)


# --------------------------------------------------------------------------- quantizers
def ste_sign(x: ArrayLike, clip_value: float | None = 1.0) -> jax.Array:
    """Sign with the straight-through estimator.

    Forward ``sign(x)`` (sign(0) = +1); backward ``1[|x| <= clip_value]`` times the
    incoming gradient, or the gradient unchanged when ``clip_value`` is None.

    Args:
      x: float array of any shape.
      clip_value: inclusive clip of the straight-through gradient, or None.

    Returns:
      An array of -1 / +1 (NaN where x is NaN) with x's shape and dtype.

    Raises:
      ValueError: for a hyper-parameter that :func:`get` rejects (checked at trace time).
    """
    _check_call("ste_sign", clip_value=clip_value)
    x = _float_input(x, "ste_sign")
    if ops.forward_mode_active():
        return _jvp_form(lambda x: _sign(x), lambda x, t: _clipped_gradient(x, t, clip_value), x)
    return _ste_sign(x, clip_value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ste_sign(x, clip_value):
    return _sign(x)


def _ste_sign_fwd(x, clip_value):
    return _ste_sign(x, clip_value), x


def _ste_sign_bwd(clip_value, x, g):
    return (_clipped_gradient(x, g, clip_value),)


_ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


def approx_sign(x: ArrayLike) -> jax.Array:
    """Bi-Real Net's ApproxSign: forward sign(x), backward (2 - 2|x|) * 1[|x| <= 1].

    Args:
      x: float array of any shape.

    Returns:
      An array of -1 / +1 (NaN where x is NaN) with x's shape and dtype.
    """
    x = _float_input(x, "approx_sign")
    if ops.forward_mode_active():
        return _jvp_form(lambda x: _sign(x), _approx_sign_tangent, x)
    return _approx_sign(x)


def _approx_sign_tangent(x, g):
    # Larq's tf.where(|x| <= 1, (1 - |x|) * 2 * dy, 0): 0 outside, whatever dy is.
    return jnp.where(jnp.abs(x) <= 1.0, g * _approx_sign_grad(x), jnp.zeros_like(g))


@jax.custom_vjp
def _approx_sign(x):
    return _sign(x)


def _approx_sign_fwd(x):
    return _approx_sign(x), x


def _approx_sign_bwd(x, g):
    return (_approx_sign_tangent(x, g),)


_approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


def swish_sign(x: ArrayLike, beta: float = 5.0) -> jax.Array:
    """BNN+'s SignSwish: forward sign(x), backward b(2 - b x tanh(b x/2)) / (1 + cosh(b x)).

    Args:
      x: float array of any shape.
      beta: sharpness of the swish surrogate.

    Returns:
      An array of -1 / +1 (NaN where x is NaN) with x's shape and dtype.

    Raises:
      ValueError: for a hyper-parameter that :func:`get` rejects (checked at trace time).
    """
    _check_call("swish_sign", beta=beta)
    x = _float_input(x, "swish_sign")
    if ops.forward_mode_active():
        return _jvp_form(lambda x: _sign(x), lambda x, t: t * _swish_sign_grad(x, beta), x)
    return _swish_sign(x, beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _swish_sign(x, beta):
    return _sign(x)


def _swish_sign_fwd(x, beta):
    return _swish_sign(x, beta), x


def _swish_sign_bwd(beta, x, g):
    return (g * _swish_sign_grad(x, beta),)


_swish_sign.defvjp(_swish_sign_fwd, _swish_sign_bwd)


def magnitude_aware_sign(x: ArrayLike, clip_value: float | None = 1.0) -> jax.Array:
    """Bi-Real Net's magnitude-aware sign for weights: ``a * ste_sign(x, clip_value)``.

    ``a = stop_gradient(mean |x|)`` over every axis but the last, i.e. one scale per
    output channel of a Dense (in, out) or Conv (h, w, in, out) kernel. The backward
    pass is therefore ``a * 1[|x| <= clip_value]``.

    Args:
      x: float array with at least one axis; the last one is the output channel.
      clip_value: inclusive clip of the straight-through gradient, or None.

    Returns:
      An array of -a / +a with x's shape and dtype.

    Raises:
      ValueError: for a hyper-parameter that :func:`get` rejects (checked at trace time).
    """
    _check_call("magnitude_aware_sign", clip_value=clip_value)
    x = _float_input(x, "magnitude_aware_sign")
    if x.ndim == 0:  # the mean over no axes
        scale = jax.lax.stop_gradient(jnp.abs(x))
    else:  # a channel sum, taken in two stages on XLA's classic CPU kernels (jbnn.ops),
        # in float32 for float16 (a sum or fan-in above 65504 was inf, the scale 0 or inf)
        fan_in = x.size // x.shape[-1] if x.shape[-1] else 1
        scale = jax.lax.stop_gradient(_channel_mean(jnp.abs(x), fan_in))
    return (scale * ste_sign(x, clip_value)).astype(x.dtype)


def ste_heaviside(x: ArrayLike, clip_value: float | None = 1.0) -> jax.Array:
    """Heaviside step with the straight-through estimator.

    Forward ``1 if x > 0 else 0`` (H(0) = 0); backward ``1[|x| <= clip_value]``.

    Args:
      x: float array of any shape.
      clip_value: inclusive clip of the straight-through gradient, or None.

    Returns:
      An array of 0 / 1 (NaN where x is NaN) with x's shape and dtype.

    Raises:
      ValueError: for a hyper-parameter that :func:`get` rejects (checked at trace time).
    """
    _check_call("ste_heaviside", clip_value=clip_value)
    x = _float_input(x, "ste_heaviside")
    if ops.forward_mode_active():
        tangent = lambda x, t: _clipped_gradient(x, t, clip_value)  # noqa: E731
        return _jvp_form(_heaviside, tangent, x)
    return _ste_heaviside(x, clip_value)


def _heaviside(x):
    return _propagate_nan(x, (x > 0).astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ste_heaviside(x, clip_value):
    return _heaviside(x)


def _ste_heaviside_fwd(x, clip_value):
    return _ste_heaviside(x, clip_value), x


def _ste_heaviside_bwd(clip_value, x, g):
    return (_clipped_gradient(x, g, clip_value),)


_ste_heaviside.defvjp(_ste_heaviside_fwd, _ste_heaviside_bwd)


def _ternary_value(x, threshold):
    # Larq's sign(sign(x + d) + sign(x - d)), which depends on |d| only: +1 for x >= |d|,
    # -1 for x <= -|d|, else 0; at d = 0 it is sign(x) with sign(0) = 0 (a zero kernel
    # stays zero under the TWN threshold); NaN for a NaN x or threshold.
    d = jnp.abs(threshold)
    q = jnp.where((x >= d) & (x > 0), 1, jnp.where((x <= -d) & (x < 0), -1, 0)).astype(x.dtype)
    return jnp.where(jnp.isnan(x) | jnp.isnan(d), jnp.asarray(jnp.nan, x.dtype), q)


def _ternarize(x, threshold, clip_value):
    if ops.forward_mode_active():
        tangent = lambda x, t, threshold: _clipped_gradient(x, t, clip_value)  # noqa: E731
        return _jvp_form(_ternary_value, tangent, x, threshold)
    return _ternarize_vjp(x, threshold, clip_value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ternarize_vjp(x, threshold, clip_value):
    return _ternary_value(x, threshold)


def _ternarize_fwd(x, threshold, clip_value):
    return _ternarize_vjp(x, threshold, clip_value), (x, threshold)


def _ternarize_bwd(clip_value, res, g):
    x, threshold = res
    return _clipped_gradient(x, g, clip_value), jnp.zeros_like(threshold)


_ternarize_vjp.defvjp(_ternarize_fwd, _ternarize_bwd)


def ste_tern(
    x: ArrayLike,
    threshold_value: float = 0.05,
    ternary_weight_networks: bool = False,
    clip_value: float | None = 1.0,
) -> jax.Array:
    """Ternarization with the straight-through estimator.

    Forward +1 for ``x >= d``, -1 for ``x <= -d``, 0 otherwise, with
    ``d = threshold_value``, or ``d = 0.7 * mean|x|`` (over all elements of x, as
    Larq's ``reduce_sum(|x|) / size(x)``; no gradient) when ``ternary_weight_networks``;
    backward ``1[|x| <= clip_value]``. As Larq's ``sign(sign(x + d) + sign(x - d))``:
    ``d = 0`` gives sign(x) with 0 at 0 (so a zero kernel ternarizes to zeros), and NaN
    in x (or in the TWN threshold) gives NaN.

    Args:
      x: float array of any shape.
      threshold_value: the fixed threshold d.
      ternary_weight_networks: use the TWN data-dependent threshold instead.
      clip_value: inclusive clip of the straight-through gradient, or None.

    Returns:
      An array of -1 / 0 / +1 with x's shape and dtype.

    Raises:
      ValueError: for a hyper-parameter that :func:`get` rejects (checked at trace time).
    """
    _check_call(
        "ste_tern",
        threshold_value=threshold_value,
        ternary_weight_networks=ternary_weight_networks,
        clip_value=clip_value,
    )
    x = _float_input(x, "ste_tern")
    if ternary_weight_networks:
        threshold = jax.lax.stop_gradient(0.7 * jnp.mean(jnp.abs(x)))
    else:
        threshold = jnp.asarray(threshold_value, x.dtype)
    return _ternarize(x, threshold.astype(x.dtype), clip_value)


def _round_ste(x):
    if ops.forward_mode_active():
        return _jvp_form(lambda x: jnp.round(x), lambda x, t: t, x)
    return _round_ste_vjp(x)


@jax.custom_vjp
def _round_ste_vjp(x):
    return jnp.round(x)


def _round_ste_fwd(x):
    return _round_ste_vjp(x), None


def _round_ste_bwd(_, g):
    return (g,)


_round_ste_vjp.defvjp(_round_ste_fwd, _round_ste_bwd)


def _clip01(x):
    if ops.forward_mode_active():
        return _jvp_form(lambda x: jnp.clip(x, 0, 1), _clip01_tangent, x)
    return _clip01_vjp(x)


def _clip01_tangent(x, g):
    # As TensorFlow's clip_by_value: the gradient passes at both boundaries, and is
    # selected (0 outside, whatever g is).
    return jnp.where((x >= 0) & (x <= 1), g, jnp.zeros_like(g))


@jax.custom_vjp
def _clip01_vjp(x):
    return jnp.clip(x, 0, 1)


def _clip01_fwd(x):
    return _clip01_vjp(x), x


def _clip01_bwd(x, g):
    return (_clip01_tangent(x, g),)


_clip01_vjp.defvjp(_clip01_fwd, _clip01_bwd)


def dorefa(x: ArrayLike, k_bit: int = 2, mode: str = "activations") -> jax.Array:
    """DoReFa-Net's k-bit quantizer, straight through the rounding only.

    ``n = 2**k_bit - 1``. Activations: ``round(n * clip(x, 0, 1)) / n`` (the clip's
    gradient passes at both boundaries). Weights: ``t = tanh(w) / (2 *
    stop_gradient(max|tanh w|)) + 0.5`` then ``2 * round(n t) / n - 1``.

    Args:
      x: float array of any shape.
      k_bit: number of bits.
      mode: "activations" or "weights".

    Returns:
      The quantized array with x's shape and dtype.

    Raises:
      ValueError: for a hyper-parameter that :func:`get` rejects (checked at trace time).
    """
    _check_call("dorefa", k_bit=k_bit, mode=mode)
    x = _float_input(x, "dorefa")
    n = 2.0**k_bit - 1.0
    if mode == "activations":
        return (_round_ste(n * _clip01(x)) / n).astype(x.dtype)
    t = jnp.tanh(x)  # mode == "weights"
    t = t / (2.0 * jax.lax.stop_gradient(jnp.max(jnp.abs(t)))) + 0.5
    return (2.0 * _round_ste(n * t) / n - 1.0).astype(x.dtype)


def identity(x: ArrayLike) -> jax.Array:
    """The identity: no quantization, gradient unchanged."""
    return jnp.asarray(x)


# --------------------------------------------------------------------------- registry
_QUANTIZERS: dict[str, Callable[..., jax.Array]] = {
    "ste_sign": ste_sign,
    "approx_sign": approx_sign,
    "swish_sign": swish_sign,
    "magnitude_aware_sign": magnitude_aware_sign,
    "ste_heaviside": ste_heaviside,
    "ste_tern": ste_tern,
    "dorefa": dorefa,
    "identity": identity,
}

_HPARAMS: dict[str, tuple[str, ...]] = {
    "ste_sign": ("clip_value",),
    "approx_sign": (),
    "swish_sign": ("beta",),
    "magnitude_aware_sign": ("clip_value",),
    "ste_heaviside": ("clip_value",),
    "ste_tern": ("threshold_value", "ternary_weight_networks", "clip_value"),
    "dorefa": ("k_bit", "mode"),
    "identity": (),
}


def _is_number(value, kinds: str = "fiu") -> bool:
    """A real number, or a 0-d real array (not a bool); kinds="iu" for integers only."""
    if value is None or isinstance(value, bool | str):
        return False
    try:
        array = np.asarray(value)
    except Exception:  # e.g. a tracer
        return False
    return array.shape == () and array.dtype.kind in kinds


# hyper-parameter -> (check, what it must be); NaN fails every range check
_HPARAM_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "clip_value": (lambda v: v is None or (_is_number(v) and v >= 0), "None or a number >= 0"),
    "beta": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "threshold_value": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "ternary_weight_networks": (lambda v: isinstance(v, bool | np.bool_), "True or False"),
    "k_bit": (lambda v: _is_number(v, "iu") and v >= 1, "an int >= 1"),
    "mode": (
        lambda v: isinstance(v, str) and v in ("activations", "weights"),
        "'activations' or 'weights'",
    ),
}


def _check_hparams(what: str, hparams: dict) -> None:
    """A ValueError naming the first hyper-parameter whose type or value is wrong."""
    for key, value in hparams.items():
        check, expected = _HPARAM_CHECKS[key]
        if not check(value):
            raise ValueError(f"{what}: {key} must be {expected}, got {value!r}.")


def _check_call(name: str, **hparams) -> None:
    """:func:`_check_hparams` for a call of the quantizer ``name``, as :func:`get` checks
    them: in Python, so under ``jit`` once per trace. A traced hyper-parameter (jit,
    vmap or grad over ``threshold_value`` or ``k_bit``, which the quantizers support)
    has no value to check then, and is left as it is."""
    concrete = {k: v for k, v in hparams.items() if not isinstance(v, jax.core.Tracer)}
    _check_hparams(f"Quantizer {name!r}", concrete)


# Quantizers whose outputs are -1, 0 or +1 only (exact in every float format).
_INTEGER_VALUED = frozenset({"ste_sign", "approx_sign", "swish_sign", "ste_heaviside", "ste_tern"})


def integer_valued(spec: str | Callable | None) -> bool:
    """True when the quantizer ``spec`` names outputs only -1, 0 or +1.

    ``ste_sign``, ``approx_sign``, ``swish_sign``, ``ste_heaviside`` and ``ste_tern`` (any
    hyper-parameters); False for ``magnitude_aware_sign`` and ``dorefa`` (scaled levels),
    ``identity``, None and callables (unknown values).
    """
    if not isinstance(spec, str):
        return False
    return parse_spec(spec)[0] in _INTEGER_VALUED


_SPEC_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)


def names() -> tuple[str, ...]:
    """The names :func:`get` knows."""
    return tuple(_QUANTIZERS)


def parse_spec(spec: str) -> tuple[str, dict]:
    """Splits ``"name"`` or ``"name(key=value, ...)"`` into (name, hparams).

    Values are Python literals (numbers, None, True/False, strings), read with
    ``ast.literal_eval``: nothing in a spec is executed.
    """
    malformed = f"Cannot parse quantizer spec {spec!r}; expected 'name' or 'name(key=value, ...)'."
    match = _SPEC_RE.match(spec)
    if not match:
        raise ValueError(malformed)
    name, args = match.group(1), match.group(2)
    hparams: dict = {}
    if args and args.strip():
        try:
            call = ast.parse(f"f({args})", mode="eval").body
        except SyntaxError as e:
            raise ValueError(f"Cannot parse the arguments of quantizer spec {spec!r}") from e
        # "name(a=1), (2)" or "name(a=1)(b=2)" parse as a tuple or a call of a call
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
            raise ValueError(malformed)
        if call.args or any(kw.arg is None for kw in call.keywords):
            raise ValueError(
                f"Quantizer spec {spec!r}: hyper-parameters must be keywords (key=value)."
            )
        for kw in call.keywords:
            try:
                hparams[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, TypeError) as e:
                raise ValueError(f"Quantizer spec {spec!r}: {kw.arg} is not a literal") from e
    return name, hparams


def get(name: str | Callable | None, **hparams) -> Quantizer:
    """Returns the quantizer ``name`` with its hyper-parameters bound.

    Args:
      name: a Larq quantizer name (``ste_sign``, ``approx_sign``, ``swish_sign``,
        ``magnitude_aware_sign``, ``ste_heaviside``, ``ste_tern``, ``dorefa``), a spec
        string such as ``"ste_sign(clip_value=1.25)"``, ``"identity"`` or None for the
        identity, or a callable, returned unchanged.
      **hparams: hyper-parameters, spelled as Larq spells them.

    Returns:
      A function array -> array.

    Raises:
      ValueError: for a malformed spec, an unknown name or hyper-parameter, or a
        hyper-parameter of the wrong type or range (``clip_value`` None or >= 0,
        ``beta`` > 0, ``threshold_value`` >= 0, ``ternary_weight_networks`` a bool,
        ``k_bit`` an int >= 1, ``mode`` "activations" or "weights").
    """
    if name is None:
        return identity
    if callable(name):
        if hparams:
            raise ValueError("Hyper-parameters cannot be bound to a callable quantizer.")
        return name
    if not isinstance(name, str):
        raise ValueError(f"A quantizer is a name, a callable or None; got {name!r}")
    base, spec_hparams = parse_spec(name)
    if base not in _QUANTIZERS:
        raise ValueError(f"Unknown quantizer {base!r}; known quantizers: {', '.join(names())}")
    merged = {**spec_hparams, **hparams}
    unknown = sorted(set(merged) - set(_HPARAMS[base]))
    if unknown:
        raise ValueError(
            f"Unknown hyper-parameter(s) {unknown} for quantizer {base!r}; it takes "
            f"{list(_HPARAMS[base]) or 'none'}."
        )
    _check_hparams(f"Quantizer {base!r}", merged)
    fn = _QUANTIZERS[base]
    if not merged:
        return fn
    return functools.partial(fn, **merged)


# --------------------------------------------------------------------------- surrogates
_SURROGATES = ("ste_sign", "approx_sign", "swish_sign", "identity")


def surrogate_gradient(spec: str | None) -> Callable[[jax.Array], jax.Array]:
    """The elementwise derivative that a backward surrogate multiplies gradients by.

    Args:
      spec: ``"ste_sign"`` (optionally ``"ste_sign(clip_value=c)"``, c None for a plain
        pass-through), ``"approx_sign"``, ``"swish_sign"`` (optionally with ``beta``) or
        ``"identity"`` / None (gradient passes unchanged).

    Returns:
      A function x -> d surrogate / dx, elementwise, in x's dtype.
    """
    name, hp = _surrogate_spec(spec)
    if name == "ste_sign":
        clip_value = hp.get("clip_value", 1.0)
        return lambda x: _clip_mask(x, clip_value)
    if name == "approx_sign":
        return _approx_sign_grad
    if name == "swish_sign":
        beta = hp.get("beta", 5.0)
        return lambda x: _swish_sign_grad(x, beta)
    return jnp.ones_like


def _surrogate_spec(spec: str | None) -> tuple[str, dict]:
    """A surrogate's name and hyper-parameters, checked."""
    if spec is None:
        spec = "identity"
    name, hp = parse_spec(spec)
    if name not in _SURROGATES:
        raise ValueError(f"Unknown surrogate {name!r}; known surrogates: {', '.join(_SURROGATES)}")
    allowed = {"ste_sign": ("clip_value",), "swish_sign": ("beta",)}.get(name, ())
    unknown = sorted(set(hp) - set(allowed))
    if unknown:
        raise ValueError(f"Unknown hyper-parameter(s) {unknown} for surrogate {name!r}")
    _check_hparams(f"Surrogate {name!r}", hp)
    return name, hp


def _surrogate_tangent(spec: str | None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(x, g) -> the gradient that the surrogate passes back for the cotangent g, as the
    quantizer of that name does: selected by the clip (0 outside it, whatever g is, as
    Larq's ``tf.where``), multiplied by the slope inside."""
    name, hp = _surrogate_spec(spec)
    if name == "ste_sign":
        clip_value = hp.get("clip_value", 1.0)
        return lambda x, g: _clipped_gradient(x, g, clip_value)
    if name == "approx_sign":
        return _approx_sign_tangent
    if name == "swish_sign":
        beta = hp.get("beta", 5.0)
        return lambda x, g: g * _swish_sign_grad(x, beta).astype(g.dtype)
    return lambda x, g: g


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _override(x, forward, tangent):
    return forward(x)


def _override_fwd(x, forward, tangent):
    return _override(x, forward, tangent), x


def _override_bwd(forward, tangent, x, g):
    return (tangent(x, g),)


_override.defvjp(_override_fwd, _override_bwd)


def with_surrogate(quantizer: Quantizer, surrogate: str | None) -> Quantizer:
    """Keeps ``quantizer``'s forward pass and replaces its backward pass.

    The result computes exactly ``quantizer(x)`` (bit for bit) and back-propagates
    ``g * surrogate_gradient(surrogate)(x)`` inside the surrogate's clip and 0 outside
    it, whatever g is (Larq's ``tf.where``).

    Args:
      quantizer: any quantizer function.
      surrogate: a surrogate spec accepted by :func:`surrogate_gradient`.

    Returns:
      A function array -> array.
    """
    tangent = _surrogate_tangent(surrogate)

    def overridden(x):
        if ops.forward_mode_active():
            return _jvp_form(quantizer, tangent, x)
        return _override(x, quantizer, tangent)

    return overridden
