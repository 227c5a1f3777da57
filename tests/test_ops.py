"""jbnn.ops against the plain JAX ops: same values and same gradients, bit for bit."""

from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbnn import ops


@pytest.mark.fast_compiles_after_first_case
@pytest.mark.parametrize("case", [0, 1, 2])
def test_marked_tests_compile_their_first_case_optimized(case):
    # tests/conftest.py: the value tests below check every case but the first with
    # unoptimized (fast) compiles, the first as jbnn's users compile it
    assert jax.config.values["jax_disable_most_optimizations"] == (case > 0)


POOLS = [
    # (input shape, window, strides, padding)
    ((2, 8, 8, 3), (3, 3), (2, 2), "SAME"),  # ResNet stem, even size: pads (0, 1)
    ((2, 7, 9, 3), (3, 3), (2, 2), "SAME"),  # odd sizes: pads (1, 1)
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),  # BinaryNet, non-overlapping
    ((2, 9, 8, 3), (2, 2), (2, 2), "VALID"),  # a row left out
    ((2, 7, 9, 3), (3, 3), (1, 1), "SAME"),  # stride 1, every input in 9 windows
    ((2, 6, 6, 2), (2, 2), (1, 1), "VALID"),  # QuickNet's transition
    ((2, 7, 9, 3), (2, 3), (2, 1), ((1, 0), (2, 1))),  # explicit, asymmetric
    ((2, 8, 10, 3), (2, 2), (3, 3), "VALID"),  # stride > window: some inputs in no window
]


def _inputs(shape, ties: bool, seed: int = 0):
    x = jax.random.normal(jax.random.key(seed), shape)
    return jnp.round(2 * x) / 2 if ties else x  # ties: many equal values per window


def _pool_grads(x, cotangent, window, strides, padding):
    plain = jax.grad(lambda x: jnp.sum(cotangent * nn.max_pool(x, window, strides, padding)))
    fast = jax.grad(lambda x: jnp.sum(cotangent * ops.max_pool(x, window, strides, padding)))
    return jax.jit(plain)(x), jax.jit(fast)(x)


@pytest.mark.fast_compiles_after_first_case
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape,window,strides,padding", POOLS)
def test_max_pool_equals_flax(shape, window, strides, padding, ties):
    x = _inputs(shape, ties)
    y = ops.max_pool(x, window, strides, padding)
    np.testing.assert_array_equal(y, nn.max_pool(x, window, strides, padding))
    cotangent = jax.random.normal(jax.random.key(1), y.shape)
    plain, fast = _pool_grads(x, cotangent, window, strides, padding)
    np.testing.assert_array_equal(fast, plain)  # bit for bit, ties included


def test_max_pool_ties_go_to_the_first_maximum():
    # all-equal windows: JAX's select_and_scatter_add (select ge) picks the first
    # element in row-major order; so must the fast backward pass.
    x = jnp.zeros((1, 4, 4, 1))
    grad = jax.grad(lambda x: jnp.sum(ops.max_pool(x, (3, 3), (2, 2), "SAME")))(x)[0, :, :, 0]
    expected = np.zeros((4, 4))
    expected[0, 0] = expected[0, 2] = expected[2, 0] = expected[2, 2] = 1.0
    np.testing.assert_array_equal(grad, expected)
    x = jnp.array([[1.0, 2, 2, 1], [2, 2, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])[None, :, :, None]
    grad = jax.grad(lambda x: jnp.sum(ops.max_pool(x, (3, 3), (2, 2), "SAME")))(x)[0, :, :, 0]
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[0, 2] = expected[3, 0] = expected[3, 2] = 1.0
    np.testing.assert_array_equal(grad, expected)


def test_max_pool_default_strides_and_bfloat16():
    x = _inputs((2, 6, 6, 4), ties=True).astype(jnp.bfloat16)
    y = ops.max_pool(x, (2, 2))  # strides None -> (1, 1), padding VALID, as in Flax
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, nn.max_pool(x, (2, 2)))
    ct = jnp.ones(y.shape, jnp.bfloat16)
    plain = jax.grad(lambda x: jnp.sum(ct * nn.max_pool(x, (2, 2))).astype(jnp.float32))(x)
    fast = jax.grad(lambda x: jnp.sum(ct * ops.max_pool(x, (2, 2))).astype(jnp.float32))(x)
    assert fast.dtype == jnp.bfloat16
    np.testing.assert_array_equal(fast, plain)


def test_max_pool_keeps_only_an_int8_index_for_its_backward_pass():
    # The VJP's residuals: the first maximum's tap number per window, int8, and no copy
    # of x or y (so that x can be freed after the forward pass).
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    y, pullback = jax.vjp(lambda x: ops.max_pool(x, (3, 3), (2, 2), "SAME"), x)
    residuals = [r for r in jax.tree.leaves(pullback) if hasattr(r, "dtype")]
    assert {(r.dtype, r.shape) for r in residuals if r.size} == {(np.dtype(np.int8), y.shape)}
    index = next(r for r in residuals if r.size)
    # against a loop: the row-major first maximum of each window
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    for b, i, j, c in np.ndindex(*y.shape):
        window = xp[b, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, c].ravel()
        assert index[b, i, j, c] == int(np.argmax(window))
    assert ops._index_dtype(9) == jnp.int8 and ops._index_dtype(127) == jnp.int32


def test_max_pool_under_vmap_and_scan():
    x = _inputs((3, 2, 8, 8, 3), ties=True)  # (S, B, H, W, C)

    def loss(pool, x):
        return jnp.sum(jnp.sin(pool(x, (3, 3), (2, 2), "SAME")))

    def scanned(pool):
        def body(total, xs):
            return total + jax.grad(lambda x: loss(pool, x))(xs), None

        return jax.lax.scan(body, jnp.zeros(x.shape[1:]), x)[0]

    vmapped = lambda pool: jax.vmap(jax.grad(lambda x: loss(pool, x)))(x)
    np.testing.assert_array_equal(
        jax.jit(lambda: vmapped(ops.max_pool))(), jax.jit(lambda: vmapped(nn.max_pool))()
    )
    np.testing.assert_allclose(
        jax.jit(lambda: scanned(ops.max_pool))(),
        jax.jit(lambda: scanned(nn.max_pool))(),
        rtol=1e-6,
        atol=1e-6,
    )


