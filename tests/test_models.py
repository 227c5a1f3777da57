"""Acceptance tests for every registered model (jbnn.models.names()).

For each model at 32x32x3 (and 224x224x3 for the ImageNet stem), with small widths:
init and forward (inference and training mode) work; the BNN and its twin have the
same parameter tree; the operands that reach each quantized layer's convolution or
matrix product are captured (by wrapping ``jax.lax.conv_general_dilated`` and
``jax.lax.dot_general`` while the innermost module, found with
``nn.intercept_methods``, is a QuantConv / QuantDense) and checked against numpy
formulas: +-1 inputs and sign / scaled-sign kernels in the BNN, the real input and the
latent kernel unchanged in the twin. ``with_surrogate`` keeps the forward pass bit for
bit and changes the input gradient. Bad input raises a clear error. Parameter counts at
224 px equal larq-zoo's published totals, and every BatchNorm's momentum, epsilon,
scale and center are larq-zoo's.

Models are compiled with ``jax_disable_most_optimizations`` (restored afterwards):
compiling, not running, is what these tests spend their time on.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import variables_with_statistics

import jbnn
from jbnn import models
from jbnn import quantizers as qz
from jbnn.layers import QuantConv, QuantDense

NUM_CLASSES = 10

# Path fragments of the layers that larq-zoo keeps real-valued (no input and no kernel
# quantizer in the BNN); every other QuantConv / QuantDense of these models is binary.
REAL_LAYERS = {
    "birealnet18": ("stem", "shortcut", "head"),
    "binary_resnet_e18": ("stem", "shortcut", "head"),
    "xnornet": ("stem", "head"),
    "quicknet_small": ("stem", "transition", "head"),
    "binary_densenet28": ("stem", "transition", "head"),
}

# (input quantizer, kernel quantizer, XNOR kernel scale, latent clip) of their binary
# layers, as REFERENCE.md section 2 / larq-zoo define them.
BINARY_DESIGN = {
    "birealnet18": ("approx_sign", "magnitude_aware_sign", False, 1.0),
    "binary_resnet_e18": ("ste_sign(clip_value=1.25)", "ste_sign(clip_value=1.25)", False, 1.25),
    "xnornet": ("ste_sign", "ste_sign", True, 1.0),
    "quicknet_small": ("ste_sign(clip_value=1.25)", "ste_sign(clip_value=1.25)", False, 1.25),
    "binary_densenet28": ("ste_sign(clip_value=1.3)", "ste_sign(clip_value=1.3)", False, 1.3),
}

# Paths the docstrings promise (checked with layer_paths).
DOCUMENTED_PATHS = {
    "birealnet18": (
        "stem",
        "stage1/block1",
        "stage4/block1/shortcut_conv",
        "stage4/block4",
        "head",
    ),
    "binary_resnet_e18": ("stem/conv", "stage2/block1/shortcut_bn", "stage4/block4/conv", "head"),
    "xnornet": ("stem/conv", "block2/conv", "block5", "fc6/conv", "fc7/bn", "head"),
    "quicknet_small": ("stem/pointwise", "stage1/block4/conv", "stage2/transition/conv", "head"),
    "binary_densenet28": ("stem/conv", "stage1/block6/conv", "stage4/block5", "transition3/conv"),
}

# larq-zoo's published parameter totals (Keras counts BatchNorm running statistics),
# ImageNet stem, 224 px, 1000 classes, width 1 (the larq-zoo README table).
LARQ_ZOO_PARAMS = {
    "birealnet18": 11_699_112,
    "binary_resnet_e18": 11_699_368,
    "xnornet": 62_396_768,
    "binary_densenet28": 5_150_504,
}

# QuickNetSmall's published total (larq_zoo/sota/quicknet.py, "ImageNet Metrics") is
# counted as ``larq.models.summary`` counts: a BatchNorm's beta and gamma are fused with
# its moving mean and variance (larq/models.py, LayerProfile: one of each pair counted),
# and the frozen 3x3 blur of each transition (a non-trainable DepthwiseConv2D) counts.
LARQ_ZOO_SUMMARY_PARAMS = {"quicknet_small": 12_655_688}

# Every BatchNorm's (momentum, epsilon, scale, center) and how many a model has, as the
# larq-zoo sources build them (Keras' defaults: momentum 0.99, epsilon 1e-3).
LARQ_ZOO_BATCHNORMS = {
    # birealnet.py: BatchNormalization(momentum=0.8) everywhere (stem, 16 blocks, 3
    # shortcuts)
    "birealnet18": {(0.8, 1e-3, True, True): 20},
    # resnet_e.py: momentum 0.9, epsilon 1e-5 (two in the stem, 16 blocks, 3 shortcuts)
    "binary_resnet_e18": {(0.9, 1e-5, True, True): 21},
    # xnornet.py: scale=False; epsilon 1e-5 (stem), 1e-4 (after the pool of the stem,
    # blocks 2-5, the 6x6 "fc" conv), 1e-3 (the 1x1 "fc" conv)
    "xnornet": {
        (0.9, 1e-5, False, True): 1,
        (0.9, 1e-4, False, True): 6,
        (0.9, 1e-3, False, True): 1,
    },
    # quicknet.py: the stem's three with Keras' defaults, the middle one without scale
    # and center; blocks and transitions momentum 0.9, epsilon 1e-5
    "quicknet_small": {
        (0.99, 1e-3, True, True): 2,
        (0.99, 1e-3, False, False): 1,
        (0.9, 1e-5, True, True): 19,
    },
    # densenet.py: momentum 0.9, epsilon 1e-5 (stem, 23 layers, 3 transitions, final)
    "binary_densenet28": {(0.9, 1e-5, True, True): 28},
}


# Models whose 32 px forward test takes over ~5 s (compiling 23 binary dense layers).
SLOW_TO_COMPILE = ("binary_densenet28",)


def _fields(name: str) -> dict:
    return models._REGISTRY[name].__dataclass_fields__


def _small_kwargs(name: str) -> dict:
    fields = _fields(name)
    kwargs = {}
    if "width" in fields:
        kwargs["width"] = 0.125
    if "hidden" in fields:
        kwargs["hidden"] = (64, 64)
    return kwargs


def _cases() -> list:
    cases = []
    for name in models.names():
        marks = [pytest.mark.slow] if name in SLOW_TO_COMPILE else []
        cases.append(pytest.param(name, "small", 32, id=f"{name}-32", marks=marks))
        if "stem" in _fields(name):
            cases.append(pytest.param(name, "imagenet", 224, id=f"{name}-imagenet-224"))
    return cases


def _build(name: str, stem: str, binary: bool = True, **kwargs) -> nn.Module:
    kw = _small_kwargs(name)
    if "stem" in _fields(name):
        kw["stem"] = stem
    kw.update(kwargs)
    return models.get(name, binary=binary, num_classes=NUM_CLASSES, **kw)


def _images(size: int, batch: int = 2) -> jax.Array:
    rng = np.random.default_rng(size)
    return jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)


pytestmark = pytest.mark.usefixtures("fast_compiles")


# ----------------------------------------------------------------- operand capture
class _Capture:
    """Records the operands of every QuantConv / QuantDense MAC op while active.

    ``meta`` gets (path, input_quantizer, kernel_quantizer, kernel_scale, kernel_clip)
    per quantized layer call, at trace time; ``values[k]`` the k-th call's input
    (``"input"``) and the (lhs, rhs) operands of the MAC ops it ran (``"ops"``), sent
    to the host with ``jax.debug.callback`` when the compiled program runs (so that it
    also works where the op is traced inside a ``custom_vjp``).
    """

    def __init__(self):
        self.meta: list[tuple] = []
        self.values: dict[int, dict] = {}
        self._stack: list[tuple[nn.Module, int | None]] = []

    def _store(self, index: int, what: str):
        def store(*arrays):
            entry = self.values.setdefault(index, {"ops": []})
            if what == "input":
                entry["input"] = np.asarray(arrays[0])
            else:
                entry["ops"].append(tuple(np.asarray(a) for a in arrays))

        return store

    def _interceptor(self, next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        mod, index = context.module, None
        if isinstance(mod, QuantConv | QuantDense):
            index = len(self.meta)
            self.meta.append(
                (
                    "/".join(mod.path),
                    mod.input_quantizer,
                    mod.kernel_quantizer,
                    mod.kernel_scale,
                    mod.kernel_clip,
                )
            )
            jax.debug.callback(self._store(index, "input"), args[0])
        self._stack.append((mod, index))
        try:
            return next_fun(*args, **kwargs)
        finally:
            self._stack.pop()

    def _wrap(self, original):
        def recorder(lhs, rhs, *args, **kwargs):
            _, index = self._stack[-1] if self._stack else (None, None)
            if index is not None:  # the innermost module is a quantized layer
                values = (lhs, rhs)
                if lhs.dtype == rhs.dtype == jnp.bfloat16:
                    # jbnn.ops.dense's bfloat16 product (CPUs with AMX) of a
                    # float32 layer multiplies the input's bfloat16 parts (1 or 3, the
                    # leading axis): record the float32 values it multiplies.
                    values = (jnp.sum(lhs.astype(jnp.float32), axis=0), rhs.astype(jnp.float32))
                jax.debug.callback(self._store(index, "ops"), *values)
            return original(lhs, rhs, *args, **kwargs)

        return recorder

    def __call__(self, fn):
        conv, dot = jax.lax.conv_general_dilated, jax.lax.dot_general
        jax.lax.conv_general_dilated, jax.lax.dot_general = self._wrap(conv), self._wrap(dot)
        try:
            with nn.intercept_methods(self._interceptor):
                return fn()
        finally:
            jax.lax.conv_general_dilated, jax.lax.dot_general = conv, dot

    def operands(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(layer input, lhs, rhs) per quantized layer call, after the program ran."""
        jax.effects_barrier()
        out = []
        for index, meta in enumerate(self.meta):
            entry = self.values.get(index, {"ops": []})
            assert len(entry["ops"]) == 1, (
                f"{meta[0]}: captured {len(entry['ops'])} MAC ops, expected one; does the "
                "layer still call jax.lax.conv_general_dilated / dot_general?"
            )
            out.append((entry["input"], *entry["ops"][0]))
        return out


