"""jbnn.models.fold: inference BatchNorm folded into the convolution that feeds it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import images, small_model, variables_with_statistics

from jbnn import models
from jbnn.layers import QuantConv
from jbnn.models import fold

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _variables(model, x, seed: int = 0):
    """Initialised variables with BatchNorm statistics and affine parameters far from
    the identity, so that a wrong fold shows."""

    def fill(path, leaf, rng):
        if path[-1].key in ("scale", "bias") and any(
            getattr(p, "key", "").startswith(("bn", "shortcut_bn", "stem_bn")) for p in path
        ):
            return jnp.asarray(
                rng.uniform(0.5, 1.5, size=leaf.shape) * rng.choice([-1, 1], size=leaf.shape),
                leaf.dtype,
            )
        return None

    return variables_with_statistics(model, x, seed, fill)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# folds expected at 32 px (small stems): every BatchNorm that reads a convolution's
# output and nothing else reads that output
EXPECTED_FOLDS = {
    "birealnet18": 20,  # stem, 16 blocks, 3 downsampling shortcuts
    "binary_resnet_e18": 19,  # stem, 16 blocks, 2 shortcuts (the first avg-pooled)
    "binarynet": 3,  # the three conv blocks without a pool before their BN
    "quicknet_small": 6,
    "xnornet": 5,
    "binary_densenet28": 0,  # its stem's output is also concatenated: not foldable
    "mlp": 0,  # no convolutions
}


@pytest.mark.parametrize("name", models.names())
def test_batchnorm_folds_of_every_model(name):
    # Found from shapes alone (abstract variables): no model is run.
    x = images()
    model = small_model(name, binary=False)
    variables = jax.eval_shape(model.init, jax.random.key(0), x[:1])
    folds = fold.batchnorm_folds(model, variables, x)
    assert len(folds) == EXPECTED_FOLDS[name], folds
    assert folds == fold.batchnorm_folds(small_model(name, binary=True), variables, x)


# the kinds of fold: blocks and shortcuts (Bi-Real Net), BatchNorm without scale
# (XNOR-Net), without scale and offset (QuickNet's depthwise layers)
@pytest.mark.parametrize("name", ["birealnet18", "xnornet", "quicknet_small"])
def test_folded_twin_equals_the_model_and_its_input_gradient(name):
    x = images()
    model = small_model(name, binary=False)
    variables = _variables(model, x)
    plain = models.apply_fn(model, variables)
    folded = models.apply_fn(model, variables, fold_batchnorm=True)
    assert _rel(jax.jit(lambda f, x: f(x))(folded, x), plain(x)) < 1e-5
    ct = jax.random.normal(jax.random.key(1), plain(x).shape)
    grad = lambda f: jax.jit(jax.grad(lambda x, f: jnp.sum(ct * f(x))))(x, f)
    assert _rel(grad(folded), grad(plain)) < 1e-5


@pytest.mark.parametrize("name", ["xnornet", "birealnet18", "quicknet_small"])
def test_folded_bnn_equals_the_model_in_float64(name):
    # In float32 a binarized activation within rounding of zero can take the other sign
    # (XNOR-Net's logits then move by 30%); in float64 none does, and the folded BNN's
    # float32 logits equal the BNN's (the affine folded in float32 moved them by 4e-8 to
    # 9e-8: one float32 step).
    with jax.enable_x64(True):
        x = images(dtype=jnp.float64)
        model = small_model(name, binary=True, dtype=jnp.float64)
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), _variables(model, x))
        assert fold.batchnorm_folds(model, variables, x)
        plain = models.apply_fn(model, variables)(x)
        folded = models.apply_fn(model, variables, fold_batchnorm=True)(x)
        assert _rel(folded, plain) < 1e-9


class _Toy(nn.Module):
    """conv -> BN (folds); conv -> relu -> BN (does not); conv read by BN and a sum
    (does not); a BN without scale or bias after a conv (folds)."""

    @nn.compact
    def __call__(self, x):
        bn = lambda name, **kw: nn.BatchNorm(use_running_average=True, name=name, **kw)
        a = bn("bn_a")(QuantConv(4, use_bias=True, name="conv_a")(x))
        b = bn("bn_b")(nn.relu(QuantConv(4, name="conv_b")(a)))
        c = QuantConv(4, name="conv_c")(b)
        d = bn("bn_c")(c) + c
        e = bn("bn_e", use_scale=False, use_bias=False)(QuantConv(4, name="conv_e")(d))
        return e


def test_only_batchnorms_that_alone_read_a_convolution_are_folded():
    x = images(size=8)
    model = _Toy()
    variables = _variables(model, x)
    # the toy's BN names do not start with "bn"-prefixed paths only: randomise all
    rng = np.random.default_rng(3)
    variables = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.5, 1.5, size=a.shape), a.dtype), variables
    )
    assert fold.batchnorm_folds(model, variables, x) == {"conv_a": "bn_a", "conv_e": "bn_e"}
    plain = model.apply(variables, x)
    folded = fold.folded_apply(model)(variables, x)
    assert _rel(folded, plain) < 1e-5
    assert fold.folded_apply(model) is fold.folded_apply(model)  # one function per model


class _PreScaledConv(QuantConv):
    """A user's QuantConv that scales its input first."""

    @nn.compact
    def __call__(self, x):
        return super().__call__(2.0 * x)


