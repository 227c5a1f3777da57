"""The saliency study: verdict logic on hand-made scores, a tiny end-to-end run, bad input."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_cli
from scipy import stats as sps

from jbnn import models, study
from jbnn.models.common import QuantMixin, batch_norm
from jbnn.models.simple import ConvBlock

pytestmark = pytest.mark.usefixtures("fast_compiles")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # configs/ is imported as a package, as explain.py does
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- verdicts
def _row(diff_lo, diff_hi, b_mean, p, diff_mean=None):
    """A compare() result with only the fields the verdict rules read."""
    mean = (diff_lo + diff_hi) / 2 if diff_mean is None else diff_mean
    return {
        "a": {"mean": b_mean + mean, "lo": 0.0, "hi": 0.0},
        "b": {"mean": b_mean, "lo": 0.0, "hi": 0.0},
        "difference": {"mean": mean, "lo": diff_lo, "hi": diff_hi},
        "wilcoxon": {"statistic": 0.0, "p_value": p},
    }


@pytest.mark.parametrize(
    "lo, hi, p, expected",
    [
        (-0.05, 0.02, 0.3, study.ALIKE),  # within the margin 0.2 * 0.5 = 0.1
        (-0.09, -0.02, 1e-4, study.ALIKE),  # significant but smaller than the margin
        (-0.30, -0.15, 1e-4, study.LESS_SIMILAR),  # all of it below -0.1
        (-0.30, -0.15, 0.2, study.INCONCLUSIVE),  # below, but Wilcoxon does not reject
        (-0.20, 0.00, 0.01, study.INCONCLUSIVE),  # straddles -0.1
        (0.05, 0.10, 1e-4, study.ALIKE),  # more similar than seed to seed
    ],
)
def test_similarity_verdict_rule(lo, hi, p, expected):
    assert study.similarity_verdict(_row(lo, hi, 0.5, p), margin=0.2, alpha=0.05) == expected


@pytest.mark.parametrize(
    "metric, lo, hi, p, seed_diff, expected",
    [
        ("total_variation", 2.0, 4.0, 1e-5, 0.5, study.NOISIER),
        ("total_variation", 2.0, 4.0, 1e-5, 3.5, study.NO_DIFFERENCE),  # within seed effect
        ("total_variation", 2.0, 4.0, 0.2, 0.5, study.NO_DIFFERENCE),  # not significant
        ("total_variation", -4.0, -2.0, 1e-5, 0.5, study.LESS_NOISY),
        ("total_variation", -1.0, 2.0, 1e-5, 0.0, study.NO_DIFFERENCE),  # straddles 0
        ("sparseness", -0.2, -0.1, 1e-5, 0.01, study.NOISIER),  # lower Gini = noisier
        ("sparseness", 0.1, 0.2, 1e-5, 0.01, study.LESS_NOISY),
        ("complexity", 0.1, 0.2, 1e-5, -0.01, study.NOISIER),
        # the interval's noisy end is at most the seed-to-seed difference: against the claim
        ("total_variation", 2.0, 3.0, 1e-5, 3.5, study.WITHIN_SEED),  # significant, small
        ("total_variation", -1.0, 0.4, 0.3, 0.5, study.WITHIN_SEED),
        ("total_variation", -4.0, -2.0, 0.2, 0.5, study.WITHIN_SEED),  # quieter, p too high
        ("sparseness", -0.005, 0.1, 0.5, 0.01, study.WITHIN_SEED),  # noisy end 0.005
        ("sparseness", -0.02, 0.1, 0.5, 0.01, study.NO_DIFFERENCE),  # noisy end 0.02
    ],
)
def test_noise_verdict_rule(metric, lo, hi, p, seed_diff, expected):
    row = _row(lo, hi, 1.0, p)
    assert study.noise_verdict(row, metric, seed_diff, alpha=0.05) == expected


def test_noise_verdict_unknown_metric():
    with pytest.raises(ValueError, match="Unknown noise metric 'ssim'"):
        study.noise_verdict(_row(0, 1, 1, 0.01), "ssim", 0.0, 0.05)


@pytest.mark.parametrize(
    "supports, expected",
    [
        ([True, True], study.HOLDS),
        ([False, False], study.DOES_NOT_HOLD),
        ([True, False], study.MIXED),
        ([True, None], study.MIXED),
        ([None, False], study.MIXED),
        ([None, None], study.INCONCLUSIVE),
    ],
)
def test_combine(supports, expected):
    assert study.combine(supports) == expected


@pytest.mark.parametrize(
    "supports, words",
    [
        ([True, False], "is mixed on this data: it holds on 1 of 2 metrics and does not hold on 1"),
        (
            [None, False],
            "is mixed on this data: it does not hold on 1 of 2 metrics and cannot be decided on 1",
        ),
        (
            [True, None, None],
            "is mixed on this data: it holds on 1 of 3 metrics and cannot be decided on 2",
        ),
        (
            [False, True, None],
            "is mixed on this data: it holds on 1 of 3 metrics, does not "
            "hold on 1 and cannot be decided on 1",
        ),
        ([True, True], "holds on this data"),
    ],
)
def test_conclusion_counts_the_metrics_of_a_mixed_finding(supports, words):
    # A finding no metric supports is never said to hold "on some metrics" (it was).
    assert study.conclusion(study.combine(supports), supports) == words


def test_compare_against_numpy_and_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 1.0, 60)
    b = a - 0.3 + rng.normal(0, 0.2, 60)
    out = study.compare(a, b, seed=3, num_bootstrap=500)
    np.testing.assert_allclose(out["a"]["mean"], a.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["difference"]["mean"], (a - b).mean(), rtol=1e-5)
    assert out["difference"]["lo"] < (a - b).mean() < out["difference"]["hi"]
    ref = sps.wilcoxon(a, b)
    np.testing.assert_allclose(out["wilcoxon"]["p_value"], ref.pvalue, rtol=1e-10)
    assert out == study.compare(a, b, seed=3, num_bootstrap=500)  # seeded
    # A series gets one interval wherever it is reported (here as B of another pair),
    # and another seed resamples differently.
    other = study.compare(b + 1.0, a, seed=3, num_bootstrap=500)
    assert other["b"] == out["a"]
    assert study.compare(a, b, seed=4, num_bootstrap=500)["a"] != out["a"]
    # A value moved by 1e-6 (float rounding elsewhere) moves the bounds by about as much,
    # not by the bootstrap's own error (a seed drawn from the values moved them by 3%).
    nudged = a.copy()
    nudged[7] += 1e-6
    moved = study.compare(nudged, b, seed=3, num_bootstrap=500)["a"]
    for bound in ("lo", "hi"):
        assert abs(moved[bound] - out["a"][bound]) < 2e-6
    with pytest.raises(ValueError, match="non-finite"):
        study.compare(np.array([1.0, np.nan]), np.array([1.0, 2.0]), seed=0)
    with pytest.raises(ValueError, match="same length"):
        study.compare(np.ones(3), np.ones(4), seed=0)


def _similarity(bnn_twin, twin_control, expect="alike"):
    return study.similarity_finding(
        title="t",
        claim="Gradient maps look alike for BNN and twin",
        expect=expect,
        group="Gradient",
        series={"spearman_abs": (bnn_twin, twin_control), "ssim": (bnn_twin, twin_control)},
        labels={},
        num_images=len(bnn_twin),
        margin=0.2,
        alpha=0.05,
        seed=0,
        num_bootstrap=500,
        confidence=0.95,
    )


def test_similarity_finding_sentences_follow_the_numbers():
    rng = np.random.default_rng(1)
    control = rng.uniform(0.6, 0.8, 200)
    same = control + rng.normal(0, 0.01, 200)
    lower = control - 0.4 + rng.normal(0, 0.01, 200)

    alike = _similarity(same, control)
    assert alike["verdict"] == study.HOLDS
    assert "“Gradient maps look alike for BNN and twin” holds on this data" in alike["sentence"]
    assert f"{same.mean():.3f} vs {control.mean():.3f}" in alike["sentence"]
    assert [r["verdict"] for r in alike["rows"]] == [study.ALIKE, study.ALIKE]

    differ = _similarity(lower, control)
    assert differ["verdict"] == study.DOES_NOT_HOLD
    assert "does not hold on this data" in differ["sentence"]
    assert "less similar than two full-precision seeds" in differ["sentence"]

    # The same numbers support the opposite claim ("GradCAM maps differ").
    assert _similarity(lower, control, expect="differ")["verdict"] == study.HOLDS
    assert _similarity(same, control, expect="differ")["verdict"] == study.DOES_NOT_HOLD

    # Three noisy images decide nothing.
    wide = _similarity(np.array([0.1, 0.9, 0.5]), np.array([0.8, 0.2, 0.6]))
    assert wide["verdict"] == study.INCONCLUSIVE
    assert "cannot be decided" in wide["sentence"]


def _noise(bnn_shift, n=150, seed=2):
    rng = np.random.default_rng(seed)
    twin = rng.uniform(1.0, 2.0, n)
    control = twin + rng.normal(0, 0.02, n)
    gini = rng.uniform(0.4, 0.6, n)
    return study.noise_finding(
        title="t",
        claim="SmoothGrad maps are noisier for BNNs",
        group="SmoothGrad",
        noise={
            "total_variation": {"bnn": twin + bnn_shift, "twin": twin, "control": control},
            "sparseness": {"bnn": gini - bnn_shift / 10, "twin": gini, "control": gini + 0.001},
        },
        reduction={
            "bnn": np.full(n, 0.1) + rng.normal(0, 0.01, n),
            "twin": np.full(n, 0.4) + rng.normal(0, 0.01, n),
            "control": np.full(n, 0.4) + rng.normal(0, 0.01, n),
        },
        labels={"total_variation": "TV", "sparseness": "Gini"},
        num_images=n,
        alpha=0.05,
        seed=0,
        num_bootstrap=500,
        confidence=0.95,
    )


def test_noise_finding_sentences_follow_the_numbers():
    noisy = _noise(1.0)
    assert noisy["verdict"] == study.HOLDS
    assert [r["verdict"] for r in noisy["rows"]] == [study.NOISIER, study.NOISIER]
    assert "holds on this data" in noisy["sentence"]
    assert (
        "SmoothGrad changes total variation by -10% for the BNN and -40% for the twin"
        in (noisy["sentence"])
    )
    assert "the change is higher for the BNN than for the twin" in noisy["sentence"]
    assert [r["verdict"] for r in noisy["extra_rows"]][:2] == ["reference", "reference"]

    quiet = _noise(-1.0)
    assert quiet["verdict"] == study.DOES_NOT_HOLD
    assert [r["verdict"] for r in quiet["rows"]] == [study.LESS_NOISY, study.LESS_NOISY]
    assert "does not hold" in quiet["sentence"]


def test_noise_sentence_reports_the_mean_per_image_tv_change():
    """The TV change in finding 2's sentence is the mean of the per-image changes, which
    can differ in sign from the change of the mean TVs shown in the tables: say which."""
    tv_gradient = np.array([1.0, 10.0, 1.0, 10.0])
    tv_smooth = np.array([2.0, 5.0, 2.0, 5.0])  # per image: +100%, -50%; of the means: -36%
    reduction = study.tv_reduction(tv_smooth, tv_gradient)
    per_image = np.mean(tv_smooth / tv_gradient - 1)
    assert per_image > 0 > tv_smooth.mean() / tv_gradient.mean() - 1
    noise = {"total_variation": {k: tv_smooth for k in ("bnn", "twin", "control")}}
    finding = study.noise_finding(
        title="t",
        claim="c",
        group="SmoothGrad",
        noise=noise,
        reduction={k: reduction for k in ("bnn", "twin", "control")},
        labels={},
        num_images=4,
        alpha=0.05,
        seed=0,
        num_bootstrap=100,
        confidence=0.95,
    )
    assert (
        f"changes total variation by {100 * per_image:+.0f}% for the BNN and "
        f"{100 * per_image:+.0f}% for the twin (means of the per-image changes;"
    ) in finding["sentence"]


def test_pointing_game_counts_an_all_zero_map_as_a_miss():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(5, 6, 6)).astype(np.float32)
    maps[0] = 0.0  # all zero: a miss, though its tied maximum touches the mask
    maps[1] = 0.5  # constant but not zero: a hit, as in Quantus
    masks = np.zeros((5, 6, 6), bool)
    masks[:, 2:4, 2:4] = True
    masks[2].flat[np.argmax(maps[2])] = True  # a sure hit
    masks[3].flat[np.argmax(maps[3])] = False  # a sure miss
    want = [
        float(maps[i].max() != 0 and masks[i][maps[i] == maps[i].max()].any()) for i in range(5)
    ]
    got = study.pointing_game(maps, masks)
    assert want[:4] == [0.0, 1.0, 1.0, 0.0]
    np.testing.assert_array_equal(got, want)


def test_tv_reduction():
    out = study.tv_reduction(np.array([1.0, 3.0, 0.0]), np.array([4.0, 2.0, 0.0]))
    np.testing.assert_allclose(out, [0.75, -0.5, 0.0])


def test_settings_validation():
    assert study.settings_from_config(None) == study.Settings()
    s = study.settings_from_config({"surrogates": "ste_sign, identity", "num_images": 20})
    assert s.surrogates == ("ste_sign", "identity") and s.num_images == 20
    with pytest.raises(ValueError, match=r"Unknown config.explain field\(s\) \['num_imgs'\]"):
        study.settings_from_config({"num_imgs": 3})
    with pytest.raises(ValueError, match="num_images must be >= 2"):
        study.settings_from_config({"num_images": 1})
    with pytest.raises(ValueError, match="must be an int"):
        study.settings_from_config({"ig_steps": 2.5})
    for bad in (float("nan"), float("inf")):  # NaN passes "< 0" and every other bound
        with pytest.raises(ValueError, match="smoothgrad_noise must be a finite number"):
            study.settings_from_config({"smoothgrad_noise": bad})
    with pytest.raises(ValueError, match="Unknown config.explain.deletion_substrate 'grey'"):
        study.settings_from_config({"deletion_substrate": "grey"})
    with pytest.raises(ValueError, match="mprt_methods must name some of"):
        study.settings_from_config({"mprt_methods": ("lime",)})


def _explain_section(*overrides: str):
    """``config.explain`` of configs/shapes.py with ``--config.explain.<...>`` overrides,
    parsed by ml_collections' flags as explain.py parses them."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["explain.py", f"--config={ROOT / 'configs' / 'shapes.py'}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config.explain


