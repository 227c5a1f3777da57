"""jbnn.saliency against independent references.

References: per-example loops of ``jax.grad``, central finite differences (float64),
slow Python loops over the same noise samples, hand-written GradCAM on a model split
into a features module and a head module, hand-derived gradients of a tiny BNN, PAIR's
``saliency.core`` (through its call_model_function protocol), Captum's attribution
methods on a float64 PyTorch copy of a small model (where torch and captum are
installed), closed-form gradients, and Captum's display formula. Tiny Linen models and
small images keep every test on CPU.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jbnn import models
from jbnn import saliency as sal
from jbnn.saliency import gradients as sal_gradients

pytestmark = pytest.mark.usefixtures("fast_compiles")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 5
TRACES = [0]  # incremented each time SplitNet is traced


# --------------------------------------------------------------------------- models
class Features(nn.Module):
    """conv -> ReLU -> BatchNorm -> strided conv: a (B, h, w, 8) feature map."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(6, (3, 3), name="conv1")(x))
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.Conv(8, (3, 3), strides=(2, 2), name="conv2")(x)


class Head(nn.Module):
    """tanh -> flatten -> dense: spatially varying channel gradients."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, a):
        a = jnp.tanh(a)
        return nn.Dense(self.num_classes, name="dense")(a.reshape(a.shape[0], -1))


class SplitNet(nn.Module):
    """head(features(x)); GradCAM layers "features" and "features/conv2" coincide."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False):
        TRACES[0] += 1
        return Head(self.num_classes, name="head")(Features(name="features")(x, train))


def _init(model, shape, seed=0, dtype=np.float32):
    """Variables of ``model`` drawn with numpy (shapes from ``jax.eval_shape``).

    Kernels ~ U(+-sqrt(3 / fan_in)), BatchNorm scales ~ U(0.5, 1.5), running means
    ~ N(0.3, 0.2) and variances ~ U(0.5, 2) (so that inference mode differs from batch
    statistics), other parameters ~ U(-0.5, 0.5). numpy keeps the tests free of
    threefry compilations, which are slow on CPU.
    """
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), spec)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "var":
            value = rng.uniform(0.5, 2.0, leaf.shape)
        elif name == "mean":
            value = rng.normal(0.3, 0.2, leaf.shape)
        elif name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.uniform(-1.0, 1.0, leaf.shape) * np.sqrt(3.0 / fan_in)
        elif name == "scale":
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = rng.uniform(-0.5, 0.5, leaf.shape)
        return jnp.asarray(value, dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _uniform(shape, seed, low=-1.0, high=1.0, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape), dtype)


def _split_apply(variables, x):
    """The same network as SplitNet, by hand: features and head applied separately."""
    feats = Features().apply(
        {
            "params": variables["params"]["features"],
            "batch_stats": variables["batch_stats"]["features"],
        },
        x,
    )
    return feats, lambda a: Head().apply({"params": variables["params"]["head"]}, a)


@pytest.fixture(scope="module")
def net():
    model = SplitNet()
    variables = _init(model, (1, 16, 16, 3))
    x = _uniform((3, 16, 16, 3), 1)
    target = jnp.array([0, 3, 1], jnp.int32)
    return model, variables, x, target


def _grad_loop(model, variables, x, target):
    """Per-example loop of jax.grad of the target logit."""

    def logit(xi, t):
        return model.apply(variables, xi[None])[0, t]

    grad = jax.jit(jax.grad(logit))
    return np.stack([np.asarray(grad(x[i], int(target[i]))) for i in range(x.shape[0])])


# --------------------------------------------------------------------------- gradient
def test_gradient_equals_per_example_grad_loop(net):
    model, variables, x, target = net
    fn = models.apply_fn(model, variables)
    ours = sal.gradient(fn, x, target)
    assert ours.shape == x.shape and ours.dtype == x.dtype
    np.testing.assert_allclose(ours, _grad_loop(model, variables, x, target), rtol=1e-5, atol=1e-7)
    # target=None explains the predicted class; one int is broadcast.
    predicted = jnp.argmax(fn(x), axis=-1)
    np.testing.assert_allclose(
        sal.gradient(fn, x), _grad_loop(model, variables, x, predicted), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        sal.gradient(fn, x, 2), _grad_loop(model, variables, x, [2, 2, 2]), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(sal.input_x_gradient(fn, x, target), ours * x, rtol=1e-6)


def test_gradient_of_bnn_equals_per_example_loop():
    model = models.get("binarynet", binary=True, num_classes=4, width=1 / 16, dense_features=32)
    x = _uniform((3, 8, 8, 3), 2)
    variables = _init(model, x.shape, seed=3)
    ours = sal.gradient(models.apply_fn(model, variables), x, jnp.array([0, 1, 3]))
    ref = _grad_loop(model, variables, x, jnp.array([0, 1, 3]))
    # Binary activations: the sums are large and cancel; float32 rounding of the scale.
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert np.abs(ref).max() > 0


def test_gradient_equals_finite_differences_on_fp_twin():
    bnn = models.get("binarynet", binary=True, num_classes=4, width=1 / 16, dense_features=32)
    twin = models.twin(bnn).clone(fp_activation="tanh")  # smooth twin
    with jax.enable_x64(True):
        x = _uniform((2, 8, 8, 3), 4, dtype=np.float64)
        variables = _init(twin, x.shape, seed=5, dtype=np.float64)
        fn = models.apply_fn(twin, variables)
        target = jnp.array([1, 2])
        ours = np.asarray(sal.gradient(fn, x, target))
        eps = 1e-3
        basis = jnp.eye(x[0].size, dtype=x.dtype).reshape(-1, *x.shape[1:])  # (D, H, W, C)

        @jax.jit
        def central(x):
            def diff(e):
                up = fn(x + eps * e[None])[jnp.arange(2), target]
                down = fn(x - eps * e[None])[jnp.arange(2), target]
                return (up - down) / (2 * eps)  # (B,)

            return jax.lax.map(diff, basis, batch_size=64)  # (D, B)

        fd = np.asarray(central(x)).T.reshape(x.shape)
    # The twin casts its logits to float32: each difference carries a rounding error of
    # about ulp(logit) / (2 eps) ~ 1e-4 of the logit; the gradient itself is exact.
    scale = np.abs(ours).max()
    assert scale > 1e-3
    np.testing.assert_allclose(ours, fd, atol=3e-3 * scale, rtol=1e-3)


# --------------------------------------------------------------------------- surrogates
def _sign(a):
    return np.where(a >= 0, 1.0, -1.0)


@pytest.mark.parametrize("surrogate", [None, "approx_sign", "ste_sign(clip_value=0.5)"])
def test_surrogate_override_changes_gradient_as_the_formula_says(surrogate):
    bnn = models.get("mlp", binary=True, num_classes=3, hidden=(16,))
    x = _uniform((4, 4, 4, 1), 6, -2.0, 2.0)
    variables = _init(bnn, x.shape, seed=7)
    stats = {  # pre-activations of dense1 spread over about [-2, 2]: both sides of the clip
        "dense1_bn": {"mean": jnp.zeros(16), "var": jnp.full(16, 16.0)},
        "head_bn": {"mean": jnp.full(3, 0.1), "var": jnp.full(3, 4.0)},
    }
    variables = {**variables, "batch_stats": stats}
    target = np.array([0, 1, 2, 1])
    model = models.with_surrogate(bnn, surrogate)
    fn = models.apply_fn(model, variables)
    ours = np.asarray(sal.gradient(fn, x, target))

    # By hand: logits = BN_head(sign(h) @ sign(W2)), h = BN1(x @ sign(W1)).
    p, s, eps = variables["params"], variables["batch_stats"], 1e-5
    xf = np.asarray(x, np.float64).reshape(4, -1)
    w1, w2 = _sign(np.asarray(p["dense1"]["kernel"])), _sign(np.asarray(p["head"]["kernel"]))
    g1 = np.asarray(p["dense1_bn"]["scale"]) / np.sqrt(np.asarray(s["dense1_bn"]["var"]) + eps)
    h = (xf @ w1 - np.asarray(s["dense1_bn"]["mean"])) * g1 + np.asarray(p["dense1_bn"]["bias"])
    if surrogate == "approx_sign":
        ds = np.where(np.abs(h) <= 1, 2 - 2 * np.abs(h), 0.0)
    else:
        ds = (np.abs(h) <= (0.5 if surrogate else 1.0)).astype(np.float64)
    assert 0 < ds.astype(bool).mean() < 1  # both sides of the clip occur
    head_scale = 1 / np.sqrt(np.asarray(s["head_bn"]["var"]) + eps)
    hand = np.stack(
        [w1 @ (g1 * ds[b] * w2[:, target[b]] * head_scale[target[b]]) for b in range(4)]
    ).reshape(x.shape)
    np.testing.assert_allclose(ours, hand, rtol=1e-5, atol=1e-6)

    # The forward pass is bit for bit the BNN's; the map differs from the default's.
    base_fn = models.apply_fn(bnn, variables)
    np.testing.assert_array_equal(fn(x), base_fn(x))
    if surrogate is not None:
        assert not np.allclose(ours, sal.gradient(base_fn, x, target))


# --------------------------------------------------------------------------- SmoothGrad
def _smoothgrad_loop(model, variables, x, target, key, num_samples, sigmas, variant):
    """Slow reference: per example b and sample s, noise from fold_in(fold_in(key, b), s)."""

    def logit(xi, t):
        return model.apply(variables, xi[None])[0, t]

    grad = jax.jit(jax.grad(logit))
    out = []
    for b in range(x.shape[0]):
        key_b = jax.random.fold_in(key, b)
        grads = []
        for s in range(num_samples):
            noise = jax.random.normal(jax.random.fold_in(key_b, s), x.shape[1:], x.dtype)
            grads.append(np.asarray(grad(x[b] + sigmas[b] * noise, int(target[b])), np.float64))
        grads = np.stack(grads)
        if variant == "smoothgrad":
            out.append(grads.mean(0))
        elif variant == "smoothgrad_sq":
            out.append((grads**2).mean(0))
        else:
            out.append(grads.var(0))
    return np.stack(out)


@pytest.mark.parametrize("batch_size", [None, 4])
@pytest.mark.parametrize("variant", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smoothgrad_equals_slow_loop(net, variant, batch_size):
    model, variables, x, target = net
    key = jax.random.key(11)
    fn = models.apply_fn(model, variables)
    ours = sal.smoothgrad(
        fn, x, target, key, num_samples=6, noise_level=0.2, variant=variant, batch_size=batch_size
    )  # batch_size=4: one scanned chunk of 4 and a remainder of 2
    sigmas = 0.2 * (np.asarray(x).max(axis=(1, 2, 3)) - np.asarray(x).min(axis=(1, 2, 3)))
    ref = _smoothgrad_loop(model, variables, x, target, key, 6, sigmas, variant)
    assert ours.shape == x.shape
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=1e-6 * np.abs(ref).max())
    assert np.abs(ref).max() > 0


def test_smoothgrad_keys_sigma_and_chunking(net):
    model, variables, x, target = net
    fn = models.apply_fn(model, variables)
    key = jax.random.key(11)
    kw = dict(num_samples=6, noise_level=0.2)
    a = sal.smoothgrad(fn, x, target, key, **kw)
    np.testing.assert_array_equal(a, sal.smoothgrad(fn, x, target, key, **kw))  # same key
    assert not np.allclose(a, sal.smoothgrad(fn, x, target, jax.random.key(12), **kw))
    # One key per example: the same noise as fold_in(key, b).
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(3))
    np.testing.assert_array_equal(a, sal.smoothgrad(fn, x, target, keys, **kw))
    # A raw PRNGKey works too; chunk sizes that divide num_samples agree with unchunked.
    raw = jax.random.key_data(key)
    chunked = sal.smoothgrad(fn, x, target, raw, **kw, batch_size=3)
    np.testing.assert_allclose(a, chunked, rtol=1e-4, atol=1e-6 * np.abs(a).max())
    # Absolute sigma (Captum): the per-example spread times noise_level, given directly.
    sigmas = 0.2 * (jnp.max(x, axis=(1, 2, 3)) - jnp.min(x, axis=(1, 2, 3)))
    b = sal.smoothgrad(fn, x, target, key, num_samples=6, noise_sigma=np.asarray(sigmas))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(a).max())