def _np_sign(w: np.ndarray) -> np.ndarray:
    return np.where(w >= 0, 1.0, -1.0)


def _expected_kernel(latent: np.ndarray, spec: str, kernel_scale: bool) -> np.ndarray:
    """REFERENCE.md's kernel quantizers, in numpy: the kernel the MAC op multiplies by."""
    name, hparams = qz.parse_spec(spec)
    axes = tuple(range(latent.ndim - 1))
    if kernel_scale:
        # XNOR-Net: alpha * sign(clip(w, -1, 1)), alpha = mean |clip(w, -1, 1)| per
        # output filter; the layer multiplies by the sign and scales its output by alpha
        # (the same linear map; test_layers checks the output against the scaled kernel).
        assert name == "ste_sign", f"no numpy reference for XNOR kernel quantizer {spec!r}"
        return _np_sign(np.clip(latent, -1.0, 1.0))
    if name == "magnitude_aware_sign":
        return np.mean(np.abs(latent), axis=axes, keepdims=True) * _np_sign(latent)
    assert name == "ste_sign", f"no numpy reference for kernel quantizer {spec!r}"
    return _np_sign(latent)


def _crop_padding(lhs: np.ndarray, shape: tuple) -> np.ndarray:
    """The interior of an input that the layer padded itself (QuickNet pads with +1)."""
    if lhs.shape == shape:
        return lhs
    (top, left) = ((lhs.shape[1] - shape[1]) // 2, (lhs.shape[2] - shape[2]) // 2)
    interior = lhs[:, top : top + shape[1], left : left + shape[2]]
    border = np.ones(lhs.shape, bool)
    border[:, top : top + shape[1], left : left + shape[2]] = False
    assert np.all(lhs[border] == 1.0), "padding of a binary input is not +1"
    return interior


def _leaf(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _random_variables(shapes, seed: int = 0):
    """Variables of the given shapes without running the initializers (cheap to build):
    kernels N(0, 1 / fan_in), BatchNorm scales near 1, offsets near 0, running
    statistics 0 and 1."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = path[-1].key
        if key == "kernel":
            value = rng.normal(size=leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        elif key == "scale":
            value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        elif key == "var":
            value = np.ones(leaf.shape)
        elif key == "mean":
            value = np.zeros(leaf.shape)
        else:
            value = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("name,stem,size", _cases())
def test_forward_and_binarized_operands(name, stem, size):
    """Init (32 px; the 224 px runs take cheap random variables of the shapes init
    gives), inference in the BNN and the twin, training mode (32 px), and the operands
    of every quantized layer's MAC op, checked against numpy."""
    bnn = _build(name, stem, binary=True)
    twin = models.twin(bnn)
    x = _images(size, batch=3 if size < 100 else 1)  # 2 would make BatchNorm degenerate
    cap_bnn, cap_twin = _Capture(), _Capture()
    small = size < 100

    def forward(variables, x):
        y_bnn = cap_bnn(lambda: bnn.apply(variables, x))
        y_twin = cap_twin(lambda: twin.apply(variables, x))
        return y_bnn, y_twin

    if small:  # one compiled program: init, both forwards, a training step's forward

        @jax.jit
        def run(key, x):
            variables = bnn.init(key, x)
            train_out = bnn.apply(variables, x, train=True, mutable=["batch_stats"])
            return variables, train_out, *forward(variables, x)

        variables, (y_train, state), y_bnn, y_twin = run(jax.random.key(0), x)
    else:
        variables = _random_variables(jax.eval_shape(bnn.init, jax.random.key(0), x))
        y_bnn, y_twin = jax.jit(forward)(variables, x)
    ops_bnn, ops_twin = cap_bnn.operands(), cap_twin.operands()

    # Forward, inference and training mode.
    for y in (y_bnn, y_twin, *([y_train] if small else [])):
        assert y.shape == (x.shape[0], NUM_CLASSES) and y.dtype == jnp.float32
        assert np.all(np.isfinite(y))
    assert not np.allclose(y_bnn, y_twin), "the BNN and its twin compute the same thing"
    if small and "batch_stats" in variables:
        assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(
            variables["batch_stats"]
        )
        changed = jax.tree.map(
            lambda a, b: bool(np.any(a != b)), state["batch_stats"], variables["batch_stats"]
        )
        assert all(jax.tree.leaves(changed)), "training mode did not update batch_stats"

    # The twin runs the very same layers, in the same order, with quantizers off.
    assert [m[0] for m in cap_bnn.meta] == [m[0] for m in cap_twin.meta]
    assert all(m[1] is None and m[2] is None for m in cap_twin.meta)
    num_binary = 0
    for (path, in_q, k_q, scale, clip), (inp, lhs, rhs), (t_inp, t_lhs, t_rhs) in zip(
        cap_bnn.meta, ops_bnn, ops_twin, strict=True
    ):
        latent = np.asarray(_leaf(variables["params"], path)["kernel"])
        inp, lhs, rhs, t_inp, t_lhs, t_rhs = map(np.asarray, (inp, lhs, rhs, t_inp, t_lhs, t_rhs))
        if lhs.ndim == 2 and inp.ndim == 4:
            # a convolution whose window covers its whole input (XNOR-Net's fc6) runs as
            # the matrix product of the flattened input and kernel (jbnn.ops.conv)
            assert latent.shape[:2] == inp.shape[1:3], path
            lhs, t_lhs = lhs.reshape(inp.shape), t_lhs.reshape(t_inp.shape)
            rhs, t_rhs = rhs.reshape(latent.shape), t_rhs.reshape(latent.shape)
        # Twin: the layer's input and latent kernel reach the MAC op unchanged.
        np.testing.assert_array_equal(t_lhs, t_inp, err_msg=f"twin input of {path}")
        np.testing.assert_array_equal(t_rhs, latent, err_msg=f"twin kernel of {path}")
        if k_q is None:
            np.testing.assert_array_equal(rhs, latent, err_msg=f"real kernel of {path}")
        else:
            # One magnitude per output channel, exactly; the value as the formula says
            # (to float32 rounding: the mean is summed in another order).
            magnitude = np.abs(rhs).reshape(-1, rhs.shape[-1])
            assert np.all(magnitude == magnitude[:1]) and np.all(magnitude > 0), path
            np.testing.assert_allclose(
                rhs,
                _expected_kernel(latent, k_q, scale),
                rtol=1e-5,
                atol=0,
                err_msg=f"binary kernel of {path}",
            )
        if in_q is not None:
            num_binary += 1
            assert set(np.unique(lhs)) <= {-1.0, 1.0}, f"{path}: BNN input is not +-1"
            np.testing.assert_array_equal(
                _crop_padding(lhs, inp.shape), _np_sign(inp), err_msg=f"BNN input of {path}"
            )
            assert np.any(np.abs(t_lhs) < 1.0), f"{path}: the twin's input is all +-1"
            # Where the BNN binarizes, the twin applies fp_activation (hard_tanh).
            assert np.all(np.abs(t_lhs) <= 1.0), f"{path}: no hard_tanh before it in the twin"
        else:
            np.testing.assert_array_equal(lhs, inp, err_msg=f"real input of {path}")
        if name in REAL_LAYERS:
            real = any(part in path for part in REAL_LAYERS[name])
            assert (in_q is None and k_q is None) == real, f"{path}: {in_q=}, {k_q=}"
            design = (None, None, False, None) if real else BINARY_DESIGN[name]
            assert (in_q, k_q, scale, clip) == design, f"{path} is not as larq-zoo builds it"
    assert all(m[4] is None for m in cap_twin.meta), "the twin has latent-weight clips"
    assert num_binary > 0, f"{name} has no layer with a binarized input"


@pytest.mark.parametrize("name", models.names())
def test_twin_of_a_config_without_input_quantizer_adds_no_activation(name):
    # The twin is the BNN with its quantizers switched off. With input_quantizer=None
    # the BNN binarizes kernels only and applies no activation before those layers, so
    # its twin must equal that BNN with the kernel quantizer switched off as well: the
    # fp_activation (hard tanh) belongs only where the BNN binarizes an input.
    bnn = _build(name, "small", input_quantizer=None)
    kernels_real = _build(name, "small", input_quantizer=None, kernel_quantizer=None)
    x = 3.0 * _images(16, batch=1)  # well beyond hard tanh's [-1, 1]
    variables = jax.jit(kernels_real.init)(jax.random.key(0), x)
    want = np.asarray(jax.jit(kernels_real.apply)(variables, x))
    got = np.asarray(jax.jit(models.twin(bnn).apply)(variables, x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # Control: with the input quantizer, the twin does apply hard tanh.
    default_twin = _build(name, "small", binary=False)
    control = jax.jit(default_twin.apply)(variables, x)
    assert not np.allclose(control, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,stem,size", _cases())
def test_twin_has_the_same_parameter_tree(name, stem, size):
    bnn = _build(name, stem, binary=True)
    twin = _build(name, stem, binary=False)
    assert models.twin(bnn) == twin
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    key = jax.random.key(0)
    v_bnn = jax.eval_shape(bnn.init, key, x)
    v_twin = jax.eval_shape(twin.init, key, x)
    assert jax.tree.structure(v_bnn) == jax.tree.structure(v_twin)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), v_bnn) == jax.tree.map(
        lambda a: (a.shape, a.dtype), v_twin
    )
    if name in DOCUMENTED_PATHS and stem == "small":
        paths = models.layer_paths(bnn, (1, size, size, 3))
        missing = [p for p in DOCUMENTED_PATHS[name] if p not in paths]
        assert not missing, f"{name}: documented paths missing: {missing}"


@pytest.mark.parametrize(
    "name,stem", [(n, "small") for n in models.names()] + [("binarynet", "imagenet")]
)
def test_surrogate_and_dtype_reach_every_quantized_layer(name, stem):
    spec = "swish_sign(beta=2.0)"
    model = models.with_surrogate(_build(name, stem, dtype=jnp.bfloat16), spec)
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, QuantConv | QuantDense):
            seen.append((context.module.surrogate, context.module.dtype))
        return next_fun(*args, **kwargs)

    def init(key):
        with nn.intercept_methods(interceptor):
            return model.init_with_output(key, jnp.zeros((1, 32, 32, 3)))

    logits, _ = jax.eval_shape(init, jax.random.key(0))
    assert seen and all(s == (spec, jnp.bfloat16) for s in seen), seen
    assert logits.dtype == jnp.float32  # logits in float32 whatever the compute dtype


@pytest.mark.parametrize("name", ["mlp", "birealnet18"])
def test_with_surrogate_keeps_forward_and_changes_gradient(name):
    """Inference output bit for bit; the input gradient (taken in training mode, where
    BatchNorm normalises the untrained network's pre-activations into the clip range of
    the straight-through estimators) changes."""
    model = _build(name, "small")
    other = models.with_surrogate(model, "identity")
    x = _images(32)

    variables = _random_variables(jax.eval_shape(model.init, jax.random.key(0), x))

    @jax.jit
    def run(variables, x):
        def loss(m):
            def f(x):
                y, _ = m.apply(variables, x, train=True, mutable=["batch_stats"])
                return jnp.sum(y**2)

            return f

        g1, g2 = (jax.grad(loss(m))(x) for m in (model, other))
        return model.apply(variables, x), other.apply(variables, x), g1, g2

    y1, y2, g1, g2 = map(np.asarray, run(variables, x))
    np.testing.assert_array_equal(y1, y2)  # bit for bit
    assert np.all(np.isfinite(g1)) and np.all(np.isfinite(g2))
    assert np.any(g1 != 0) and np.any(g2 != 0)
    assert not np.allclose(g1, g2), "the surrogate did not change the input gradient"
    assert models.with_surrogate(other, None).surrogate is None


# ----------------------------------------------------------------- bad input
def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet1000'.*birealnet18"):
        models.get("resnet1000", binary=True, num_classes=10)


@pytest.mark.parametrize("name", models.names())
def test_bad_images_raise_clear_errors(name):
    model = _build(name, "small")
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"rank-4.*\(32, 32, 3\)"):
        jax.eval_shape(model.init, key, jnp.zeros((32, 32, 3)))
    with pytest.raises(TypeError, match="int32"):
        jax.eval_shape(model.init, key, jnp.zeros((1, 32, 32, 3), jnp.int32))


@pytest.mark.parametrize("name", [n for n in models.names() if "stem" in _fields(n)])
def test_bad_stem_and_width(name):
    key, x = jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="'cifar'"):
        jax.eval_shape(_build(name, "cifar").init, key, x)
    if name in REAL_LAYERS:
        for width in (-1, 0.0, float("inf"), float("nan"), True):  # True was width 1
            with pytest.raises(
                ValueError, match=f"width must be a finite positive number, got {width}"
            ):
                jax.eval_shape(_build(name, "small", width=width).init, key, x)
        # NumPy scalars are numbers (np.float32(0.5) was refused)
        jax.eval_shape(_build(name, "small", width=np.float32(0.5)).init, key, x)


