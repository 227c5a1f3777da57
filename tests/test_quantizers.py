"""Quantizers against REFERENCE.md section 1, written out independently in NumPy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbnn import ops
from jbnn import quantizers as qz

pytestmark = pytest.mark.usefixtures("fast_compiles")

# A dense grid that contains 0, +-1 (the default clip), +-0.05 (the ternary threshold),
# +-1.25 / +-1.3 (larq-zoo clips) and the DoReFa half-way points.
GRID = np.unique(
    np.concatenate(
        [
            np.linspace(-3, 3, 601),
            [0.0, 1.0, -1.0, 0.05, -0.05, 1.25, -1.25, 1.3, -1.3, 0.5, -0.5, 1 / 6, 0.5 / 3],
        ]
    )
).astype(np.float32)


def np_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def np_clip_mask(x, c):
    return np.ones_like(x) if c is None else (np.abs(x) <= c).astype(np.float64)


def elementwise_grad(f, x):
    return jax.vmap(jax.grad(lambda v: f(v)))(jnp.asarray(x))


def sum_grad(f, x):
    return jax.grad(lambda v: jnp.sum(f(v)))(jnp.asarray(x))


@pytest.mark.parametrize("clip_value", [1.0, 1.25, 0.5, None])
def test_ste_sign(clip_value):
    f = qz.get("ste_sign", clip_value=clip_value)
    np.testing.assert_array_equal(f(GRID), np_sign(GRID))
    np.testing.assert_allclose(elementwise_grad(f, GRID), np_clip_mask(GRID, clip_value), atol=1e-6)


def test_sign_of_zero_is_plus_one_for_every_sign_quantizer():
    for name in ("ste_sign", "approx_sign", "swish_sign"):
        assert float(qz.get(name)(jnp.float32(0.0))) == 1.0
    assert float(qz.get("magnitude_aware_sign")(jnp.array([[0.0], [2.0]]))[0, 0]) == 1.0
    assert float(qz.get("ste_heaviside")(jnp.float32(0.0))) == 0.0


def test_approx_sign():
    f = qz.get("approx_sign")
    np.testing.assert_array_equal(f(GRID), np_sign(GRID))
    expected = (2 - 2 * np.abs(GRID)) * (np.abs(GRID) <= 1)
    np.testing.assert_allclose(elementwise_grad(f, GRID), expected, atol=1e-6)


@pytest.mark.parametrize("beta", [5.0, 2.0])
def test_swish_sign(beta):
    f = qz.get("swish_sign", beta=beta)
    np.testing.assert_array_equal(f(GRID), np_sign(GRID))
    x = GRID.astype(np.float64)
    expected = beta * (2 - beta * x * np.tanh(beta * x / 2)) / (1 + np.cosh(beta * x))
    np.testing.assert_allclose(elementwise_grad(f, GRID), expected, atol=1e-6)


def test_spot_values_from_reference():
    x = jnp.array([-2, -1, -0.5, 0, 0.5, 1, 2], jnp.float32)
    np.testing.assert_array_equal(qz.ste_sign(x), [-1, -1, -1, 1, 1, 1, 1])
    np.testing.assert_array_equal(elementwise_grad(qz.get("ste_sign"), x), [0, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(elementwise_grad(qz.approx_sign, x), [0, 0, 1, 2, 1, 0, 0])
    g = elementwise_grad(qz.get("swish_sign"), x)
    assert float(g[3]) == pytest.approx(5.0)
    assert float(g[2]) == pytest.approx(-0.0846, abs=1e-4)
    assert float(g[4]) == pytest.approx(-0.0846, abs=1e-4)


@pytest.mark.parametrize("clip_value", [1.0, None])
def test_magnitude_aware_sign(clip_value):
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(np.float32)
    w[0, 0, 0, 0] = 0.0
    w[1, 1, 1, 1] = 1.0
    f = qz.get("magnitude_aware_sign", clip_value=clip_value)
    scale = np.abs(w).mean(axis=(0, 1, 2), keepdims=True)  # one scale per output channel
    np.testing.assert_allclose(f(w), scale * np_sign(w), rtol=1e-6)
    # d/dw sum(a * sign(w)) with a held constant = a * 1[|w| <= c]
    np.testing.assert_allclose(sum_grad(f, w), scale * np_clip_mask(w, clip_value), rtol=1e-6)


def test_ste_heaviside():
    f = qz.get("ste_heaviside")
    np.testing.assert_array_equal(f(GRID), (GRID > 0).astype(np.float32))
    np.testing.assert_allclose(elementwise_grad(f, GRID), np_clip_mask(GRID, 1.0))


@pytest.mark.parametrize("threshold", [0.05, 0.3])
def test_ste_tern_fixed_threshold(threshold):
    f = qz.get("ste_tern", threshold_value=threshold)
    expected = np.where(
        GRID >= np.float32(threshold), 1, np.where(GRID <= -np.float32(threshold), -1, 0)
    )
    np.testing.assert_array_equal(f(GRID), expected)
    np.testing.assert_allclose(sum_grad(f, GRID), np_clip_mask(GRID, 1.0))


def test_ste_tern_twn_threshold():
    f = qz.get("ste_tern", ternary_weight_networks=True)
    d = np.float32(0.7) * np.abs(GRID).mean(dtype=np.float32)
    expected = np.where(GRID >= d, 1, np.where(GRID <= -d, -1, 0))
    np.testing.assert_array_equal(f(GRID), expected)
    # The data-dependent threshold carries no gradient.
    np.testing.assert_allclose(sum_grad(f, GRID), np_clip_mask(GRID, 1.0))


@pytest.mark.parametrize("k_bit", [1, 2, 3])
def test_dorefa_activations(k_bit):
    n = 2**k_bit - 1
    f = qz.get("dorefa", k_bit=k_bit)
    expected = np.round(n * np.clip(GRID, 0, 1)) / n  # numpy rounds half to even too
    np.testing.assert_allclose(f(GRID), expected, atol=1e-6)
    # straight through the rounding; the clip's gradient passes at both boundaries
    np.testing.assert_allclose(sum_grad(f, GRID), ((GRID >= 0) & (GRID <= 1)).astype(float))


def test_dorefa_half_to_even():
    f = qz.get("dorefa", k_bit=1)  # n = 1: round(x) on [0, 1]
    np.testing.assert_array_equal(f(jnp.array([0.5, 0.49, 0.51])), [0.0, 0.0, 1.0])


@pytest.mark.parametrize("k_bit", [1, 2])
def test_dorefa_weights(k_bit):
    n = 2**k_bit - 1
    w = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
    t = np.tanh(w.astype(np.float64))
    t = t / (2 * np.abs(t).max()) + 0.5
    expected = 2 * np.round(n * t) / n - 1
    f = qz.get("dorefa", k_bit=k_bit, mode="weights")
    np.testing.assert_allclose(f(w), expected, atol=1e-6)
    # Straight through the rounding: d/dw sum(2 t - 1) with max|tanh| held constant.
    m = np.abs(np.tanh(w.astype(np.float64))).max()
    expected_grad = (1 - np.tanh(w.astype(np.float64)) ** 2) / m
    np.testing.assert_allclose(sum_grad(f, w), expected_grad, rtol=1e-5, atol=1e-6)


ALL = [
    ("ste_sign", {}),
    ("approx_sign", {}),
    ("swish_sign", {}),
    ("magnitude_aware_sign", {}),
    ("ste_heaviside", {}),
    ("ste_tern", {}),
    ("ste_tern", {"ternary_weight_networks": True}),
    ("dorefa", {}),
    ("dorefa", {"mode": "weights"}),
    ("identity", {}),
]


@pytest.mark.parametrize("name,hparams", ALL)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_is_kept(name, hparams, dtype):
    f = qz.get(name, **hparams)
    x = jnp.asarray(GRID[:64].reshape(8, 8), dtype)
    assert f(x).dtype == dtype
    assert sum_grad(f, x).dtype == dtype


@pytest.mark.parametrize("name,hparams", ALL)
def test_jit_vmap_grad(name, hparams):
    f = qz.get(name, **hparams)
    x = jnp.asarray(GRID[:60].reshape(6, 10))
    per_row = jax.jit(jax.vmap(jax.grad(lambda r: jnp.sum(f(r)))))(x)
    loop = np.stack([np.asarray(jax.grad(lambda r: jnp.sum(f(r)))(row)) for row in x])
    np.testing.assert_allclose(per_row, loop, atol=1e-6)


def test_elementwise_jit_vmap_grad_of_scalars():
    # against the analytic derivatives (it checked only the shape, which cannot fail)
    x = GRID.astype(np.float64)
    expected = {
        "ste_sign": np_clip_mask(x, 1.0),
        "approx_sign": (2 - 2 * np.abs(x)) * (np.abs(x) <= 1),
        "swish_sign": 5 * (2 - 5 * x * np.tanh(5 * x / 2)) / (1 + np.cosh(5 * x)),
        "ste_heaviside": np_clip_mask(x, 1.0),
        "dorefa": ((x >= 0) & (x <= 1)).astype(float),
    }
    for name, want in expected.items():
        g = jax.jit(jax.vmap(jax.grad(qz.get(name))))(jnp.asarray(GRID))
        np.testing.assert_allclose(g, want, atol=1e-6, err_msg=name)


def test_get_identity_and_specs():
    assert qz.get(None) is qz.identity
    assert qz.get("identity") is qz.identity
    f = qz.get("ste_sign(clip_value=0.5)")
    np.testing.assert_array_equal(elementwise_grad(f, [0.4, 0.5, 0.6]), [1, 1, 0])
    g = qz.get("ste_tern(threshold_value=0.3, clip_value=None)")
    np.testing.assert_array_equal(g(jnp.array([0.29, 0.3])), [0, 1])
    own = lambda x: x * 2
    assert qz.get(own) is own


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="Unknown quantizer 'ste_sgn'.*ste_sign.*dorefa"):
        qz.get("ste_sgn")


def test_unknown_hparam_is_an_error():
    with pytest.raises(ValueError, match="clip"):
        qz.get("approx_sign", clip_value=1.0)
    with pytest.raises(ValueError, match="mode"):
        qz.get("dorefa", mode="weight")
    with pytest.raises(ValueError, match="keywords"):
        qz.get("ste_sign(1.0)")


@pytest.mark.parametrize(
    "surrogate,expected",
    [
        ("ste_sign", lambda x: np_clip_mask(x, 1.0)),
        ("ste_sign(clip_value=2.0)", lambda x: np_clip_mask(x, 2.0)),
        ("approx_sign", lambda x: (2 - 2 * np.abs(x)) * (np.abs(x) <= 1)),
        (
            "swish_sign(beta=3.0)",
            lambda x: 3 * (2 - 3 * x * np.tanh(3 * x / 2)) / (1 + np.cosh(3 * x)),
        ),
        ("identity", np.ones_like),
    ],
)
def test_surrogate_override_keeps_forward_and_changes_backward(surrogate, expected):
    base = qz.get("ste_sign")
    f = qz.with_surrogate(base, surrogate)
    np.testing.assert_array_equal(np.asarray(f(GRID)), np.asarray(base(GRID)))  # bitwise
    np.testing.assert_allclose(
        elementwise_grad(f, GRID), expected(GRID.astype(np.float64)), atol=1e-6
    )


def test_surrogate_unknown_name():
    with pytest.raises(ValueError, match="Unknown surrogate 'tanh'"):
        qz.surrogate_gradient("tanh")


def test_non_float_input_is_rejected_by_layers():
    from jbnn.layers import QuantDense

    layer = QuantDense(4, input_quantizer="ste_sign")
    with pytest.raises(TypeError, match="floating-point"):
        layer.init(jax.random.key(0), jnp.ones((2, 3), jnp.int32))


@pytest.mark.parametrize("name", qz.names())
def test_integer_valued_names_exactly_the_quantizers_with_outputs_in_minus_one_zero_one(name):
    # jbnn.ops.dense multiplies by such a kernel in bfloat16: the claim must hold
    x = jnp.asarray(np.random.default_rng(0).normal(0, 1, 4096).astype(np.float32))
    values = np.unique(np.asarray(qz.get(name)(x)))
    in_set = bool(np.isin(values, [-1.0, 0.0, 1.0]).all())
    assert qz.integer_valued(name) == in_set, values[:10]
    assert qz.integer_valued(f"{name}()") == in_set
    assert not qz.integer_valued(None) and not qz.integer_valued(qz.ste_sign)


# A NaN in a network must not be hidden as -1, 0 or +1: Larq's sign is
# tf.sign(tf.sign(x) + 0.1) and its ternarization sign(sign(x + d) + sign(x - d)), NaN for
# NaN. Hand values: sign(-0.0) = +1, sign(+-inf) = +-1, H(-0.0) = 0.
NAN_ROW = np.array([np.nan, -0.0, np.inf, -np.inf, 0.3, -0.3], np.float32)
NAN_EXPECTED = {
    "ste_sign": [np.nan, 1, 1, -1, 1, -1],
    "approx_sign": [np.nan, 1, 1, -1, 1, -1],
    "swish_sign": [np.nan, 1, 1, -1, 1, -1],
    "ste_heaviside": [np.nan, 0, 1, 0, 1, 0],
    "ste_tern": [np.nan, 0, 1, -1, 1, -1],
    "dorefa": [np.nan, 0, 1, 0, 1 / 3, 0],
}


@pytest.mark.parametrize("name", sorted(NAN_EXPECTED))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nan_input_gives_nan_output(name, dtype):
    f = qz.get(name)
    for apply in (f, jax.jit(f)):
        got = np.asarray(apply(jnp.asarray(NAN_ROW, dtype)), np.float32)
        np.testing.assert_allclose(got, NAN_EXPECTED[name], rtol=1e-2)  # NaN == NaN here


def test_nan_input_of_the_data_dependent_quantizers():
    # magnitude_aware_sign: the NaN's output channel is NaN, the other one intact
    w = np.array([[np.nan, 0.5], [1.0, -1.5]], np.float32)
    np.testing.assert_array_equal(
        qz.get("magnitude_aware_sign")(w), [[np.nan, 1.0], [np.nan, -1.0]]
    )
    # a NaN threshold (TWN, dorefa's max|tanh|) makes every output NaN, as in Larq
    x = jnp.asarray([np.nan, 0.5, -0.5, 0.0])
    assert np.all(np.isnan(qz.get("ste_tern(ternary_weight_networks=True)")(x)))
    assert np.all(np.isnan(qz.get("dorefa(mode='weights')")(x)))


@pytest.mark.parametrize("name,hparams", [a for a in ALL if a[0] != "identity"])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_input_is_a_type_error(name, hparams, dtype):
    # an integer input was silently truncated (ste_tern's 0.05 threshold became 0,
    # magnitude_aware_sign's scale 1.5 became 1): a clear error instead
    f = qz.get(name, **hparams)
    x = jnp.asarray([[0, 1], [1, 0]], dtype)
    for apply in (f, jax.jit(f)):
        with pytest.raises(TypeError, match=f"{name} expects a floating-point input.*{x.dtype}"):
            apply(x)


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3])
def test_ste_tern_is_larqs_formula(threshold):
    # Larq: tf.sign(tf.sign(x + d) + tf.sign(x - d)); at d = 0 that is sign(x), 0 at 0
    d = np.float32(threshold)
    expected = np.sign(np.sign(GRID + d) + np.sign(GRID - d))
    np.testing.assert_array_equal(qz.get("ste_tern", threshold_value=threshold)(GRID), expected)


def test_ste_tern_twn_keeps_a_zero_kernel_zero():
    # d = 0.7 * mean|0| = 0: Larq gives sign(sign(0) + sign(0)) = 0 (it was +1 everywhere)
    f = qz.get("ste_tern(ternary_weight_networks=True)")
    np.testing.assert_array_equal(f(jnp.zeros((3, 3, 2, 4))), np.zeros((3, 3, 2, 4)))
    np.testing.assert_array_equal(f(jnp.array([0.0, 0.0, 0.0, 3.0])), [0, 0, 0, 1])  # d = 0.525


SPOT = np.array([-2, -1, -0.5, 0, 0.5, 1, 2], np.float32)


def _swish_grad_np(x, beta=5.0):
    return beta * (2 - beta * x * np.tanh(beta * x / 2)) / (1 + np.cosh(beta * x))


@pytest.mark.parametrize(
    "quantizer,expected",
    [
        # d/dx [q'(x) x + q(x)] = q''(x) x + 2 q'(x), q' the surrogate derivative
        ("ste_sign", [0, 2, 2, 2, 2, 2, 0]),
        ("ste_heaviside", [0, 2, 2, 2, 2, 2, 0]),
        ("ste_tern", [0, 2, 2, 2, 2, 2, 0]),
        ("dorefa", [0, 0, 0, 2, 2, 2, 0]),  # both clip bounds pass
        ("approx_sign", [0, -2, 1, 4, 1, -2, 0]),  # (4 - 6|x|) 1[|x| <= 1]
        (
            "swish_sign",  # the surrogate's own derivative by central differences
            lambda x: (
                x * (_swish_grad_np(x + 1e-6) - _swish_grad_np(x - 1e-6)) / 2e-6
                + 2 * _swish_grad_np(x)
            ),
        ),
        ("surrogate", [0, -2, 1, 4, 1, -2, 0]),  # ste_sign with approx_sign's backward
    ],
)
def test_second_order_gradient_sees_the_straight_through_derivative(quantizer, expected):
    # grad of grad of sum(q(x) * x): the forward value q(x) in the first gradient must
    # carry the surrogate derivative too (each _fwd computed it without one: 1 * q')
    if quantizer == "surrogate":
        f = qz.with_surrogate(qz.get("ste_sign"), "approx_sign")
    else:
        f = qz.get(quantizer)
    first = jax.grad(lambda x: jnp.sum(f(x) * x))
    got = jax.jit(jax.grad(lambda x: jnp.sum(first(x))))(jnp.asarray(SPOT))
    want = expected(SPOT.astype(np.float64)) if callable(expected) else expected
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_float64_surrogate_gradients_are_float64_accurate():
    # under jax_enable_x64 the surrogates were computed in float32 (errors 8e-8, 3e-7)
    x = np.array([0.1, 1 / 3, -0.7, 0.3], np.float64)
    with jax.enable_x64(True):
        for f, want in [
            (qz.approx_sign, 2 - 2 * np.abs(x)),
            (qz.swish_sign, _swish_grad_np(x)),
            (qz.with_surrogate(qz.ste_sign, "approx_sign"), 2 - 2 * np.abs(x)),
        ]:
            got = jax.vmap(jax.grad(f))(jnp.asarray(x, jnp.float64))
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("ste_sign(clip_value=1), (2)", "Cannot parse quantizer spec"),
        ("ste_sign(clip_value=0.5)(clip_value=2)", "Cannot parse quantizer spec"),
        ("ste_sign(**{'clip_value': 1})", "must be keywords"),
        ("ste_sign(clip_value=__import__('os'))", "clip_value is not a literal"),
        ("ste_sign(clip_value='a')", "clip_value must be None or a number >= 0, got 'a'"),
        ("ste_sign(clip_value=-1)", "clip_value must be None or a number >= 0, got -1"),
        ("ste_sign(clip_value=True)", "clip_value must be None or a number >= 0, got True"),
        ("swish_sign(beta=0)", "beta must be a number > 0, got 0"),
        ("ste_tern(threshold_value=-0.1)", "threshold_value must be a number >= 0"),
        ("ste_tern(ternary_weight_networks='no')", "ternary_weight_networks must be True or"),
        ("dorefa(k_bit=0)", "k_bit must be an int >= 1, got 0"),
        ("dorefa(k_bit=1.5)", "k_bit must be an int >= 1, got 1.5"),
        ("dorefa(mode='weight')", "mode must be 'activations' or 'weights', got 'weight'"),
    ],
)
def test_bad_specs_raise_errors_naming_the_problem(spec, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        qz.get(spec)


def test_bad_hyper_parameters_by_keyword_and_for_surrogates():
    with pytest.raises(ValueError, match="clip_value must be None or a number >= 0, got nan"):
        qz.get("ste_sign", clip_value=float("nan"))
    with pytest.raises(ValueError, match="Surrogate 'swish_sign': beta must be a number > 0"):
        qz.surrogate_gradient("swish_sign(beta=-1.0)")
    # the valid edge values stay valid
    for spec in [
        "ste_sign(clip_value=None)",
        "ste_sign(clip_value=0)",
        "dorefa(k_bit=3, mode='weights')",
        "ste_tern(threshold_value=0, ternary_weight_networks=False)",
    ]:
        qz.get(spec)
    # numbers as numpy / JAX scalars too, as before the checks
    for clip_value in (np.float32(1.25), jnp.float32(1.25), np.array(1.25)):
        f = qz.get("ste_sign", clip_value=clip_value)
        np.testing.assert_array_equal(elementwise_grad(f, [1.25, 1.3]), [1, 0])
    qz.get("dorefa", k_bit=np.int64(3))


def _larq_masked(x, dy, keep):
    """Larq's tf.where(keep, dy, zeros), in NumPy: no arithmetic on dy where not kept."""
    return np.where(keep, dy, 0.0)


