"""Max-pooling and convolution with cheaper backward passes on CPU and GPU.

Both compute exactly what the plain JAX ops compute (the forward pass is the same XLA
op) and differ only in how their vector-Jacobian product is built, because XLA's CPU
backend lowers these backward ops slowly:

* the gradient of max-pooling (``select_and_scatter_add``) becomes a variadic
  reduce-window over four full-size index arrays and a scatter: on a ResNet-18 stem
  (64 x 56 x 56 x 64) about 4x slower than the forward pass of the whole pool.
  :func:`max_pool`'s backward finds the first maximum of every window (row-major
  order, as ``select_and_scatter_add`` with ``ge`` does) with strided slices and
  routes the cotangent to it with one gather per stride phase: the same numbers, bit
  for bit (contributions that meet at one input are added in the same, window
  row-major order). The first maximum is found in the forward pass and kept as an int8
  tap number, the backward pass's only residual: neither x nor y is kept for it (on an
  H100, Bi-Real Net 18's SmoothGrad ran 1-2% faster than with x and y kept, within the
  rounds' spread; on CPU the same speed);
* the input gradient of a convolution is a convolution with the kernel's input and
  output channels swapped; JAX expresses the swap as a relabelling of the kernel's
  dimensions, which XLA's fast CPU convolution kernels (HWIO only) take outside loops,
  after XLA inserts a transpose, but not inside a ``lax.scan`` body (chunked
  SmoothGrad, Integrated Gradients), where it runs 3-6x slower in a generic loop.
  :func:`conv` computes the same convolution with an explicitly transposed kernel:
  the same numbers, bit for bit, at the fast speed everywhere;
* that transposed kernel costs more than the convolution itself when the cotangent
  has few positions (batch x height x width) for the kernel's size (a ResNet's last
  stage at a small batch): on CPU, :func:`conv` then computes the input gradient as
  one matrix product with the kernel as it is and a col2im, the same sums in another
  order (float rounding; 2.0-2.2x faster on those layers, and a Bi-Real Net 18
  Gradient at batch 4 1.25x faster);
* in the explainers' CPU programs (:func:`platform_jit`), the input gradient of a
  strided convolution over a large input (at least 28 px a side and 8192 positions)
  is one stride-1 convolution per stride phase, interleaved: XLA's classic kernels
  run JAX's form, a convolution of the stride-dilated cotangent, in a generic loop
  (a 3x3/2 convolution at 64 x 28 x 28 x 64: 1.3x faster; at 56 px 1.9x). The same sums
  in another order (float rounding);
* the kernel gradient of a convolution of an input padded with a constant other than
  zero (``conv(..., pad_value=1.0)``, QuickNet) runs 2-3x slower through a padded copy
  than with the convolution's own zero padding: :func:`conv` differentiates the
  zero-padded convolution plus the border's contribution instead;
* on GPUs, a strided convolution of an input with few channels (a ResNet's 7x7/2
  stem over RGB images) runs as a stride-1 convolution of the space-to-depth input:
  cuDNN's strided kernels for 3 channels, above all the input gradient's, run at a
  small fraction of the matrix units' speed (on an H100 the stem took 40% of a
  bfloat16 SmoothGrad call of Bi-Real Net 18; with the rearrangement, SmoothGrad ran
  1.33x faster). The sums are the same up to float rounding. XLA's CPU backend keeps
  the direct forward pass, bit for bit, but takes the input gradient through the
  rearranged form (its direct form, a convolution of the stride-dilated cotangent,
  runs in a generic loop: 1.8x slower at 64 x 112 x 112 x 3); TPUs, where it was not
  measured, keep the direct form (``lax.platform_dependent``).

* a convolution whose unpadded window covers its whole input (one output position:
  XNOR-Net's 6x6 ``fc6``) runs as the matrix product it is. cuDNN takes kernels as
  OHWI, so XLA transposed the large kernel both ways around every step; the product
  keeps it HWIO. On an H100, XNOR-Net's training step at 224 px, batch 64, ran 1.35x
  faster (BNN 7.7 -> 5.7 ms, twin 6.4 -> 4.8 ms). On XLA's CPU backend, which turns
  that convolution into a dot of its own, the product lets a binary kernel be written
  out once instead of once per layout: a BNN's XNOR-Net step at 224 px, batch 8, ran
  1.18-1.22x faster on a 2-core Xeon, the twin's within 5%
  (``benchmarks/results/cpu-2026-11-27b``). The explainers' programs for XLA's classic
  CPU kernels (:func:`platform_jit`) keep the convolution, which those kernels run
  faster (a twin XNOR-Net's Gradient at 224 px, batch 2: 83 against 317 ms); the choice
  is made when a function is traced, as :data:`BF16_EXACT_PRODUCTS`'s. The sums are the
  same up to float rounding (in another order; exact, so bit for bit, for +-1
  operands).

:func:`channel_sum`, a kernel's per-output-channel sum (Bi-Real Net's and XNOR-Net's
scales), is taken in two stages in :func:`platform_jit`'s CPU programs, where XLA's
classic kernels made one reduction a reduce-window that wrote its operand out first
(the same sum up to float rounding; elsewhere the one reduction).

:func:`dense` multiplies by a kernel of -1 / 0 / +1 (a binary layer's) in bfloat16 on
CPUs with AMX bfloat16 tiles, where it is exact: a binary input's product equals
the float32 one bit for bit, a real input's (split into three bfloat16 parts) up to float
rounding; elsewhere it is the float32 ``lax.dot_general``.

Like every ``jax.custom_vjp`` function, these ops (and jbnn's quantizers) do not take
forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``,
``jax.hessian``) by default; reverse mode, ``jit``, ``vmap`` and higher-order reverse
derivatives work. Under :func:`forward_mode` they are traced in forms that take it: the
plain JAX ops (the same forward values, bit for bit, but for :func:`dense`'s bfloat16
products of a real input) with JAX's own derivatives, and the quantizers as
``jax.custom_jvp`` functions with the same surrogate derivatives. Images are NHWC,
kernels HWIO, as everywhere in jbnn.

:func:`platform_jit` is ``jax.jit`` with XLA compiler options chosen per platform when
the call is made: on CPU, jbnn's explainers compile without XLA's YNNPACK fusions,
whose convolutions ran SmoothGrad 1.3x slower than XLA's classic CPU kernels.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import os
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

__all__ = [
    "BF16_EXACT_PRODUCTS",
    "BF16_PRODUCTS_CPU_FLAG",
    "CPU_COMPILER_OPTIONS",
    "channel_sum",
    "conv",
    "dense",
    "forward_mode",
    "max_pool",
    "platform_jit",
]

Padding = str | Sequence[tuple[int, int]]


# --------------------------------------------------------------------------- forward mode
class _ForwardMode(threading.local):
    """Set inside :func:`forward_mode` (per thread)."""

    active = False


_FORWARD_MODE = _ForwardMode()


@contextlib.contextmanager
def forward_mode():
    """Traces jbnn's ops and quantizers in forms that forward-mode autodiff takes.

    By default :func:`conv`, :func:`max_pool`, :func:`dense`, XNOR-Net's kernel scale
    and every quantizer are ``jax.custom_vjp`` functions, which ``jax.jvp`` (so
    ``jax.jacfwd``, ``jax.linearize``, ``jax.hessian``, forward-over-reverse
    Hessian-vector products) refuses, for the full-precision twins too. Inside this
    context they are traced as the plain JAX ops, whose forward values are the same bit
    for bit (but for :func:`dense`'s bfloat16 products of a real input on CPUs that
    have them, run in float32 here: float rounding), with JAX's own derivatives, and
    the quantizers as ``jax.custom_jvp`` functions whose tangent is the surrogate
    derivative (the straight-through mask, ``approx_sign``'s slope...) times the
    input's tangent: the same derivatives as the default VJPs, so ``jvp`` agrees with
    ``grad``. Reverse mode works here too, at the plain ops' speed (the default forms
    exist because XLA's CPU backend runs some of the plain backward passes slowly).

    The choice is made when a function is traced, as :data:`BF16_EXACT_PRODUCTS`'s: a
    ``jax.jit`` function traced before, outside the context, keeps its trace for inputs
    of the same shapes (jit it anew inside, or trace it first inside).

    Example::

        with jbnn.ops.forward_mode():
            logits, tangent = jax.jvp(lambda x: model.apply(variables, x), (x,), (v,))
    """
    previous = _FORWARD_MODE.active
    _FORWARD_MODE.active = True
    try:
        yield
    finally:
        _FORWARD_MODE.active = previous


def forward_mode_active() -> bool:
    """Whether functions traced now are traced in :func:`forward_mode`'s forms."""
    return _FORWARD_MODE.active


_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


# --------------------------------------------------------------------------- helpers
def _pair(value, name: str, what: str) -> tuple[int, int]:
    try:
        pair = (operator.index(value),) * 2 if not hasattr(value, "__len__") else value
        pair = tuple(operator.index(v) for v in pair)
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name}: {what} must be two positive ints (h, w), got {value!r}.")
    return pair