def test_get_takes_numpy_ints_and_lists():
    """num_classes=np.int64(10) was refused; hidden=[16, 16] built a module that
    apply_fn could not hash ("Failed to hash Flax Module")."""
    model = models.get("mlp", binary=True, num_classes=np.int64(3), hidden=[16, 16])
    assert model.num_classes == 3 and type(model.num_classes) is int
    assert model.hidden == (16, 16)
    x = jnp.ones((2, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    np.testing.assert_array_equal(models.apply_fn(model, variables)(x), model.apply(variables, x))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            models.get("mlp", binary=True, num_classes=bad)


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("quicknet_small", {"stem": "imagenet"}, 28),
        ("binary_densenet28", {}, 4),
        ("binarynet", {}, 7),  # a ZeroDivisionError in the dense layer's initializer
    ],
)
def test_too_small_inputs_are_refused_not_turned_into_nan(name, kwargs, size):
    """A 2x2 VALID max-pool of a 1 px map was empty: global pooling gave NaN logits."""
    model = models.get(name, binary=True, num_classes=3, width=0.125, **kwargs)
    with pytest.raises(ValueError, match=r"max_pool: a 1x1 input.*too small"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def test_xnornet_too_small_input():
    model = _build("xnornet", "imagenet")
    with pytest.raises(ValueError, match=r"\(1, 32, 32, 3\) is too small"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# ----------------------------------------------------------------- larq-zoo sizes
@pytest.mark.parametrize("name", sorted(LARQ_ZOO_PARAMS))
def test_parameter_count_matches_larq_zoo(name):
    model = models.get(name, binary=True, num_classes=1000, stem="imagenet")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    count = sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))  # params + batch_stats
    assert count == LARQ_ZOO_PARAMS[name]