def test_comma_separated_names_on_the_command_line_are_split():
    # ml_collections reads "--config.explain.mprt_methods=gradient,gradcam" into the
    # 1-tuple ("gradient,gradcam",), which was refused as one unknown method.
    explain = _explain_section(
        "--config.explain.surrogate_methods=gradient, smoothgrad",
        "--config.explain.mprt_methods=gradient,gradcam",
        "--config.explain.surrogates=ste_sign(clip_value=2.0),identity",
        "--config.explain.mprt_layers=head+head_bn,block6",
    )
    s = study.settings_from_config(explain)
    assert s.surrogate_methods == ("gradient", "smoothgrad")
    assert s.mprt_methods == ("gradient", "gradcam")
    assert s.surrogates == ("ste_sign(clip_value=2.0)", "identity")
    assert s.mprt_layers == ("head+head_bn", "block6")
    # a comma inside a spec's brackets or quotes does not split it
    assert study._as_names(("swish_sign(beta=2.0, x='a,b'), approx_sign",), "surrogates") == (
        "swish_sign(beta=2.0, x='a,b')",
        "approx_sign",
    )
    # empty entries are dropped; each name is still checked, and the message names the
    # unknown one
    explain = _explain_section("--config.explain.mprt_methods=gradcam,")
    assert study.settings_from_config(explain).mprt_methods == ("gradcam",)
    for override, match in [
        ("--config.explain.surrogate_methods=gradient,lime", r"unknown: 'lime'"),
        ("--config.explain.surrogates=ste_sign,sine", "Bad config.explain.surrogates entry 'sine'"),
    ]:
        with pytest.raises(ValueError, match=match):
            study.settings_from_config(_explain_section(override))