class _ShiftedBatchNorm(nn.BatchNorm):
    """A user's BatchNorm that adds 1 to its output."""

    def __call__(self, x, use_running_average=None):
        return super().__call__(x, use_running_average) + 1.0


class _Subclassed(nn.Module):
    @nn.compact
    def __call__(self, x):
        bn = lambda cls, name: cls(use_running_average=True, name=name)
        y = bn(nn.BatchNorm, "bn_a")(_PreScaledConv(4, (3, 3), name="conv_a")(x))
        y = bn(_ShiftedBatchNorm, "bn_b")(QuantConv(4, (3, 3), name="conv_b")(y))
        return bn(nn.BatchNorm, "bn_c")(QuantConv(4, (3, 3), name="conv_c")(y))


def test_subclasses_of_the_folded_layers_run_as_they_are():
    # A subclass may compute anything around the base class's call: folding it (the
    # convolution's forward pass with the BatchNorm's affine map) would skip that.
    x = images(size=8)
    model = _Subclassed()
    rng = np.random.default_rng(4)
    variables = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.5, 1.5, size=a.shape), a.dtype),
        model.init(jax.random.key(0), x),
    )
    assert fold.batchnorm_folds(model, variables, x) == {"conv_c": "bn_c"}
    plain = model.apply(variables, x)
    assert _rel(fold.folded_apply(model)(variables, x), plain) < 1e-5


def test_gradcam_of_a_per_call_folded_function():
    # The folded function traces the model to find its folds (jbnn's analysis traces);
    # GradCAM's probe must take the layer's output in the real trace, not in those.
    from jbnn import saliency

    x = images(batch=3)
    model = small_model("birealnet18", binary=False)
    variables = _variables(model, x)
    plain = saliency.gradcam(model, variables, x, None, layer="stage2")
    fn = models.apply_fn(model, variables, fold_batchnorm=True)
    folded = saliency.gradcam(model, None, x, None, layer="stage2", fn=fn)
    assert _rel(folded, plain) < 1e-4


def test_folding_skips_the_batchnorm_passes():
    # The folded program has no BatchNorm arithmetic on activations: fewer elementwise
    # ops of the activations' shape than the plain one.
    x = images()
    model = small_model("birealnet18", binary=False)
    variables = _variables(model, x)

    def count(f):
        jaxpr = jax.make_jaxpr(f)(x)
        shape = (2, 32, 32, 8)  # stage 1 at width 0.125
        return sum(
            1
            for eqn in jaxpr.jaxpr.eqns
            if eqn.primitive.name in ("mul", "sub", "add", "rsqrt")
            and any(getattr(v.aval, "shape", None) == shape for v in eqn.outvars)
        )

    plain = count(models.apply_fn(model, variables))
    folded = count(models.apply_fn(model, variables, fold_batchnorm=True))
    assert folded < plain / 2, (folded, plain)


def test_explain_dataset_folds_on_request():
    from jbnn import saliency

    x = images(batch=3)
    model = small_model("birealnet18", binary=False)
    variables = _variables(model, x)
    run = lambda **kw: saliency.explain_dataset(
        "gradient", [np.asarray(x)], model=model, variables=variables, progress=False, **kw
    )
    plain, folded = run(), run(fold_batchnorm=True)
    np.testing.assert_array_equal(folded["predictions"], plain["predictions"])
    assert _rel(folded["maps"], plain["maps"]) < 1e-5
    fn = models.apply_fn(model, variables)
    with pytest.raises(ValueError, match="fold_batchnorm=True folds model= and variables="):
        saliency.explain_dataset("gradient", [np.asarray(x)], fn=fn, fold_batchnorm=True)
    with pytest.raises(TypeError, match="fold_batchnorm must be True or False"):
        run(fold_batchnorm="yes")


def test_a_folded_model_splits_its_input_layer_too():
    """SmoothGrad's split input layer (jbnn.saliency._input_layer) sees through the
    fold's own analysis traces: the folded stem (conv and BatchNorm) is split off, and
    the map equals the unfolded model's, every copy's gradient taken in full."""
    from jbnn import saliency
    from jbnn.saliency import _input_layer

    x = images(batch=2)
    model = small_model("birealnet18", binary=False)
    variables = _variables(model, x)
    folded = models.apply_fn(model, variables, fold_batchnorm=True)
    assert _input_layer.find(folded, x) == ("stem", "conv")
    key = jax.random.key(0)
    ours = saliency.smoothgrad(folded, x, None, key, num_samples=3)
    plain = saliency.smoothgrad(
        models.apply_fn(model, variables), x, None, key, num_samples=3, split_input_layer=False
    )
    assert _rel(ours, plain) < 1e-5