CONVS = [
    # (input shape, kernel shape, strides, padding, groups)
    ((2, 8, 8, 4), (3, 3, 4, 5), (1, 1), "SAME", 1),
    ((2, 8, 8, 4), (3, 3, 4, 5), (2, 2), "SAME", 1),  # pads (0, 1)
    ((2, 9, 11, 4), (3, 3, 4, 5), (2, 2), "SAME", 1),  # pads (1, 1)
    ((2, 12, 10, 3), (7, 7, 3, 4), (2, 2), "SAME", 1),  # ImageNet stem
    ((2, 9, 9, 4), (1, 1, 4, 6), (2, 2), "SAME", 1),  # ResNet downsampling shortcut
    ((2, 9, 9, 4), (3, 3, 4, 6), (3, 2), ((2, 0), (1, 3)), 1),
    ((2, 9, 9, 4), (2, 2, 4, 6), (3, 3), "VALID", 1),  # stride > kernel
    ((2, 9, 9, 4), (3, 3, 4, 6), (1, 1), ((3, 0), (0, 2)), 1),
    ((2, 9, 9, 4), (3, 3, 2, 6), (2, 2), "SAME", 2),  # grouped: the plain op
    ((2, 9, 9, 4), (3, 3, 1, 4), (1, 1), "SAME", 4),  # depthwise
]


def _lax_conv(x, w, strides, padding, groups):
    return jax.lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


@pytest.mark.fast_compiles_after_first_case
@pytest.mark.parametrize("shape,kernel,strides,padding,groups", CONVS)
def test_conv_equals_lax(shape, kernel, strides, padding, groups):
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), kernel)
    y = ops.conv(x, w, strides, padding, groups)
    np.testing.assert_array_equal(y, _lax_conv(x, w, strides, padding, groups))
    ct = jax.random.normal(jax.random.key(2), y.shape)
    loss = lambda conv: lambda x, w: jnp.sum(ct * conv(x, w, strides, padding, groups))
    plain = jax.jit(jax.grad(loss(_lax_conv), (0, 1)))(x, w)
    fast = jax.jit(jax.grad(loss(ops.conv), (0, 1)))(x, w)
    if groups == 1 and ops._use_space_to_depth(shape[-1], strides):
        # a strided few-channel convolution: on CPU its input gradient goes through the
        # space-to-depth form, the same sums in another order
        np.testing.assert_allclose(fast[0], plain[0], rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(fast[0], plain[0])  # input gradient, bit for bit
    np.testing.assert_array_equal(fast[1], plain[1])  # kernel gradient


SPACE_TO_DEPTH = [
    # (input shape, kernel shape, strides, padding): strided, few input channels
    ((2, 16, 16, 3), (7, 7, 3, 8), (2, 2), "SAME"),  # ImageNet stem, pads (2, 3)
    ((2, 15, 13, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),  # odd sizes, symmetric
    ((2, 9, 10, 3), (3, 3, 3, 5), (2, 2), "VALID"),  # a row no output reads
    ((2, 9, 10, 4), (5, 3, 4, 5), (2, 1), "SAME"),  # stride in one dimension
    ((2, 11, 7, 1), (3, 3, 1, 5), (3, 2), ((1, 2), (0, 1))),  # stride 3, explicit pads
    ((2, 8, 8, 2), (1, 1, 2, 5), (2, 2), "SAME"),  # 1x1, stride > kernel
    ((2, 10, 10, 3), (4, 4, 3, 5), (2, 2), ((5, 0), (0, 5))),  # padding > kernel / 2
]


@pytest.mark.fast_compiles_after_first_case
@pytest.mark.parametrize("shape,kernel,strides,padding", SPACE_TO_DEPTH)
def test_space_to_depth_conv_equals_the_strided_conv(shape, kernel, strides, padding):
    # The GPU form of a strided few-channel convolution: the same sums in another
    # order, so values and both gradients agree to float rounding, in float32 and bf16.
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), kernel)
    pads = ops._explicit_pads(padding, shape[1:3], kernel[:2], strides, "test")
    s2d = lambda x, w: ops._space_to_depth_conv(x, w, strides, pads)
    ref = lambda x, w: _lax_conv(x, w, strides, pads, 1)
    y = jax.jit(s2d)(x, w)
    assert y.shape == ref(x, w).shape
    np.testing.assert_allclose(y, ref(x, w), rtol=1e-5, atol=1e-5)
    ct = jax.random.normal(jax.random.key(2), y.shape)
    grads = lambda conv: jax.jit(jax.grad(lambda x, w: jnp.sum(ct * conv(x, w)), (0, 1)))(x, w)
    for got, want in zip(grads(s2d), grads(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if (shape, kernel) != SPACE_TO_DEPTH[0][:2]:
        return  # bfloat16 and vmap: the stem's case is enough (keeps the suite short)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    yb = s2d(xb, wb)
    assert yb.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(y)))
    np.testing.assert_allclose(
        yb.astype(jnp.float32), ref(xb, wb).astype(jnp.float32), atol=0.02 * scale
    )
    # batched like SmoothGrad's samples: vmap of the input gradient
    gx = jax.vmap(jax.grad(lambda x: jnp.sum(jnp.tanh(s2d(x[None], w)))))(x)
    gx_ref = jax.vmap(jax.grad(lambda x: jnp.sum(jnp.tanh(ref(x[None], w)))))(x)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_conv_picks_space_to_depth_only_on_gpu():
    # Where the computation is lowered decides: the compiled CPU forward pass keeps the
    # strided convolution (bit for bit, test_conv_equals_lax); a CUDA lowering (no GPU
    # needed) carries the stride-1 convolution over sh * sw * C_in = 12 channels, in the
    # platform's branch (that it runs there was measured on an H100: see docs/performance.md).
    x = jnp.ones((2, 16, 16, 3))
    w = jnp.ones((7, 7, 3, 8))
    f = jax.jit(lambda x: ops.conv(x, w, (2, 2), "SAME"))
    convs = [line for line in f.lower(x).compile().as_text().splitlines() if "convolution(" in line]
    assert convs and all("size=7x7 stride=2x2" in line for line in convs), convs
    assert "tensor<4x4x12x8xf32>" in f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert not ops._use_space_to_depth(5, (2, 2))
    assert not ops._use_space_to_depth(3, (1, 1))
    # The input gradient: on CPU through the rearranged form (a stride-1 4x4 convolution;
    # XLA runs the stride-dilated one in a generic loop), on TPUs the direct form.
    dx = jax.jit(jax.grad(lambda x: jnp.sum(ops.conv(x, w, (2, 2), "SAME") ** 2)))
    cpu = dx.lower(x).compile().as_text()
    assert "lhs_dilate" not in cpu and "size=4x4" in cpu, cpu
    assert "lhs_dilate = [2, 2]" in dx.trace(x).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.fast_compiles_after_first_case
