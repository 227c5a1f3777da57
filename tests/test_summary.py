"""jbnn.summary against hand computations and larq-zoo's published model sizes."""

from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jbnn
from jbnn import models
from jbnn.layers import QuantConv, QuantDense
from jbnn.summary import ModelSummary, precision


def test_two_layer_mlp_by_hand():
    features, hidden, classes = 4 * 4 * 1, 32, 10
    model = models.get("mlp", binary=True, num_classes=classes, hidden=(hidden,))
    s = jbnn.summary(model, (1, 4, 4, 1), print_fn=None)
    assert isinstance(s, ModelSummary)

    # By hand. dense1: real input, 1-bit kernel (features x hidden), no bias.
    # dense1_bn: scale + offset (32-bit). head: 1-bit input and kernel (hidden x
    # classes). head_bn: offset only (use_scale=False).
    one_bit = features * hidden + hidden * classes
    full = 2 * hidden + classes
    assert [layer.path for layer in s.layers] == ["dense1", "dense1_bn", "head", "head_bn"]
    assert [layer.input_precision for layer in s.layers] == [None, None, 1, None]
    assert [layer.output_shape for layer in s.layers] == [
        (1, hidden),
        (1, hidden),
        (1, classes),
        (1, classes),
    ]
    assert s.layers[0].params == {1: features * hidden}
    assert s.layers[1].params == {32: 2 * hidden}
    assert s.layers[0].macs == {32: features * hidden}  # real input: 32-bit MACs
    assert s.layers[2].macs == {1: hidden * classes}  # binary input and kernel
    assert s.params_by_bits == {1: one_bit, 32: full}
    assert s.total_params == one_bit + full
    assert s.batch_stats == 2 * hidden + 2 * classes  # reported, not counted
    assert s.memory_bits == one_bit + 32 * full
    assert s.fp32_memory_bits == 32 * (one_bit + full)
    assert s.model_size_mib == pytest.approx((one_bit + 32 * full) / 8 / 1024**2, rel=1e-12)
    assert s.fp32_size_mib == pytest.approx(4 * (one_bit + full) / 1024**2, rel=1e-12)
    assert s.compression_ratio == pytest.approx((one_bit + 32 * full) / (32 * (one_bit + full)))
    assert s.macs_by_precision == {1: hidden * classes, 32: features * hidden}
    assert s.total_macs == features * hidden + hidden * classes
    assert s.binary_mac_fraction == pytest.approx(
        hidden * classes / (features * hidden + hidden * classes)
    )

    twin = jbnn.summary(models.twin(model), (1, 4, 4, 1), print_fn=None)
    assert twin.params_by_bits == {32: one_bit + full}
    assert twin.compression_ratio == 1.0
    assert twin.binary_mac_fraction == 0.0
    assert twin.macs_by_precision == {32: features * hidden + hidden * classes}


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = QuantConv(
            8,
            (3, 3),
            (2, 2),
            input_quantizer="dorefa(k_bit=3)",
            kernel_quantizer="ste_tern",
            name="tern",
        )(x)
        x = QuantConv(
            8,
            (3, 3),
            feature_group_count=8,
            use_bias=False,
            input_quantizer="approx_sign",
            kernel_quantizer="magnitude_aware_sign",
            name="depthwise",
        )(x)
        x = nn.Conv(4, (1, 1), name="real")(x)
        return x


def test_convolutions_groups_and_other_bit_widths_by_hand():
    s = jbnn.summary(_Tiny(), (2, 8, 8, 4), print_fn=None)
    tern, depthwise, real = s.layers
    pixels = 4 * 4  # 8x8 input, stride 2, SAME
    assert tern.output_shape == depthwise.output_shape == (2, 4, 4, 8)
    assert (tern.input_precision, depthwise.input_precision, real.input_precision) == (3, 1, None)
    assert tern.params == {2: 3 * 3 * 4 * 8, 32: 8}  # ternary kernel, float bias
    assert tern.macs == {3: pixels * 3 * 3 * 4 * 8}  # max(3-bit input, 2-bit kernel)
    assert depthwise.params == {1: 3 * 3 * 1 * 8}
    assert depthwise.macs == {1: pixels * 3 * 3 * 8}  # per example, one input channel each
    assert real.params == {32: 8 * 4 + 4}
    assert real.macs == {32: pixels * 8 * 4}
    assert s.memory_bits == 2 * 288 + 32 * 8 + 72 + 32 * 36
    assert s.binary_mac_fraction == pytest.approx(1152 / (4608 + 1152 + 512))


