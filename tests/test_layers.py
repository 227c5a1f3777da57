"""Quantized layers against Flax's own layers and hand-written convolutions."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbnn import layers, ops
from jbnn import quantizers as qz
from jbnn.layers import QuantConv, QuantDense, quantized_layers

pytestmark = pytest.mark.usefixtures("fast_compiles")

KEY = jax.random.key(0)


def test_dense_without_quantizers_equals_nn_dense():
    x = jax.random.normal(KEY, (4, 7, 13))
    ours = QuantDense(5)
    variables = ours.init(KEY, x)
    ref = nn.Dense(5)
    ref_vars = ref.init(KEY, x)
    assert jax.tree_util.tree_map(jnp.shape, variables) == jax.tree_util.tree_map(
        jnp.shape, ref_vars
    )
    np.testing.assert_array_equal(ours.apply(variables, x), ref.apply(variables, x))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=(3, 3), padding="SAME"),
        dict(kernel_size=(3, 3), padding="VALID", strides=(2, 2)),
        dict(kernel_size=(5, 3), padding="SAME", strides=(2, 1)),
        dict(kernel_size=(1, 1), padding="SAME", use_bias=False),
        dict(kernel_size=(3, 3), padding=((1, 2), (0, 1))),
        dict(kernel_size=(3, 3), padding="SAME", feature_group_count=4),
    ],
)
def test_conv_without_quantizers_equals_nn_conv(kwargs):
    x = jax.random.normal(KEY, (2, 9, 10, 4))
    ours = QuantConv(8, **kwargs)
    variables = ours.init(KEY, x)
    ref = nn.Conv(8, **kwargs)
    ref_vars = ref.init(KEY, x)
    assert jax.tree_util.tree_map(jnp.shape, variables) == jax.tree_util.tree_map(
        jnp.shape, ref_vars
    )
    np.testing.assert_array_equal(ours.apply(variables, x), ref.apply(variables, x))


def test_binary_dense_is_a_sign_matmul():
    x = jax.random.normal(KEY, (3, 6))
    layer = QuantDense(4, input_quantizer="ste_sign", kernel_quantizer="ste_sign", use_bias=False)
    variables = layer.init(KEY, x)
    w = np.asarray(variables["params"]["kernel"])
    expected = np.where(np.asarray(x) >= 0, 1, -1) @ np.where(w >= 0, 1, -1)
    np.testing.assert_array_equal(layer.apply(variables, x), expected)


@pytest.mark.parametrize("padding", ["SAME", "same"])  # Larq / Keras spell it "same"
def test_pad_values_one_keeps_binary_conv_binary(padding):
    x = jax.random.normal(KEY, (1, 5, 5, 2))
    layer = QuantConv(
        3,
        (3, 3),
        padding=padding,
        pad_values=1.0,
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        use_bias=False,
    )
    variables = layer.init(KEY, x)
    w = np.where(np.asarray(variables["params"]["kernel"]) >= 0, 1.0, -1.0)  # (3,3,2,3)
    xb = np.pad(
        np.where(np.asarray(x) >= 0, 1.0, -1.0),
        ((0, 0), (1, 1), (1, 1), (0, 0)),
        constant_values=1.0,
    )
    expected = np.zeros((1, 5, 5, 3))
    for i in range(5):  # a slow loop as the independent reference
        for j in range(5):
            expected[0, i, j] = np.einsum("hwc,hwco->o", xb[0, i : i + 3, j : j + 3], w)
    np.testing.assert_allclose(layer.apply(variables, x), expected, atol=1e-5)
    # every output of a binary 3x3x2 conv padded with +1 has the parity of 18
    assert np.all(np.asarray(layer.apply(variables, x)) % 2 == 0)


@pytest.mark.parametrize("layer_cls", ["conv", "dense"])
def test_xnor_kernel_scale(layer_cls):
    # The output of the real layer whose kernel is alpha * sign(clip(w)) (numpy), with
    # latent weights beyond the clip; the bias is added after the scale.
    if layer_cls == "conv":
        x = jax.random.normal(KEY, (2, 4, 4, 3))
        layer = QuantConv(5, (3, 3), kernel_quantizer="ste_sign", kernel_scale=True)
        ref = QuantConv(5, (3, 3))
    else:
        x = jax.random.normal(KEY, (2, 7))
        layer = QuantDense(5, kernel_quantizer="ste_sign", kernel_scale=True)
        ref = QuantDense(5)
    variables = layer.init(KEY, x)
    w = np.asarray(variables["params"]["kernel"])
    w = 1.5 * w / np.abs(w).max()
    bias = np.linspace(-1.0, 1.0, 5).astype(np.float32)
    alpha = np.abs(np.clip(w, -1, 1)).mean(axis=tuple(range(w.ndim - 1)))
    assert np.any(np.abs(w) > 1.0)
    scaled = {"params": {"kernel": np.where(w >= 0, 1.0, -1.0) * alpha, "bias": bias}}
    np.testing.assert_allclose(
        layer.apply({"params": {"kernel": w, "bias": bias}}, x),
        ref.apply(scaled, x),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("layer_cls", ["conv", "dense"])
def test_xnor_layer_with_binary_input_is_alpha_times_an_exact_integer(layer_cls):
    # Binary input and kernel: each output is alpha times an integer sum of +-1 (numpy),
    # with one float32 rounding, whatever order the sum takes; where the integer is 0
    # the output is exactly 0, so the next sign is +1 (such ties are frequent: even
    # fan-ins, 36 and 18 here).
    rng = np.random.default_rng(0)
    quantizers = {"input_quantizer": "ste_sign", "kernel_quantizer": "ste_sign"}
    if layer_cls == "conv":
        x = rng.normal(size=(4, 5, 5, 4)).astype(np.float32)
        layer = QuantConv(8, (3, 3), kernel_scale=True, use_bias=False, **quantizers)
    else:
        x = rng.normal(size=(64, 18)).astype(np.float32)
        layer = QuantDense(8, kernel_scale=True, use_bias=False, **quantizers)
    variables = layer.init(KEY, x)
    w = np.asarray(variables["params"]["kernel"])
    xs, ws = np.where(x >= 0, 1.0, -1.0), np.where(w >= 0, 1.0, -1.0)
    if layer_cls == "conv":
        padded = np.pad(xs, ((0, 0), (1, 1), (1, 1), (0, 0)))
        counts = sum(
            np.einsum("bhwc,co->bhwo", padded[:, i : i + 5, j : j + 5], ws[i, j])
            for i in range(3)
            for j in range(3)
        )
    else:
        counts = xs @ ws
    _, alpha = jax.jit(layers._xnor_kernel, static_argnums=1)(w, qz.get("ste_sign"))
    alpha = np.asarray(alpha)
    want_alpha = np.abs(np.clip(w, -1, 1)).mean(axis=tuple(range(w.ndim - 1)))
    np.testing.assert_allclose(alpha, want_alpha, rtol=1e-6)
    got = np.asarray(jax.jit(layer.apply)(variables, x))
    np.testing.assert_array_equal(got, (counts * alpha.astype(np.float64)).astype(np.float32))
    assert np.mean(counts == 0) > 0.01 and np.all(got[counts == 0] == 0.0)


@pytest.mark.parametrize(
    "layer_cls,spec", [("conv", "ste_sign"), ("dense", "ste_sign"), ("dense", "approx_sign")]
)
def test_xnor_kernel_scale_gradient_equals_autodiff_of_the_formula(layer_cls, spec):
    # larq-zoo's xnor_weight_scale: alpha = mean |clip(w)| per filter, differentiable;
    # k = alpha * quantizer(clip(w)). jbnn writes the kernel's VJP out (two passes);
    # autodiff of the formula written out is the reference (up to summation order),
    # with TensorFlow's tie rules: clip_by_value passes the gradient at exactly +-1,
    # abs passes 0 at 0. Latent weights at exactly -1, 0, +1 and beyond the clip
    # exercise the ties.
    x = jax.random.normal(KEY, (3, 5, 5, 4))
    if layer_cls == "conv":
        layer = QuantConv(6, (3, 3), kernel_quantizer=spec, kernel_scale=True)
    else:
        layer = QuantDense(6, kernel_quantizer=spec, kernel_scale=True)
    variables = layer.init(KEY, x)
    w = variables["params"]["kernel"]
    w = w.reshape(-1).at[:4].set(jnp.array([-1.0, 0.0, 1.0, 1.5])).reshape(w.shape)
    params = {**variables["params"], "kernel": w}
    ct = jax.random.normal(jax.random.key(7), layer.apply({"params": params}, x).shape)

    def tf_clip(w):  # clip_by_value: the gradient passes on [-1, 1], bounds included
        inside = (w >= -1.0) & (w <= 1.0)
        return jnp.where(inside, w, jax.lax.stop_gradient(jnp.clip(w, -1.0, 1.0)))

    def formula(params, x):
        c = tf_clip(params["kernel"])
        tf_abs = jnp.sign(c) * c  # |c|, gradient sign(c): 0 at 0
        alpha = jnp.mean(tf_abs, axis=tuple(range(c.ndim - 1)), keepdims=True)
        plain = QuantConv(6, (3, 3)) if layer_cls == "conv" else QuantDense(6)
        kernel = alpha * qz.get(spec)(c)
        return plain.apply({"params": {**params, "kernel": kernel}}, x)

    loss = lambda f: jax.jit(jax.grad(lambda p, x: jnp.sum(ct * f(p, x)), (0, 1)))
    got = loss(lambda p, x: layer.apply({"params": p}, x))(params, x)
    want = loss(formula)(params, x)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_xnor_kernel_gradient_at_the_clip_bound_is_tensorflows():
    # larq-zoo's xnor_weight_scale in TensorFlow, by hand: w = (1, 0.5), x = (1, 1):
    # y = alpha * (sign(1) + sign(0.5)) = 2 alpha, alpha = (1 + 0.5) / 2 = 0.75;
    # dy/dw_i = 2 * dalpha/dw_i + alpha * ste'(w_i) = 2 * 1/2 + 0.75 = 1.75 for both:
    # clip_by_value passes the whole gradient at w = 1 (jnp.clip would halve it).
    layer = QuantDense(1, kernel_quantizer="ste_sign", kernel_scale=True, use_bias=False)
    x, w = jnp.ones((1, 2)), jnp.array([[1.0], [0.5]])
    grad = jax.grad(lambda w: layer.apply({"params": {"kernel": w}}, x).sum())(w)
    np.testing.assert_array_equal(layer.apply({"params": {"kernel": w}}, x), [[1.5]])
    np.testing.assert_allclose(np.ravel(grad), [1.75, 1.75], rtol=1e-6)
    # At w = 0: abs'(0) = 0 in TensorFlow, so only the binary path: alpha * 1 = 0.25.
    w0 = jnp.array([[0.0], [0.5]])
    grad0 = jax.grad(lambda w: layer.apply({"params": {"kernel": w}}, x).sum())(w0)
    np.testing.assert_allclose(np.ravel(grad0), [0.25, 1.0 + 0.25], rtol=1e-6)


def test_layer_surrogate_changes_input_gradient_only():
    x = jnp.linspace(-1.5, 1.5, 12).reshape(2, 6)
    base = QuantDense(3, input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    variables = base.init(KEY, x)
    other = base.clone(surrogate="approx_sign")
    np.testing.assert_array_equal(base.apply(variables, x), other.apply(variables, x))
    loss = lambda m: jax.grad(lambda v: jnp.sum(m.apply(variables, v)))(x)
    wsum = np.where(np.asarray(variables["params"]["kernel"]) >= 0, 1.0, -1.0).sum(axis=1)
    xn = np.asarray(x)
    np.testing.assert_allclose(loss(base), (np.abs(xn) <= 1) * wsum, atol=1e-6)
    np.testing.assert_allclose(
        loss(other), (2 - 2 * np.abs(xn)) * (np.abs(xn) <= 1) * wsum, atol=1e-5
    )


def test_quantized_layers_lists_paths_and_clips():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = QuantConv(4, kernel_quantizer="ste_sign", kernel_clip=1.25, name="c1")(x)
            x = nn.Conv(4, (3, 3), name="real")(x)
            x = x.reshape((x.shape[0], -1))
            return QuantDense(2, input_quantizer="ste_sign", name="head")(x)

    infos = quantized_layers(Net(), (1, 6, 6, 3))
    assert [i.path for i in infos] == [("c1",), ("head",)]
    assert infos[0].kernel_clip == 1.25 and infos[0].kernel_shape == (3, 3, 3, 4)
    assert infos[1].input_quantizer == "ste_sign" and infos[1].kernel_quantizer is None
    assert infos[1].input_shape == (1, 144) and infos[1].output_shape == (1, 2)


def test_conv_rejects_wrong_rank_and_int_input():
    with pytest.raises(ValueError, match=r"rank-4.*\(3, 4, 5\)"):
        QuantConv(2).init(KEY, jnp.ones((3, 4, 5)))
    with pytest.raises(TypeError, match="floating-point"):
        QuantConv(2).init(KEY, jnp.ones((1, 4, 4, 1), jnp.uint8))


def test_bfloat16_layers():
    x = jax.random.normal(KEY, (2, 6, 6, 3)).astype(jnp.bfloat16)
    layer = QuantConv(
        4, input_quantizer="ste_sign", kernel_quantizer="ste_sign", dtype=jnp.bfloat16
    )
    variables = layer.init(KEY, x)
    assert layer.apply(variables, x).dtype == jnp.bfloat16
    assert qz.get("ste_sign")(x).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs,bf16",
    [
        ({"input_quantizer": "ste_sign", "kernel_quantizer": "ste_sign"}, True),
        ({"input_quantizer": None, "kernel_quantizer": "ste_tern"}, True),
        ({"input_quantizer": "ste_sign", "kernel_quantizer": "magnitude_aware_sign"}, False),
        (
            # XNOR-Net: the binary kernel multiplies, alpha scales the output
            {"input_quantizer": "ste_sign", "kernel_quantizer": "ste_sign", "kernel_scale": True},
            True,
        ),
        ({"input_quantizer": "ste_sign", "kernel_quantizer": None}, False),
    ],
)
def test_quant_dense_multiplies_exact_kernels_in_bfloat16(monkeypatch, kwargs, bf16):
    layer = QuantDense(16, **kwargs)
    x = jax.random.normal(jax.random.key(0), (5, 32))
    variables = layer.init(jax.random.key(1), x)
    loss = lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x)))
    outputs = {}
    for enabled in (True, False):
        monkeypatch.setattr(ops, "BF16_EXACT_PRODUCTS", enabled)
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        text = step.lower(variables, x).compile().as_text()
        assert ("bf16[" in text) == (bf16 and enabled)
        outputs[enabled] = step(variables, x)
    for a, b in zip(jax.tree.leaves(outputs[True]), jax.tree.leaves(outputs[False]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_cls", [QuantDense, QuantConv])
@pytest.mark.parametrize(
    "kernel_clip", [0.0, -1.0, float("nan"), float("inf"), True, False, "1.0", (1.0,)]
)
def test_kernel_clip_must_be_none_or_a_finite_positive_number(layer_cls, kernel_clip):
    # the trainer clips latent weights to [-c, c]: c = -1 set every weight to -1, True
    # clipped to [-1, 1], and NaN, inf, 0 were taken as well
    x = jnp.ones((1, 4, 4, 2))
    layer = layer_cls(3, kernel_quantizer="ste_sign", kernel_clip=kernel_clip)
    match = f"{layer_cls.__name__}: kernel_clip must be None or a finite number > 0, got "
    with pytest.raises(ValueError, match=re.escape(match + repr(kernel_clip))):
        layer.init(KEY, x)
    with pytest.raises(ValueError, match=re.escape(match)):
        quantized_layers(layer, x.shape)


@pytest.mark.parametrize("kernel_clip", [None, 1, 1.25, np.float32(1.3), 1e-3])
def test_valid_kernel_clips_are_recorded_as_given(kernel_clip):
    layer = QuantConv(3, kernel_quantizer="ste_sign", kernel_clip=kernel_clip)
    layer.init(KEY, jnp.ones((1, 4, 4, 2)))
    (info,) = quantized_layers(layer, (1, 4, 4, 2))
    assert info.kernel_clip is kernel_clip


def test_conv_takes_an_int_kernel_size_and_stride_as_a_square_pair():
    x = jax.random.normal(KEY, (2, 9, 9, 3))
    ints = QuantConv(4, kernel_size=3, strides=2, input_quantizer="ste_sign")
    pairs = QuantConv(4, kernel_size=(3, 3), strides=(2, 2), input_quantizer="ste_sign")
    variables = ints.init(KEY, x)
    assert variables["params"]["kernel"].shape == (3, 3, 3, 4)
    np.testing.assert_array_equal(ints.apply(variables, x), pairs.apply(variables, x))
    # as nn.Conv with pairs (nn.Conv takes an int kernel_size as a 1-D window)
    ref = nn.Conv(4, (3, 3), strides=2)
    plain = QuantConv(4, kernel_size=3, strides=2)
    np.testing.assert_array_equal(plain.apply(variables, x), ref.apply(variables, x))
    (info,) = quantized_layers(ints, x.shape)
    assert info.kernel_shape == (3, 3, 3, 4) and info.output_shape == (2, 5, 5, 4)


@pytest.mark.parametrize(
    "field, value",
    [
        ("kernel_size", (3, 3, 3)),
        ("kernel_size", (3,)),
        ("kernel_size", 0),
        ("kernel_size", (0, 3)),
        ("kernel_size", 2.5),
        ("kernel_size", "3"),
        ("kernel_size", True),
        ("strides", (1, 1, 1)),
        ("strides", -1),
        ("strides", (1.5, 1)),
        ("strides", False),
    ],
)
def test_conv_rejects_bad_kernel_size_and_strides(field, value):
    layer = QuantConv(4, **{field: value})
    match = f"QuantConv: {field} must be two positive ints (h, w), got {value!r}"
    with pytest.raises(ValueError, match=re.escape(match)):
        layer.init(KEY, jnp.ones((1, 8, 8, 3)))


def test_xnor_alpha_in_float16_does_not_overflow():
    # alpha = mean min(|w|, 1) over fan_in = 70000 > 65504 (float16's max): the divisor
    # was inf, alpha and its gradient 0
    w = jnp.asarray(np.random.default_rng(0).uniform(-0.02, 0.02, (70000, 2)), jnp.float16)
    want = np.abs(np.asarray(w, np.float64)).mean(0)
    layer = QuantDense(2, kernel_quantizer="ste_sign", kernel_scale=True, use_bias=False)
    _, alpha, _ = layer.quantized_kernel(w, None)
    assert alpha.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(alpha, np.float64), want, rtol=1e-3)
    # d sum(alpha) / dw = sign(w) / fan_in, a float16 subnormal
    grad = jax.grad(lambda w: jnp.sum(layer.quantized_kernel(w, None)[1]).astype(jnp.float32))
    want_grad = np.sign(np.asarray(w, np.float64)) / 70000
    np.testing.assert_allclose(np.asarray(grad(w), np.float64), want_grad, rtol=1e-2)
    with ops.forward_mode():  # larq-zoo's formula with custom_jvp tie rules
        alpha_fwd, alpha_dot = jax.jvp(
            lambda w: layer.quantized_kernel(w, None)[1], (w,), (jnp.ones_like(w),)
        )
    np.testing.assert_allclose(np.asarray(alpha_fwd, np.float64), want, rtol=1e-3)
    np.testing.assert_allclose(
        np.asarray(alpha_dot, np.float64),
        np.sign(np.asarray(w, np.float64)).sum(0) / 70000,
        rtol=1e-2,
    )