@pytest.mark.parametrize(
    "shape,kernel",
    [((3, 6, 6, 8), (6, 6, 8, 16)), ((2, 3, 5, 4), (3, 5, 4, 7)), ((2, 1, 1, 5), (1, 1, 5, 3))],
)
def test_whole_input_dense_equals_the_convolution(shape, kernel):
    # The form of a convolution whose VALID window covers the whole input (XNOR-Net's
    # fc6): a matrix product. Checked against a float64 loop over taps, and its gradients
    # against the convolution's, to float rounding.
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), kernel)
    y = jax.jit(ops._whole_input_dense)(x, w)
    assert y.shape == (shape[0], 1, 1, kernel[-1])
    want = np.einsum("bhwc,hwco->bo", np.asarray(x, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(y[:, 0, 0], want, rtol=1e-5, atol=1e-5)
    ref = lambda x, w: _lax_conv(x, w, (1, 1), ((0, 0), (0, 0)), 1)
    ct = jax.random.normal(jax.random.key(2), y.shape)
    grads = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(ct * f(x, w)), (0, 1)))(x, w)
    for got, want in zip(grads(ops._whole_input_dense), grads(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_runs_a_whole_input_window_as_a_product_everywhere():
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 8))
    w = jax.random.normal(jax.random.key(1), (6, 6, 8, 16))
    f = jax.jit(lambda x, w: ops.conv(x, w, padding="VALID"))
    cpu = f.lower(x, w).compile().as_text()
    assert " dot(" in cpu and "convolution(" not in cpu, cpu
    ref = lambda x, w: _lax_conv(x, w, (1, 1), ((0, 0), (0, 0)), 1)
    # the same sums in another order; exact for +-1 operands (a BNN's), bit for bit
    np.testing.assert_allclose(f(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    xb, wb = jnp.where(x >= 0, 1.0, -1.0), jnp.where(w >= 0, 1.0, -1.0)
    np.testing.assert_array_equal(f(xb, wb), ref(xb, wb))
    # ... except in programs for XLA's classic CPU kernels (the explainers'), which run
    # the convolution faster
    classic = ops.platform_jit(lambda x, w: ops.conv(x, w, padding="VALID"))
    text = classic.lower(x, w).compile().as_text()
    assert "convolution(" in text and " dot(" not in text, text
    np.testing.assert_allclose(classic(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    for platform in ("cuda", "tpu"):
        lowered = f.trace(x, w).lower(lowering_platforms=(platform,)).as_text()
        assert "stablehlo.dot_general" in lowered, platform
        assert "stablehlo.convolution" not in lowered, platform
    # padding, or a window smaller than the input: an ordinary convolution everywhere
    for padding, kernel in (("SAME", (6, 6, 8, 16)), ("VALID", (5, 6, 8, 16))):
        k = jnp.ones(kernel)
        g = jax.jit(functools.partial(lambda x, k, p: ops.conv(x, k, padding=p), k=k, p=padding))
        lowered = g.trace(x).lower(lowering_platforms=("cuda",)).as_text()
        assert "stablehlo.dot_general" not in lowered


PRODUCT = [
    # (input shape, kernel shape, strides, padding): few output positions per channel
    ((1, 4, 4, 8), (3, 3, 8, 16), (1, 1), "SAME"),  # stage 4 at batch 1: 16 <= 16
    ((2, 3, 5, 6), (3, 3, 6, 32), (1, 1), "SAME"),
    ((2, 7, 7, 4), (3, 3, 4, 32), (2, 2), "SAME"),  # downsampling 3x3/2, pads (1, 1)
    ((1, 8, 8, 4), (3, 3, 4, 16), (2, 2), "SAME"),  # pads (0, 1)
    ((1, 7, 8, 3), (7, 7, 3, 16), (2, 2), "SAME"),  # a 7x7/2 stem
    ((2, 9, 9, 4), (3, 3, 4, 48), (3, 2), ((2, 0), (1, 3))),  # explicit, uneven pads
    ((2, 9, 9, 4), (2, 2, 4, 24), (3, 3), "VALID"),  # stride > kernel: rows no tap reads
    ((2, 4, 4, 6), (1, 1, 6, 32), (2, 2), "SAME"),  # 1x1 downsampling shortcut
    ((1, 5, 6, 4), (2, 3, 4, 32), (1, 2), ((3, 0), (0, 2))),  # padding > kernel / 2
]

# through ops.conv to second order (compiles most): one case per kind of padding
SECOND_ORDER = {PRODUCT[0], PRODUCT[2], PRODUCT[5], PRODUCT[8]}


def _slow_input_grad(x_shape, w, ct, strides, pads):
    """Loop over outputs and taps: dx[b, sh i + p - top, sw j + q - left] += w[p, q] ct."""
    w, ct = np.asarray(w, np.float64), np.asarray(ct, np.float64)
    (sh, sw), ((top, _), (left, _)) = strides, pads
    dx = np.zeros(x_shape)
    for b, i, j, p, q in np.ndindex(ct.shape[0], *ct.shape[1:3], *w.shape[:2]):
        row, col = sh * i + p - top, sw * j + q - left
        if 0 <= row < x_shape[1] and 0 <= col < x_shape[2]:
            dx[b, row, col] += w[p, q] @ ct[b, i, j]
    return dx


def _check_input_grad_form(form, shape, kernel, strides, padding):
    """``form(x_shape, dtype, w, ct, strides, pads)`` (an input gradient of a convolution)
    against JAX's transpose rule and a slow loop, in float32 and bfloat16 (bfloat16 in,
    bfloat16 out); returns x, w, pads and the cotangent."""
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), kernel)
    pads = ops._explicit_pads(padding, shape[1:3], kernel[:2], strides, "test")
    ct = jax.random.normal(jax.random.key(2), _lax_conv(x, w, strides, pads, 1).shape)
    got = jax.jit(lambda w, ct: form(x.shape, w.dtype, w, ct, strides, pads))
    (want,) = jax.vjp(lambda x: _lax_conv(x, w, strides, pads, 1), x)[1](ct)
    assert got(w, ct).shape == x.shape
    np.testing.assert_allclose(got(w, ct), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        got(w, ct), _slow_input_grad(x.shape, w, ct, strides, pads), atol=1e-4
    )
    gb = got(w.astype(jnp.bfloat16), ct.astype(jnp.bfloat16))
    assert gb.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(gb.astype(jnp.float32), want, atol=0.03 * scale)
    return x, w, pads, ct


@pytest.mark.fast_compiles_after_first_case
@pytest.mark.parametrize("shape,kernel,strides,padding", PRODUCT)
def test_product_input_gradient_equals_the_transposed_convolution(shape, kernel, strides, padding):
    # CPU form of the input gradient when the cotangent has few positions per channel:
    # the same sums in another order, against JAX's transpose rule and a slow loop.
    form = ops._product_input_grad
    x, w, pads, ct = _check_input_grad_form(form, shape, kernel, strides, padding)
    assert ops._use_product_input_grad(ct.shape, w.shape, pads)
    if (shape, kernel, strides, padding) not in SECOND_ORDER:
        return
    # through ops.conv, whose CPU backward takes this form here, to second order
    loss = lambda conv: lambda x, w: jnp.sum(ct * jnp.tanh(conv(x, w, strides, pads, 1)))
    fast = jax.jit(jax.grad(loss(ops.conv), (0, 1)))(x, w)
    plain = jax.jit(jax.grad(loss(_lax_conv), (0, 1)))(x, w)
    for a, b in zip(fast, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    hvp = lambda conv: jax.jit(jax.grad(lambda x: jnp.sum(jax.grad(loss(conv))(x, w) ** 2)))(x)
    np.testing.assert_allclose(hvp(ops.conv), hvp(_lax_conv), rtol=1e-4, atol=1e-4)


def test_conv_picks_the_product_input_gradient_only_on_cpu_for_few_positions():
    # Few positions per output channel: the compiled CPU gradient has one convolution (the
    # forward pass) and a dot; a CUDA lowering keeps the transposed convolution. Many
    # positions: the convolution, on CPU too.
    w = jnp.ones((3, 3, 8, 16))
    dx = lambda x: jax.jit(jax.grad(lambda x: jnp.sum(ops.conv(x, w) ** 2)))
    few, many = jnp.ones((1, 4, 4, 8)), jnp.ones((2, 4, 4, 8))  # 16 and 32 positions
    text = dx(few).lower(few).compile().as_text()
    assert text.count("convolution(") == 1 and " dot(" in text, text
    assert dx(many).lower(many).compile().as_text().count("convolution(") == 2
    cuda = dx(few).trace(few).lower(lowering_platforms=("cuda",)).as_text()
    assert cuda.count("stablehlo.convolution") == 2, cuda
    assert not ops._use_product_input_grad((1, 4, 4, 16), (3, 3, 8, 16), ((-1, 0), (0, 0)))
    # batched like SmoothGrad's samples: vmap folds 4 samples into the batch, still equal
    xs = jax.random.normal(jax.random.key(0), (4, 1, 4, 4, 8))
    per_sample = jax.vmap(lambda x: jax.grad(lambda x: jnp.sum(jnp.tanh(ops.conv(x, w))))(x))
    plain = jax.vmap(
        lambda x: jax.grad(lambda x: jnp.sum(jnp.tanh(_lax_conv(x, w, (1, 1), "SAME", 1))))(x)
    )
    np.testing.assert_allclose(per_sample(xs), plain(xs), rtol=1e-5, atol=1e-5)


PHASE = [
    # (input shape, kernel shape, strides, padding): strided input gradients by phase
    ((2, 8, 8, 5), (3, 3, 5, 6), (2, 2), "SAME"),  # ResNet downsampling 3x3/2, pads (0, 1)
    ((2, 9, 7, 5), (3, 3, 5, 6), (2, 2), "SAME"),  # odd sizes, pads (1, 1)
    ((1, 11, 10, 3), (7, 7, 3, 4), (2, 2), "SAME"),  # a 7x7/2 stem
    ((2, 8, 8, 5), (1, 1, 5, 6), (2, 2), "SAME"),  # 1x1 shortcut: three phases get zeros
    ((2, 10, 9, 5), (2, 3, 5, 6), (3, 2), ((2, 0), (1, 3))),  # explicit, uneven pads
    ((1, 9, 9, 5), (2, 2, 5, 6), (3, 3), "VALID"),  # stride > kernel: rows no tap reads
    ((2, 7, 8, 5), (3, 3, 5, 6), (1, 2), "VALID"),  # strided along one axis only
]


@pytest.mark.fast_compiles_after_first_case
@pytest.mark.parametrize("shape,kernel,strides,padding", PHASE)
def test_phase_input_gradient_equals_the_transposed_convolution(shape, kernel, strides, padding):
    # The explainers' CPU form of a strided convolution's input gradient: one stride-1
    # convolution per stride phase, against JAX's transpose rule and a slow loop.
    _check_input_grad_form(ops._phase_input_grad, shape, kernel, strides, padding)


def test_conv_takes_the_phase_input_gradient_only_in_classic_programs_for_large_inputs():
    # A 3x3/2 convolution over 16 x 28 x 28 (12544 positions): in platform_jit's CPU
    # programs its input gradient has no stride-dilated convolution, and equals JAX's;
    # a plain jit, or a smaller input (14 px, or 8 images), keeps the dilated one.
    w = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))
    grad = lambda x: jnp.tanh(x) * jax.grad(lambda x: jnp.sum(jnp.sin(ops.conv(x, w, 2))))(x)
    plain_grad = lambda x: (
        jnp.tanh(x) * jax.grad(lambda x: jnp.sum(jnp.sin(_lax_conv(x, w, (2, 2), "SAME", 1))))(x)
    )
    dilated = re.compile(r"lhs_dilate=2x2")
    for shape, phased in (
        ((16, 28, 28, 8), True),
        ((64, 14, 14, 8), False),
        ((8, 28, 28, 8), False),
    ):
        x = jax.random.normal(jax.random.key(0), shape)
        assert ops._use_phase_input_grad(shape, (2, 2), ((0, 1), (0, 1))) == phased
        classic = ops.platform_jit(grad)
        text = _compiled_text(classic, x)
        assert bool(dilated.search(text)) != phased, (shape, text)
        assert dilated.search(_compiled_text(jax.jit(grad), x)), shape
        np.testing.assert_allclose(classic(x), jax.jit(plain_grad)(x), rtol=1e-5, atol=1e-5)
    assert not ops._use_phase_input_grad((16, 28, 28, 8), (1, 1), ((1, 1), (1, 1)))
    assert not ops._use_phase_input_grad((16, 28, 28, 8), (2, 2), ((-1, 0), (0, 0)))


PADDED = [
    # (input shape, kernel shape, strides, padding, groups)
    ((2, 8, 8, 4), (3, 3, 4, 5), (1, 1), "SAME", 1),  # QuickNet's binary 3x3
    ((2, 9, 7, 4), (3, 3, 4, 5), (2, 2), "SAME", 1),
    ((2, 8, 8, 4), (3, 3, 4, 5), (1, 1), ((2, 0), (1, 3)), 1),
    ((2, 8, 8, 4), (3, 3, 1, 4), (1, 1), "SAME", 4),  # depthwise
    ((2, 8, 8, 4), (3, 3, 4, 5), (1, 1), "VALID", 1),  # no padding: pad_value unused
]


def _padded_lax_conv(x, w, strides, padding, groups, value):
    pads = (
        jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
        if isinstance(padding, str)
        else padding
    )
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)), constant_values=value)
    return _lax_conv(xp, w, strides, "VALID", groups)