@pytest.mark.parametrize(
    "name, hparams, keep",
    [
        ("ste_sign", {}, lambda x: np.abs(x) <= 1.0),
        ("ste_sign", {"clip_value": 1.25}, lambda x: np.abs(x) <= 1.25),
        ("ste_heaviside", {}, lambda x: np.abs(x) <= 1.0),
        ("ste_tern", {}, lambda x: np.abs(x) <= 1.0),
        ("approx_sign", {}, lambda x: np.abs(x) <= 1.0),
    ],
)
def test_non_finite_cotangent_outside_the_clip_gives_zero_as_larqs_where(name, hparams, keep):
    # Larq selects the gradient with tf.where; a product g * mask turns an inf cotangent
    # outside the clip into NaN (inf * 0), which then poisons every latent weight.
    x = np.array([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.1, 3.0], np.float32)
    f = qz.get(name, **hparams)
    for bad in (np.inf, -np.inf, np.nan):
        dy = np.full_like(x, bad)
        _, vjp = jax.vjp(f, jnp.asarray(x))
        (got,) = vjp(jnp.asarray(dy))
        slope = np.where(np.abs(x) <= 1, 2 - 2 * np.abs(x), 0) if name == "approx_sign" else 1.0
        with np.errstate(invalid="ignore"):
            expected = _larq_masked(x, dy * slope, keep(x))
        np.testing.assert_array_equal(np.asarray(got), expected.astype(np.float32))