def _cube(z):
    """Logits (B, 2) whose class 0 has the input gradient z ** 2."""
    return jnp.stack([jnp.sum(z**3, axis=(1, 2, 3)) / 3, jnp.sum(z, axis=(1, 2, 3))], axis=-1)


@pytest.mark.parametrize("variant", ["smoothgrad", "vargrad"])
def test_smoothgrad_in_float64_keeps_sigma_in_float64(variant):
    # Gradient (x + sigma z)^2 in closed form, numpy float64: a sigma rounded to float32
    # (0.1 -> 0.10000000149) moves the map by about 1e-9 of its scale (4e-8 for vargrad).
    with jax.enable_x64(True):
        x = _uniform((2, 4, 4, 3), 8, dtype=np.float64)
        key = jax.random.key(4)
        xs = np.asarray(x)
        spread = xs.max(axis=(1, 2, 3)) - xs.min(axis=(1, 2, 3))
        for kw, sigmas in [
            (dict(noise_sigma=0.1), [0.1, 0.1]),
            (dict(noise_level=0.15), 0.15 * spread),
        ]:
            ours = sal.smoothgrad(
                _cube, x, 0, key, num_samples=4, batch_size=3, variant=variant, **kw
            )
            assert ours.dtype == jnp.float64
            ref = []
            for b in range(2):
                key_b = jax.random.fold_in(key, b)
                z = [
                    jax.random.normal(jax.random.fold_in(key_b, s), xs.shape[1:], jnp.float64)
                    for s in range(4)
                ]
                grads = np.stack([(xs[b] + sigmas[b] * np.asarray(zs)) ** 2 for zs in z])
                ref.append(grads.mean(0) if variant == "smoothgrad" else grads.var(0))
            np.testing.assert_allclose(ours, np.stack(ref), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "x_shape, num, chunk",
    [
        ((4, 112, 112, 3), 16, 4),  # 16 images of 112x112 per chunk
        ((2, 224, 224, 3), 8, 2),
        ((50, 32, 32, 1), 50, 3),  # 150 images of 32x32 (200704 // 51200 = 3)
        ((16, 224, 224, 3), 50, 1),  # more pixels than the budget: one copy at a time
        ((3, 8, 8, 3), 6, 6),  # small images: all copies at once
    ],
)
def test_auto_batch_size_chunks_by_pixels_on_cpu_only(monkeypatch, x_shape, num, chunk):
    key_options = dict(noise_level=0.15, noise_sigma=None, variant="smoothgrad")
    sg = lambda bs: sal_gradients._smoothgrad_options(
        x_shape, num, **key_options, batch_size=bs, split_input_layer=True, name="sg"
    )[1]["batch_size"]
    ig = lambda bs: sal_gradients._ig_options(x_shape, 0.0, num, "gausslegendre", bs, True, "ig")[
        1
    ]["batch_size"]
    assert jax.default_backend() == "cpu"
    assert sal.AUTO_CHUNK_PIXELS == 16 * 112 * 112
    for options in (sg, ig):
        assert options("auto") == chunk
        assert options(None) == num  # None: all at once, everywhere
        assert options(5) == min(5, num)
    with jax.default_device(jax.devices("cpu")[0]):
        assert sg("auto") == chunk
    # On an accelerator "auto" is all at once (the default device decides, as for
    # platform_jit's CPU compiler options).
    monkeypatch.setattr(sal_gradients, "_default_platform", lambda: "gpu")
    assert sg("auto") == ig("auto") == num


def test_auto_batch_size_changes_maps_by_rounding_only():
    # One 256x256 image: "auto" takes chunks of 200704 // 65536 = 3 of the 7 noisy copies
    # (two scanned chunks and a remainder of 1). The same program as batch_size=3, so
    # the same bits; all at once differs by float rounding only. The gradient of _cube
    # is z ** 2 in closed form.
    x = _uniform((1, 256, 256, 1), 21)
    key = jax.random.key(5)
    kw = dict(num_samples=7, noise_sigma=0.3)
    auto = sal.smoothgrad(_cube, x, 0, key, **kw)
    np.testing.assert_array_equal(auto, sal.smoothgrad(_cube, x, 0, key, **kw, batch_size=3))
    # explain_dataset's default is "auto" too (example 0 takes fold_in(key, 0) there too).
    streamed = sal.explain_dataset(
        "smoothgrad",
        [(x, np.zeros(1, np.int32))],
        fn=_cube,
        key=key,
        target="label",
        progress=False,
        **kw,
    )["maps"]
    np.testing.assert_allclose(streamed, auto, rtol=1e-6, atol=1e-7)
    whole = sal.smoothgrad(_cube, x, 0, key, **kw, batch_size=None)
    np.testing.assert_allclose(auto, whole, rtol=1e-5, atol=1e-6 * float(np.abs(whole).max()))
    noise = np.stack(
        [
            np.asarray(
                jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 0), s), x.shape[1:])
            )
            for s in range(7)
        ]
    )
    ref = ((np.asarray(x[0]) + 0.3 * noise) ** 2).mean(0)
    np.testing.assert_allclose(auto[0], ref, rtol=1e-5, atol=1e-6)
    ig_auto = sal.integrated_gradients(_cube, x, 0, num_steps=7, method="gausslegendre")
    ig_whole = sal.integrated_gradients(
        _cube, x, 0, num_steps=7, method="gausslegendre", batch_size=None
    )
    np.testing.assert_allclose(ig_auto, ig_whole, rtol=1e-5, atol=1e-7)
    # IG of z^3 / 3 from 0 is x^3 / 3, times Gauss-Legendre's (exact) weights.
    np.testing.assert_allclose(ig_auto, np.asarray(x) ** 3 / 3, rtol=1e-4, atol=1e-6)


def test_smoothgrad_noise_is_standard_normal_in_bfloat16():
    # With x = 0, sigma = 1 and the gradient of |z|^2 / 2, one sample's map is the noise
    # itself: 1M draws of it should look like N(0, 1) rounded to bfloat16. Drawn in
    # bfloat16 by jax.random.normal, they took 128 values in [-2.89, 2.52], mean -0.012.
    def half_square(z):
        return 0.5 * jnp.sum(jnp.square(z.astype(jnp.float32)), axis=(1, 2, 3))[:, None]

    x = jnp.zeros((1, 128, 128, 64), jnp.bfloat16)
    z = sal.smoothgrad(half_square, x, 0, jax.random.key(0), num_samples=1, noise_sigma=1.0)
    assert z.dtype == jnp.bfloat16
    z = np.asarray(z, np.float64).ravel()
    assert abs(z.mean()) < 5e-3 and abs(z.std() - 1) < 5e-3  # 5 standard errors
    assert z.min() < -4 and z.max() > 4  # P(max |z| < 4) ~ exp(-63) for 1M draws
    assert len(np.unique(z)) > 1000