@pytest.mark.fast_compiles_after_first_case
@pytest.mark.parametrize("shape,kernel,strides,padding,groups", PADDED)
def test_conv_pad_value_equals_padding_a_copy(shape, kernel, strides, padding, groups):
    # The forward pass is the padded copy's convolution itself; the backward pass splits
    # the sum (zero-padded convolution + the border's contribution). With +-1 inputs,
    # kernels and cotangents every sum is an exact integer: the same bits.
    sign = lambda a: jnp.where(a >= 0, 1.0, -1.0)
    x = sign(jax.random.normal(jax.random.key(0), shape))
    w = sign(jax.random.normal(jax.random.key(1), kernel))
    fast = lambda x, w: ops.conv(x, w, strides, padding, groups, pad_value=1.0)
    plain = lambda x, w: _padded_lax_conv(x, w, strides, padding, groups, 1.0)
    y = fast(x, w)
    np.testing.assert_array_equal(y, plain(x, w))
    ct = sign(jax.random.normal(jax.random.key(2), y.shape))
    grads = lambda conv, ct: jax.jit(jax.grad(lambda x, w: jnp.sum(ct * conv(x, w)), (0, 1)))
    for got, ref in zip(grads(fast, ct)(x, w), grads(plain, ct)(x, w), strict=True):
        np.testing.assert_array_equal(got, ref)
    # real values: the same forward bits, gradients equal up to float rounding
    xr = jax.random.normal(jax.random.key(3), shape)
    wr = jax.random.normal(jax.random.key(4), kernel)
    ctr = jax.random.normal(jax.random.key(5), y.shape)
    np.testing.assert_array_equal(fast(xr, wr), plain(xr, wr))
    for got, ref in zip(grads(fast, ctr)(xr, wr), grads(plain, ctr)(xr, wr), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_conv_bfloat16_and_second_order():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    np.testing.assert_array_equal(ops.conv(xb, wb, (2, 2)), _lax_conv(xb, wb, (2, 2), "SAME", 1))
    gb = jax.grad(lambda x: jnp.sum(ops.conv(x, wb, (2, 2))).astype(jnp.float32))(xb)
    ref = jax.grad(lambda x: jnp.sum(_lax_conv(x, wb, (2, 2), "SAME", 1)).astype(jnp.float32))(xb)
    assert gb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(gb, ref)

    # reverse over reverse: d/dw of |d/dx f|^2 goes through the custom backward pass
    def second(conv):
        inner = lambda w: jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, w, (2, 2), "SAME", 1))))(x)
        return jax.grad(lambda w: jnp.sum(inner(w) ** 2))(w)

    np.testing.assert_allclose(second(ops.conv), second(_lax_conv), rtol=1e-5, atol=1e-6)