@pytest.mark.parametrize("name", sorted(LARQ_ZOO_SUMMARY_PARAMS))
def test_summary_parameter_count_matches_larq_zoo(name):
    model = models.get(name, binary=True, num_classes=1000, stem="imagenet")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    size = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))
    count = size(shapes)  # params + batch_stats
    # Larq's summary: a BatchNorm's beta / gamma fused with its moving mean / variance.
    fused = []

    def visit(params, stats):
        for key, value in stats.items():
            if "mean" in value:  # a BatchNorm's running statistics
                fused.extend(params.get(key, {}).values())  # beta, gamma: paired
            else:
                visit(params[key], value)

    visit(shapes["params"], shapes["batch_stats"])
    count -= size(fused)
    # larq-zoo's transitions hold a frozen depthwise 3x3 blur of their input channels,
    # a constant in jbnn: 9 weights per input channel of each transition's 1x1 conv.
    transitions = [
        stage["transition"]["conv"]["kernel"]
        for stage in shapes["params"].values()
        if isinstance(stage, dict) and "transition" in stage
    ]
    assert len(transitions) == 3
    count += sum(9 * kernel.shape[2] for kernel in transitions)
    assert count == LARQ_ZOO_SUMMARY_PARAMS[name]


@pytest.mark.parametrize("name", sorted(LARQ_ZOO_BATCHNORMS))
def test_batchnorm_settings_match_larq_zoo(name):
    model = models.get(name, binary=True, num_classes=10, stem="imagenet", width=0.125)
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, nn.BatchNorm):
            seen.append((mod.momentum, mod.epsilon, mod.use_scale, mod.use_bias))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    counts = {}
    for settings in seen:
        counts[settings] = counts.get(settings, 0) + 1
    assert counts == LARQ_ZOO_BATCHNORMS[name]