@pytest.mark.slow
def test_smoothgrad_memory_is_bounded_by_the_chunk():
    model = SplitNet()
    x = _uniform((1, 32, 32, 3), 3)
    variables = _init(model, x.shape)
    fn = models.apply_fn(model, variables)
    keys = jax.random.key(0)[None]
    scale = jnp.float32(0.15)

    def compiled(num_samples, batch_size):
        return sal_gradients._smoothgrad_jit.lower(
            fn,
            x,
            None,
            keys,
            scale,
            relative=True,
            num_samples=num_samples,
            variant="smoothgrad",
            batch_size=batch_size,
        ).compile()

    # XLA's optimizations on (the programs users run): the 2000 noisy samples below run
    # about 10x faster with them, more than the three compiles lose. The temp sizes are
    # those of fast_compiles' unoptimized programs too.
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        chunked_1000 = compiled(1000, 50)
        temp = {
            (1000, 50): chunked_1000.memory_analysis().temp_size_in_bytes,
            (100, 50): compiled(100, 50).memory_analysis().temp_size_in_bytes,
            (1000, 1000): compiled(1000, 1000).memory_analysis().temp_size_in_bytes,
        }
        maps = chunked_1000(fn, x, None, keys, scale)
        ref = sal.smoothgrad(fn, x, None, keys, num_samples=1000, batch_size=250)
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    # 1000 samples in chunks of 50 need the memory of 50 samples (of 100 in chunks of 50),
    # not the memory of 1000 samples at once.
    assert temp[(1000, 50)] <= 1.1 * temp[(100, 50)], temp
    assert temp[(1000, 1000)] > 10 * temp[(1000, 50)], temp
    # ... and the chunked computation runs and matches the public function's result
    # for 1000 samples in chunks of 250.
    np.testing.assert_allclose(maps, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


# --------------------------------------------------------------------------- IG
def test_integrated_gradients_quadrature_and_completeness(net):
    model, variables, x, target = net
    fn = models.apply_fn(model, variables)
    for method in sal.IG_METHODS:
        alphas, weights = sal.quadrature(method, 8)
        assert alphas.shape == weights.shape == (8,) and 0 <= alphas.min() <= alphas.max() <= 1
        assert np.isclose(weights.sum(), 1.0)
    # Against a loop over the path points with the per-example gradient.
    baseline = 0.1
    ours = sal.integrated_gradients(
        fn, x, target, baseline=baseline, num_steps=8, method="gausslegendre", batch_size=3
    )
    alphas, weights = sal.quadrature("gausslegendre", 8)
    xb = np.asarray(x) - baseline
    ref = sum(
        w * _grad_loop(model, variables, baseline + a * jnp.asarray(xb), target)
        for a, w in zip(alphas, weights, strict=True)
    )
    np.testing.assert_allclose(ours, xb * ref, rtol=1e-4, atol=1e-7)
    # Completeness: attributions sum to about logit(x) - logit(baseline); the ReLU makes
    # the integrand kinked, so both quadratures are good to about 1%.
    logits, logits0 = fn(x), fn(jnp.zeros_like(x))
    delta = (logits - logits0)[jnp.arange(3), target]
    tol = 0.02 * np.abs(delta).max()
    for method in ("gausslegendre", "riemann_trapezoid"):
        ig = sal.integrated_gradients(fn, x, target, num_steps=32, method=method)
        np.testing.assert_allclose(ig.sum(axis=(1, 2, 3)), delta, atol=tol)


# --------------------------------------------------------------------------- input layer
class _Preprocessed(nn.Module):  # the input is rescaled inside the model
    @nn.compact
    def __call__(self, x):
        return SplitNet()(2.0 * x - 1.0)


class _InputReadTwice(nn.Module):  # the input reaches the logits besides the conv
    @nn.compact
    def __call__(self, x):
        return SplitNet()(x) + jnp.sum(jnp.square(x), axis=(1, 2, 3))[:, None]


class _QuantizedInput(nn.Module):  # the first layer binarizes its input: not affine
    @nn.compact
    def __call__(self, x):
        from jbnn import layers

        y = layers.QuantConv(4, (3, 3), input_quantizer="ste_sign", name="conv")(x)
        return nn.Dense(NUM_CLASSES)(jnp.tanh(y).reshape(x.shape[0], -1))


class _SharedConv(nn.Module):  # one conv applied to x and to its own output
    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(3, (3, 3), name="conv")
        y = conv(jnp.tanh(conv(x)))
        return nn.Dense(NUM_CLASSES)(y.reshape(x.shape[0], -1))


# nn.Conv / nn.Dense given their own arithmetic (as a quantization library does): here
# not linear in the input, so the layer is not the affine map the split relies on.
def _tanh_conv(lhs, rhs, *args, **kwargs):
    return jax.lax.conv_general_dilated(jnp.tanh(lhs), rhs, *args, **kwargs)


def _tanh_dot(lhs, rhs, *args, **kwargs):
    return jax.lax.dot_general(jnp.tanh(lhs), rhs, *args, **kwargs)


def _tanh_promote(inputs, *rest, dtype=None, inexact=True):
    return (jnp.tanh(inputs), *rest)


class _CustomConv(nn.Module):  # nn.Conv with conv_general_dilated=
    @nn.compact
    def __call__(self, x):
        y = nn.Conv(4, (3, 3), conv_general_dilated=_tanh_conv, name="conv")(x)
        return nn.Dense(NUM_CLASSES)(jnp.tanh(y).reshape(x.shape[0], -1))


class _CustomDot(nn.Module):  # nn.Dense (on every pixel) with dot_general=
    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4, dot_general=_tanh_dot, name="dense")(x)
        return nn.Dense(NUM_CLASSES)(jnp.tanh(y).reshape(x.shape[0], -1))


class _CustomPromote(nn.Module):  # nn.Conv with promote_dtype=
    @nn.compact
    def __call__(self, x):
        y = nn.Conv(4, (3, 3), promote_dtype=_tanh_promote, name="conv")(x)
        return nn.Dense(NUM_CLASSES)(jnp.tanh(y).reshape(x.shape[0], -1))


def _conv_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every convolution in a jaxpr, sub-programs included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += _conv_output_shapes(sub)
    return shapes


def test_split_input_layer_is_the_same_map_with_one_pullback(net):
    """The stem's input gradient runs once per example, and the maps do not change."""
    from jbnn.saliency import _input_layer

    model, variables, x, target = net
    fn = models.apply_fn(model, variables)
    assert _input_layer.find(fn, x) == ("features", "conv1")
    key = jax.random.key(3)
    for batch_size in (None, 4):  # all at once; a scanned chunk of 4 and a remainder of 2
        kw = dict(num_samples=6, batch_size=batch_size)
        split = sal.smoothgrad(fn, x, target, key, **kw)
        full = sal.smoothgrad(fn, x, target, key, **kw, split_input_layer=False)
        np.testing.assert_allclose(split, full, rtol=1e-5, atol=1e-6 * np.abs(full).max())
        kw = dict(num_steps=6, batch_size=batch_size, method="gausslegendre")
        split = sal.integrated_gradients(fn, x, target, **kw)
        full = sal.integrated_gradients(fn, x, target, **kw, split_input_layer=False)
        np.testing.assert_allclose(split, full, rtol=1e-5, atol=1e-6 * np.abs(full).max())

    # The convolutions whose output has x's shape (the input layer's input gradient):
    # one over the B * 6 noisy copies without the split, one over the B examples with it.
    def x_shaped_convs(split):
        run = functools.partial(
            sal_gradients._smoothgrad_jit.__wrapped__,
            relative=True,
            num_samples=6,
            variant="smoothgrad",
            batch_size=6,
            split_input_layer=split,
        )
        keys = jax.random.split(key, x.shape[0])
        jaxpr = jax.make_jaxpr(run)(fn, x, target, keys, jnp.float32(0.2)).jaxpr
        return [s for s in _conv_output_shapes(jaxpr) if s[1:] == x.shape[1:]]

    assert x_shaped_convs(False) == [(6 * x.shape[0], *x.shape[1:])]
    assert x_shaped_convs(True) == [x.shape]


@pytest.mark.parametrize(
    "module",
    [
        _Preprocessed,
        _InputReadTwice,
        _QuantizedInput,
        _SharedConv,
        _CustomConv,
        _CustomDot,
        _CustomPromote,
    ],
    ids=lambda m: m.__name__,
)
def test_split_input_layer_only_where_the_model_allows_it(module):
    """No split where it would be wrong; the maps still equal the slow loop there."""
    from jbnn.saliency import _input_layer

    model = module()
    x = _uniform((2, 8, 8, 3), 5)
    variables = _init(model, x.shape)
    fn = models.apply_fn(model, variables)
    assert _input_layer.find(fn, x) is None
    target = jnp.array([1, 4], jnp.int32)
    key = jax.random.key(7)
    ours = sal.smoothgrad(fn, x, target, key, num_samples=3, noise_level=0.2)
    sigmas = 0.2 * (np.asarray(x).max(axis=(1, 2, 3)) - np.asarray(x).min(axis=(1, 2, 3)))
    ref = _smoothgrad_loop(model, variables, x, target, key, 3, sigmas, "smoothgrad")
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=1e-6 * np.abs(ref).max())