def test_conv_input_gradient_keeps_an_hwio_kernel_inside_scan():
    # The reason for ops.conv: inside a loop body XLA keeps JAX's relabelled (O <-> I)
    # kernel and runs the input gradient in a generic convolution; ops.conv transposes
    # the kernel explicitly, so every convolution of the loop has an HWIO kernel.
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 4))

    def summed(conv):
        def body(total, i):
            g = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x + i, w, (1, 1), "SAME", 1))))(x)
            return total + g, None

        return jax.jit(lambda: jax.lax.scan(body, jnp.zeros_like(x), jnp.arange(3.0))[0])

    hlo = summed(ops.conv).lower().compile().as_text()
    labels = [
        line.split("dim_labels=")[1].split(",")[0]
        for line in hlo.split("\n")
        if "dim_labels=" in line
    ]
    assert labels and all("_01io->" in lab for lab in labels), labels
    np.testing.assert_allclose(summed(ops.conv)(), summed(_lax_conv)(), rtol=1e-5, atol=1e-5)


def test_models_use_the_fast_ops():
    from jbnn import models

    model = models.get("binarynet", binary=True, num_classes=3, width=0.0625)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    grad = jax.grad(lambda v, x: jnp.sum(model.apply(v, x)), argnums=1)
    jaxpr = str(jax.make_jaxpr(grad)(variables, x))
    assert "reduce_window_max" in jaxpr  # the model max-pools...
    assert "select_and_scatter_add" not in jaxpr  # ...without nn.max_pool's slow backward
    assert "permutation=(0, 1, 3, 2)" in jaxpr  # ops.conv's explicit HWIO -> HWOI


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.max_pool(jnp.zeros((4, 4, 3)), (2, 2)), "rank-4"),
        (lambda: ops.max_pool(jnp.zeros((1, 4, 4, 3), jnp.int32), (2, 2)), "floating"),
        (lambda: ops.max_pool(jnp.zeros((1, 4, 4, 3)), (2, 0)), "window_shape"),
        (lambda: ops.max_pool(jnp.zeros((1, 4, 4, 3)), (2, 2), (1, 1, 1)), "strides"),
        (lambda: ops.max_pool(jnp.zeros((1, 4, 4, 3)), (2, 2), padding="FULL"), "padding"),
        (lambda: ops.max_pool(jnp.zeros((1, 4, 4, 3)), (2, 2), padding=((1, 1),)), "padding"),
        (lambda: ops.conv(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3))), "HWIO"),
        (lambda: ops.conv(jnp.zeros((4, 4, 3)), jnp.zeros((3, 3, 3, 2))), "rank-4"),
        (lambda: ops.conv(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2)), (0, 1)), "strides"),
    ],
)
def test_bad_input_raises_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# --------------------------------------------------------------------------- platform_jit
def _conv_grad(x, w):  # a convolution's input gradient, the op the CPU options concern
    loss = lambda x: jnp.sum(ops.conv(jax.nn.relu(ops.conv(x, w)), w) ** 2)
    return jax.grad(loss)(x)