@pytest.mark.parametrize(
    "name",
    ["default", "digits", "shapes", "cifar10_binarynet", "cifar10_birealnet", "imagenet_birealnet"],
)
def test_config_explain_sections_name_valid_layers(name):
    """Every convolutional config's explain section validates and names a GradCAM layer
    with a feature map (checked with jax.eval_shape: nothing is allocated)."""
    config = importlib.import_module(f"configs.{name}").get_config()
    settings = study.settings_from_config(config.explain)
    size = config.image_size or 32
    channels = 1 if config.dataset == "digits" else 3
    model = models.get(config.model, binary=True, num_classes=10, **config.model_kwargs)
    spatial = study._spatial_layers(model, (1, size, size, channels))
    assert settings.gradcam_layer in spatial


def test_docs_state_the_measured_accuracies_and_the_fold_option():
    # configs/shapes.py said the BNN reaches about 0.98 where the README's measured run
    # gives 0.971; docs/performance.md said the study does not fold BatchNorms, where
    # config.explain.fold_batchnorm folds them (off by default).
    readme = (ROOT / "README.md").read_text()
    (measured,) = re.findall(
        r"BNN (\d\.\d{3}), twin (\d\.\d{3}), control (\d\.\d{3}) test accuracy", readme
    )
    doc = " ".join(importlib.import_module("configs.shapes").__doc__.split())
    bnn, twin, control = measured
    assert f"the BNN reaches {bnn} test accuracy" in doc
    if twin == control:
        assert f"the twin and the control {twin}" in doc
    else:
        assert f"the twin {twin} and the control {control}" in doc
    perf = " ".join((ROOT / "docs" / "performance.md").read_text().split())
    assert "the study do not fold" not in perf
    assert study.Settings().fold_batchnorm is False
    assert "fold only when asked (`--config.explain.fold_batchnorm=True`; off by default" in perf
    assert study.settings_from_config({"fold_batchnorm": True}).fold_batchnorm is True


