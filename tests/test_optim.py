"""Bop, latent-weight clipping and parameter routing against hand computations."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jbnn import models, optim

KEY = jax.random.key(0)


def larq_bop_step(w, m, g, threshold, gamma):
    """Larq's Bop._resource_apply_dense in numpy (tf.sign(0) = 0, lq.math.sign(0) = +1)."""
    m = m + gamma * (g - m)
    inner = -np.sign(w * m - threshold) * w
    return np.where(inner >= 0, 1.0, -1.0).astype(w.dtype), m


def test_bop_flips_exactly_when_w_times_m_exceeds_threshold():
    # gamma = 1 makes m equal to the gradient, so w * m is set by hand around tau.
    tau = 0.5
    w = np.array([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0], np.float32)
    g = np.array([0.25, 0.5, 0.75, -0.25, -0.5, -0.75, -2.0, 2.0], np.float32)
    # w * m:        0.25  0.5   0.75   0.25   0.5    0.75  -2.0  -2.0
    expected_flip = np.array([0, 0, 1, 0, 0, 1, 0, 0], bool)
    tx = optim.bop(threshold=tau, gamma=1.0)
    params = {"k": jnp.asarray(w)}
    state = tx.init(params)
    updates, state = jax.jit(tx.update)({"k": jnp.asarray(g)}, state, params)
    new_w = np.asarray(optax.apply_updates(params, updates)["k"])
    np.testing.assert_array_equal(new_w, np.where(expected_flip, -w, w))
    np.testing.assert_array_equal(np.asarray(state.momentum["k"]), g)
    assert int(state.count) == 1