# --------------------------------------------------------------------------- GradCAM
def _hand_cam(variables, x, target, plus_plus=False, relu=True):
    """GradCAM by hand on the split model (numpy), low resolution (B, h, w)."""
    feats, head = _split_apply(variables, x)

    def score(a):
        return jnp.sum(head(a)[jnp.arange(x.shape[0]), target])

    g = np.asarray(jax.grad(score)(feats), np.float64)
    a = np.asarray(feats, np.float64)
    if plus_plus:
        num = g**2
        den = 2 * g**2 + a.sum(axis=(1, 2), keepdims=True) * g**3
        alpha = np.where((g != 0) & (den != 0), num / np.where(den != 0, den, 1), 0)
        weights = (alpha * np.maximum(g, 0)).sum(axis=(1, 2))
    else:
        weights = g.mean(axis=(1, 2))
    cam = np.einsum("bhwc,bc->bhw", a, weights)
    return np.maximum(cam, 0) if relu else cam


@pytest.mark.parametrize("layer", ["features", "features/conv2"])
def test_gradcam_equals_hand_split(net, layer):
    model, variables, x, target = net
    cam, low = sal.gradcam(model, variables, x, target, layer=layer, return_low_res=True)
    hand = _hand_cam(variables, x, target)
    assert cam.shape == x.shape[:3] and low.shape == (3, 8, 8)
    np.testing.assert_allclose(low, hand, rtol=1e-4, atol=1e-6 * hand.max())
    assert hand.max() > 0 and (hand == 0).any()  # the ReLU matters
    # Captum's default: no ReLU.
    _, low_signed = sal.gradcam(
        model, variables, x, target, layer=layer, relu=False, return_low_res=True
    )
    hand_signed = _hand_cam(variables, x, target, relu=False)
    np.testing.assert_allclose(low_signed, hand_signed, rtol=1e-4, atol=1e-6 * hand.max())
    # Nearest upsampling by an integer factor is pixel repetition.
    nearest = sal.gradcam(model, variables, x, target, layer=layer, interpolation="nearest")
    np.testing.assert_allclose(nearest, np.repeat(np.repeat(low, 2, 1), 2, 2), rtol=1e-6)
    # Bilinear: skimage's resize (half-pixel centres) of the low-res map, edge-clamped.
    from skimage.transform import resize

    bilinear = np.stack(
        [resize(np.asarray(m, np.float64), (16, 16), order=1, mode="edge") for m in low]
    )
    np.testing.assert_allclose(cam, bilinear, rtol=1e-5, atol=1e-6 * hand.max())