def _conv_inputs():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 32))  # >= 32 channels: XLA uses YNN
    w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) / 32
    return x, w


def _compiled_text(jitted, *args) -> str:
    return jitted.lower(*args).compile().as_text()


def test_platform_jit_compiles_cpu_calls_with_its_options():
    x, w = _conv_inputs()
    tuned = ops.platform_jit(_conv_grad)
    expected = jax.jit(_conv_grad)(x, w)
    np.testing.assert_allclose(tuned(x, w), expected, rtol=1e-5, atol=1e-5)
    # The options reach XLA: the tuned CPU program has no YNNPACK fusion left (XLA's
    # default one runs these convolutions as YNNPACK fusions on the CPUs measured here;
    # on a CPU where it does not, the two programs are simply alike).
    assert "ynn" not in _compiled_text(tuned, x, w)
    # An option XLA does not know is an error XLA raises, so the options are not ignored.
    bogus = ops.platform_jit(_conv_grad, cpu_compiler_options={"xla_no_such_option": "1"})
    with pytest.raises(Exception, match="xla_no_such_option"):
        bogus.lower(x, w).compile()
    cache = tuned._cache_size()
    tuned(x, w)
    assert tuned._cache_size() == cache  # no retrace, no recompilation


def test_platform_jit_inside_user_transformations():
    x, w = _conv_inputs()
    tuned = ops.platform_jit(_conv_grad)
    expected = tuned(x, w)
    # jit, vmap and grad around it: JAX takes no compiler options there, the plain jit runs.
    np.testing.assert_allclose(jax.jit(tuned)(x, w), expected, rtol=1e-5, atol=1e-5)
    per_example = jax.vmap(lambda xi: tuned(xi[None], w)[0])(x)
    np.testing.assert_allclose(per_example, expected, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda w: jnp.sum(tuned(x, w)))(w)
    ref = jax.grad(lambda w: jnp.sum(_conv_grad(x, w)))(w)
    np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-4)


def test_platform_jit_leaves_user_xla_flags_and_unknown_options_alone(monkeypatch):
    x, w = _conv_inputs()
    expected = jax.jit(_conv_grad)(x, w)
    # The user's own XLA_FLAGS for the same option win: the plain jit runs.
    tuned = ops.platform_jit(_conv_grad)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+eltwise")
    assert tuned._pick() is tuned._plain
    monkeypatch.delenv("XLA_FLAGS")
    assert tuned._pick() is tuned._cpu
    # Options an XLA rejects (an older XLA without them): one failed compile, then plain.
    old = ops.platform_jit(_conv_grad, cpu_compiler_options={"xla_no_such_option": "1"})
    np.testing.assert_allclose(old(x, w), expected, rtol=1e-5, atol=1e-5)
    assert old._pick() is old._plain
    # Other errors are the function's own and propagate.
    broken = ops.platform_jit(lambda x: x.reshape(5))
    with pytest.raises(TypeError, match="reshape"):
        broken(x)


def test_explainers_use_platform_jit():
    from jbnn.metrics import faithfulness
    from jbnn.saliency import cam, dataset, gradients

    for jitted in (
        gradients._gradient_jit,
        gradients._smoothgrad_jit,
        gradients._ig_jit,
        cam._cam_jit,
        cam._activation_and_gradient_jit,
        dataset._predict,
        faithfulness._curve,
        faithfulness._road,
    ):
        assert isinstance(jitted, ops._PlatformJit), jitted


# --------------------------------------------------------------------------- dense
def _plain_dense(x, k):
    return jax.lax.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_grads(f, x, k, g):
    return jax.jit(jax.grad(lambda x, k: jnp.vdot(f(x, k), g), (0, 1)))(x, k)


def _ternary(key, shape):
    return jax.random.randint(key, shape, -1, 2).astype(jnp.float32)  # -1, 0, +1