def _explicit_pads(
    padding: Padding, in_hw: tuple[int, int], window: tuple[int, int], strides, name: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    """'SAME' / 'VALID' / ((top, bottom), (left, right)) as explicit (lo, hi) pairs."""
    if isinstance(padding, str):
        try:
            return tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, window, strides, padding))
        except (ValueError, RuntimeError) as e:
            raise ValueError(
                f"{name}: padding must be 'SAME', 'VALID' or ((top, bottom), (left, right)), "
                f"got {padding!r}."
            ) from e
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    if len(pads) != 2 or any(len(p) != 2 for p in pads):
        raise ValueError(
            f"{name}: explicit padding must be ((top, bottom), (left, right)), got {padding!r}."
        )
    return pads


def _check_nhwc(x: jax.Array, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"{name}: expects a rank-4 NHWC batch (B, H, W, C), got shape {tuple(x.shape)}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expects floating-point inputs, got dtype {x.dtype}.")


# --------------------------------------------------------------------------- max-pool
def max_pool(
    x: ArrayLike,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: Padding = "VALID",
) -> jax.Array:
    """``flax.linen.max_pool`` for NHWC batches, with a fast backward pass.

    The forward pass is the same ``lax.reduce_window`` (padding with -inf); the
    gradient is the same as JAX's, bit for bit: every window sends its cotangent to
    its first maximum in row-major order.

    Args:
      x: float images (B, H, W, C).
      window_shape: (h, w) of the pooling window.
      strides: (h, w) strides; None for (1, 1), as in Flax.
      padding: "SAME", "VALID" or ((top, bottom), (left, right)).

    Returns:
      The pooled batch (B, H', W', C), x's dtype.

    Raises:
      ValueError: x not NHWC, bad window, strides or padding, or an empty output (an
        input smaller than the window).
    """
    x = jnp.asarray(x)
    _check_nhwc(x, "max_pool")
    window = _pair(window_shape, "max_pool", "window_shape")
    strides = (1, 1) if strides is None else _pair(strides, "max_pool", "strides")
    pads = _explicit_pads(padding, x.shape[1:3], window, strides, "max_pool")
    out_hw = [
        (n + lo + hi - k) // s + 1
        for n, (lo, hi), k, s in zip(x.shape[1:3], pads, window, strides, strict=True)
    ]
    if min(out_hw) < 1:  # an empty map: a global average pool of it gave NaN logits
        raise ValueError(
            f"max_pool: a {x.shape[1]}x{x.shape[2]} input is smaller than the "
            f"{window[0]}x{window[1]} window (padding {padding!r}): the output would be empty. "
            "The model's input is too small for its downsampling; use larger images."
        )
    if _FORWARD_MODE.active:
        return _reduce_window_max(x, window, strides, pads)
    return _max_pool(x, window, strides, pads)