def test_mprt_default_stages_randomise_every_parameter():
    """BinaryNet's default MPRT stages: each dense layer with its BatchNorm, each conv block
    whole, from the logits down; together they hold every parameter of the model."""
    model = models.get("binarynet", binary=True, num_classes=10, width=0.125, stem="small")
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    stages = study._mprt_stages(model, variables, (1, 32, 32, 1))
    blocks = [f"block{i}" for i in range(6, 0, -1)]
    assert stages == ["head+head_bn", "dense2+dense2_bn", "dense1+dense1_bn", *blocks]
    assert sorted(p for stage in stages for p in stage.split("+")) == sorted(variables["params"])
    assert sorted(variables["batch_stats"]) == sorted(
        p for stage in stages for p in stage.split("+") if p.endswith("_bn") or "block" in p
    )


# --------------------------------------------------------------------------- end to end
class TinyCNN(nn.Module, QuantMixin):
    """Two BinaryNet blocks and a binary head: BinaryNet's design, quick to compile."""

    num_classes: int
    binary: bool = True
    input_quantizer: str | None = "ste_sign"
    kernel_quantizer: str | None = "ste_sign"
    kernel_clip: float | None = 1.0
    surrogate: str | None = None
    fp_activation: str = "hard_tanh"
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        fields = self.quant_fields()
        x = ConvBlock(8, name="block1", **(fields | {"input_quantizer": None}))(x, train)
        x = ConvBlock(8, pool=True, name="block2", **fields)(x, train)
        x = self.twin_act(x.reshape((x.shape[0], -1)))
        x = self.binary_dense(self.num_classes, name="head")(x)
        return batch_norm(train, name="head_bn", use_scale=False)(x).astype(jnp.float32)