def test_bop_moving_average_and_flips_match_larq_over_steps():
    rng = np.random.default_rng(0)
    shape = (6, 5)
    w = np.where(rng.normal(size=shape) >= 0, 1.0, -1.0).astype(np.float32)
    m = np.zeros(shape, np.float32)
    tau, gamma = 1e-3, 0.1
    tx = optim.bop(threshold=tau, gamma=gamma)
    params = {"k": jnp.asarray(w)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    total_flips = 0
    for _ in range(8):
        g = rng.normal(scale=0.05, size=shape).astype(np.float32)
        w_ref, m = larq_bop_step(w, m, g, np.float32(tau), np.float32(gamma))
        updates, state = update({"k": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(np.asarray(state.momentum["k"]), m, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(params["k"]), w_ref)
        total_flips += int(np.sum(w_ref != w))
        w = w_ref
    assert total_flips > 0  # the sequence exercised both branches
    assert update._cache_size() == 1  # no retrace across steps


def test_bop_binarizes_float_initial_weights_and_needs_params():
    w = jnp.array([0.3, -0.2, 0.0, 0.7])
    g = jnp.array([1.0, 1.0, 1.0, -1.0])
    tx = optim.bop(threshold=0.0, gamma=1.0)
    state = tx.init({"k": w})
    updates, _ = tx.update({"k": g}, state, {"k": w})
    new = optim.project_binary_kernels(
        optax.apply_updates({"k": w}, updates), optim.BinaryKernels(((("k",), 1.0),)), "bop"
    )
    # w * m = [0.3, -0.2, 0, -0.7]: only the first flips; 0 counts as +1 and stays.
    np.testing.assert_array_equal(np.asarray(new["k"]), [-1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update({"k": g}, state)
    with pytest.raises(ValueError, match="gamma"):
        optim.bop(gamma=0.0)
    with pytest.raises(ValueError, match="threshold"):
        optim.bop(threshold=-1.0)


def test_bop_takes_schedules_that_return_python_floats():
    """optax.constant_schedule returns a float; Bop called .astype on it."""
    rng = np.random.default_rng(1)
    params = {"k": jnp.asarray(np.where(rng.normal(size=(5, 4)) >= 0, 1.0, -1.0), jnp.float32)}
    grads = {"k": jnp.asarray(rng.normal(scale=0.5, size=(5, 4)), jnp.float32)}
    want, _ = optim.bop(threshold=0.1, gamma=0.5).update(grads, optim.bop().init(params), params)
    tx = optim.bop(threshold=lambda step: 0.1, gamma=optax.constant_schedule(0.5))
    got, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(got["k"]), np.asarray(want["k"]))
    assert np.any(np.asarray(got["k"]) != 0)  # some weights flipped
    assert int(state.count) == 1


def test_bop_refuses_kernels_that_are_not_one_bit():
    """Bop sets its kernels to +-1: a ternary or 2-bit kernel would lose its other levels."""
    from jbnn.layers import QuantDense

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = QuantDense(4, kernel_quantizer="ste_sign", name="binary")(x)
            return QuantDense(3, kernel_quantizer="ste_tern", name="ternary")(x)

    model = Net()
    params = jax.jit(model.init)(KEY, jnp.zeros((1, 6)))["params"]
    kernels = optim.binary_kernels(model, (1, 6))
    schedule = optim.make_schedule(1e-3, 10, "constant")
    with pytest.raises(ValueError, match=r"1-bit.*ternary \('ste_tern': 2 bits\)"):
        optim.make_optimizer(params, kernels, schedule=schedule, binary_optimizer="bop")
    optim.make_optimizer(params, kernels, schedule=schedule, binary_optimizer="latent")
    sign_only = optim.BinaryKernels(kernels.clips[:1], kernels.quantizers[:1])
    optim.param_labels(params, sign_only, "bop")  # the 1-bit layer alone is fine


def _mlp(binary=True, kernel_clip=1.0):
    model = models.get("mlp", binary=binary, num_classes=3, hidden=(8, 6), kernel_clip=kernel_clip)
    variables = jax.jit(model.init)(KEY, jnp.zeros((2, 4, 4, 1)))
    return model, variables


def test_binary_kernels_and_labels_come_from_the_quantized_layers():
    model, variables = _mlp()
    kernels = optim.binary_kernels(model, (1, 4, 4, 1))
    assert kernels.paths == (("dense1", "kernel"), ("dense2", "kernel"), ("head", "kernel"))
    assert dict(kernels.clips) == {p: 1.0 for p in kernels.paths}
    labels = optim.param_labels(variables["params"], kernels, "bop")
    flat = {
        "/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(labels)
    }
    for path, label in flat.items():
        expected = optim.BINARY if path.endswith("kernel") else optim.REAL
        assert label == expected, path
    twin = models.twin(model)
    assert len(optim.binary_kernels(twin, (1, 4, 4, 1))) == 0
    with pytest.raises(ValueError, match="Unknown binary optimizer 'sgd'"):
        optim.param_labels(variables["params"], kernels, "sgd")


def _grads(model, variables, x, y):
    def loss(params):
        logits, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.jit(jax.grad(loss))(variables["params"])


@pytest.mark.parametrize("binary_optimizer", ["latent", "bop"])
def test_routing_sends_each_group_to_its_optimizer(binary_optimizer):
    model, variables = _mlp(kernel_clip=0.05)
    params = variables["params"]
    kernels = optim.binary_kernels(model, (1, 4, 4, 1))
    x = jax.random.normal(KEY, (4, 4, 4, 1))
    y = jnp.array([0, 1, 2, 1])
    grads = _grads(model, variables, x, y)
    schedule = optim.make_schedule(1e-2, 10, "constant")
    tx = optim.make_optimizer(
        params, kernels, schedule=schedule, binary_optimizer=binary_optimizer, gamma=0.5
    )
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    new = optim.project_binary_kernels(
        optax.apply_updates(params, updates), kernels, binary_optimizer
    )

    # Independent reference: plain Adam on every leaf, Bop alone on binary kernels.
    adam = optax.adam(1e-2)
    ref_adam = jax.jit(lambda g, p: optax.apply_updates(p, adam.update(g, adam.init(p), p)[0]))(
        grads, params
    )
    bop = optim.bop(gamma=0.5)
    for path, _ in kernels.clips:
        layer = path[0]
        got = np.asarray(new[layer]["kernel"])
        if binary_optimizer == "latent":
            want = np.clip(np.asarray(ref_adam[layer]["kernel"]), -0.05, 0.05)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
            assert np.abs(got).max() <= 0.05
        else:
            k = {"k": params[layer]["kernel"]}
            u, _ = bop.update({"k": grads[layer]["kernel"]}, bop.init(k), k)
            want = np.where(np.asarray(optax.apply_updates(k, u)["k"]) >= 0, 1.0, -1.0)
            np.testing.assert_array_equal(got, want)
    for layer in ("dense1_bn", "dense2_bn", "head_bn"):
        for name, leaf in new[layer].items():
            np.testing.assert_allclose(
                np.asarray(leaf), np.asarray(ref_adam[layer][name]), rtol=1e-5, atol=1e-8
            )


def test_adamw_decays_only_kernels():
    model, variables = _mlp(binary=False)
    params = variables["params"]
    kernels = optim.binary_kernels(model, (1, 4, 4, 1))
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx = optim.make_optimizer(
        params,
        kernels,
        schedule=optax.constant_schedule(0.1),
        name="adamw",
        weight_decay=0.5,
    )
    updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    # With zero gradients the update is -lr * wd * p on kernels, 0 elsewhere.
    np.testing.assert_allclose(
        np.asarray(updates["dense1"]["kernel"]),
        -0.05 * np.asarray(params["dense1"]["kernel"]),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(np.asarray(updates["dense1_bn"]["bias"]), 0.0)
    with pytest.raises(ValueError, match="takes no weight_decay"):
        optim.make_optimizer(params, kernels, schedule=optax.constant_schedule(0.1), weight_decay=1)
    with pytest.raises(ValueError, match="Unknown optimizer 'sgd'"):
        optim.make_optimizer(params, kernels, schedule=optax.constant_schedule(0.1), name="sgd")


def test_flip_ratio_counts_sign_changes():
    kernels = optim.BinaryKernels(((("a", "kernel"), 1.0), (("b", "kernel"), None)))
    old = {"a": {"kernel": jnp.array([1.0, -1.0, 0.0, 0.2])}, "b": {"kernel": jnp.ones((2, 2))}}
    new = {
        "a": {"kernel": jnp.array([-1.0, -0.5, -0.1, 0.0])},  # flips: yes, no, yes, no
        "b": {"kernel": jnp.array([[1.0, -1.0], [1.0, 1.0]])},  # one flip
    }
    assert float(optim.flip_ratio(old, new, kernels)) == pytest.approx(3 / 8)
    assert float(optim.flip_ratio(old, new, optim.BinaryKernels(()))) == 0.0


def test_flip_ratio_equals_a_numpy_count_for_every_kernel_rank():
    # conv (3x3: 32 bits a word; 3x3x3x5: uint8 chunks), dense (300 x 7: uint8 chunks;
    # 48 x 40: 32 bits a word), 1-D and scalar kernels, with exact zeros (sign(0) = +1)
    # and -0.0
    rng = np.random.default_rng(0)
    shapes = {
        "conv": (3, 3, 16, 24),
        "conv_odd": (3, 3, 3, 5),
        "dense": (300, 7),
        "packed": (48, 40),
        "vector": (7,),
        "scalar": (),
    }
    round_ = lambda a: np.round(a, 1).astype(np.float32)  # many exact zeros
    old = {k: {"kernel": round_(rng.normal(0, 0.2, s))} for k, s in shapes.items()}
    new = {
        k: {"kernel": round_(v["kernel"] + rng.normal(0, 0.2, s))}
        for (k, v), s in zip(old.items(), shapes.values(), strict=True)
    }
    new["dense"]["kernel"][0, :3] = [-0.0, 0.0, -0.0]
    new["packed"]["kernel"][-1, -3:] = [-0.0, 0.0, -0.0]
    kernels = optim.BinaryKernels(tuple(((k, "kernel"), 1.0) for k in shapes))
    changed = sum(np.sum((old[k]["kernel"] >= 0) != (new[k]["kernel"] >= 0)) for k in shapes)
    total = sum(np.size(old[k]["kernel"]) for k in shapes)
    got = jax.jit(optim.flip_ratio, static_argnums=2)(old, new, kernels)
    assert float(got) == pytest.approx(changed / total, rel=1e-7)


def test_latent_clip_leaves_unclipped_layers_alone():
    kernels = optim.BinaryKernels(((("a", "kernel"), 0.5), (("b", "kernel"), None)))
    params = {"a": {"kernel": jnp.array([-2.0, 0.3, 0.9])}, "b": {"kernel": jnp.array([3.0])}}
    out = optim.project_binary_kernels(params, kernels, "latent")
    np.testing.assert_array_equal(np.asarray(out["a"]["kernel"]), np.float32([-0.5, 0.3, 0.5]))
    np.testing.assert_array_equal(np.asarray(out["b"]["kernel"]), [3.0])
    with pytest.raises(ValueError, match="not in the parameters"):
        optim.project_binary_kernels({"c": {"kernel": jnp.ones(1)}}, kernels, "latent")


def test_schedules():
    cosine = optim.make_schedule(1.0, 100, "cosine", warmup_steps=10)
    assert float(cosine(0)) == 0.0
    assert float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0)
    # cosine decay over the 90 steps after warmup: 0.5 * (1 + cos(pi * 45 / 90)) = 0.5
    assert float(cosine(55)) == pytest.approx(0.5, abs=1e-6)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
    constant = optim.make_schedule(0.3, 100, "constant", warmup_steps=3)
    assert [float(constant(s)) for s in (0, 3, 99)] == pytest.approx([0.0, 0.3, 0.3])
    assert float(optim.make_schedule(0.3, 5, "constant")(0)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="Unknown schedule 'linear'"):
        optim.make_schedule(1.0, 10, "linear")
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.make_schedule(1.0, 10, "cosine", warmup_steps=10)


def test_flip_count_of_dense_kernels_does_not_overflow_its_words_or_chunks():
    # every sign flips: 32-bit words (64 x 96, 1 x 32), uint8 chunks of rows of 600 (200
    # each), 257 (prime: chunks of 1), 255
    for shape in ((64, 96), (1, 32), (39, 600), (3, 257), (2, 255), (6, 6, 8, 32), (5, 5, 3, 7)):
        old = {"d": {"kernel": jnp.ones(shape)}}
        new = {"d": {"kernel": -jnp.ones(shape)}}
        kernels = optim.BinaryKernels(((("d", "kernel"), 1.0),))
        assert float(jax.jit(optim.flip_ratio, static_argnums=2)(old, new, kernels)) == 1.0


def test_flip_ratio_of_update_counts_flips_and_changes_no_bit_of_the_updates():
    kernels = optim.BinaryKernels(((("a", "kernel"), 1.0), (("c", "kernel"), None)))
    special = np.array([-0.0, 0.0, np.inf, -np.inf, np.nan, 1e-45, -3.4e38, 0.5], np.float32)
    params = {
        "a": {"kernel": jnp.asarray([0.1, -0.2, 0.3, -0.4, 0.5, -0.0, 0.0, -1.0])},
        "b": {"kernel": jnp.ones(8)},
        "c": {"kernel": jnp.asarray([[0.0, -0.5], [0.25, 1.0]])},
    }
    updates = {
        "a": {"kernel": jnp.asarray(special)},
        "b": {"kernel": jnp.asarray(special)},
        "c": {"kernel": jnp.asarray([[-0.1, 0.5], [-0.25, -2.0]])},
    }
    ratio, tied = jax.jit(optim.flip_ratio_of_update, static_argnums=2)(params, updates, kernels)
    new = optax.apply_updates(params, updates)
    assert float(ratio) == pytest.approx(float(optim.flip_ratio(params, new, kernels)))
    # a: 0.5 + nan (NaN counts as negative), 0 - 3.4e38; c: -0.1, 0.0 (sign(0) = +1), -1
    assert float(ratio) == pytest.approx((2 + 3) / 12)
    # the applied updates are the same, bit for bit (-0.0, inf, NaN, extremes included;
    # XLA's CPU backend flushes the subnormal 1e-45 to zero in either)
    apply = jax.jit(optax.apply_updates)
    for leaf, ref in zip(
        jax.tree.leaves(apply(params, tied)), jax.tree.leaves(apply(params, updates)), strict=True
    ):
        np.testing.assert_array_equal(
            np.asarray(leaf).view(np.uint32), np.asarray(ref).view(np.uint32)
        )
    empty = optim.flip_ratio_of_update(params, updates, optim.BinaryKernels(()))
    assert float(empty[0]) == 0.0 and empty[1] is updates


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": float("inf")}, "learning_rate must be a finite number > 0, got inf"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0, got nan"),
        ({"learning_rate": 0.0}, "learning_rate must be a finite number > 0, got 0.0"),
        ({"learning_rate": True}, "learning_rate must be a finite number > 0, got True"),
        ({"learning_rate": "0.1"}, "learning_rate must be a finite number > 0, got '0.1'"),
        ({"warmup_steps": 2.5}, "warmup_steps must be an int >= 0, got 2.5"),
        ({"warmup_steps": float("nan")}, "warmup_steps must be an int >= 0, got nan"),
        ({"warmup_steps": -1}, "warmup_steps must be an int >= 0, got -1"),
        ({"total_steps": 10.5}, "total_steps must be an int >= 1, got 10.5"),
        ({"total_steps": True}, "total_steps must be an int >= 1, got True"),
    ],
)
def test_make_schedule_refuses_non_finite_and_non_integral_values(kwargs, match):
    # learning_rate=inf passed `not lr > 0` and gave an inf schedule (the first step NaN)
    args = {"learning_rate": 1e-3, "total_steps": 10, "schedule": "cosine", "warmup_steps": 0}
    with pytest.raises(ValueError, match=re.escape(match)):
        optim.make_schedule(**{**args, **kwargs})


def test_weight_decay_threshold_and_gamma_must_be_finite_and_in_range():
    model, variables = _mlp()
    params, kernels = variables["params"], optim.binary_kernels(model, (1, 4, 4, 1))
    make = functools.partial(
        optim.make_optimizer, params, kernels, schedule=optax.constant_schedule(0.1)
    )
    for value in (-0.1, float("inf"), float("nan"), True):
        with pytest.raises(
            ValueError, match=re.escape(f"weight_decay must be a finite number >= 0, got {value!r}")
        ):
            make(name="adamw", weight_decay=value)
    with pytest.raises(
        ValueError, match=re.escape("weight_decay must be a finite number >= 0, got nan")
    ):
        make(name="adam", weight_decay=float("nan"))  # was "adam takes no weight_decay"
    for value in (float("inf"), float("nan"), -1e-9):
        with pytest.raises(
            ValueError, match=re.escape(f"threshold must be a finite number >= 0, got {value!r}")
        ):
            make(binary_optimizer="bop", threshold=value)
    for value in (0.0, 1.5, float("nan"), float("inf")):
        with pytest.raises(
            ValueError, match=re.escape(f"gamma must be a finite number in (0, 1], got {value!r}")
        ):
            make(binary_optimizer="bop", gamma=value)
    make(name="adamw", weight_decay=0.0)  # the bounds themselves are fine
    make(binary_optimizer="bop", threshold=0.0, gamma=1.0)