@pytest.mark.parametrize("surrogate", ["ste_sign", "ste_sign(clip_value=1.25)", "approx_sign"])
def test_surrogate_override_masks_non_finite_cotangents_outside_its_clip(surrogate):
    x = jnp.array([-3.0, -0.5, 0.0, 0.5, 3.0])
    f = qz.with_surrogate(qz.get("ste_sign"), surrogate)
    _, vjp = jax.vjp(f, x)
    (got,) = vjp(jnp.full_like(x, jnp.inf))
    # inside the clip the (positive) slope times inf is inf; outside 0, not NaN
    np.testing.assert_array_equal(np.asarray(got), [0.0, np.inf, np.inf, np.inf, 0.0])


# every quantizer (identity: already plain JAX), and the unclipped STE and 3-bit weights
FORWARD_MODE_SPECS = [s for s in ALL if s[0] != "identity"] + [
    ("ste_sign", {"clip_value": None}),
    ("dorefa", {"mode": "weights", "k_bit": 3}),
]


@pytest.mark.parametrize("name, hparams", FORWARD_MODE_SPECS)
def test_forward_mode_jvp_equals_the_default_vjp(name, hparams):
    # Every quantizer is elementwise in its derivative (data-dependent scales and
    # thresholds pass none), so its Jacobian is diagonal: the forward-mode tangent along
    # t must equal the default custom VJP of t, entry by entry, inf / NaN included.
    f = qz.get(name, **hparams)
    x = jnp.asarray(GRID[:600].reshape(-1, 6))  # (100, 6): a kernel-like shape
    t = jnp.asarray(np.random.default_rng(0).normal(size=x.shape), jnp.float32)
    t = t.at[0, 0].set(jnp.inf).at[-1, -1].set(jnp.nan)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (x,), (t,))
    jvp = lambda x, t: jax.jvp(f, (x,), (t,))  # noqa: E731
    vjp = lambda x, t: jax.vjp(f, x)[1](t)[0]  # noqa: E731
    y_default, want = jax.jit(f)(x), jax.jit(vjp)(x, t)
    with ops.forward_mode():  # traced anew here: new functions
        y, got = jax.jit(lambda x, t: jvp(x, t))(x, t)
        reverse = jax.jit(lambda x, t: vjp(x, t))(x, t)
    np.testing.assert_array_equal(y, y_default)
    # DoReFa's chain is differentiated by JAX's own rules (the scalings by n and 1 / n,
    # tanh) in the other order going forward: float rounding; the others bit for bit
    tol = {"rtol": 1e-5, "atol": 1e-6} if name == "dorefa" else {"rtol": 0, "atol": 0}
    np.testing.assert_allclose(got, want, **tol)
    np.testing.assert_allclose(reverse, want, **tol)