def tiny_config():
    """Shapes at 16 px, a two-block BinaryNet, a few steps, a tiny study."""
    models.register("tiny_cnn", TinyCNN)
    config = importlib.import_module("configs.shapes").get_config()
    config.image_size = 16
    config.data_kwargs = {"num_examples": 64}
    config.model = "tiny_cnn"
    config.model_kwargs = {}
    config.batch_size = 32
    config.eval_batch_size = 32
    config.num_epochs = 1
    config.train_control = True
    config.checkpoint_every_steps = 100
    config.log_every_steps = 1
    config.progress_bar = False
    e = config.explain
    e.num_images = 12
    e.batch_size = 6
    e.num_examples = 2
    e.smoothgrad_samples = 2
    e.sample_batch_size = 2
    e.ig_steps = 2
    e.gradcam_layer = "block2"
    e.surrogates = ("ste_sign", "identity")
    e.surrogate_methods = ("gradient",)
    e.faithfulness_steps = 2
    e.mprt_images = 3
    e.mprt_methods = ("gradient",)
    e.mprt_layers = ("head+head_bn", "block2")
    e.bootstrap_samples = 100
    return config


def snapshot(path: Path) -> dict[str, str]:
    """Hash of every file (and the name of every folder) under ``path``."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(path.rglob("*"))
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from jbnn import training

    path = tmp_path_factory.mktemp("study")
    training.train_and_evaluate(tiny_config(), path)
    return path


@pytest.fixture(scope="module")
def report(workdir):
    out = study.run_study(tiny_config(), workdir, verbose=False)
    return out, (out / "results.json").read_bytes()


@pytest.mark.slow
def test_end_to_end_report(report):
    out, _ = report
    names = {p.name for p in out.iterdir()}
    pngs = {
        "saliency_grid.png",
        "metric_distributions.png",
        "mprt.png",
        "deletion_insertion.png",
        "surrogates.png",
    }
    assert pngs | {"report.md", "results.json", "per_image.npz", "timings.json"} == names
    assert names == study.REPORT_FILES  # what a rerun may replace
    for name in pngs:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    per_image = np.load(out / "per_image.npz")
    assert results["meta"]["num_images"] == 12
    assert set(results["findings"]) == {"gradient", "smoothgrad", "gradcam"}
    text = (out / "report.md").read_text()
    for finding in results["findings"].values():
        assert finding["verdict"] in (
            study.HOLDS,
            study.DOES_NOT_HOLD,
            study.MIXED,
            study.INCONCLUSIVE,
        )
        assert finding["sentence"] in text
        row = finding["rows"][0]
        key = {
            "Gradient": "gradient/spearman_abs/bnn_vs_twin",
            "SmoothGrad": "smoothgrad/total_variation/bnn",
            "GradCAM": "gradcam/spearman_abs/bnn_vs_twin",
        }[row["group"]]
        np.testing.assert_allclose(row["a"]["mean"], per_image[key].mean(), rtol=1e-5, atol=1e-6)
    # The BNN's SmoothGrad total variation, in finding 2's table and in the noise overview:
    # one series, one interval.
    tv_row = results["findings"]["smoothgrad"]["rows"][0]
    assert tv_row["a"] == results["noise"]["smoothgrad"]["total_variation"]["bnn"]
    assert results["localisation"] is not None  # shapes has masks
    assert len(results["mprt"]["gradient"]["bnn"]["spearman_abs"]) == 3  # none, head, block2
    assert results["mprt"]["gradient"]["bnn"]["layers"] == ["head+head_bn", "block2"]
    assert list(results["surrogates"]["rows"]) == ["ste_sign", "identity"]
    # ste_sign is the BNN's own surrogate: its maps are the BNN's.
    same = results["surrogates"]["rows"]["ste_sign"]["gradient"]["spearman_abs_vs_bnn"]
    assert same["mean"] == pytest.approx(1.0)
    assert not list(out.parent.glob(".report*"))  # no temporary folder left behind
    text = study.summary(out)
    assert text.splitlines()[0].startswith("| finding (paper) |")
    assert str(out / "report.md") in text


@pytest.mark.slow
def test_verdicts_follow_the_printed_numbers(report):
    """Every verdict of results.json, re-derived from its own intervals and p-values with
    the rules as the README states them (an independent transcription)."""
    out, _ = report
    results = json.loads((out / "results.json").read_text())
    settings = results["meta"]["explain_config"]
    margin, alpha = settings["similarity_margin"], settings["alpha"]
    findings = results["findings"]
    supports = {}
    for name in ("gradient", "gradcam"):
        supports[name] = []
        for row in findings[name]["rows"]:
            m = margin * abs(row["b"]["mean"])
            d = row["difference"]
            if d["lo"] >= -m:
                want = "alike"
            elif d["hi"] < -m and row["wilcoxon"]["p_value"] < alpha:
                want = "less similar"
            else:
                want = "inconclusive"
            assert row["verdict"] == want, (name, row["metric"])
            alike = {"alike": True, "less similar": False}.get(want)
            supports[name].append(None if alike is None else alike == (name == "gradient"))
    seed = {
        r["metric"]: r for r in findings["smoothgrad"]["extra_rows"] if r["a_name"] == "control"
    }
    supports["smoothgrad"] = []
    for row in findings["smoothgrad"]["rows"]:
        d, up = row["difference"], row["metric"] != "sparseness"  # Gini falls with noise
        decided = row["wilcoxon"]["p_value"] < alpha and abs(d["mean"]) > abs(
            seed[row["metric"]]["difference"]["mean"]
        )
        noisier = (d["lo"] > 0) if up else (d["hi"] < 0)
        quieter = (d["hi"] < 0) if up else (d["lo"] > 0)
        noisy_end = d["hi"] if up else -d["lo"]
        want = (
            "noisier"
            if decided and noisier
            else "less noisy"
            if decided and quieter
            else "within seed-to-seed"
            if noisy_end <= abs(seed[row["metric"]]["difference"]["mean"])
            else None
        )
        assert row["verdict"] == (want or "no clear difference"), row["metric"]
        supports["smoothgrad"].append(None if want is None else want == "noisier")
    for name, s in supports.items():
        want = (
            "holds"
            if all(x is True for x in s)
            else "does not hold"
            if all(x is False for x in s)
            else "inconclusive"
            if all(x is None for x in s)
            else "mixed"
        )
        assert findings[name]["verdict"] == want, name


@pytest.mark.slow
def test_gradient_similarity_matches_an_independent_computation(workdir, report):
    """Spearman of |Gradient| (channel sum) between BNN and twin, with jax.grad and scipy."""
    from jbnn import data as jdata
    from jbnn import training

    out, _ = report
    results = json.loads((out / "results.json").read_text())
    per_image = np.load(out / "per_image.npz")
    config = tiny_config()
    test = jdata.load("shapes", "test", image_size=16, seed=0, num_examples=64)
    idx = np.asarray(results["meta"]["image_indices"])
    x, y = test.images[idx], test.labels[idx]
    grads = {}
    for name, sub in (("bnn", "bnn"), ("twin", "fp")):
        model, variables, _ = training.load_run(workdir / sub)

        def logit(image, label, model=model, variables=variables):
            return model.apply(variables, image[None])[0, label]

        g = jax.vmap(jax.grad(logit))(jnp.asarray(x), jnp.asarray(y))
        grads[name] = np.abs(np.asarray(g)).sum(-1)
    expected = [
        sps.spearmanr(grads["bnn"][i].ravel(), grads["twin"][i].ravel()).statistic
        for i in range(len(idx))
    ]
    np.testing.assert_allclose(
        per_image["gradient/spearman_abs/bnn_vs_twin"], expected, rtol=1e-4, atol=1e-4
    )
    assert config.explain.num_images == len(idx) == len(set(idx.tolist()))


@pytest.mark.slow
def test_rerun_gives_the_same_numbers(workdir, report):
    _, first = report
    again = study.run_study(tiny_config(), workdir, verbose=False)
    assert (again / "results.json").read_bytes() == first


def _refused(config, workdir, match):
    before = snapshot(workdir)
    with pytest.raises(study.StudyError, match=match):
        study.run_study(config, workdir, verbose=False)
    assert snapshot(workdir) == before


@pytest.mark.slow
def test_unknown_layer_is_refused_and_nothing_written(workdir, report):
    config = tiny_config()
    config.explain.gradcam_layer = "block9"
    _refused(config, workdir, r"Unknown config.explain.gradcam_layer 'block9'.*block1.*block2")
    config = tiny_config()
    config.explain.mprt_layers = ("head+head_bn", "head+bn", "")
    _refused(
        config,
        workdir,
        r"Unknown config.explain.mprt_layers \['head\+bn', ''\].*stages: head\+head_bn, "
        r"block2, block1$",
    )


@pytest.mark.slow
def test_a_report_folder_with_other_files_is_not_replaced(workdir, report):
    notes = workdir / study.REPORT_DIR / "notes.md"
    notes.write_text("my notes")
    try:
        _refused(tiny_config(), workdir, r"report holds files explain.py did not write \(notes")
    finally:
        notes.unlink()


@pytest.mark.slow
def test_config_of_another_dataset_is_refused(workdir, report):
    config = tiny_config()
    config.dataset = "digits"
    _refused(config, workdir, r"another dataset.*dataset: trained with 'shapes'")


@pytest.mark.slow
def test_missing_and_half_trained_models_are_refused(workdir, report, tmp_path):
    missing = tmp_path / "missing"
    shutil.copytree(workdir, missing)
    shutil.rmtree(missing / "control")
    _refused(tiny_config(), missing, r"control is missing.*train_control=True")
    half = tmp_path / "half"
    shutil.copytree(workdir, half)
    (half / "fp" / "results.json").unlink()
    _refused(tiny_config(), half, r"half-trained")
    _refused(tiny_config(), tmp_path / "nowhere", r"does not exist")


def test_a_report_path_that_is_not_a_folder_is_refused(tmp_path):
    """A file where the report goes would be renamed out of sight: refuse it instead."""
    (tmp_path / "report").write_text("my notes")
    with pytest.raises(study.StudyError, match=r"report exists and is not a folder"):
        study._check_report_dir(tmp_path / "report")
    assert (tmp_path / "report").read_text() == "my notes"
    study._check_report_dir(tmp_path / "absent")  # nothing there: fine


@pytest.mark.slow
def test_damaged_runs_are_refused_in_one_line(workdir, report, tmp_path):
    for damage, text in (("results.json", "{"), ("results.json", '{"binary": false}')):
        broken = tmp_path / f"broken{len(text)}"
        shutil.copytree(workdir, broken)
        (broken / "fp" / damage).write_text(text)
        where = re.escape(str(broken / "fp"))
        _refused(tiny_config(), broken, rf"{where} holds a damaged run .*train the twin")


@pytest.mark.slow
def test_damaged_checkpoints_and_configs_are_refused_in_one_line(workdir, tmp_path):
    # A complete checkpoint with truncated array files or without its _METADATA (was: a
    # 151-line traceback from orbax's bare Exception; a pytree error naming no run or
    # file), a config.json that is not JSON (was: "Expecting value: line 2 column 1").
    from jbnn import training

    steps = json.loads((workdir / "fp" / training.RESULTS_FILE).read_text())["steps"]
    broken = tmp_path / "broken"

    def truncate(step_dir):
        for f in (step_dir / "default").glob("ocdbt.process_0/d/*"):
            f.write_bytes(f.read_bytes()[:100])

    for damage, match in [
        (truncate, r"\(ValueError: .*byte range .*\)"),
        (lambda step_dir: (step_dir / "default" / "_METADATA").unlink(), r"\(ValueError: .*\)"),
    ]:
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(workdir, broken)
        damage(broken / "fp" / training.CHECKPOINT_DIR / str(steps))
        where = re.escape(str(broken / "fp"))
        before = snapshot(broken)
        with pytest.raises(study.StudyError) as info:
            study.run_study(tiny_config(), broken, verbose=False)
        assert snapshot(broken) == before
        message = str(info.value)
        assert "\n" not in message, message
        assert re.match(  # the fixture's runs keep one checkpoint, the final one
            rf"{where}: checkpoint of step {steps} is damaged or unreadable {match}; it holds the "
            r"run's final weights and there is no earlier checkpoint: delete "
            rf"{where} and rerun train\.py \(same --config and --workdir\) to train it again\.$",
            message,
        ), message
    shutil.rmtree(broken)
    shutil.copytree(workdir, broken)
    (broken / "bnn" / training.CONFIG_FILE).write_text('{\n  "augm')
    _refused(
        tiny_config(),
        broken,
        rf"^{re.escape(str(broken / 'bnn' / training.CONFIG_FILE))} is not valid JSON "
        r"\(Unterminated string .*\); it records the config the bnn model was trained with: "
        rf"restore it from a copy, or delete {re.escape(str(broken / 'bnn'))} and rerun",
    )


def test_explain_cli_reports_a_clear_error(tmp_path):
    proc = run_cli("explain.py", "shapes", tmp_path / "absent")
    assert proc.returncode == 1
    assert "explain.py: workdir" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "absent").exists()
    # A file for a workdir: "not a directory" (was: "does not exist"); the file kept.
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(study.StudyError, match=r"workdir .*afile is a file, not a directory"):
        study.prepare(tiny_config(), tmp_path / "afile")
    proc = run_cli("explain.py", "shapes", tmp_path / "afile")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"explain.py: workdir {tmp_path / 'afile'} is a file, not a directory: pass the "
        "--workdir that train.py wrote bnn/, fp/ and control/ into."
    ), proc.stderr
    assert (tmp_path / "afile").read_text() == "keep me"


# --------------------------------------------------------------------------- kills
# run_study with every stage before the report replaced by a stub (the stubs' names are
# those of HEAD's run_study too): what is left to test is the writing of the report.
_STUBBED_STUDY = """
import os, sys, time, types
from pathlib import Path
import numpy as np
from jbnn import report, study

