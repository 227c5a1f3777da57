"""jbnn.models.frozen: quantized kernels computed once for inference."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import images, small_model, variables_with_statistics

from jbnn import layers, models
from jbnn.layers import QuantConv, QuantDense
from jbnn.models import frozen

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _variables(model, x, seed: int = 0):
    """Initialised variables with BatchNorm statistics and affine parameters away from
    the identity and latent weights beyond the clip, so that a wrong kernel shows."""

    def fill(path, leaf, rng):
        key = path[-1].key
        if key == "kernel":
            return leaf * 1.5 / jnp.maximum(jnp.max(jnp.abs(leaf)), 1e-6)
        if key in ("scale", "bias"):
            return jnp.asarray(rng.uniform(0.5, 1.5, size=leaf.shape), leaf.dtype)
        return None

    return variables_with_statistics(model, x, seed, fill)


def _call(fn, x):
    return jax.jit(lambda f, x: f(x))(fn, x)


def _grad(fn, x, ct):
    return jax.jit(jax.grad(lambda x, f: jnp.sum(ct * f(x))))(x, fn)


@pytest.mark.parametrize("name", models.names())
def test_every_quantized_layer_of_every_model_is_frozen(name):
    # shapes only: no model is compiled
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    model = small_model(name, binary=True)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    expected = ["/".join(info.path) for info in layers.quantized_layers(model, x.shape)]
    assert frozen.frozen_layers(model, variables, x) == list(dict.fromkeys(expected))


# sign kernels with a dense head (BinaryNet), magnitude-aware kernels and real shortcuts
# (Bi-Real Net), XNOR-Net's alpha; a twin (the latent kernel as it is)
CASES = [("binarynet", True), ("birealnet18", True), ("xnornet", True), ("xnornet", False)]
IDS = [f"{name}-{'bnn' if binary else 'twin'}" for name, binary in CASES]


@pytest.mark.parametrize(("name", "binary"), CASES, ids=IDS)
def test_frozen_function_equals_the_model_and_its_input_gradient(name, binary):
    # The same ops on the same numbers in another program: equal for sign kernels (a
    # binarized activation cannot move), within float rounding for XNOR-Net's alpha.
    x = images()
    model = small_model(name, binary=binary)
    variables = _variables(model, x)
    plain = models.apply_fn(model, variables)
    fast = models.apply_fn(model, variables, input_like=x)
    ct = jax.random.normal(jax.random.key(1), _call(plain, x).shape)
    exact = name != "xnornet"
    for ours, ref in ((_call(fast, x), _call(plain, x)), (_grad(fast, x, ct), _grad(plain, x, ct))):
        if exact:
            np.testing.assert_array_equal(ours, ref)
        else:
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    # no latent kernel is in the pytree
    leaves = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(fast)}
    assert not any("'params'" in p and "'kernel'" in p for p in leaves), leaves


@pytest.mark.parametrize("name", ["birealnet18", "xnornet"])
def test_frozen_folded_function_equals_the_folded_model(name):
    x = images()
    model = small_model(name, binary=False)
    variables = _variables(model, x)
    folded = models.apply_fn(model, variables, fold_batchnorm=True)
    fast = models.apply_fn(model, variables, fold_batchnorm=True, input_like=x)
    ref = _call(folded, x)
    top = float(jnp.abs(ref).max())
    np.testing.assert_allclose(_call(fast, x), ref, rtol=1e-6, atol=1e-6 * top)
    ct = jax.random.normal(jax.random.key(1), ref.shape)
    g = _grad(folded, x, ct)
    top = float(jnp.abs(g).max())
    np.testing.assert_allclose(_grad(fast, x, ct), g, rtol=1e-5, atol=1e-6 * top)
    # the folded BatchNorms' passes are gone, as in the folded function
    program = frozen.program(model, variables, x, fold_batchnorm=True)
    assert len(program.folds) > 0


def test_frozen_kernels_are_the_quantized_kernels():
    # Against the quantizers written out: sign(clip(w)) (+1 at 0), and XNOR-Net's alpha
    # as a mean of |clip(w)| per output channel.
    x = images()
    for name, scaled in (("binarynet", False), ("xnornet", True)):
        model = small_model(name, binary=True)
        variables = _variables(model, x)
        entries = models.apply_fn(model, variables, input_like=x).args[0]["layers"]
        infos = {"/".join(i.path): i for i in layers.quantized_layers(model, x.shape)}
        binary_layers = [k for k, i in infos.items() if i.kernel_quantizer is not None]
        assert binary_layers
        for key in binary_layers:
            w = variables["params"]
            for part in key.split("/"):
                w = w[part]
            w = np.asarray(w["kernel"], np.float64)
            c = np.clip(w, -1, 1)
            np.testing.assert_array_equal(entries[key]["kernel"], np.where(c >= 0, 1.0, -1.0))
            if scaled:
                alpha = np.abs(c).reshape(-1, c.shape[-1]).mean(0)
                np.testing.assert_allclose(entries[key]["scale"], alpha, rtol=1e-6)
            else:
                assert "scale" not in entries[key]


def test_no_recompilation_for_new_variables_and_kernels_computed_once():
    x = images()
    model = small_model("birealnet18", binary=True)
    traces = []

    @jax.jit
    def logits(fn, x):
        traces.append(1)
        return fn(x)

    fns = [models.apply_fn(model, _variables(model, x, seed), input_like=x) for seed in (0, 1)]
    a, b = logits(fns[0], x), logits(fns[1], x[:1])  # another batch size: a new trace
    c = logits(fns[1], x)
    assert len(traces) == 2
    assert not np.array_equal(a, c)
    np.testing.assert_allclose(b, c[:1], rtol=1e-5)  # another batch: another summation order

    # the jitted program computes no kernel-shaped array: the kernels are its inputs
    def kernel_ops(fn):
        jaxpr = jax.make_jaxpr(lambda f, x: f(x))(fn, x).jaxpr
        return [
            e.primitive.name for e in jaxpr.eqns if any(v.aval.shape in shapes for v in e.outvars)
        ]

    shapes = {k.shape for k in jax.tree.leaves(fns[0].args[0]["layers"]) if k.ndim >= 2}
    assert kernel_ops(fns[0]) == []
    assert "custom_vjp_call" in kernel_ops(models.apply_fn(model, _variables(model, x)))


def test_wrong_input_shape_or_dtype_is_named():
    x = images()
    model = small_model("binarynet", binary=True)
    fn = models.apply_fn(model, _variables(model, x), input_like=x)
    message = r"built for inputs \(B, 32, 32, 3\).*got shape \(2, 16, 16, 3\)"
    with pytest.raises(ValueError, match=message):
        fn(images(size=16))
    with pytest.raises(ValueError, match="of dtype bfloat16"):
        fn(x.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="input_like must be an array"):
        models.apply_fn(model, _variables(model, x), input_like=(2, 32, 32, 3))
    # variables made for 32 px images, frozen for 16 px ones: named (was Flax's error)
    message = r"variables do not fit images of shape \(H, W, C\) = \(16, 16, 3\)"
    with pytest.raises(ValueError, match=message):
        models.apply_fn(model, _variables(model, x), input_like=images(size=16))
    # variables of another configuration (7 classes) are named as such, not the images
    seven = _variables(models.get("binarynet", binary=True, num_classes=7, width=0.125), x)
    message = r"variables do not belong to this model: parameter 'kernel' of layer 'head"
    with pytest.raises(ValueError, match=message) as info:
        models.apply_fn(model, seven, input_like=x)
    assert "do not fit images" not in str(info.value)


class _Sub(QuantConv):
    """A subclass that computes something else: not frozen."""

    def __call__(self, x):
        return super().__call__(x) * 2.0


class _Mixed(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = QuantConv(4, kernel_quantizer="ste_sign", input_quantizer=None, name="a")(x)
        x = nn.BatchNorm(use_running_average=True, name="bn_a")(x)
        x = _Sub(4, kernel_quantizer="ste_sign", input_quantizer="ste_sign", name="b")(x)
        x = nn.BatchNorm(use_running_average=True, name="bn_b")(x)
        y = QuantDense(3, kernel_quantizer="ste_sign", name="head")(x.reshape(x.shape[0], -1))
        return y


def test_caller_interceptors_see_every_layer_and_subclasses_run_as_they_are():
    x = images(size=8)
    model = _Mixed()
    variables = _variables(model, x)
    assert frozen.frozen_layers(model, variables, x) == ["a", "head"]
    for fold_batchnorm in (False, True):
        fast = models.apply_fn(model, variables, fold_batchnorm, input_like=x)
        ref = models.apply_fn(model, variables, fold_batchnorm)
        leaves = jax.tree_util.tree_leaves_with_path(fast.args[0]["variables"])
        assert any("'b'" in jax.tree_util.keystr(p) for p, _ in leaves)  # _Sub keeps its kernel

        def seen(fn):
            out = {}

            def capture(next_fun, args, kwargs, context):
                y = next_fun(*args, **kwargs)
                if context.method_name == "__call__" and context.module.scope is not None:
                    out["/".join(context.module.scope.path)] = y
                return y

            with nn.intercept_methods(capture):
                logits = fn(x)
            return logits, out

        (y1, s1), (y2, s2) = seen(fast), seen(ref)
        np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
        assert s1.keys() == s2.keys() and {"a", "b", "head", "bn_a"} <= s1.keys()
        for k in s1:
            np.testing.assert_allclose(s1[k], s2[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_explain_dataset_gives_the_maps_of_the_model():
    # BinaryNet's BNN: sign kernels and integer sums, so the frozen maps are the same
    # bit for bit (a magnitude-aware kernel's sums round by the program's summation
    # order, docs/performance.md "Kernels quantized once for explaining")
    from jbnn import saliency

    x = images(batch=3)
    model = small_model("binarynet", binary=True)
    variables = _variables(model, x)
    batches = [np.asarray(x[:2]), np.asarray(x[2:])]
    key = jax.random.key(0)
    run = lambda **kw: saliency.explain_dataset(
        "smoothgrad", batches, key=key, progress=False, num_samples=3, **kw
    )
    out = run(model=model, variables=variables)
    ref = run(fn=models.apply_fn(model, variables))
    np.testing.assert_array_equal(out["predictions"], ref["predictions"])
    np.testing.assert_array_equal(out["maps"], ref["maps"])
    assert np.abs(ref["maps"]).max() > 0
    with pytest.raises(ValueError, match="batch 1 images are float32 of shape \\(16, 16, 3\\)"):
        saliency.explain_dataset(
            "gradient",
            [np.asarray(x), np.asarray(images(size=16))],
            model=model,
            variables=variables,
            progress=False,
        )


@pytest.mark.parametrize("layer", ["block5", "block5/conv"])
def test_explain_dataset_gradcam_runs_over_frozen_kernels_unfolded(layer):
    # GradCAM at a block and at a quantized convolution (a frozen layer itself): the
    # probe sees the frozen layer's output, so the maps are saliency.gradcam's bit for
    # bit (sign kernels) on the same batches; with fold_batchnorm=True too, GradCAM
    # running unfolded. The same batches: explain_dataset pads the last one to the
    # first's size by repeating its last image, and XLA's CPU convolutions may round an
    # image differently in batches of other sizes (seen on an AVX2-only AMD EPYC).
    from jbnn import saliency
    from jbnn.saliency import cam

    x = images(batch=3)
    model = small_model("binarynet", binary=True)
    variables = _variables(model, x)
    batches = [np.asarray(x[:2]), np.asarray(x[2:])]
    padded = [batches[0], np.concatenate([batches[1], batches[1]])]
    ref = np.concatenate(
        [saliency.gradcam(model, variables, b, None, layer=layer) for b in padded]
    )[:3]
    assert np.abs(ref).max() > 0
    calls = []
    original = cam._cam_jit
    try:
        cam._cam_jit = lambda fn, *a, **kw: calls.append(fn) or original(fn, *a, **kw)
        for fold_batchnorm in (False, True):
            out = saliency.explain_dataset(
                "gradcam",
                batches,
                model=model,
                variables=variables,
                layer=layer,
                fold_batchnorm=fold_batchnorm,
                progress=False,
            )
            np.testing.assert_array_equal(out["maps"], ref)
    finally:
        cam._cam_jit = original
    # every batch over the frozen function (no latent kernel of a frozen layer left)
    assert len(calls) == 4
    for fn in calls:
        assert set(fn.args[0]["layers"]) == set(frozen.frozen_layers(model, variables, x))


def test_gradcam_and_layer_gradient_take_the_frozen_function():
    # fn= runs the CAM methods over kernels quantized once: the same maps bit for bit
    # (sign kernels), without variables; a function that never calls the layer, a
    # non-callable fn and neither variables nor fn are refused by name.
    from jbnn import saliency

    x = images(batch=2)
    model = small_model("binarynet", binary=True)
    variables = _variables(model, x)
    fn = models.apply_fn(model, variables, input_like=x)
    for method in (saliency.gradcam, saliency.gradcam_plus_plus):
        ref = method(model, variables, x, None, layer="block5/conv", return_low_res=True)
        got = method(model, None, x, None, layer="block5/conv", return_low_res=True, fn=fn)
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_array_equal(a, b)
        assert np.abs(ref[1]).max() > 0
    ref = saliency.layer_activation_and_gradient(model, variables, x, 1, layer="block4")
    got = saliency.layer_activation_and_gradient(model, None, x, 1, layer="block4", fn=fn)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(a, b)
    other = small_model("binarynet", binary=False)  # the same paths, another function
    mlp = models.apply_fn(
        small_model("mlp", binary=True), _variables(small_model("mlp", binary=True), x)
    )
    with pytest.raises(ValueError, match="layer 'block5' was not called"):
        saliency.gradcam(other, None, x, None, layer="block5", fn=mlp)
    with pytest.raises(TypeError, match="gradcam: fn must be a callable"):
        saliency.gradcam(model, None, x, None, layer="block5", fn=variables)
    with pytest.raises(ValueError, match="gradcam: give variables="):
        saliency.gradcam(model, None, x, None, layer="block5")