def test_forward_mode_surrogate_override_and_jacfwd():
    f = qz.with_surrogate(qz.get("ste_sign"), "approx_sign")
    x = jnp.asarray(SPOT)
    with ops.forward_mode():
        jac = jax.jacfwd(f)(x)
        second = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(f(x) * x))(x)))(x)
    np.testing.assert_allclose(jac, np.diag((2 - 2 * np.abs(SPOT)) * (np.abs(SPOT) <= 1)))
    np.testing.assert_allclose(second, [0, -2, 1, 4, 1, -2, 0], atol=1e-6)


@pytest.mark.parametrize(
    "quantizer, hparams, match",
    [
        (qz.ste_sign, {"clip_value": -1.0}, "'ste_sign': clip_value must be None or a number >= 0"),
        (qz.ste_sign, {"clip_value": True}, "'ste_sign': clip_value must be None or a number >= 0"),
        (qz.magnitude_aware_sign, {"clip_value": float("nan")}, "clip_value must be None or a"),
        (qz.ste_heaviside, {"clip_value": -0.5}, "'ste_heaviside': clip_value must be None"),
        (qz.swish_sign, {"beta": 0.0}, "'swish_sign': beta must be a number > 0, got 0.0"),
        (qz.ste_tern, {"threshold_value": -0.1}, "'ste_tern': threshold_value must be a number"),
        (qz.ste_tern, {"ternary_weight_networks": "yes"}, "ternary_weight_networks must be True"),
        (qz.ste_tern, {"clip_value": -1.0}, "'ste_tern': clip_value must be None or a number"),
        (qz.dorefa, {"k_bit": 0}, "'dorefa': k_bit must be an int >= 1, got 0"),
        (qz.dorefa, {"k_bit": -2}, "'dorefa': k_bit must be an int >= 1, got -2"),
        (qz.dorefa, {"mode": "weight"}, "'dorefa': mode must be 'activations' or 'weights'"),
    ],
)
def test_direct_calls_check_hyper_parameters_as_get_does(quantizer, hparams, match):
    # dorefa(x, k_bit=0) was all NaN and ste_sign(x, clip_value=-1) had a zero gradient:
    # only quantizers.get checked them
    x = jnp.asarray([-0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match=re.escape(match)):
        quantizer(x, **hparams)
    with pytest.raises(ValueError, match=re.escape(match)):
        jax.jit(lambda x: quantizer(x, **hparams))(x)  # at trace time


def test_direct_calls_keep_valid_and_traced_hyper_parameters():
    x = jnp.asarray(GRID[::10])
    # traced threshold_value and k_bit worked before the checks (jit, vmap, grad over
    # them) and still do; their values are then not known at trace time
    tern = jax.jit(lambda x, d: qz.ste_tern(x, threshold_value=d))
    np.testing.assert_array_equal(tern(x, 0.5), qz.ste_tern(x, threshold_value=0.5))
    dorefa = jax.jit(lambda x, k: qz.dorefa(x, k_bit=k))
    # (a traced n = 2**k - 1 is not folded into a constant: float rounding)
    np.testing.assert_allclose(dorefa(x, 3), qz.dorefa(x, k_bit=3), rtol=1e-6)
    by_k = jax.vmap(lambda k: qz.dorefa(x, k_bit=k))(jnp.asarray([2, 3]))
    np.testing.assert_allclose(by_k[1], qz.dorefa(x, k_bit=3), rtol=1e-6)
    assert np.isfinite(jax.grad(lambda k: jnp.sum(qz.dorefa(x, k_bit=k)))(2.0))
    # concrete NumPy / JAX scalars and NumPy bools, as before
    np.testing.assert_array_equal(
        elementwise_grad(lambda v: qz.ste_sign(v, clip_value=jnp.float32(1.25)), [1.25, 1.3]),
        [1, 0],
    )
    np.testing.assert_array_equal(qz.dorefa(x, k_bit=np.int64(3)), qz.dorefa(x, k_bit=3))
    np.testing.assert_array_equal(
        qz.ste_tern(x, ternary_weight_networks=np.True_),
        qz.ste_tern(x, ternary_weight_networks=True),
    )


@pytest.mark.parametrize(
    "x",
    [
        # fan_in 70000 > 65504, float16's max: the divisor was inf, the scale 0
        np.random.default_rng(0).uniform(-0.02, 0.02, (70000, 2)),
        # a channel sum 4 * 30000 > 65504: the sum was inf, the scale inf
        np.full((2, 2, 1, 3), 30000.0) * np.array([1.0, -1.0, 0.5]),
    ],
    ids=["fan_in", "sum"],
)
def test_magnitude_aware_sign_float16_scale_does_not_overflow(x):
    x16 = jnp.asarray(x, jnp.float16)
    x64 = np.asarray(x16, np.float64)
    want = np.abs(x64).reshape(-1, x64.shape[-1]).mean(0) * np.where(x64 >= 0, 1.0, -1.0)
    got = qz.magnitude_aware_sign(x16)
    assert got.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-3)