workdir, pause = Path(sys.argv[1]), sys.argv[2]
plan = types.SimpleNamespace(workdir=workdir, labels=np.zeros(2, np.int32), dataset="toy")
study.prepare = lambda config, workdir: plan
study.compute_maps = lambda plan, verbose: ({}, {})
study.per_image_metrics = lambda plan, maps, signed, verbose: ({}, {})
study.run_mprt = lambda plan, verbose: {}
study.build_results = lambda *args: {"meta": {}}
study._predictions = lambda plan: {k: np.zeros(2) for k in study.MODELS}
study.figure_data = lambda *args: None

def ready():
    (workdir / "ready").touch()
    time.sleep(float(os.environ.get("PAUSE_S", "60")))

def write_report(results, data, out, methods):
    (out / "report.md").write_text("new")
    if pause == "writing":
        ready()

report.write_report = write_report
replace = os.replace

def slow_replace(src, dst):  # the first is report -> .report-old-<pid>
    replace(src, dst)
    if pause == "swap" and not (workdir / "ready").exists():
        ready()

os.replace = slow_replace
study.run_study(None, workdir, verbose=False)
"""


def _run_stubbed_study(workdir: Path, pause: str, sigterm: bool, pause_s: float = 30):
    """The stubbed study in a fresh process, sent SIGTERM once it pauses ``pause``."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "PAUSE_S": str(pause_s), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUBBED_STUDY, str(workdir), pause],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not (workdir / "ready").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the stubbed study never reached its pause"
            time.sleep(0.05)
        if sigterm:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    (workdir / "ready").unlink(missing_ok=True)
    return proc.returncode, err