@pytest.mark.parametrize("x_shape", [(6, 40), (3, 5, 40)])
def test_dense_in_bfloat16_is_exact_for_binary_inputs_and_float32_close_for_real_ones(
    monkeypatch, x_shape
):
    monkeypatch.setattr(ops, "BF16_EXACT_PRODUCTS", True)  # any CPU: the bfloat16 form
    k = _ternary(jax.random.key(0), (40, 12))
    real = jax.random.normal(jax.random.key(1), x_shape) * 3.0
    binary = jnp.sign(real)
    g = jax.random.normal(jax.random.key(2), (*x_shape[:-1], 12))
    for x, exact in ((binary, True), (real, False)):
        fast = functools.partial(ops.dense, exact_kernel=True, exact_input=exact)
        y, y_plain = jax.jit(fast)(x, k), jax.jit(_plain_dense)(x, k)
        if exact:  # integer sums: bit for bit
            np.testing.assert_array_equal(y, y_plain)
        else:  # three bfloat16 parts: float32 rounding against a float64 product
            ref = np.asarray(x, np.float64) @ np.asarray(k, np.float64)
            scale = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(k, np.float64))
            assert np.max(np.abs(np.asarray(y) - ref) / (scale + 1e-30)) < 4e-7
        dx, dk = _dense_grads(fast, x, k, g)
        dx_plain, dk_plain = _dense_grads(_plain_dense, x, k, g)
        if x.ndim == 2:  # x^T g in float32, as JAX's own
            np.testing.assert_array_equal(dk, dk_plain)
        np.testing.assert_allclose(dk, dk_plain, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(dx, dx_plain, rtol=1e-6, atol=1e-5)
    # vmap over a leading axis, and non-finite inputs propagate as in float32
    xs = jnp.stack([real, 2 * real])
    vm = jax.vmap(lambda x: ops.dense(x, k, exact_kernel=True))(xs)
    np.testing.assert_allclose(vm, jax.vmap(lambda x: _plain_dense(x, k))(xs), rtol=1e-6, atol=1e-5)
    bad = real.at[0, ..., 0].set(jnp.inf).at[-1, ..., 1].set(jnp.nan)
    np.testing.assert_array_equal(
        np.isfinite(ops.dense(bad, k, exact_kernel=True)), np.isfinite(_plain_dense(bad, k))
    )


@pytest.mark.parametrize("x_shape", [(4, 300), (2, 3, 300)])
def test_dense_in_bfloat16_has_float32_accurate_second_derivatives(monkeypatch, x_shape):
    """Hessian-vector products of ||x k||^2 in x and in k against the analytic ones in
    float64: 2 (v k) k^T and 2 x^T (x w), w the direction in k (a cotangent through a
    bfloat16 residual or split was rounded: 3e-3 relative error)."""
    monkeypatch.setattr(ops, "BF16_EXACT_PRODUCTS", True)  # any CPU: the bfloat16 form
    k = _ternary(jax.random.key(0), (300, 20))
    x = jax.random.normal(jax.random.key(1), x_shape)
    v = jax.random.normal(jax.random.key(2), x_shape)
    w = _ternary(jax.random.key(3), (300, 20))
    loss = lambda x, k: jnp.sum(ops.dense(x, k, exact_kernel=True) ** 2)  # noqa: E731
    hvp_x = jax.jit(jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x, k), v)))(x)
    hvp_k = jax.jit(jax.grad(lambda k: jnp.vdot(jax.grad(loss, 1)(x, k), w)))(k)
    x64, k64, v64, w64 = (np.asarray(a, np.float64) for a in (x, k, v, w))
    want_x = 2 * (v64 @ k64) @ k64.T
    flat_x = x64.reshape(-1, 300)
    want_k = 2 * flat_x.T @ (flat_x @ w64)
    for got, want in ((hvp_x, want_x), (hvp_k, want_k)):
        assert np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)) < 2e-6


def test_dense_takes_bfloat16_only_on_cpu_for_exact_float32_kernels(monkeypatch):
    def has_bf16(fn, *args, platform=None):
        fn = lambda *a, fn=fn: fn(*a)  # a new function: traced again (the flag is read then)
        if platform is None:
            return "bf16[" in jax.jit(fn).lower(*args).compile().as_text()
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        return "bf16" in text

    x, k = jnp.ones((4, 8)), jnp.ones((8, 3))
    exact = lambda x, k: ops.dense(x, k, exact_kernel=True)
    monkeypatch.setattr(ops, "BF16_EXACT_PRODUCTS", True)
    assert has_bf16(exact, x, k)
    assert not has_bf16(lambda x, k: ops.dense(x, k), x, k)  # kernel not known exact
    assert not has_bf16(exact, x, k, platform="cuda")  # GPUs keep float32
    assert not has_bf16(exact, x.astype(jnp.float16), k.astype(jnp.float16))
    # platform_jit's CPU programs (XLA's classic kernels: bfloat16 products run slower)
    jitted = ops.platform_jit(exact)
    assert "bf16[" not in jitted.lower(x, k).compile().as_text()
    np.testing.assert_array_equal(jitted(x, k), _plain_dense(x, k))
    monkeypatch.setattr(ops, "BF16_EXACT_PRODUCTS", False)
    assert not has_bf16(exact, x, k)
    # None: decided by JBNN_BF16_PRODUCTS if set, else by the CPU's flags
    monkeypatch.setattr(ops, "BF16_EXACT_PRODUCTS", None)
    monkeypatch.delenv("JBNN_BF16_PRODUCTS", raising=False)
    assert has_bf16(exact, x, k) == ops._cpu_has_bf16_products()
    for value, expected in (("0", False), ("1", True)):
        monkeypatch.setenv("JBNN_BF16_PRODUCTS", value)
        assert has_bf16(exact, x, k) == expected
    monkeypatch.setenv("JBNN_BF16_PRODUCTS", "yes")
    with pytest.raises(ValueError, match="JBNN_BF16_PRODUCTS='yes'"):
        exact(x, k)


def test_dense_takes_bfloat16_products_only_on_cpus_with_amx():
    """AVX512-BF16 without AMX (an AMD EPYC) made the MLP's BNN step slower than float32
    products (1.20 against 1.11x its twin's): only AMX's bfloat16 tiles turn them on."""
    zen4 = {"avx512f", "avx512_bf16", "avx512_vnni", "avx2", "fma"}
    sapphire_rapids = zen4 | {"amx_bf16", "amx_tile", "amx_int8"}
    assert not ops._bf16_products_pay_off(zen4)
    assert not ops._bf16_products_pay_off({"avx2", "fma"})
    assert ops._bf16_products_pay_off(sapphire_rapids)


# --------------------------------------------------------------------------- channel sum
@pytest.mark.parametrize("shape", [(3, 3, 3, 16), (3, 3, 64, 8), (5, 7, 8), (100, 4), (6,)])
def test_channel_sum_equals_the_float64_sum_in_both_programs(shape):
    # 27 rows (one reduction everywhere), 576 (18 blocks of 32), 35 and 100 rows (a
    # zero-padded last block), a vector (one row); plain jit and the explainers' CPU
    # program (two stages there)
    x = jax.random.normal(jax.random.key(0), shape) * 3.0
    exact = np.abs(np.asarray(x, np.float64)).reshape(-1, shape[-1]).sum(0)
    fun = lambda x: ops.channel_sum(jnp.abs(x))  # noqa: E731
    for jitted in (jax.jit(fun), ops.platform_jit(fun)):
        got = jitted(x)
        assert got.shape == (shape[-1],) and got.dtype == x.dtype
        np.testing.assert_allclose(got, exact, rtol=2e-6)
    # differentiable: d sum(v * channel_sum(x)) / dx = v broadcast over the rows
    v = jnp.arange(1.0, shape[-1] + 1.0)
    g = jax.grad(lambda x: jnp.sum(v * ops.platform_jit(ops.channel_sum)(x)))(x)
    np.testing.assert_array_equal(g, np.broadcast_to(v, shape))