def test_gradcam_nearest_torch_takes_pytorchs_source_positions(net):
    # PyTorch's F.interpolate(mode="nearest") to a size, Captum's upsampling, takes the
    # source row floor(i * h / H) (clamped); for 13 -> 7 and 11 -> 6 that rational floor
    # is also what float32 computes. jax.image.resize's "nearest" (half-pixel centres)
    # takes other rows there: the control that the mode changes something.
    model, _, _, target = net
    variables = _init(model, (1, 13, 11, 3))  # the head's dense layer sees 7 x 6 x C
    x = _uniform((3, 13, 11, 3), 5)
    cam, low = sal.gradcam(
        model,
        variables,
        x,
        target,
        layer="features",
        interpolation="nearest_torch",
        relu=False,
        return_low_res=True,
    )
    assert low.shape == (3, 7, 6)
    rows = np.minimum(np.arange(13) * 7 // 13, 6)
    cols = np.minimum(np.arange(11) * 6 // 11, 5)
    np.testing.assert_array_equal(cam, np.asarray(low)[:, rows][:, :, cols])
    centred = sal.gradcam(
        model, variables, x, target, layer="features", interpolation="nearest", relu=False
    )
    assert not np.array_equal(centred, cam)


def test_torch_nearest_sources_match_pytorch():
    # The float32 rule against PyTorch itself (not installed by the test extras: this
    # runs where torch is, as in the benchmarks' environment).
    torch = pytest.importorskip("torch")
    from jbnn.saliency import cam

    for h in range(1, 40):
        for size in range(h, 400, 13):
            src = torch.arange(h, dtype=torch.float32).reshape(1, 1, h, 1)
            out = torch.nn.functional.interpolate(src, size=(size, 1), mode="nearest")
            np.testing.assert_array_equal(cam._torch_nearest_sources(h, size), out[0, 0, :, 0])


def test_gradcam_plus_plus_equals_hand_split(net):
    model, variables, x, target = net
    cam, low = sal.gradcam_plus_plus(
        model, variables, x, target, layer="features", return_low_res=True
    )
    hand = _hand_cam(variables, x, target, plus_plus=True)  # float64: g^3 rounds in float32
    np.testing.assert_allclose(low, hand, rtol=1e-3, atol=1e-6 * hand.max())
    assert cam.shape == (3, 16, 16) and hand.max() > 0
    act, grad = sal.layer_activation_and_gradient(model, variables, x, target, layer="features")
    feats, _ = _split_apply(variables, x)
    np.testing.assert_allclose(act, feats, rtol=1e-6, atol=1e-7)


def test_gradcam_inference_mode_and_predicted_target(net):
    model, variables, x, _ = net
    predicted = jnp.argmax(model.apply(variables, x), axis=-1)
    _, low = sal.gradcam(model, variables, x, None, layer="features", return_low_res=True)
    np.testing.assert_allclose(low, _hand_cam(variables, x, predicted), rtol=1e-4, atol=1e-7)
    # One example explained alone gives the same map as in the batch (no batch stats).
    _, low0 = sal.gradcam(model, variables, x[:1], None, layer="features", return_low_res=True)
    np.testing.assert_allclose(low0[0], low[0], rtol=1e-5, atol=1e-7)


class _ConvBN(nn.Module):
    """A jbnn convolution read by its BatchNorm alone (jbnn.models.fold folds them), then
    tanh and a dense head; ``features`` and ``classify`` split it by hand."""

    def setup(self):
        from jbnn import layers

        self.conv = layers.QuantConv(4, (3, 3))
        self.bn = nn.BatchNorm(use_running_average=True)
        self.head = nn.Dense(NUM_CLASSES)

    def features(self, x):
        return self.bn(self.conv(x))

    def classify(self, a):
        return self.head(jnp.tanh(a).reshape(a.shape[0], -1))

    def __call__(self, x):
        return self.classify(self.features(x))


def _hand_low_res(activation, head, target):
    """GradCAM's low-resolution map (ReLU'd) of ``activation`` under ``head``, numpy."""
    score = lambda a: jnp.sum(head(a)[jnp.arange(a.shape[0]), target])
    g = np.asarray(jax.grad(score)(activation), np.float64)
    a = np.asarray(activation, np.float64)
    return np.maximum(np.einsum("bhwc,bc->bhw", a, g.mean(axis=(1, 2))), 0)


def test_gradcam_refuses_a_layer_whose_batchnorm_fn_folds():
    """In a BatchNorm-folded fn the convolution returns its BatchNorm's output: GradCAM of
    the convolution would explain the BatchNorm's activation. It says so, and the
    BatchNorm's own layer is explained right, folded or not."""
    from jbnn.models import fold

    model = _ConvBN()
    x = _uniform((2, 6, 6, 3), 8)
    variables = _init(model, x.shape, seed=9)
    target = jnp.array([1, 3], jnp.int32)
    assert fold.batchnorm_folds(model, variables, x) == {"conv": "bn"}
    conv_out = model.apply(variables, x, method=lambda m, x: m.conv(x))
    bn_out = model.apply(variables, x, method="features")
    hand_conv = _hand_low_res(
        conv_out,
        lambda a: model.apply(variables, a, method=lambda m, a: m.classify(m.bn(a))),
        target,
    )
    hand_bn = _hand_low_res(bn_out, lambda a: model.apply(variables, a, method="classify"), target)
    assert np.abs(hand_conv - hand_bn).max() > 0.1 * hand_bn.max()  # two different maps

    low = lambda layer, **kw: sal.gradcam(
        model, kw.pop("v", None), x, target, layer=layer, return_low_res=True, **kw
    )[1]
    np.testing.assert_allclose(low("conv", v=variables), hand_conv, rtol=1e-4, atol=1e-6)
    for fn in (
        models.apply_fn(model, variables, fold_batchnorm=True),  # folded at every call
        models.apply_fn(model, variables, fold_batchnorm=True, input_like=x),  # frozen
    ):
        with pytest.raises(
            ValueError,
            match=r"layer 'conv': fn folds the BatchNorm 'bn'.*"
            r"layer='bn'.*without fold_batchnorm",
        ):
            low("conv", fn=fn)
        with pytest.raises(ValueError, match="folds the BatchNorm 'bn'"):
            sal.layer_activation_and_gradient(model, None, x, target, layer="conv", fn=fn)
        np.testing.assert_allclose(low("bn", fn=fn), hand_bn, rtol=1e-4, atol=1e-5 * hand_bn.max())
    # Unfolded fns (kernels frozen or not) explain the convolution itself.
    for fn in (models.apply_fn(model, variables), models.apply_fn(model, variables, input_like=x)):
        np.testing.assert_allclose(low("conv", fn=fn), hand_conv, rtol=1e-4, atol=1e-6)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Conv(4, (3, 3), name="conv")(x))


class _Rematted(nn.Module):
    """Two blocks, the first under nn.remat (if ``remat``): the same variables either way."""

    remat: bool = True

    @nn.compact
    def __call__(self, x):
        first = nn.remat(_Block) if self.remat else _Block
        y = _Block(name="block2")(first(name="block1")(x))
        return nn.Dense(NUM_CLASSES, name="head")(y.reshape(y.shape[0], -1))


def test_gradcam_inside_nn_remat_names_it_and_the_workaround():
    """A layer run under nn.remat lives in the checkpoint's own trace (JAX raised an
    UnexpectedTracerError that named no layer): a ValueError names nn.remat and the
    workaround, the same model without remat and the same variables."""
    x = _uniform((2, 6, 6, 3), 10)
    rematted, plain = _Rematted(), _Rematted(remat=False)
    variables = _init(rematted, x.shape, seed=11)
    assert jax.tree.structure(variables) == jax.tree.structure(_init(plain, x.shape))
    target = jnp.array([0, 2], jnp.int32)
    for layer in ("block1", "block1/conv"):
        with pytest.raises(ValueError, match=rf"layer '{layer}' .*nn\.remat.*without nn\.remat"):
            sal.gradcam(rematted, variables, x, target, layer=layer)
    # The workaround: the same variables in the model built without nn.remat, checked
    # against GradCAM by hand (block1's output through block2 and the head).
    block1 = _Block().apply({"params": variables["params"]["block1"]}, x)

    def head(a):
        y = _Block().apply({"params": variables["params"]["block2"]}, a)
        return nn.Dense(NUM_CLASSES).apply(
            {"params": variables["params"]["head"]}, y.reshape(2, -1)
        )

    _, low = sal.gradcam(plain, variables, x, target, layer="block1", return_low_res=True)
    hand = _hand_low_res(block1, head, target)
    np.testing.assert_allclose(low, hand, rtol=1e-4, atol=1e-6 * hand.max())
    assert hand.max() > 0
    # Layers outside the remat are explained in the rematted model as in the plain one.
    np.testing.assert_allclose(
        sal.gradcam(rematted, variables, x, target, layer="block2"),
        sal.gradcam(plain, variables, x, target, layer="block2"),
        rtol=1e-5,
        atol=1e-7,
    )


# --------------------------------------------------------------------------- PAIR
def _pair_call_model_function(model, variables):
    import saliency.core as pair

    def call_model_function(x_batch, call_model_args=None, expected_keys=None):
        target = call_model_args["target"]
        x_batch = jnp.asarray(x_batch, jnp.float32)
        out = {}
        if pair.base.INPUT_OUTPUT_GRADIENTS in expected_keys:
            grad = jax.grad(lambda z: jnp.sum(model.apply(variables, z)[:, target]))(x_batch)
            out[pair.base.INPUT_OUTPUT_GRADIENTS] = np.asarray(grad)
        if pair.base.CONVOLUTION_LAYER_VALUES in expected_keys:
            feats, head = _split_apply(variables, x_batch)
            grad = jax.grad(lambda a: jnp.sum(head(a)[:, target]))(feats)
            out[pair.base.CONVOLUTION_LAYER_VALUES] = np.asarray(feats)
            out[pair.base.CONVOLUTION_OUTPUT_GRADIENTS] = np.asarray(grad)
        return out

    return call_model_function


def test_agrees_with_pair_gradient_and_gradcam(net):
    import saliency.core as pair

    model, variables, x, target = net
    cmf = _pair_call_model_function(model, variables)
    xs = np.asarray(x)
    ours = np.asarray(sal.gradient(models.apply_fn(model, variables), x, target))
    cam, low = sal.gradcam(model, variables, x, target, layer="features", return_low_res=True)
    for b in range(3):
        args = {"target": int(target[b])}
        np.testing.assert_allclose(
            ours[b], pair.GradientSaliency().GetMask(xs[b], cmf, args), rtol=1e-5, atol=1e-8
        )
        # PAIR: ReLU, divide by the low-res max, skimage resize; ours is not normalised. PAIR's
        # skimage resize mirrors the map at the border (mode "reflect", i.e. scipy's
        # "mirror") where jax.image.resize clamps to the edge (as TF and PyTorch do):
        # the outer ring of half a low-res pixel (1 px at 2x) differs by design.
        pair_cam = pair.GradCam().GetMask(xs[b], cmf, args, should_resize=True, three_dims=False)
        ours_cam = np.asarray(cam[b] / low[b].max() if low[b].max() > 0 else cam[b])
        inner = (slice(1, -1), slice(1, -1))
        np.testing.assert_allclose(ours_cam[inner], pair_cam[inner], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["smoothgrad", "smoothgrad_sq"])
def test_agrees_with_pair_smoothgrad_on_the_same_noise(net, monkeypatch, variant):
    import saliency.core as pair

    model, variables, x, target = net
    key = jax.random.key(11)
    ours = sal.smoothgrad(
        models.apply_fn(model, variables),
        x,
        target,
        key,
        num_samples=6,
        noise_level=0.2,
        variant=variant,
    )
    cmf = _pair_call_model_function(model, variables)
    xs = np.asarray(x)
    for b in range(3):
        # PAIR draws np.random.normal(0, stdev, shape) with stdev = 0.2 * (max - min):
        # feed it our standard normal samples for example b, scaled by its stdev.
        key_b = jax.random.fold_in(key, b)
        draws = iter(
            np.asarray(jax.random.normal(jax.random.fold_in(key_b, s), xs.shape[1:]))
            for s in range(6)
        )
        monkeypatch.setattr(
            np.random, "normal", lambda loc, scale, size, d=draws: loc + scale * next(d)
        )
        mask = pair.GradientSaliency().GetSmoothedMask(
            xs[b],
            cmf,
            {"target": int(target[b])},
            stdev_spread=0.2,
            nsamples=6,
            magnitude=variant == "smoothgrad_sq",
        )
        monkeypatch.undo()
        np.testing.assert_allclose(ours[b], mask, rtol=2e-4, atol=1e-6 * np.abs(mask).max())


# --------------------------------------------------------------------------- Captum
class _ConvTanhDense(nn.Module):  # 3x3 "SAME" conv = PyTorch's Conv2d(padding=1)
    @nn.compact
    def __call__(self, x):
        y = jnp.tanh(nn.Conv(4, (3, 3), name="conv")(x))
        return nn.Dense(NUM_CLASSES, name="dense")(y.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def captum_net():
    """_ConvTanhDense, its float64 PyTorch copy (NHWC in) and a batch with targets."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("captum")
    model = _ConvTanhDense()
    x = _uniform((3, 6, 6, 2), 9)
    variables = _init(model, x.shape, seed=9)
    p = jax.tree_util.tree_map(lambda a: torch.tensor(np.asarray(a, np.float64)), variables)
    p = p["params"]

    class Torch(torch.nn.Module):
        def forward(self, x):
            y = torch.nn.functional.conv2d(
                x.permute(0, 3, 1, 2), p["conv"]["kernel"].permute(3, 2, 0, 1), padding=1
            )
            y = torch.tanh(y + p["conv"]["bias"][:, None, None]).permute(0, 2, 3, 1)
            return y.reshape(x.shape[0], -1) @ p["dense"]["kernel"] + p["dense"]["bias"]

    target = np.array([0, 3, 1])
    torch_args = (Torch(), torch.tensor(np.asarray(x, np.float64)), torch.tensor(target))
    return models.apply_fn(model, variables), x, target, torch_args


def _check_captum(ours, theirs):
    theirs = theirs.detach().numpy()
    assert np.abs(theirs).max() > 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


def test_agrees_with_captum_gradient_and_integrated_gradients(captum_net):
    """Saliency (signed and abs), InputXGradient, IntegratedGradients with Captum's own
    quadrature points and weights, on the same model."""
    from captum import attr
    from captum.attr._utils import approximation_methods as captum_quadrature

    fn, x, target, (tm, xt, tt) = captum_net
    saliency = attr.Saliency(tm)
    _check_captum(sal.gradient(fn, x, target), saliency.attribute(xt, tt, abs=False))
    _check_captum(jnp.abs(sal.gradient(fn, x, target)), saliency.attribute(xt, tt))
    _check_captum(sal.input_x_gradient(fn, x, target), attr.InputXGradient(tm).attribute(xt, tt))
    ig = attr.IntegratedGradients(tm)
    for method in sal.IG_METHODS:
        step_sizes, alphas = captum_quadrature.approximation_parameters(method)
        ours_alphas, ours_weights = sal.quadrature(method, 5)
        np.testing.assert_allclose(ours_alphas, alphas(5), rtol=1e-6, atol=1e-7)
        # riemann_trapezoid: ours takes step 1 / (n - 1), Captum 1 / n (documented).
        scale = 5 / 4 if method == "riemann_trapezoid" else 1.0
        np.testing.assert_allclose(ours_weights, scale * np.array(step_sizes(5)), rtol=1e-6)
        if method in ("gausslegendre", "riemann_trapezoid"):  # Captum's default, ours
            ours = sal.integrated_gradients(
                fn, x, target, baseline=0.2, num_steps=5, method=method, batch_size=2
            )
            theirs = ig.attribute(xt, baselines=0.2, target=tt, n_steps=5, method=method)
            _check_captum(ours, scale * theirs)


def test_agrees_with_captum_noise_tunnel_on_the_same_noise(captum_net, monkeypatch):
    import torch
    from captum import attr

    fn, x, target, (tm, xt, tt) = captum_net
    # NoiseTunnel draws torch.normal(0, stdev) for B * n copies (example-major) per
    # chunk of n samples: hand it our standard normal draws for those samples.
    key, num_samples, chunk, sigma = jax.random.key(2), 5, 2, 0.3
    z = np.stack(
        [
            [jax.random.normal(jax.random.fold_in(k, s), x.shape[1:]) for s in range(num_samples)]
            for k in jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(3))
        ]
    )  # (B, S, H, W, C)
    for variant in sal.SMOOTHGRAD_VARIANTS:
        starts = iter(range(0, num_samples, chunk))

        def normal(mean, std, starts=starts):
            s, n = next(starts), std.shape[0] // 3
            return torch.tensor(z[:, s : s + n].reshape(std.shape), dtype=std.dtype) * std + mean

        monkeypatch.setattr(torch, "normal", normal)
        theirs = attr.NoiseTunnel(attr.Saliency(tm)).attribute(
            xt,
            nt_type=variant,
            nt_samples=num_samples,
            nt_samples_batch_size=chunk,
            stdevs=sigma,
            target=tt,
            abs=False,
        )
        monkeypatch.undo()
        ours = sal.smoothgrad(
            fn, x, target, key, num_samples=num_samples, noise_sigma=sigma, variant=variant
        )
        _check_captum(ours, theirs)


# --------------------------------------------------------------------------- display
def test_reduce_channels_against_numpy():
    maps = np.random.default_rng(0).normal(size=(2, 4, 5, 3)).astype(np.float32)
    expected = {
        "abs_max": np.abs(maps).max(-1),
        "max": maps.max(-1),
        "sum": maps.sum(-1),
        "abs_sum": np.abs(maps).sum(-1),
        "sum_abs": np.abs(maps).sum(-1),
        "mean": maps.mean(-1),
        "abs_mean": np.abs(maps).mean(-1),
        "l2": np.sqrt((maps**2).sum(-1)),
    }
    assert set(expected) == set(sal.REDUCTIONS)
    for reduction, ref in expected.items():
        np.testing.assert_allclose(sal.reduce_channels(maps, reduction), ref, rtol=1e-6)


def _captum_normalize(attr, sign, outlier_perc):
    """Captum's _normalize_attr (visualization.py) for one (H, W, C) map, in numpy."""

    def threshold(values, percentile):
        ordered = np.sort(values.flatten())
        cumulative = np.cumsum(ordered)
        return ordered[np.where(cumulative >= cumulative[-1] * 0.01 * percentile)[0][0]]

    combined = attr.sum(axis=2)
    if sign == "all":
        t = threshold(np.abs(combined), 100 - outlier_perc)
    elif sign == "positive":
        combined = (combined > 0) * combined
        t = threshold(combined, 100 - outlier_perc)
    elif sign == "negative":
        combined = (combined < 0) * combined
        t = -threshold(np.abs(combined), 100 - outlier_perc)
    else:
        combined = np.abs(combined)
        t = threshold(combined, 100 - outlier_perc)
    return np.clip(combined / t, -1, 1)


def test_normalizations_match_captum_and_pair():
    import saliency.core as pair

    maps = np.random.default_rng(1).normal(size=(2, 6, 7, 3))
    for sign in sal.CAPTUM_SIGNS:
        ours = sal.normalize_captum(maps.astype(np.float32), outlier_perc=2, sign=sign)
        for b in range(2):
            np.testing.assert_allclose(
                ours[b], _captum_normalize(maps[b], sign, 2), rtol=1e-4, atol=1e-5
            )
    ours = sal.normalize_pair(maps.astype(np.float32), percentile=99)
    ours_div = sal.normalize_pair(maps.astype(np.float32), percentile=95, diverging=True)
    for b in range(2):
        gray = pair.VisualizeImageGrayscale(maps[b], percentile=99)
        np.testing.assert_allclose(ours[b], gray, rtol=1e-4, atol=1e-5)
        div = pair.VisualizeImageDiverging(maps[b], percentile=95)
        np.testing.assert_allclose(ours_div[b], div, rtol=1e-4, atol=1e-5)
    assert ours.min() >= 0 and ours.max() == 1


def test_zero_maps_stay_finite():
    zeros = jnp.zeros((2, 4, 4, 3))
    for sign in sal.CAPTUM_SIGNS:
        np.testing.assert_array_equal(sal.normalize_captum(zeros, sign=sign), 0.0)
    np.testing.assert_array_equal(sal.normalize_pair(zeros), 0.0)
    np.testing.assert_array_equal(sal.normalize_pair(zeros, diverging=True), 0.5)
    np.testing.assert_array_equal(sal.normalize_pair(jnp.full((1, 4, 4), 3.0)), 0.0)


def test_normalize_captum_of_float16_maps_sums_in_float32():
    """Captum's cumulative sum of a float16 map ran in float16: past 65504 (a 64 x 64
    map of |a| ~ 20) it overflowed to inf and moved the threshold (0.11 off the float64
    display). It runs in float32 now; the display stays float16."""
    rng = np.random.default_rng(2)
    maps = rng.uniform(-40, 40, size=(2, 64, 64, 1)).astype(np.float16)
    assert np.abs(maps.astype(np.float64)).sum(axis=(1, 2, 3)).min() > 65504
    for sign in sal.CAPTUM_SIGNS:
        ours = sal.normalize_captum(maps, sign=sign)
        assert ours.dtype == np.float16
        for b in range(2):
            ref = _captum_normalize(maps[b].astype(np.float64), sign, 2)
            np.testing.assert_allclose(
                np.asarray(ours[b], np.float64), ref, atol=2e-3, err_msg=sign
            )


def test_reduce_channels_l2_of_float16_maps_does_not_overflow():
    """Float16 squares overflow past 255: the l2 norm of (300, 300, 300) was inf. The
    norm is taken in float32 and returned in float16."""
    rng = np.random.default_rng(3)
    big = rng.uniform(200, 400, size=(2, 3, 4, 3)) * rng.choice([-1, 1], size=(2, 3, 4, 3))
    big = big.astype(np.float16)
    l2 = sal.reduce_channels(big, "l2")
    assert l2.dtype == np.float16
    ref = np.sqrt(np.sum(np.square(big.astype(np.float64)), axis=-1))
    np.testing.assert_allclose(np.asarray(l2, np.float64), ref, rtol=1e-3)


# --------------------------------------------------------------------------- no retrace
def test_no_retrace_on_second_call_and_with_new_variables(net):
    model, variables, x, target = net
    key = jax.random.key(0)
    calls = {
        "gradient": lambda v: sal.gradient(models.apply_fn(model, v), x, target),
        "smoothgrad": lambda v: sal.smoothgrad(
            models.apply_fn(model, v), x, target, key, num_samples=6, noise_level=0.2
        ),
        "ig": lambda v: sal.integrated_gradients(models.apply_fn(model, v), x, target, num_steps=4),
        "gradcam": lambda v: sal.gradcam(model, v, x, target, layer="features"),
        "gradcam_pp": lambda v: sal.gradcam_plus_plus(model, v, x, target, layer="features"),
    }
    jitted = {
        "gradient": sal_gradients._gradient_jit,
        "smoothgrad": sal_gradients._smoothgrad_jit,
        "ig": sal_gradients._ig_jit,
    }
    new_variables = jax.tree_util.tree_map(lambda a: a * 1.5, variables)
    for name, call in calls.items():
        first = call(variables)
        traces, sizes = TRACES[0], {k: f._cache_size() for k, f in jitted.items()}
        second = call(variables)
        other = call(new_variables)
        assert TRACES[0] == traces, f"{name} retraced the model"
        assert {k: f._cache_size() for k, f in jitted.items()} == sizes, name
        np.testing.assert_array_equal(first, second)
        assert not np.allclose(first, other)  # the new variables were used
    # Any other callable is a static argument: the same function object is not retraced.
    plain = jax.jit(lambda z: model.apply(variables, z))
    first = sal.gradient(plain, x, target)
    traces, size = TRACES[0], sal_gradients._gradient_jit._cache_size()
    np.testing.assert_array_equal(sal.gradient(plain, x, target), first)
    assert (TRACES[0], sal_gradients._gradient_jit._cache_size()) == (traces, size)


def test_composes_with_the_callers_jit_and_vmap(net):
    model, variables, x, target = net
    fn = models.apply_fn(model, variables)
    direct = sal.gradient(fn, x, target)
    inside = jax.jit(lambda v, x, t: sal.gradient(models.apply_fn(model, v), x, t))
    np.testing.assert_allclose(inside(variables, x, target), direct, rtol=1e-6, atol=1e-9)
    per_example = jax.vmap(lambda xi, ti: sal.gradient(fn, xi[None], ti[None])[0])(x, target)
    np.testing.assert_allclose(per_example, direct, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(net):
    model, variables, x, target = net
    fn = models.apply_fn(model, variables)
    key = jax.random.key(0)
    bad_x = np.array(x)
    bad_x[1, 2, 3, 0] = np.nan
    inf_x = np.array(x)
    inf_x[0, 0, 0, 0] = np.inf
    nan_maps = jnp.asarray(bad_x)  # a device array: checked on the device
    cases = [
        (lambda: sal.gradient(fn, x[0], None), ValueError, r"rank-4 .* got shape \(16, 16, 3\)"),
        # Images of another size or channel count than the variables': say so (Flax's
        # own error names a kernel shape only).
        (lambda: sal.gradient(fn, x[:, :8, :8]), ValueError, r"do not fit .* = \(8, 8, 3\)"),
        (
            lambda: sal.gradcam(model, variables, x[..., :2], None, layer="features"),
            ValueError,
            r"do not fit images of shape \(H, W, C\) = \(16, 16, 2\)",
        ),
        (
            lambda: sal.explain_dataset(
                "gradient", [np.asarray(x[:, :8])], model=model, variables=variables, progress=False
            ),
            ValueError,
            r"do not fit images of shape \(H, W, C\) = \(8, 16, 3\)",
        ),
        (lambda: sal.gradient(fn, (x * 255).astype(jnp.uint8), None), TypeError, "uint8"),
        (lambda: sal.gradient(fn, bad_x, None), ValueError, r"NaN or inf .*\[1\]"),
        (lambda: sal.smoothgrad(fn, inf_x, None, key), ValueError, "NaN or inf"),
        (lambda: sal.gradient(fn, x, jnp.array([0, 1])), ValueError, r"shape \(B,\) = \(3,\)"),
        (lambda: sal.gradient(fn, x, jnp.array([0, 5, 1])), ValueError, r"\[0, 5\).* \[5\]"),
        (lambda: sal.gradient(fn, x, -1), ValueError, r"\[0, 5\)"),
        (lambda: sal.gradient(fn, x, jnp.array([0.0, 1.0, 2.0])), TypeError, "integer"),
        (lambda: sal.gradient("model", x), TypeError, "callable"),
        (lambda: sal.gradient(lambda z: z.sum(), x), ValueError, r"\(B, K\)"),
        (lambda: sal.smoothgrad(fn, x, target, key, num_samples=0), ValueError, "num_samples.*0"),
        (lambda: sal.smoothgrad(fn, x, target, key, num_samples=-3), ValueError, "num_samples"),
        (lambda: sal.smoothgrad(fn, x, target, key, batch_size=0), ValueError, "batch_size"),
        (lambda: sal.smoothgrad(fn, x, target, key, batch_size="all"), ValueError, "'auto'"),
        (lambda: sal.integrated_gradients(fn, x, target, batch_size=1.5), ValueError, "1.5"),
        (lambda: sal.smoothgrad(fn, x, target, key, variant="var"), ValueError, "'var'.*vargrad"),
        (lambda: sal.smoothgrad(fn, x, target, key, noise_level=-0.1), ValueError, "noise_level"),
        (lambda: sal.smoothgrad(fn, x, target, None), ValueError, "key is required"),
        (lambda: sal.smoothgrad(fn, x, target, jnp.zeros(3)), TypeError, "jax.random.key"),
        (lambda: sal.integrated_gradients(fn, x, target, num_steps=0), ValueError, "num_steps"),
        (lambda: sal.integrated_gradients(fn, x, target, method="simpson"), ValueError, "simpson"),
        (
            lambda: sal.integrated_gradients(fn, x, target, baseline=np.zeros((5, 5))),
            ValueError,
            "baseline",
        ),
        (
            lambda: sal.gradcam(model, variables, x, target, layer="features/conv9"),
            ValueError,
            r"unknown layer 'features/conv9'.*features/conv1 .*features/conv2 .*head/dense",
        ),
        (
            lambda: sal.gradcam(model, variables, x, target, layer="head/dense"),
            ValueError,
            r"\(B, h, w, C\).*features",
        ),
        (
            lambda: sal.gradcam(
                model, variables, x, target, layer="features", interpolation="area"
            ),
            ValueError,
            "'area'.*bilinear",
        ),
        (
            lambda: sal.gradcam(model, variables, x, jnp.array([9, 0, 0]), layer="features"),
            ValueError,
            r"\[0, 5\)",
        ),
        (lambda: sal.reduce_channels(x, "median"), ValueError, "'median'.*abs_max"),
        (lambda: sal.reduce_channels(x[..., 0], "sum"), ValueError, r"\(B, H, W, C\)"),
        (lambda: sal.normalize_captum(x, sign="both"), ValueError, "'both'"),
        # NaN maps: a percentile scale would turn them into plausible maps (PAIR's
        # all zeros, Captum's mostly ones) without the check.
        (lambda: sal.normalize_pair(nan_maps), ValueError, r"NaN or inf.*example\(s\) \[1\]"),
        (lambda: sal.normalize_captum(nan_maps), ValueError, r"NaN or inf.*\[1\]"),
        (lambda: sal.reduce_channels(np.asarray(nan_maps)), ValueError, r"NaN or inf.*\[1\]"),
        (lambda: sal.explain_dataset("occlusion", [x]), ValueError, "'occlusion'.*gradient"),
        (
            lambda: sal.explain_dataset("gradient", [np.asarray(x)], fn=fn, num_samples=3),
            TypeError,
            "num_samples",
        ),
        (
            lambda: sal.explain_dataset("smoothgrad", [np.asarray(x)], fn=fn, progress=False),
            ValueError,
            "key is required",
        ),
        *[  # a per-example array was applied by position in each batch
            (
                lambda option=option: sal.explain_dataset(
                    "smoothgrad",
                    [np.asarray(x)],
                    fn=fn,
                    key=jax.random.key(0),
                    progress=False,
                    **{option: np.full(len(x), 0.1)},
                ),
                ValueError,
                f"{option} must be one number for a whole dataset",
            )
            for option in ("noise_level", "noise_sigma")
        ],
        (
            lambda: sal.explain_dataset("gradient", [bad_x], fn=fn, progress=False),
            ValueError,
            "batch 0 images contains NaN",
        ),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()


def test_variables_of_another_model_are_named_not_the_images(net):
    """Flax's shape error was reported as images of the wrong size whatever its cause;
    variables of another configuration (7 classes here) or another model are named."""
    model, variables, x, target = net
    seven = _init(SplitNet(num_classes=7), (1, 16, 16, 3))
    other = _init(models.get("mlp", binary=False, num_classes=NUM_CLASSES, hidden=(8,)), x.shape)
    no_stats = {"params": variables["params"]}
    not_this = r"do not belong to this model: parameter 'kernel' of layer 'head/dense' has "
    not_this += r"shape \(512, 7\) in the variables, but the model makes it \(512, 5\)"
    cases = [
        (lambda: sal.gradient(models.apply_fn(model, seven), x, target), not_this),
        (lambda: sal.gradcam(model, seven, x, target, layer="features"), not_this),
        (
            lambda: sal.explain_dataset(
                "gradient", [np.asarray(x)], model=model, variables=seven, progress=False
            ),
            not_this,
        ),
        (
            lambda: sal.integrated_gradients(models.apply_fn(model, other), x, target),
            r"variables do not match the model .*features/conv1",
        ),
        (
            lambda: sal.gradcam(model, no_stats, x, target, layer="features"),
            r"variables do not match the model .*batch_stats.*features/bn",
        ),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            call()
        assert "do not fit images" not in str(info.value)
    # Images of another size or channel count are still named as such.
    with pytest.raises(ValueError, match=r"do not fit images of shape \(H, W, C\) = \(16, 16, 2\)"):
        sal.gradient(models.apply_fn(model, variables), x[..., :2])


def test_fn_that_is_not_x_to_logits_is_named(net):
    """model.apply (variables first), the module itself or any (variables, x) function
    failed deep in Flax with "Array.__contains__: unsupported operand type"."""
    from jbnn.models import fold

    model, variables, x, target = net
    apply_message = r"fn is SplitNet\.apply, which takes \(variables, x\).*apply_fn"
    cases = [
        (lambda: sal.gradient(model.apply, x, target), apply_message),
        (lambda: sal.smoothgrad(model.apply, x, target, jax.random.key(0)), apply_message),
        (
            lambda: sal.gradcam(model, None, x, target, layer="features", fn=model.apply),
            apply_message,
        ),
        (lambda: sal.gradient(model, x, target), r"the Flax module SplitNet itself.*apply_fn"),
        (
            lambda: sal.integrated_gradients(lambda v, z: model.apply(v, z), x, target),
            r"one argument, the images x.*takes 2 \(v, z\)",
        ),
        (
            lambda: sal.gradient(fold.folded_apply(model), x, target),
            r"takes 2 \(variables, x\).*apply_fn",
        ),
        (
            lambda: sal.explain_dataset("gradient", [np.asarray(x)], fn=model.apply),
            apply_message,
        ),
    ]
    for call, pattern in cases:
        with pytest.raises(TypeError, match=pattern):
            call()
    # Functions of x alone (with optional arguments) are taken as they are.
    fn = lambda z, scale=1.0: scale * model.apply(variables, z)
    np.testing.assert_allclose(
        sal.gradient(fn, x, target), _grad_loop(model, variables, x, target), rtol=1e-5, atol=1e-7
    )


def test_logits_shape_is_evaluated_once_per_fn_and_image_shape(net, monkeypatch):
    """The shape-only trace of fn (about 1 ms per call for a ResNet-18) runs once per fn
    object and image shape; other images, another fn or variables that do not fit are
    still checked, and the kept shapes go with fn."""
    import gc

    from jbnn.saliency import _checks

    model, variables, x, target = net
    traced = []
    original = _checks._logits_shape
    monkeypatch.setattr(
        _checks, "_logits_shape", lambda *a: traced.append(a[1].shape) or original(*a)
    )
    fn = models.apply_fn(model, variables)
    want = _grad_loop(model, variables, x, target)
    for _ in range(3):
        np.testing.assert_allclose(sal.gradient(fn, x, target), want, rtol=1e-5, atol=1e-7)
    sal.smoothgrad(fn, x, target, jax.random.key(0), num_samples=2)
    assert traced == [x.shape]
    sal.gradient(fn, x[:1], target[:1])  # another batch size: traced again
    assert traced == [x.shape, x[:1].shape]
    with pytest.raises(ValueError, match=r"do not fit images of shape \(H, W, C\) = "):
        sal.gradient(fn, x[..., :2], target)
    other = models.apply_fn(model, variables)  # another fn object
    sal.gradient(other, x, target)
    assert len(traced) == 4
    cached = len(_checks._LOGITS_SHAPES)
    del fn, other
    gc.collect()
    assert len(_checks._LOGITS_SHAPES) <= cached - 2


# --------------------------------------------------------------------------- dataset
def test_explain_dataset_matches_direct_calls(net, tmp_path):
    model, variables, x, _ = net
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, size=(7, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=7)
    batches = [(images[:3], labels[:3]), (images[3:6], labels[3:6]), (images[6:], labels[6:])]
    fn = models.apply_fn(model, variables)

    out = sal.explain_dataset(
        "gradient",
        batches,
        model=model,
        variables=variables,
        target="label",
        progress=False,
        path=tmp_path / "maps.npz",
    )
    np.testing.assert_array_equal(out["labels"], labels)
    np.testing.assert_array_equal(out["targets"], labels)
    np.testing.assert_array_equal(out["predictions"], np.argmax(fn(images), -1))
    np.testing.assert_allclose(out["maps"], sal.gradient(fn, images, labels), rtol=1e-5, atol=1e-8)
    saved = np.load(tmp_path / "maps.npz")
    np.testing.assert_array_equal(saved["maps"], out["maps"])

    cams = sal.explain_dataset(
        "gradcam",
        [{"image": b[0]} for b in batches],
        model=model,
        variables=variables,
        layer="features",
        progress=False,
    )
    assert "labels" not in cams
    np.testing.assert_allclose(
        cams["maps"],
        sal.gradcam(model, variables, images, None, layer="features"),
        rtol=1e-5,
        atol=1e-7,
    )
    # SmoothGrad: example i uses fold_in(key, i), whatever the batching.
    key = jax.random.key(5)
    a = sal.explain_dataset(
        "smoothgrad", batches, fn=fn, key=key, num_samples=6, noise_level=0.2, progress=False
    )
    b = sal.explain_dataset(  # other offsets, same padded size: no new compilation
        "smoothgrad",
        [(images[:3], labels[:3]), (images[3:4], labels[3:4]), (images[4:], labels[4:])],
        fn=fn,
        key=key,
        num_samples=6,
        noise_level=0.2,
        progress=False,
    )
    np.testing.assert_allclose(a["maps"], b["maps"], rtol=1e-5, atol=1e-9)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(4, 7))
    direct = sal.smoothgrad(
        fn, images[4:], a["predictions"][4:], keys, num_samples=6, noise_level=0.2
    )
    np.testing.assert_allclose(a["maps"][4:], direct, rtol=1e-5, atol=1e-9)
    # The split input layer's option passes through (here: every gradient in full).
    ig = sal.explain_dataset(
        "integrated_gradients",
        batches[:1],
        fn=fn,
        num_steps=4,
        split_input_layer=False,
        target="label",
        progress=False,
    )
    direct = sal.integrated_gradients(fn, images[:3], labels[:3], num_steps=4)
    np.testing.assert_allclose(ig["maps"], direct, rtol=1e-5, atol=1e-6 * np.abs(direct).max())


def test_explain_dataset_passes_the_ig_quadrature_on(net):
    # explain_dataset's own first argument is also called method: IG's quadrature option
    # must still reach integrated_gradients (a TypeError "multiple values" before).
    model, variables, x, _ = net
    fn = models.apply_fn(model, variables)
    out = sal.explain_dataset(
        "integrated_gradients",
        [np.asarray(x[:2]), np.asarray(x[2:])],
        fn=fn,
        num_steps=3,
        method="riemann_left",
        baseline=0.1,
        progress=False,
    )
    # Left Riemann sum by hand: points 0, 1/3, 2/3 of the path, weights 1/3.
    xb = np.asarray(x) - 0.1
    ref = sum(
        _grad_loop(model, variables, 0.1 + a * jnp.asarray(xb), out["targets"]) / 3
        for a in (0.0, 1 / 3, 2 / 3)
    )
    np.testing.assert_allclose(out["maps"], xb * ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    sys.path.insert(0, {tests!r})
    from test_saliency import SplitNet, _init
    from jbnn import models, saliency as sal

    assert len(jax.local_devices()) == 4, jax.local_devices()
    model = SplitNet()
    variables = _init(model, (1, 16, 16, 3))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(11, 16, 16, 3)).astype(np.float32)
    batches = [images[:6], images[6:]]  # 6 -> padded to 8 on 4 devices, then 5 -> 8
    single = Mesh(np.asarray(jax.local_devices()[:1]), ("batch",))
    # Record over how many devices each batch is split.
    from jbnn.saliency import dataset
    seen, predict = [], dataset._predict
    dataset._predict = lambda fn, x: seen.append(len(x.sharding.device_set)) or predict(fn, x)
    errors = {{}}
    for method, kw in [
        ("gradient", dict()),
        ("smoothgrad", dict(key=jax.random.key(3), num_samples=4, noise_level=0.2)),
        ("gradcam", dict(layer="features")),
    ]:
        sharded = sal.explain_dataset(method, batches, model=model, variables=variables,
                                      progress=False, **kw)
        assert seen == [4, 4], seen
        seen.clear()
        alone = sal.explain_dataset(method, batches, model=model, variables=variables,
                                    progress=False, mesh=single, **kw)
        assert seen == [1, 1], seen
        seen.clear()
        assert sharded["maps"].shape[0] == 11
        np.testing.assert_array_equal(sharded["predictions"], alone["predictions"])
        scale = float(np.abs(alone["maps"]).max())
        assert scale > 0
        errors[method] = float(np.abs(sharded["maps"] - alone["maps"]).max()) / scale
    # SmoothGrad and IG run their samples as one batch: a batch sharded over the devices
    # must stay sharded, with no collective moving examples between devices.
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jbnn.saliency import gradients
    mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
    split = lambda a: jax.device_put(a, NamedSharding(mesh, P("batch")))
    fn = jax.device_put(models.apply_fn(model, variables), NamedSharding(mesh, P()))
    x, t = split(images[:8]), split(np.zeros(8, np.int32))
    keys = split(jax.random.split(jax.random.key(0), 8))
    compiled = {{
        "smoothgrad": gradients._smoothgrad_jit.lower(
            fn, x, t, keys, jnp.float32(0.1), relative=False, num_samples=4,
            variant="smoothgrad", batch_size=2).compile(),
        "ig": gradients._ig_jit.lower(
            fn, x, t, jnp.zeros((), jnp.float32), num_steps=4,
            method="riemann_trapezoid", batch_size=4).compile(),
    }}
    for name, c in compiled.items():
        text = c.as_text()
        moved = [op for op in ("all-gather", "all-to-all", "collective-permute") if op in text]
        errors[name + "_collectives"] = len(moved)
        errors[name + "_sharded_devices"] = len(c.output_shardings.device_set)
    print(json.dumps(errors))
    """
)


def _run_on_cpu_devices(script: str, devices: int) -> dict:
    """Runs ``script`` (formatted with the tests folder) in a subprocess with ``devices``
    simulated CPU devices; returns the JSON object of its last output line."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", script.format(tests=tests_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_explain_dataset_sharded_over_4_devices_equals_single_device():
    errors = _run_on_cpu_devices(_SHARDED_SCRIPT, 4)
    for name in ("smoothgrad", "ig"):
        assert errors.pop(name + "_collectives") == 0, name
        assert errors.pop(name + "_sharded_devices") == 4, name
    assert set(errors) == {"gradient", "smoothgrad", "gradcam"}
    for method, error in errors.items():
        assert error < 1e-5, (method, error)


_COMMITTED_BASELINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    sys.path.insert(0, {tests!r})
    from test_saliency import SplitNet, _init, _grad_loop
    from jbnn import saliency as sal

    devices = jax.local_devices()
    assert len(devices) == 2, devices
    model = SplitNet()
    variables = _init(model, (1, 16, 16, 3))
    images = np.random.default_rng(0).uniform(-1, 1, size=(3, 16, 16, 3)).astype(np.float32)
    baseline = np.random.default_rng(1).uniform(-0.2, 0.2, size=(16, 16, 3)).astype(np.float32)
    errors = {{}}
    for label, mesh, device in [
        ("2 devices, baseline on device 0", None, devices[0]),
        ("device 0, baseline on device 1", Mesh(np.asarray(devices[:1]), ("batch",)), devices[1]),
    ]:
        out = sal.explain_dataset(
            "integrated_gradients", [images], model=model, variables=variables,
            baseline=jax.device_put(baseline, device), num_steps=2, method="riemann_left",
            mesh=mesh, progress=False)
        # Left Riemann sum of 2 points by hand: alpha 0 and 1/2, weights 1/2.
        diff = images - baseline
        ref = diff * sum(
            _grad_loop(model, variables, jnp.asarray(baseline + a * diff), out["targets"]) / 2
            for a in (0.0, 0.5)
        )
        errors[label] = float(np.abs(out["maps"] - ref).max() / np.abs(ref).max())
    print(json.dumps(errors))
    """
)


def test_explain_dataset_replicates_a_baseline_committed_to_one_device():
    """IG's baseline array committed to one device met a batch sharded over two (or over
    another device) in one jitted computation: "Received incompatible devices"."""
    errors = _run_on_cpu_devices(_COMMITTED_BASELINE_SCRIPT, 2)
    assert len(errors) == 2
    for label, error in errors.items():
        assert error < 1e-4, (label, error)