class _KiB(nn.Module):
    binary: bool = True

    @nn.compact
    def __call__(self, x):
        return QuantDense(64, use_bias=False, kernel_quantizer="ste_sign" if self.binary else None)(
            x.reshape((x.shape[0], -1))
        )


def test_memory_units():
    # 8 x 1024 one-bit weights = 1 KiB; the same weights in float32 = 32 KiB.
    assert jbnn.summary(_KiB(), (1, 128), print_fn=None).layers[0].memory_kib == 1.0
    assert jbnn.summary(_KiB(binary=False), (1, 128), print_fn=None).layers[0].memory_kib == 32.0


def test_precision_of_specs():
    assert precision(None) is None and precision("identity") is None
    assert precision("ste_sign(clip_value=1.25)") == precision("magnitude_aware_sign") == 1
    assert precision("ste_tern") == 2 and precision("dorefa(k_bit=4)") == 4
    with pytest.raises(ValueError, match="'sgn'"):
        precision("sgn")


def test_prints_a_table_and_returns_data():
    lines = []
    model = models.get("binarynet", binary=True, num_classes=10, width=0.125)
    s = jbnn.summary(model, (1, 32, 32, 3), print_fn=lines.append)
    assert len(lines) == 1
    text = lines[0]
    for needle in (
        "BinaryNet stats",
        "block1/conv",
        "head_bn",
        "Total params",
        "Model size",
        "Float-32 equivalent",
        "Compression ratio",
        "Ratio of MACs that are binarized",
        f"{s.total_params}",
    ):
        assert needle in text, needle
    data = json.loads(json.dumps(s.as_dict()))
    assert data["total_params"] == s.total_params
    assert len(data["layers"]) == len(s.layers)


@pytest.mark.parametrize("name", models.names())
def test_every_model_counts_all_its_parameters(name):
    fields = models._REGISTRY[name].__dataclass_fields__
    kwargs = {"width": 0.125} if "width" in fields else {}
    model = models.get(name, binary=True, num_classes=10, **kwargs)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    s = jbnn.summary(model, (1, 32, 32, 3), print_fn=None)
    assert s.total_params == sum(math.prod(a.shape) for a in jax.tree.leaves(shapes["params"]))
    assert s.batch_stats == sum(
        math.prod(a.shape) for a in jax.tree.leaves(shapes.get("batch_stats", {}))
    )
    assert 0.0 < s.binary_mac_fraction < 1.0 and 0.0 < s.compression_ratio < 1.0
    twin = jbnn.summary(models.twin(model), (1, 32, 32, 3), print_fn=None)
    assert twin.binary_mac_fraction == 0.0 and twin.compression_ratio == 1.0
    assert twin.total_macs == s.total_macs


# larq-zoo's published memory (MB, running statistics counted at 32 bits, as Keras
# does) at 224 px, 1000 classes.
LARQ_ZOO_MEMORY_MB = {
    "birealnet18": 4.03,
    "binary_resnet_e18": 4.03,
    "xnornet": 22.81,
    "binary_densenet28": 4.12,
}


@pytest.mark.parametrize("name", sorted(LARQ_ZOO_MEMORY_MB))
def test_model_size_matches_larq_zoo(name):
    model = models.get(name, binary=True, num_classes=1000, stem="imagenet")
    s = jbnn.summary(model, (1, 224, 224, 3), print_fn=None)
    size_mb = (s.memory_bits + 32 * s.batch_stats) / (8 * 1024 * 1024)
    assert round(size_mb, 2) == LARQ_ZOO_MEMORY_MB[name]


def test_bad_input():
    model = models.get("mlp", binary=True, num_classes=10)
    with pytest.raises(ValueError, match=r"input_shape.*\(1, -28, 28, 1\)"):
        jbnn.summary(model, (1, -28, 28, 1), print_fn=None)
    with pytest.raises(ValueError, match="input_shape"):
        jbnn.summary(model, 28, print_fn=None)
    with pytest.raises(TypeError, match="Module, got function"):
        jbnn.summary(lambda x: x, (1, 28, 28, 1), print_fn=None)
    with pytest.raises(ValueError, match="rank-4"):
        jbnn.summary(model, (28, 28, 1), print_fn=None)