def _kernel_sized_results(text: str, size: int) -> int:
    """How many instructions of the entry computation (parameters aside) write an array
    of ``size`` elements: the arrays a program writes out at a kernel's size."""
    entry = text[text.index("\nENTRY") :]
    count = 0
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]", line)
        if m and "parameter(" not in line and m.group(1):
            count += math.prod(int(d) for d in m.group(1).split(",")) == size
    return count


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's classic CPU kernels")
def test_kernel_scales_write_no_magnitudes_out_in_the_explainers_cpu_programs(monkeypatch):
    # Bi-Real Net's magnitude-aware sign and XNOR-Net's alpha. In one reduction XLA's
    # classic CPU backend makes a reduce-window that does not fuse with |w|, so |w| is
    # written out first (the control below, one block as large as the kernel); in two
    # stages the first reduction reads w itself.
    from jbnn import layers
    from jbnn import quantizers as qz

    w = jax.random.normal(jax.random.key(1), (3, 3, 128, 64))
    scales = {  # name: (function, kernel-sized outputs of its own)
        "magnitude_aware_sign": (qz.magnitude_aware_sign, 1),
        "xnor alpha": (lambda w: layers._xnor_kernel(w, qz.ste_sign)[1], 0),
    }
    w64 = np.asarray(w, np.float64)
    exact = {
        "magnitude_aware_sign": np.where(w64 >= 0, 1.0, -1.0) * np.abs(w64).mean(axis=(0, 1, 2)),
        "xnor alpha": np.minimum(np.abs(w64), 1.0).mean(axis=(0, 1, 2)),
    }
    for name, (fun, own) in scales.items():
        text = _compiled_text(ops.platform_jit(fun), w)
        assert _kernel_sized_results(text, w.size) == own, name
        np.testing.assert_allclose(ops.platform_jit(fun)(w), exact[name], rtol=2e-6)
        np.testing.assert_allclose(jax.jit(fun)(w), exact[name], rtol=2e-6)
    monkeypatch.setattr(ops, "_CHANNEL_SUM_BLOCK", w.size)  # one reduction: the control
    for name, (fun, own) in scales.items():
        text = _compiled_text(ops.platform_jit(fun), w)
        assert "reduce-window(" in text and _kernel_sized_results(text, w.size) == own + 1, name


# --------------------------------------------------------------------------- forward mode
FORWARD_MODE_CONVS = [
    # (input shape, kernel shape, strides, padding, groups, pad_value): the custom_vjp
    # forms (grouped and whole-input-window convolutions are plain JAX already; XNOR-Net's
    # whole window is tested in test_models.py)
    ((2, 8, 8, 4), (3, 3, 4, 5), (1, 1), "SAME", 1, 0.0),
    ((2, 12, 10, 3), (7, 7, 3, 4), (2, 2), "SAME", 1, 0.0),  # stem: space-to-depth on GPU
    ((2, 9, 11, 4), (3, 3, 4, 5), (2, 2), "SAME", 1, 1.0),  # QuickNet's +1 padding
]


def _jvp_and_vjp(f, primals, tangents, cotangent):
    out, jvp_out = jax.jit(lambda p, t: jax.jvp(f, p, t))(primals, tangents)
    vjp_out = jax.jit(lambda p, c: jax.vjp(f, *p)[1](c))(primals, cotangent)
    return out, jvp_out, vjp_out


@pytest.mark.parametrize("shape,kernel,strides,padding,groups,value", FORWARD_MODE_CONVS)
def test_forward_mode_conv_takes_jvp_with_the_same_values_and_derivatives(
    shape, kernel, strides, padding, groups, value
):
    # By default these forms of ops.conv are custom_vjps, which jax.jvp refuses. Under
    # forward_mode the values are the default ones bit for bit, the JVP is the plain
    # padded lax convolution's, and reverse mode agrees with the default VJP.
    keys = jax.random.split(jax.random.key(3), 5)
    x, w = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], kernel)
    tx, tw = jax.random.normal(keys[2], shape), jax.random.normal(keys[3], kernel)
    fast = lambda x, w: ops.conv(x, w, strides, padding, groups, pad_value=value)
    plain = lambda x, w: _padded_lax_conv(x, w, strides, padding, groups, value)
    default = jax.jit(fast)(x, w)
    cotangent = jax.random.normal(keys[4], default.shape)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(fast, (x, w), (tx, tw))
    _, want_jvp, _ = _jvp_and_vjp(plain, (x, w), (tx, tw), cotangent)
    want_vjp = jax.jit(lambda x, w, c: jax.vjp(fast, x, w)[1](c))(x, w, cotangent)
    with ops.forward_mode():
        out, got_jvp, got_vjp = _jvp_and_vjp(fast, (x, w), (tx, tw), cotangent)
    assert not ops.forward_mode_active()
    np.testing.assert_array_equal(out, default)
    np.testing.assert_allclose(got_jvp, want_jvp, rtol=1e-5, atol=1e-4)
    for got, want in zip(got_vjp, want_vjp, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_forward_mode_max_pool_and_dense():
    x = jax.random.normal(jax.random.key(4), (2, 9, 8, 3))
    t = jax.random.normal(jax.random.key(5), x.shape)
    pool = lambda x: ops.max_pool(x, (3, 3), (2, 2), "SAME")
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(pool, (x,), (t,))
    with ops.forward_mode():
        y, jt = jax.jvp(pool, (x,), (t,))
    y_flax, jt_flax = jax.jvp(lambda x: nn.max_pool(x, (3, 3), (2, 2), "SAME"), (x,), (t,))
    np.testing.assert_array_equal(y, y_flax)
    np.testing.assert_array_equal(jt, jt_flax)
    # dense with an exact kernel (bfloat16 products where the CPU has them) is plain here
    k = jnp.sign(jax.random.normal(jax.random.key(6), (24, 5)))
    xs = jax.random.normal(jax.random.key(7), (3, 24))
    with ops.forward_mode():
        y, jt = jax.jvp(lambda x: ops.dense(x, k, exact_kernel=True), (xs,), (xs,))
    np.testing.assert_allclose(y, xs @ k, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(jt, xs @ k, rtol=1e-6, atol=1e-5)