def _reduce_window_max(x, window, strides, pads):
    return lax.reduce_window(  # as flax.linen.max_pool: reduce_window_max
        x,
        -jnp.inf,
        lax.max,
        (1, *window, 1),
        (1, *strides, 1),
        ((0, 0), *pads, (0, 0)),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
    return _reduce_window_max(x, window, strides, pads)


def _max_pool_fwd(x, window, strides, pads):
    y = _reduce_window_max(x, window, strides, pads)
    # The backward pass needs only where each window's maximum is: its tap number, in
    # the smallest integer type that holds it (int8 for windows up to 126 taps), a
    # quarter of y's bytes in float32, instead of x and y themselves. XLA computes it
    # with the forward pass (one read of x, fused with the pooling on GPU), and x can
    # be freed as soon as the forward pass no longer needs it.
    index = _first_max_index(x, y, window, strides, pads)
    # a zero-size array carries x's shape and dtype to the backward pass
    return y, (index, jnp.zeros((0, *x.shape[1:3], 0), x.dtype))


def _window_tap(x, kh, kw, out_hw, strides, pads):
    """x_padded[:, i*sh + kh, j*sw + kw, :] for every window (i, j): (B, Ho, Wo, C).

    Read straight from x, with -inf where the tap falls in the padding, so that the
    padded input is never materialised.
    """
    batch, height, width, channels = x.shape
    starts, limits, edge = [], [], []
    for tap, size, n_out, stride, (lo, _) in zip(
        (kh, kw), (height, width), out_hw, strides, pads, strict=True
    ):
        # window i reads row i*stride + tap - lo; keep the i whose row is inside x
        first = max(0, -(-(lo - tap) // stride))
        last = min(n_out - 1, (size - 1 + lo - tap) // stride)
        if last < first:  # this tap is padding for every window
            return jnp.full((batch, *out_hw, channels), -jnp.inf, x.dtype)
        starts.append(first * stride + tap - lo)
        limits.append(last * stride + tap - lo + 1)
        edge.append((first, n_out - 1 - last, 0))
    tap_values = lax.slice(
        x, (0, starts[0], starts[1], 0), (batch, limits[0], limits[1], channels), (1, *strides, 1)
    )
    if any(e[:2] != (0, 0) for e in edge):
        tap_values = lax.pad(
            tap_values, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), edge[0], edge[1], (0, 0, 0))
        )
    return tap_values


def _index_dtype(taps: int):
    return jnp.int8 if taps < jnp.iinfo(jnp.int8).max else jnp.int32


def _first_max_index(x, y, window, strides, pads):
    """First maximum of each window of x, as a tap number kh * ww + kw (row-major).

    ``taps`` (one past the last tap) where no tap equals the window's maximum y (a NaN
    window): such a window sends its cotangent nowhere. Shape y.shape.
    """
    ww, taps = window[1], window[0] * window[1]
    dtype = _index_dtype(taps)
    index = jnp.full(y.shape, taps, dtype)
    for k in reversed(range(taps)):
        tap = _window_tap(x, k // ww, k % ww, y.shape[1:3], strides, pads)
        index = jnp.where(tap == y, jnp.asarray(k, dtype), index)
    return index


def _max_pool_bwd(window, strides, pads, residuals, g):
    index, x_like = residuals  # (B, Ho, Wo, C) tap numbers; (0, H, W, 0)
    batch, (height, width), channels = g.shape[0], x_like.shape[1:3], g.shape[3]
    out_h, out_w = g.shape[1:3]
    (wh, ww), (sh, sw) = window, strides
    taps = wh * ww

    # Input row r = sh*u + a - top (padded coordinates sh*u + a) receives the window
    # i = u - m through tap kh = sh*m + a; same for columns. Each stride phase (a, b)
    # of the padded input is a gather from shifted windows.
    mh, mw = (wh - 1) // sh, (ww - 1) // sw
    (top, bottom), (left, right) = pads
    phase_h = max(-(-(height + top + bottom) // sh), out_h + mh)
    phase_w = max(-(-(width + left + right) // sw), out_w + mw)
    shift = ((0, 0, 0), (mh, phase_h - out_h, 0), (mw, phase_w - out_w, 0), (0, 0, 0))
    index = lax.pad(index, jnp.asarray(taps, index.dtype), shift)  # (B, mh+phase_h, mw+phase_w, C)
    g_pad = lax.pad(g, jnp.zeros((), g.dtype), shift)
    zero = jnp.zeros((), g.dtype)
    rows = []
    for a in range(sh):
        cols = []
        for b in range(sw):
            acc = None
            # windows in row-major order (larger tap = earlier window), as XLA adds them
            for kh in reversed(range(a, wh, sh)):
                for kw in reversed(range(b, ww, sw)):
                    m, n = kh // sh, kw // sw
                    sel = lambda t, m=m, n=n: t[
                        :, mh - m : mh - m + phase_h, mw - n : mw - n + phase_w
                    ]
                    term = jnp.where(sel(index) == kh * ww + kw, sel(g_pad), zero)
                    acc = term if acc is None else acc + term
            if acc is None:  # no tap lands on this phase (stride > window)
                acc = jnp.zeros((batch, phase_h, phase_w, channels), g.dtype)
            cols.append(acc)
        rows.append(jnp.stack(cols, axis=3))  # (B, phase_h, phase_w, sw, C)
    dx = jnp.stack(rows, axis=2)  # (B, phase_h, sh, phase_w, sw, C)
    dx = dx.reshape(batch, phase_h * sh, phase_w * sw, channels)
    return (dx[:, top : top + height, left : left + width, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# --------------------------------------------------------------------------- conv
def conv(
    x: ArrayLike,
    kernel: ArrayLike,
    strides: Sequence[int] = (1, 1),
    padding: Padding = "SAME",
    feature_group_count: int = 1,
    pad_value: float = 0.0,
) -> jax.Array:
    """``lax.conv_general_dilated`` on NHWC / HWIO whose input gradient stays fast.

    The forward pass is ``lax.conv_general_dilated(x, kernel, strides, padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=...)`` itself, and
    both gradients are JAX's own, bit for bit (except on CPU when the cotangent has at
    most one position per output channel, where the input gradient is a matrix product
    and a col2im, and in the explainers' CPU programs for a strided convolution over a
    large input, where it is one stride-1 convolution per stride phase: both equal up to
    float rounding). The input gradient is written out as
    JAX's transpose rule computes it (the kernel flipped in space, input and output
    channels swapped, the cotangent dilated by the strides), with the swap made an
    explicit transpose of the kernel instead of a relabelling of its dimensions: XLA's
    fast CPU convolution kernels only take HWIO kernels, and inside a loop (``lax.scan``,
    as chunked SmoothGrad and Integrated Gradients use) XLA does not restore that layout
    by itself, so JAX's own input gradient falls back to a generic loop 3-6x slower.
    Grouped convolutions (``feature_group_count > 1``) use the plain op. An unpadded
    window that covers the whole input is a matrix product (module docstring), and
    strided RGB stems are rearranged on GPUs.

    ``pad_value`` fills the padding with a constant other than zero (QuickNet pads
    binary inputs with +1). The forward pass is then the convolution of the padded
    input, unpadded (``VALID``), as before; the backward pass does not go through the
    padded copy, whose kernel gradient XLA's CPU kernels compute 2-3x slower than that
    of a zero-padded convolution: it differentiates the same sum split in two, the
    zero-padded convolution of ``x`` plus the padding's own contribution
    ``conv(border, kernel)`` (one image holding ``pad_value`` in the padding and zeros
    inside). The gradients equal the plain ones up to float rounding (bit for bit for
    integer-valued operands such as +-1).

    Args:
      x: float images (B, H, W, C_in).
      kernel: (kh, kw, C_in / groups, C_out).
      strides: (sh, sw).
      padding: "SAME", "VALID" or ((top, bottom), (left, right)).
      feature_group_count: number of groups (C_in for a depthwise convolution).
      pad_value: the value the padding holds (0.0: ordinary zero padding).

    Returns:
      (B, H', W', C_out).
    """
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    _check_nhwc(x, "conv")
    if kernel.ndim != 4:
        raise ValueError(
            f"conv: kernel must be HWIO (kh, kw, C_in / groups, C_out), got shape "
            f"{tuple(kernel.shape)}."
        )
    strides = _pair(strides, "conv", "strides")
    pads = _explicit_pads(padding, x.shape[1:3], tuple(kernel.shape[:2]), strides, "conv")
    # Under forward_mode the same forms, each with JAX's own derivatives (the same
    # values, bit for bit).
    plain = _FORWARD_MODE.active
    conv_fn = _conv if plain else _conv_hwio_grad
    if pad_value != 0.0 and any(p != 0 for pair in pads for p in pair):
        if plain:
            return _conv_padded_copy(x, kernel, strides, pads, feature_group_count, pad_value)
        return _conv_const_pad(x, kernel, strides, pads, feature_group_count, float(pad_value))
    if feature_group_count != 1:
        return _conv(x, kernel, strides, pads, feature_group_count)
    if _is_whole_input_window(x.shape, kernel.shape, pads):
        # One output position: a fully connected layer (XNOR-Net's fc6), run as the
        # matrix product it is (see the module docstring); XLA's classic CPU kernels
        # (the explainers' programs) run the convolution faster.
        if _CLASSIC_CPU_KERNELS.active:
            return conv_fn(x, kernel, strides, pads)
        return _whole_input_dense(x, kernel)
    if _use_space_to_depth(x.shape[-1], strides):
        # cuDNN runs the rearranged form much faster (measured on an H100), XLA's CPU
        # kernels the direct forward pass (its input gradient is rearranged in the VJP);
        # TPUs, unmeasured, keep the direct form. The choice is made where the
        # computation is lowered.
        direct = lambda x, k: conv_fn(x, k, strides, pads)
        rearranged = lambda x, k: _space_to_depth_conv(x, k, strides, pads, conv_fn)
        return lax.platform_dependent(x, kernel, cuda=rearranged, rocm=rearranged, default=direct)
    return conv_fn(x, kernel, strides, pads)


def _is_whole_input_window(x_shape, kernel_shape, pads) -> bool:
    """Whether an unpadded kernel window covers the whole input: one output position."""
    return tuple(kernel_shape[:2]) == tuple(x_shape[1:3]) and all(
        p == 0 for pair in pads for p in pair
    )


def _whole_input_dense(x, kernel):
    """conv(x, kernel, VALID) for a kernel as large as x: (B, 1, 1, C_out)."""
    out = lax.dot_general(
        x.reshape(x.shape[0], -1), kernel.reshape(-1, kernel.shape[-1]), _DENSE_DIMS(2)
    )
    return out.reshape(x.shape[0], 1, 1, kernel.shape[-1])


# A strided convolution of an input with at most this many channels (an RGB stem) runs
# as a stride-1 convolution of the space-to-depth input (C_in x sh x sw channels).
SPACE_TO_DEPTH_MAX_CHANNELS = 4


def _use_space_to_depth(channels: int, strides: tuple[int, int]) -> bool:
    return channels <= SPACE_TO_DEPTH_MAX_CHANNELS and strides != (1, 1)


def _space_to_depth_conv(x, kernel, strides, pads, conv_fn=None):
    """The strided convolution of a few-channel input as a stride-1 one, the same sums.

    With strides (sh, sw), tap ``t = sh * a + b`` of a kernel row meets padded input row
    ``sh * (i + a) + b`` for output row ``i``: rearranging the zero-padded input into
    blocks of sh x sw pixels (``(B, L_h / sh, L_w / sw, sh * sw * C_in)``) and the kernel,
    zero-padded to whole blocks, the same way (``(ceil(kh / sh), ceil(kw / sw), sh * sw *
    C_in, C_out)``) turns the convolution into a stride-1 ``VALID`` one over the blocks,
    whose products are exactly the original ones plus products with zero taps. Values
    equal the direct convolution's up to the order of float summation. Both passes
    avoid the strided convolution of a 3-channel image, which GPU libraries run far
    below their matrix speed (the input gradient of a ResNet stem: a quarter of a
    SmoothGrad call on an H100); the input gradient becomes a stride-1 convolution with
    ``sh * sw * C_in`` output channels, followed by the inverse rearrangement.
    """
    (sh, sw), (kh, kw, c_in, c_out) = strides, kernel.shape
    batch, height, width = x.shape[:3]
    out_h = (height + sum(pads[0]) - kh) // sh + 1
    out_w = (width + sum(pads[1]) - kw) // sw + 1
    taps_h, taps_w = -(-kh // sh), -(-kw // sw)
    # Padded lengths covering whole blocks: rows past the original padding meet only
    # the zero taps (or none); a negative high padding drops rows no output reads.
    len_h, len_w = sh * (out_h + taps_h - 1), sw * (out_w + taps_w - 1)
    zero = jnp.zeros((), x.dtype)
    x = lax.pad(
        x,
        zero,
        (
            (0, 0, 0),
            (pads[0][0], len_h - height - pads[0][0], 0),
            (pads[1][0], len_w - width - pads[1][0], 0),
            (0, 0, 0),
        ),
    )
    x = x.reshape(batch, len_h // sh, sh, len_w // sw, sw, c_in)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, len_h // sh, len_w // sw, sh * sw * c_in)
    kernel = jnp.pad(kernel, ((0, taps_h * sh - kh), (0, taps_w * sw - kw), (0, 0), (0, 0)))
    kernel = kernel.reshape(taps_h, sh, taps_w, sw, c_in, c_out)
    kernel = kernel.transpose(0, 2, 1, 3, 4, 5).reshape(taps_h, taps_w, sh * sw * c_in, c_out)
    return (conv_fn or _conv_hwio_grad)(x, kernel, (1, 1), ((0, 0), (0, 0)))


def _conv(x, kernel, strides, pads, groups=1):
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=pads,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_hwio_grad(x, kernel, strides, pads):
    return _conv(x, kernel, strides, pads)


def _conv_hwio_grad_fwd(x, kernel, strides, pads):
    return _conv(x, kernel, strides, pads), (x, kernel)


def _conv_hwio_grad_bwd(strides, pads, residuals, g):
    x, kernel = residuals
    # Kernel gradient: JAX's own (dead code when only input gradients are used).
    _, kernel_pullback = jax.vjp(lambda k: _conv(x, k, strides, pads), kernel)
    (d_kernel,) = kernel_pullback(g)
    direct = lambda k, g: _conv_input_grad(x.shape, x.dtype, k, g, strides, pads)
    if _use_space_to_depth(x.shape[-1], strides) and not _use_product_input_grad(
        g.shape, kernel.shape, pads
    ):
        # A strided few-channel convolution (an RGB stem): XLA's CPU backend runs its
        # transposed form, a convolution of the stride-dilated cotangent, in a generic
        # loop; through the space-to-depth form it is a stride-1 convolution (1.8x
        # faster at 64 x 112 x 112 x 3, as fast at batch 4). TPUs keep the direct form.
        def rearranged(k, g):
            _, pullback = jax.vjp(lambda x: _space_to_depth_conv(x, k, strides, pads), x)
            return pullback(g)[0].astype(x.dtype)

        return lax.platform_dependent(kernel, g, cpu=rearranged, default=direct), d_kernel
    if not _use_product_input_grad(g.shape, kernel.shape, pads):
        if _CLASSIC_CPU_KERNELS.active and _use_phase_input_grad(x.shape, strides, pads):
            # A strided convolution over a large input, in the explainers' CPU programs:
            # the dilated form runs in a generic loop there (module docstring).
            return _phase_input_grad(x.shape, x.dtype, kernel, g, strides, pads), d_kernel
        return direct(kernel, g), d_kernel
    # Few output positions for the kernel's size: on CPU the kernel's transpose costs
    # more than the product itself, so skip it; cuDNN and TPUs keep the convolution.
    product = lambda k, g: _product_input_grad(x.shape, x.dtype, k, g, strides, pads)
    return lax.platform_dependent(kernel, g, cpu=product, default=direct), d_kernel


# The input gradient of a convolution whose cotangent has at most this many positions
# (batch x height x width) per output channel runs on CPU as one matrix product with the
# untransposed kernel and a col2im (measured on a 2-core Xeon: ResNet-18's stage-4
# convolutions at batch 4, 4 x 4 positions, 2.0-2.2x faster; 0.7x at 4x more positions).
PRODUCT_INPUT_GRAD_MAX_POSITIONS_PER_CHANNEL = 1.0


def _use_product_input_grad(g_shape, kernel_shape, pads) -> bool:
    positions = g_shape[0] * g_shape[1] * g_shape[2]
    limit = PRODUCT_INPUT_GRAD_MAX_POSITIONS_PER_CHANNEL * kernel_shape[3]
    return positions <= limit and all(p >= 0 for pair in pads for p in pair)


def _product_input_grad(x_shape, dtype, kernel, g, strides, pads):
    """The input gradient of a convolution as a matrix product and a col2im.

    ``taps[p, q, c, b, i, j] = sum_o kernel[p, q, c, o] g[b, i, j, o]`` takes the kernel
    as the left operand in its own HWIO layout (contracting its minor dimension, which
    XLA's CPU dot does without copying it: the transposed kernel JAX's rule builds costs
    more than the product when the cotangent has few positions); then output (i, j)'s
    tap (p, q) read the padded input at (sh i + p, sw j + q), so each tap's slice is
    added there, a strided placement (interior padding), and the padding is cut off.
    The same sums as the transposed convolution, in another order (float rounding).
    """
    kh, kw = kernel.shape[:2]
    (sh, sw), ((top, bottom), (left, right)) = strides, pads
    height, width = x_shape[1:3]
    out_h, out_w = g.shape[1:3]
    padded_h, padded_w = height + top + bottom, width + left + right
    taps = lax.dot_general(kernel, g, (((3,), (3,)), ((), ())))  # (kh, kw, C_in, B, H', W')
    zero = jnp.zeros((), taps.dtype)
    d_padded = None  # (C_in, B, padded_h, padded_w)
    for p in range(kh):
        for q in range(kw):
            rows = (p, padded_h - p - (out_h - 1) * sh - 1, sh - 1)  # (lo, hi, interior)
            cols = (q, padded_w - q - (out_w - 1) * sw - 1, sw - 1)
            placed = lax.pad(taps[p, q], zero, ((0, 0, 0), (0, 0, 0), rows, cols))
            d_padded = placed if d_padded is None else d_padded + placed
    d_x = d_padded[:, :, top : top + height, left : left + width]  # (C_in, B, H, W)
    return d_x.transpose(1, 2, 3, 0).astype(dtype)  # (B, H, W, C_in)


# In the explainers' CPU programs (XLA's classic kernels) the input gradient of a strided
# convolution over an input of at least this size (each side) and this many positions
# (batch x height x width) runs as one stride-1 convolution per stride phase
# (:func:`_phase_input_grad`). Measured on a 2-core AMD EPYC VM without AVX-512 (Zen 3)
# (``benchmarks/phase_ab.py --layers``, ``benchmarks/results/cpu-2026-11-29/``): a
# 3x3/2 convolution at batch 64 over 56 and 28 px 1.93x and 1.32x faster, at batch 4
# over 56 px 1.77x, a 1x1/2 one at batch 64 1.71-1.80x; smaller 3x3/2 ones (batch 4 at
# 28 px or less, batch 64 at 14 px or less) 0.79-1.01x, so they keep the dilated form.
PHASE_INPUT_GRAD_MIN_SIZE = 28
PHASE_INPUT_GRAD_MIN_POSITIONS = 8192


def _use_phase_input_grad(x_shape, strides, pads) -> bool:
    positions = x_shape[0] * x_shape[1] * x_shape[2]
    return (
        tuple(strides) != (1, 1)
        and min(x_shape[1:3]) >= PHASE_INPUT_GRAD_MIN_SIZE
        and positions >= PHASE_INPUT_GRAD_MIN_POSITIONS
        and all(p >= 0 for pair in pads for p in pair)
    )


def _phase_input_grad(x_shape, dtype, kernel, g, strides, pads):
    """The input gradient of a strided convolution as one stride-1 convolution per phase.

    Input row ``sh m + a`` of the padded input (phase ``a`` of ``sh``) is read only by the
    kernel rows ``a, a + sh, ...``: its gradient is the full correlation of the
    cotangent with that sub-kernel, flipped, input and output channels swapped, at
    stride 1 (likewise for columns). The ``sh x sw`` phases are interleaved and the
    padding cut off. JAX's transpose rule computes the same sums as one convolution of
    the cotangent dilated by the strides, which XLA's classic CPU kernels run in a
    generic loop (at 64 x 28 x 28 x 64, 3x3/2: 1.3x slower than the phases); the sums
    are the same, in another order (float rounding). A phase no kernel row reads
    (stride larger than the kernel) gets zeros.
    """
    kh, kw, c_in, _ = kernel.shape
    (sh, sw), ((top, bottom), (left, right)) = strides, pads
    batch, height, width = x_shape[:3]
    out_h, out_w = g.shape[1:3]
    rows, cols = -(-(height + top + bottom) // sh), -(-(width + left + right) // sw)
    phases = []
    for a in range(sh):
        row = []
        for b in range(sw):
            sub = kernel[a::sh, b::sw]  # (taps_h, taps_w, C_in, C_out)
            taps_h, taps_w = sub.shape[:2]
            if taps_h == 0 or taps_w == 0:
                row.append(jnp.zeros((batch, rows, cols, c_in), g.dtype))
                continue
            row.append(
                lax.conv_general_dilated(
                    g,
                    jnp.flip(sub, (0, 1)).transpose(0, 1, 3, 2),  # (taps_h, taps_w, C_out, C_in)
                    window_strides=(1, 1),
                    padding=((taps_h - 1, rows - out_h), (taps_w - 1, cols - out_w)),
                    dimension_numbers=_DIMENSION_NUMBERS,
                )
            )  # (B, rows, cols, C_in): padded input rows sh m + a, columns sw n + b
        phases.append(jnp.stack(row, 3))  # (B, rows, cols, sw, C_in)
    d_padded = jnp.stack(phases, 2).reshape(batch, rows * sh, cols * sw, c_in)
    return d_padded[:, top : top + height, left : left + width].astype(dtype)


def _conv_input_grad(x_shape, dtype, kernel, g, strides, pads):
    """JAX's transpose rule for the input of a convolution, with an HWIO kernel.

    ``lax._conv_general_dilated_transpose_lhs`` with ``lhs_dilation = rhs_dilation = 1``:
    a convolution of g, dilated by the strides, with the spatially flipped kernel whose
    input and output channels are swapped, padded by ``_conv_general_vjp_lhs_padding``.
    """
    kh, kw = kernel.shape[:2]
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # (kh, kw, C_out, C_in)
    transposed_pads = []
    for size, k, stride, out, (lo, _) in zip(
        x_shape[1:3], (kh, kw), strides, g.shape[1:3], pads, strict=True
    ):
        before = k - lo - 1
        after = size + k - 1 - ((out - 1) * stride + 1) - before
        transposed_pads.append((before, after))
    d_x = lax.conv_general_dilated(
        g,
        flipped,
        window_strides=(1, 1),
        padding=transposed_pads,
        lhs_dilation=strides,
        dimension_numbers=_DIMENSION_NUMBERS,
    )
    return d_x.astype(dtype)


_conv_hwio_grad.defvjp(_conv_hwio_grad_fwd, _conv_hwio_grad_bwd)


def _pad_with(x, pads, value):
    return lax.pad(
        x, jnp.asarray(value, x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0))
    )


def _conv_padded_copy(x, kernel, strides, pads, groups, value):
    """The convolution of x padded with ``value`` (the forward pass of both forms)."""
    return _conv(_pad_with(x, pads, value), kernel, strides, ((0, 0), (0, 0)), groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_const_pad(x, kernel, strides, pads, groups, value):
    return _conv_padded_copy(x, kernel, strides, pads, groups, value)


def _conv_const_pad_fwd(x, kernel, strides, pads, groups, value):
    return _conv_const_pad(x, kernel, strides, pads, groups, value), (x, kernel)


def _conv_const_pad_bwd(strides, pads, groups, value, residuals, g):
    x, kernel = residuals
    # conv(pad(x, value)) = conv(pad(x, 0)) + conv(border): x and the kernel enter the
    # first term as in a zero-padded convolution, the kernel also enters the second.
    if groups == 1:
        zero_padded = lambda x, k: _conv_hwio_grad(x, k, strides, pads)
    else:
        zero_padded = lambda x, k: _conv(x, k, strides, pads, groups)
    _, pullback = jax.vjp(zero_padded, x, kernel)
    d_x, d_kernel = pullback(g)
    border = _pad_with(jnp.zeros((1, *x.shape[1:]), x.dtype), pads, value)  # (1, H', W', C)
    _, border_pullback = jax.vjp(
        lambda k: _conv(border, k, strides, ((0, 0), (0, 0)), groups), kernel
    )
    (d_border,) = border_pullback(jnp.sum(g, axis=0, keepdims=True))
    return d_x, d_kernel + d_border


_conv_const_pad.defvjp(_conv_const_pad_fwd, _conv_const_pad_bwd)


# --------------------------------------------------------------------------- dense
#: Whether :func:`dense` runs an exact binary product in bfloat16 on CPU: None decides
#: by the environment variable ``JBNN_BF16_PRODUCTS`` (``0`` / ``1``) if set, else by the
#: CPU (AMX bfloat16 tiles: :data:`BF16_PRODUCTS_CPU_FLAG`); True / False force it. The
#: real-input and gradient products differ from float32 by rounding, so a BNN trains
#: along a slightly different path: ``JBNN_BF16_PRODUCTS=0`` reproduces another
#: machine's float32 run.
#: Read when a function is traced: a compiled function keeps its choice, and so does a
#: jitted function traced inside another (jax.jit caches its trace), whatever the flag
#: or the platform_jit context of a later call; results agree to float rounding.
BF16_EXACT_PRODUCTS: bool | None = None

_BF16_ENV = "JBNN_BF16_PRODUCTS"
_DENSE_DIMS = lambda ndim: (((ndim - 1,), (0,)), ((), ()))  # noqa: E731


#: The CPU flag (``/proc/cpuinfo``) under which :func:`dense` takes bfloat16 products:
#: AMX's bfloat16 tiles. AVX512-BF16 alone does not pay: on a 2-core AMD EPYC (Zen 4,
#: AVX512-BF16 without AMX) the MLP's BNN training step took 1.20-1.21x its twin's with
#: bfloat16 products and 1.10-1.12x with float32 ones (2 runs each, 9 rounds of 40
#: steps, ``benchmarks/results/cpu-2026-11-28b``), conv models within noise either way;
#: on the Xeon with AMX the bfloat16 product was 1.3-1.6x faster than the float32 one.
BF16_PRODUCTS_CPU_FLAG = "amx_bf16"


def _bf16_products_pay_off(cpu_flags: set[str]) -> bool:
    """Whether a CPU with these ``/proc/cpuinfo`` flags gains from bfloat16 products."""
    return BF16_PRODUCTS_CPU_FLAG in cpu_flags


@functools.cache
def _cpu_has_bf16_products() -> bool:
    """True when this machine's CPU multiplies bfloat16 matrices fast enough to gain
    from it (AMX; Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return _bf16_products_pay_off(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def _bf16_products_enabled() -> bool:
    if _CLASSIC_CPU_KERNELS.active:  # XLA's classic CPU dots are slow in bfloat16
        return False
    if BF16_EXACT_PRODUCTS is not None:
        return bool(BF16_EXACT_PRODUCTS)
    env = os.environ.get(_BF16_ENV, "").strip()
    if env:
        if env not in ("0", "1"):
            raise ValueError(f"{_BF16_ENV}={env!r}: expected 0 (float32 products) or 1 (bfloat16)")
        return env == "1"
    return _cpu_has_bf16_products()


def dense(
    x: ArrayLike,
    kernel: ArrayLike,
    *,
    exact_kernel: bool = False,
    exact_input: bool = False,
) -> jax.Array:
    """``x @ kernel`` over x's last axis (``lax.dot_general``, as ``nn.Dense`` computes it).

    A binary layer multiplies by a kernel of -1 / 0 / +1 (``exact_kernel``: the caller
    knows the kernel holds only these values, e.g. the output of ``ste_sign``). Such a
    kernel is exact in bfloat16, so on a CPU with AMX bfloat16 tiles
    (:data:`BF16_PRODUCTS_CPU_FLAG`; AVX512-BF16 alone was slower than float32) and
    float32 operands the product runs in bfloat16 with float32 accumulation:

    * an input of -1 / 0 / +1 too (``exact_input``, a binarized activation) is exact in
      bfloat16: the products and their integer sums are exact, so the result equals the
      float32 product bit for bit;
    * a real input is split into three bfloat16 parts, ``x = hi + mid + lo`` (8 bits of
      the float32 significand each), and the three products are summed in float32: the
      float32 product up to float rounding.

    The kernel is then written once as bfloat16 (half the bytes of the float32 sign) and
    XLA's CPU backend hands the products to YNNPACK's bfloat16 kernels. In an MLP's
    training step (a 3072 x 512 binary kernel, batch 64, measured on a 2-core Xeon with
    AMX) the first layer's binarize-and-multiply took 1.2 ms where the twin's float32
    product took 1.2 ms and the float32 binary one 1.6-1.9 ms. The gradients are float32
    products: the kernel's is ``x^T g`` in float32 (JAX's own for a 2-D input, otherwise
    up to float rounding); the input's is ``g k^T`` with ``g`` split as above (float
    rounding). The two products are each other's derivatives, so second and higher
    reverse derivatives (Hessian-vector products) are float32-accurate too.

    Elsewhere (GPU, TPU, a CPU without AMX, a non-float32 operand, a kernel
    not known to be exact, or inside :func:`platform_jit`'s CPU programs, whose classic
    XLA kernels multiply bfloat16 2x slower than float32) this is the float32
    ``lax.dot_general`` itself. Like every ``jax.custom_vjp`` function the bfloat16 form
    has no forward-mode derivative; reverse mode, ``jit`` and ``vmap`` work.

    Args:
      x: (..., K) float input.
      kernel: (K, N).
      exact_kernel: the kernel holds only -1, 0 and +1.
      exact_input: x holds only -1, 0 and +1.

    Returns:
      (..., N), of the operands' promoted dtype.
    """
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    plain = lambda x, k: lax.dot_general(x, k, _DENSE_DIMS(x.ndim))  # noqa: E731
    if not (
        exact_kernel
        and not _FORWARD_MODE.active
        and x.dtype == jnp.float32
        and kernel.dtype == jnp.float32
        and kernel.ndim == 2
        and _bf16_products_enabled()
    ):
        return plain(x, kernel)
    bf16 = lambda x, k: _bf16_dense(x, k, bool(exact_input))  # noqa: E731
    return lax.platform_dependent(x, kernel, cpu=bf16, default=plain)


def _split3(x: jax.Array) -> jax.Array:
    """(3, *x.shape) bfloat16 parts whose float32 sum is x (to the last bit, nearly)."""
    hi = x.astype(jnp.bfloat16)
    # Non-finite values (and the rare overflow of hi) stay in hi alone.
    rest = jnp.where(jnp.isfinite(hi), x - hi.astype(x.dtype), 0.0).astype(x.dtype)
    mid = rest.astype(jnp.bfloat16)
    lo = (rest - mid.astype(x.dtype)).astype(jnp.bfloat16)
    return jnp.stack([hi, mid, lo])


def _bf16_product(parts: jax.Array, k16: jax.Array, contract_k: int) -> jax.Array:
    """Sum over the leading axis of ``parts`` of the bfloat16 products with ``k16``."""
    dims = (((parts.ndim - 1,), (contract_k,)), ((), ()))
    y = lax.dot_general(parts, k16, dims, preferred_element_type=jnp.float32)
    return functools.reduce(operator.add, [y[i] for i in range(y.shape[0])])


def _lead_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a^T b`` over every leading axis, float32: (..., M), (..., N) -> (M, N).

    As JAX's transpose rule of the product computes a kernel's gradient
    (jax.linear_transpose of it made XLA split the training step's gradient sums).
    """
    lead = tuple(range(a.ndim - 1))
    return lax.dot_general(a, b, ((lead, lead), ((), ())))


# ``x @ kernel`` and ``g @ kernel^T`` are each other's derivatives: two custom_vjp
# functions whose backward passes call each other, so that every order of reverse
# derivative (grad of grad: Hessian-vector products) runs the same exact products. The
# residual is the float32 kernel: a cotangent through its bfloat16 copy would be rounded
# to bfloat16 (a Hessian-vector product was off by 3e-3). XLA's CSE merges the two
# casts of the kernel, so a first-order step compiles as it did with a bfloat16 residual.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_dense(x, kernel, exact_input):
    parts = x.astype(jnp.bfloat16)[None] if exact_input else _split3(x)
    return _bf16_product(parts, kernel.astype(jnp.bfloat16), 0)


def _bf16_dense_fwd(x, kernel, exact_input):
    return _bf16_dense(x, kernel, exact_input), (x, kernel)


def _bf16_dense_bwd(exact_input, residuals, g):
    x, kernel = residuals
    return _bf16_dense_t(g, kernel).astype(x.dtype), _lead_product(x, g)


_bf16_dense.defvjp(_bf16_dense_fwd, _bf16_dense_bwd)


@jax.custom_vjp
def _bf16_dense_t(g, kernel):
    """``g @ kernel^T`` (the input gradient of :func:`_bf16_dense`), ``g`` split."""
    return _bf16_product(_split3(g), kernel.astype(jnp.bfloat16), 1)


def _bf16_dense_t_fwd(g, kernel):
    return _bf16_dense_t(g, kernel), (g, kernel)


def _bf16_dense_t_bwd(residuals, c):
    g, kernel = residuals
    return _bf16_dense(c, kernel, False).astype(g.dtype), _lead_product(c, g)


_bf16_dense_t.defvjp(_bf16_dense_t_fwd, _bf16_dense_t_bwd)


# --------------------------------------------------------------------------- channel sum
_CHANNEL_SUM_BLOCK = 32


def channel_sum(x: ArrayLike) -> jax.Array:
    """The sum over every axis but the last: (..., C) -> (C,), ``jnp.sum`` of x viewed as
    (rows, C). A kernel's per-output-channel sum (Bi-Real Net's and XNOR-Net's scales).

    Inside :func:`platform_jit`'s CPU programs (XLA's classic kernels) it is taken in
    two stages: over blocks of 32 rows (zeros pad the last block), then over the blocks,
    with ``lax.optimization_barrier`` between them (XLA merges two plain reductions
    into one). XLA's classic CPU backend rewrites one reduction over many rows as a
    reduce-window over 32-row windows plus a reduce, which does not fuse with its
    operand: the operand (``|w|``) was written out first. For a 3 x 3 x 512 x 512
    kernel's sum of ``|w|``, single-threaded on a 2-core Xeon, the two stages took 0.78
    against 4.04 ms, with a smaller error against the float64 sum (1.6e-7 against 2.4e-7
    of it; ``benchmarks/results/cpu-2026-11-27e/``). Elsewhere (XLA's default CPU
    fusions, GPU, TPU, a user's own ``jit``) it is the one reduction. The two forms
    agree up to float rounding. Differentiable (the barrier's derivative is the
    identity).

    Args:
      x: array with at least one axis; the last one is kept.

    Returns:
      (C,) in x's dtype.
    """
    x = jnp.asarray(x)
    n = math.prod(x.shape[:-1])
    rows = x.reshape(n, x.shape[-1])
    if not _CLASSIC_CPU_KERNELS.active or n <= _CHANNEL_SUM_BLOCK:
        return jnp.sum(rows, axis=0)
    pad = -n % _CHANNEL_SUM_BLOCK
    if pad:
        rows = jnp.pad(rows, ((0, pad), (0, 0)))
    blocks = rows.reshape(-1, _CHANNEL_SUM_BLOCK, rows.shape[-1])
    return jnp.sum(lax.optimization_barrier(jnp.sum(blocks, axis=1)), axis=0)


# --------------------------------------------------------------------------- jit
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"

#: XLA options of :func:`platform_jit` on CPU. By default XLA's CPU backend hands
#: convolutions, dots and elementwise fusions to the YNNPACK library; an empty list of
#: YNN fusion types keeps XLA's classic kernels (Eigen convolutions). On the 2-core
#: Xeon jbnn is benchmarked on (Bi-Real Net 18 and ResNet-E 18, 112 px, batch 4,
#: ``benchmarks/ynn_cpu.py``) SmoothGrad ran 1.29-1.34x faster with them, BNN and twin
#: alike, the twins' GradCAM 1.23-1.25x, Gradient and the BNNs' GradCAM 0.88-1.19x.
#: Training keeps XLA's defaults: there the classic kernels were 1.2-1.3x faster for the
#: ResNet-like models but slower for XNOR-Net's BNN, BinaryDenseNet and the MLP.
#: The maps agree up to float rounding.
CPU_COMPILER_OPTIONS: dict[str, str] = {_YNN_OPTION: ""}


def _top_level() -> bool:
    """True outside every trace (jit, vmap, grad), where a jit may take compiler options."""
    try:
        from jax._src import core as jax_core

        return bool(jax_core.trace_state_clean())
    except (ImportError, AttributeError):  # a JAX without it: never pass options
        return False


def _default_platform() -> str:
    device = jax.config.jax_default_device  # jax.default_device(...) context or config
    if device is None:
        return jax.default_backend()
    return device if isinstance(device, str) else device.platform


class _ClassicCpuKernels(threading.local):
    """Set while a program for XLA's classic CPU kernels (no YNNPACK) is traced."""

    active = False


_CLASSIC_CPU_KERNELS = _ClassicCpuKernels()


def _tracing_for_classic_kernels(fun: Callable, cpu_options: dict) -> Callable:
    if cpu_options.get(_YNN_OPTION, None) != "":
        return fun

    @functools.wraps(fun)
    def traced(*args, **kwargs):
        previous = _CLASSIC_CPU_KERNELS.active
        _CLASSIC_CPU_KERNELS.active = True
        try:
            return fun(*args, **kwargs)
        finally:
            _CLASSIC_CPU_KERNELS.active = previous

    return traced


class _PlatformJit:
    """``jax.jit(fun)`` whose top-level CPU calls compile with CPU_COMPILER_OPTIONS."""

    def __init__(self, fun: Callable, cpu_options: dict, jit_kwargs: dict):
        self._options_supported = True  # False once XLA rejected them (an older XLA)
        self._plain = jax.jit(fun, **jit_kwargs)
        self._cpu = jax.jit(
            _tracing_for_classic_kernels(fun, cpu_options),
            compiler_options=cpu_options,
            **jit_kwargs,
        )
        self._option_names = tuple(cpu_options)
        functools.update_wrapper(self, fun)

    def _pick(self):
        # Options only at the top level (JAX refuses them on a jit nested in a trace),
        # only for CPU, and never against the user's own XLA_FLAGS for the same option.
        if (
            self._options_supported
            and _top_level()
            and _default_platform() == "cpu"
            and _YNN_OPTION not in os.environ.get("XLA_FLAGS", "")
        ):
            return self._cpu
        return self._plain

    def __call__(self, *args, **kwargs):
        jitted = self._pick()
        if jitted is self._plain:
            return jitted(*args, **kwargs)
        try:
            return jitted(*args, **kwargs)
        except Exception as e:  # an XLA that does not take the options: plain jit from now on
            if not any(name in str(e) for name in self._option_names):
                raise
            self._options_supported = False
            return self._plain(*args, **kwargs)

    def lower(self, *args, **kwargs):
        """``jax.jit(...).lower`` of the variant a call made now would run."""
        return self._pick().lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        """``jax.jit(...).trace`` of the variant a call made now would run."""
        return self._pick().trace(*args, **kwargs)

    def eval_shape(self, *args, **kwargs):
        """Output shapes and dtypes, as ``jax.jit(...).eval_shape``."""
        return self._plain.eval_shape(*args, **kwargs)

    def _cache_size(self) -> int:
        return self._plain._cache_size() + self._cpu._cache_size()


def platform_jit(
    fun: Callable | None = None,
    *,
    cpu_compiler_options: dict | None = None,
    **jit_kwargs,
):
    """``jax.jit`` whose top-level calls on CPU compile with XLA options of their own.

    A call made outside any trace while the default device is a CPU compiles with
    ``cpu_compiler_options`` (:data:`CPU_COMPILER_OPTIONS` by default); every other call
    (GPU, TPU, or inside a user's own ``jit`` / ``vmap`` / ``grad``, where JAX takes no
    compiler options) is plain ``jax.jit(fun, **jit_kwargs)``. Each variant compiles once
    per shape, as ``jax.jit`` does. An ``XLA_FLAGS`` environment variable that sets the
    same option wins: the user's flags are left alone. Usable as a decorator, bare or
    through ``functools.partial(platform_jit, static_argnames=...)``.

    Args:
      fun: the function to compile.
      cpu_compiler_options: XLA options for CPU compilations; None for
        :data:`CPU_COMPILER_OPTIONS`.
      **jit_kwargs: passed to ``jax.jit`` (``static_argnames``, ``donate_argnums``...).

    Returns:
      The compiled callable, with ``lower`` and ``trace`` as ``jax.jit``'s.
    """
    options = dict(CPU_COMPILER_OPTIONS if cpu_compiler_options is None else cpu_compiler_options)
    if fun is None:
        return functools.partial(platform_jit, cpu_compiler_options=options, **jit_kwargs)
    return _PlatformJit(fun, options, jit_kwargs)