# ----------------------------------------------------------------- shared pieces
def test_zoo_models_keep_their_field_order_and_quantizer_defaults():
    # BiRealNet18, BinaryResNetE18 and XNORNet take their fields from _zoo.ZooModel and
    # override the quantizer defaults: the order (positional construction) is the one
    # they always had, and the defaults are REFERENCE.md section 2's.
    import dataclasses

    order = [
        "num_classes",
        "binary",
        "width",
        "stem",
        "input_quantizer",
        "kernel_quantizer",
        "kernel_clip",
        "surrogate",
        "fp_activation",
        "dtype",
        "parent",
        "name",
    ]
    for name in ("birealnet18", "binary_resnet_e18", "xnornet"):
        constructor = models._REGISTRY[name]
        assert [f.name for f in dataclasses.fields(constructor)] == order, name
        model = constructor(NUM_CLASSES)
        input_q, kernel_q, _, clip = BINARY_DESIGN[name]
        assert (model.input_quantizer, model.kernel_quantizer, model.kernel_clip) == (
            input_q,
            kernel_q,
            clip,
        )
    model = models.XNORNet(NUM_CLASSES, False, 0.5, "imagenet")
    assert (model.binary, model.width, model.stem) == (False, 0.5, "imagenet")


def test_layer_factories_of_quant_mixin():
    # The layers that common.QuantMixin builds, read back from the modules themselves:
    # binary layers carry the module's quantizers and clip in the BNN and none in the
    # twin; real layers never do; every layer gets the surrogate and the dtype.
    from typing import Any

    from jbnn.models.common import QuantMixin

    class Toy(nn.Module, QuantMixin):
        binary: bool
        input_quantizer: str | None = "ste_sign"
        kernel_quantizer: str | None = "magnitude_aware_sign"
        kernel_clip: float | None = 1.5
        surrogate: str | None = "approx_sign"
        fp_activation: str = "hard_tanh"
        dtype: Any = jnp.bfloat16

        @nn.compact
        def __call__(self, x):
            x = self.real_conv(4, (3, 3), (2, 2), name="real_conv")(x)
            x = self.binary_conv(4, (1, 1), name="binary_conv")(self.twin_act(x))
            x = x.reshape((x.shape[0], -1))
            x = self.binary_dense(3, input_quantizer=None, name="real_input_dense")(x)
            x = self.binary_dense(3, name="binary_dense")(self.twin_act(x))
            return self.real_dense(2, name="real_dense")(x)

    def layers(model):
        seen = {}

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name == "__call__" and isinstance(mod, QuantConv | QuantDense):
                seen[mod.name] = (
                    mod.input_quantizer,
                    mod.kernel_quantizer,
                    mod.kernel_clip,
                    mod.use_bias,
                    mod.surrogate,
                    mod.dtype,
                )
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
        return seen

    sur, bf16 = "approx_sign", jnp.bfloat16
    real = (None, None, None, False, sur, bf16)
    binary = ("ste_sign", "magnitude_aware_sign", 1.5, False, sur, bf16)
    assert layers(Toy(binary=True)) == {
        "real_conv": real,
        "binary_conv": binary,
        "real_input_dense": (None, *binary[1:]),
        "binary_dense": binary,
        "real_dense": (None, None, None, True, sur, bf16),
    }
    assert layers(Toy(binary=False)) == {
        "real_conv": real,
        "binary_conv": real,
        "real_input_dense": real,
        "binary_dense": real,
        "real_dense": (None, None, None, True, sur, bf16),
    }