def _report_dir_with(workdir: Path, text: str) -> None:
    (workdir / study.REPORT_DIR).mkdir(parents=True, exist_ok=True)
    (workdir / study.REPORT_DIR / "report.md").write_text(text)


def test_sigterm_while_the_report_is_written_removes_the_temporary_folder(tmp_path):
    # A SIGTERM-killed explain.py left .report-tmp-* in the workdir (the default action
    # ends the process before any cleanup). Now the folder goes, and the old report stays.
    _report_dir_with(tmp_path, "old")
    code, err = _run_stubbed_study(tmp_path, "writing", sigterm=True)
    assert code == 128 + 15, err[-2000:]  # SystemExit(143), as a shell reports SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == [study.REPORT_DIR], err[-2000:]
    assert (tmp_path / study.REPORT_DIR / "report.md").read_text() == "old"


def test_sigterm_during_the_swap_waits_until_the_new_report_is_in_place(tmp_path):
    # Killed between "report -> .report-old-<pid>" and "tmp -> report", the workdir had no
    # report/ at all (the old one hidden in .report-old-*, the new one in .report-tmp-*).
    _report_dir_with(tmp_path, "old")
    code, err = _run_stubbed_study(tmp_path, "swap", sigterm=True, pause_s=1.0)
    assert code == 128 + 15, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [study.REPORT_DIR], err[-2000:]
    assert (tmp_path / study.REPORT_DIR / "report.md").read_text() == "new"


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    # SIGKILL cannot be caught: the next run on this machine removes a folder whose
    # process is gone, and keeps those of a live process or another machine.
    import os
    import socket
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    dead = child.pid  # exited and reaped: no such process (short of pid reuse)
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())  # "-" separates parts
    stale = tmp_path / f".report-tmp-{host}-{dead}-abcd1234"
    live = tmp_path / f".report-tmp-{host}-{os.getppid()}-abcd1234"
    elsewhere = tmp_path / f".report-tmp-otherhost-{dead}-abcd1234"
    for folder in (stale, live, elsewhere):
        folder.mkdir()
        (folder / "report.md").write_text("partial")
    code, err = _run_stubbed_study(tmp_path, "none", sigterm=False)
    assert code == 0, err[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([live.name, elsewhere.name, study.REPORT_DIR]), names
    assert (tmp_path / study.REPORT_DIR / "report.md").read_text() == "new"