def _latent_ties(path, leaf, rng):
    """Kernels with a fifth of their entries at exactly -1, 0, +1 (where the clips and
    XNOR-Net's |w| have their tie rules) or beyond the clip (+-1.5)."""
    if path[-1].key != "kernel":
        return None
    k = np.array(leaf)
    at = rng.uniform(size=k.shape) < 0.2
    k[at] = rng.choice([-1.5, -1.0, 0.0, 1.0, 1.5], size=int(at.sum()))
    return jnp.asarray(k, leaf.dtype)


# The zoo's op and quantizer forms, in three models (compiling is the cost): approx_sign,
# the magnitude-aware sign, max-pool and average-pool shortcuts (Bi-Real Net), the sign
# STE, XNOR-Net's kernel scale, its whole-input window and binary dense layers
# (XNOR-Net), QuickNet's +1 padding and 1.25 clip. BinaryNet, DenseNet, ResNetE and the
# MLP use only forms these cover (each op and quantizer is also tested alone, in
# test_ops.py and test_quantizers.py).
FORWARD_MODE_MODELS = ("birealnet18", "xnornet", "quicknet_small")


@pytest.mark.parametrize("name", FORWARD_MODE_MODELS)
def test_forward_mode_jvp_of_zoo_models_equals_their_default_gradient(name):
    # jax.jvp refuses jbnn's custom VJPs (the ops' and the quantizers'), for the twins
    # too. Under jbnn.forward_mode the BNN's
    # logits are the default ones bit for bit, and its JVP along a random direction of
    # the input and of every parameter equals the default reverse-mode gradient's inner
    # product with that direction: the forward forms (plain ops, custom_jvp quantizers,
    # XNOR-Net's TensorFlow tie rules written as JVPs) against the custom VJPs, two
    # derivations of one derivative.
    x = _images(16, batch=2)
    twin_model = _build(name, "small", binary=False)
    twin_vars = jax.eval_shape(twin_model.init, jax.random.key(0), x)
    jvp = jax.jit(lambda v, x: jax.jvp(lambda x: twin_model.apply(v, x), (x,), (x,)))
    with pytest.raises(TypeError, match="forward-mode"):  # lowered only, not compiled
        jvp.lower(twin_vars, x)
    model = _build(name, "small", binary=True)
    variables = variables_with_statistics(model, x, fill=_latent_ties)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    rng = np.random.default_rng(1)
    weights = jnp.asarray(rng.normal(size=(2, NUM_CLASSES)), jnp.float32)

    def logits(params, x):
        return model.apply({"params": params, **rest}, x)

    t_params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    t_x = jnp.asarray(rng.normal(size=x.shape), x.dtype)
    default_logits, vjp = jax.vjp(jax.jit(logits), params, x)
    g_params, g_x = jax.jit(vjp)(weights)
    with jbnn.forward_mode():
        fm_logits, tangent = jax.jit(lambda p, x, tp, tx: jax.jvp(logits, (p, x), (tp, tx)))(
            params, x, t_params, t_x
        )
        # reverse mode through the forward forms (JAX transposes their JVPs): leaf by leaf
        fm_g_params, fm_g_x = jax.jit(lambda p, x, w: jax.vjp(logits, p, x)[1](w))(
            params, x, weights
        )
    np.testing.assert_array_equal(fm_logits, default_logits)
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path((fm_g_params, fm_g_x)),
        jax.tree.leaves((g_params, g_x)),
        strict=True,
    ):
        atol = 1e-5 * float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol, err_msg=str(path))
    pairs = [*zip(jax.tree.leaves(g_params), jax.tree.leaves(t_params), strict=True), (g_x, t_x)]
    want = sum(float(jnp.vdot(g, t)) for g, t in pairs)
    scale = sum(float(jnp.vdot(jnp.abs(g), jnp.abs(t))) for g, t in pairs)
    got = float(jnp.vdot(weights, tangent))
    assert scale > 0
    assert abs(got - want) <= 1e-4 * scale, (got, want, scale)
