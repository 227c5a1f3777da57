"""Tests for jbnn.report: display scaling against PAIR, figures and markdown from data."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jbnn import report

METHODS = ("gradient", "smoothgrad", "gradcam", "integrated_gradients")
MODELS = ("bnn", "twin", "control")


def _ci(mean: float, half: float = 0.02) -> dict:
    return {"mean": mean, "lo": mean - half, "hi": mean + half}


def _row(group, metric, a, b, p, verdict, a_name="BNN vs twin", b_name="twin vs control"):
    return {
        "group": group,
        "metric": metric,
        "label": report.METRIC_LABELS.get(metric, metric),
        "a_name": a_name,
        "a": _ci(a),
        "b_name": b_name,
        "b": _ci(b),
        "difference": _ci(a - b, 0.01),
        "wilcoxon": {"statistic": 12.0, "p_value": p},
        "verdict": verdict,
    }


def _finding(title, claim, verdict, rows, extra=()):
    return {
        "title": title,
        "claim": claim,
        "verdict": verdict,
        "sentence": f"Sentence for {title}.",
        "method_note": f"Note for {title}.",
        "rows": list(rows),
        "extra_rows": list(extra),
        "extra_note": "Extra rows.",
    }


@pytest.fixture(scope="module")
def study():
    """Hand-made results and figure data with distinctive numbers."""
    rng = np.random.default_rng(0)
    n, h, w, steps = 5, 12, 12, 6
    layers = ["head", "dense1", "block2", "block1"]
    results = {
        "meta": {
            "dataset": "shapes",
            "model": "binarynet",
            "num_images": 40,
            "image_shape": [h, w, 3],
            "seed": 7,
            "bootstrap_samples": 500,
            "confidence": 0.95,
            "mask_fraction": _ci(0.1234, 0.01),
            "models": {m: {"test_accuracy": 0.9 + 0.01 * i} for i, m in enumerate(MODELS)},
            "faithfulness": {
                "substrate": "blur",
                "insertion_substrate": "blurred",
                "num_steps": steps,
            },
            "mprt": {"num_images": 8},
            "explain_config": {"num_images": 40, "gradcam_layer": "block2"},
        },
        "findings": {
            "gradient": _finding(
                "Gradient maps look alike",
                "Gradient maps look alike for BNN and twin",
                "holds",
                [
                    _row("Gradient", "spearman_abs", 0.6111, 0.6222, 0.0333, "alike"),
                    _row("Gradient", "ssim", 0.4444, 0.4555, 0.2, "alike"),
                ],
            ),
            "smoothgrad": _finding(
                "SmoothGrad noisier",
                "SmoothGrad maps are noisier for BNNs",
                "mixed",
                [_row("SmoothGrad", "total_variation", 3.5, 2.25, 1e-6, "noisier", "BNN", "twin")],
                [
                    _row(
                        "SmoothGrad (seed)",
                        "total_variation",
                        2.3,
                        2.25,
                        0.5,
                        "reference",
                        "control",
                        "twin",
                    )
                ],
            ),
            "gradcam": _finding(
                "GradCAM maps differ",
                "GradCAM maps differ between the twins",
                "does not hold",
                [_row("GradCAM", "spearman_abs", 0.8766, 0.8801, 0.9, "alike")],
            ),
        },
        "faithfulness": {
            m: {
                k: {"deletion_auc": _ci(0.2 + 0.01 * i), "insertion_auc": _ci(0.7 - 0.01 * i)}
                for i, k in enumerate(MODELS)
            }
            for m in METHODS
        },
        "localisation": {
            m: {k: {"pointing_game": _ci(0.55), "relevance_mass": _ci(0.3)} for k in MODELS}
            for m in METHODS
        },
        "mprt": {
            m: {
                k: {
                    "layers": layers,
                    "spearman_abs": [_ci(1.0, 0.0)] + [_ci(0.8 - 0.2 * i) for i in range(4)],
                    "ssim": [_ci(1.0, 0.0)] + [_ci(0.7 - 0.15 * i) for i in range(4)],
                }
                for k in ("bnn", "twin")
            }
            for m in ("gradient", "gradcam")
        },
        "surrogates": {
            "reference": "ste_sign",
            "trained": "ste_sign",
            "metric_labels": {"spearman_abs_vs_twin": "ρ vs twin", "total_variation": "TV"},
            "rows": {
                s: {
                    m: {"spearman_abs_vs_twin": _ci(0.5 + 0.05 * i), "total_variation": _ci(2.0)}
                    for m in ("gradient", "smoothgrad", "gradcam")
                }
                for i, s in enumerate(("ste_sign", "approx_sign", "swish_sign", "identity"))
            },
        },
    }
    per_image = {}
    for m in ("gradient", "gradcam"):
        for metric in ("spearman_abs", "ssim"):
            for p in ("bnn_vs_twin", "twin_vs_control"):
                per_image[f"{m}/{metric}/{p}"] = rng.uniform(0, 1, 40)
    for metric in ("total_variation", "complexity", "sparseness", "tv_reduction"):
        for k in MODELS:
            per_image[f"smoothgrad/{metric}/{k}"] = rng.uniform(0, 1, 40)
    per_image["smoothgrad/sparseness/control"][:] = 0.5  # a constant series still plots
    data = report.FigureData(
        images=rng.uniform(0, 1, (n, h, w, 3)),
        titles=[f"image {i}" for i in range(n)],
        maps={m: {k: rng.normal(size=(n, h, w)) for k in MODELS} for m in METHODS},
        per_image=per_image,
        curves={
            kind: {
                m: {k: np.linspace(1, 0, steps + 1) ** (i + 1) for i, k in enumerate(MODELS)}
                for m in METHODS
            }
            for kind in ("deletion", "insertion")
        },
        surrogate_maps={s: rng.normal(size=(n, h, w)) for s in results["surrogates"]["rows"]},
    )
    return results, data


def test_display_map_matches_pair():
    saliency_core = pytest.importorskip("saliency.core")
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(3, 9, 11))
    ours = report.display_map(maps)
    for i in range(3):
        ref = saliency_core.VisualizeImageGrayscale(maps[i][..., None])
        np.testing.assert_allclose(ours[i], ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(report.display_map(maps[0]), ours[0])


def test_display_map_constant_and_bad_shape():
    assert np.all(report.display_map(np.zeros((4, 4))) == 0.0)
    assert np.all(np.isfinite(report.display_map(np.full((2, 4, 4), 3.0))))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\)"):
        report.display_map(np.zeros((1, 2, 3, 4)))


def test_format_ci():
    assert report.format_ci({"mean": 0.12345, "lo": 0.1, "hi": 0.2}) == "0.123 [0.100, 0.200]"
    assert report.format_ci(None) == "—"
    assert report.format_ci({"mean": float("nan"), "lo": 0, "hi": 0}) == "n/a"


@pytest.mark.slow
def test_write_report(study, tmp_path):
    results, data = study
    written = report.write_report(results, data, tmp_path, METHODS)
    for name in ("grid", "distributions", "mprt", "deletion_insertion", "surrogates"):
        png = written[name]
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size > 10_000, name
    text = written["report"].read_text()
    # Every image the report links exists next to it.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(p.name for k, p in written.items() if k != "report")
    # The numbers come from the results: verdicts, sentences, distinctive values.
    for finding in results["findings"].values():
        assert finding["sentence"] in text
        assert f"**{finding['verdict']}**" in text
    for value in ("0.611", "0.622", "0.877", "0.880", "0.0333", "1.0e-06", "0.123"):
        assert value in text, value
    assert "## Localisation" in text and "## Surrogate ablation" in text


def test_headline_table_one_row_per_finding(study):
    results, _ = study
    lines = report.headline_table(results)
    assert len(lines) == 2 + len(results["findings"])
    assert "does not hold" in lines[-1] and "0.88" in lines[-1]


def test_the_report_states_the_coverage_it_was_computed_with(study):
    """config.explain.confidence = 0.9 gives 90% intervals: no table or sentence of the
    report may call them 95%."""
    results, _ = study
    results = {**results, "meta": {**results["meta"], "confidence": 0.9}}
    text = report.render_markdown(results, {})
    assert "95%" not in text
    assert "Intervals are 90% bootstrap intervals" in text
    assert "A − B [90% CI]" in text and "mean A [90% CI]" in text
    assert "A − B [90% CI]" in report.headline_table(results)[0]


def test_the_all_zero_map_note_says_what_the_metrics_compute(study):
    """The note on all-zero maps, against what jbnn.metrics gives for one."""
    from jbnn import metrics

    results, _ = study
    meta = {**results["meta"], "zero_maps": {"gradcam": {"bnn": 3, "twin": 0, "control": 0}}}
    text = report.render_markdown({**results, "meta": meta}, {})
    assert "GradCAM BNN 3 of the images" in text
    zero = np.zeros((1, 32, 32), np.float32)
    blob = zero.copy()
    blob[0, 10:20, 10:20] = 1.0
    assert float(metrics.spearman(zero, blob, absolute=True)[0]) == 0.0
    assert float(metrics.spearman(zero, zero, absolute=True)[0]) == 1.0
    assert "Spearman ρ with an all-zero map counts as 0 (1 between two)" in text
    # SSIM against an all-zero map is not 0 (a map that is mostly flat zero scores high).
    assert float(metrics.ssim(zero, blob)[0]) > 0.2
    assert "Similarity to an all-zero map counts as 0" not in text
    assert "SSIM compares it as an all-zero image" in text


def _figure_of(monkeypatch, draw):
    """The matplotlib Figure that ``draw(path)`` saves (captured, nothing written)."""
    saved = []
    monkeypatch.setattr(report, "_save", lambda fig, path: saved.append(fig) or path)
    draw("unused.png")
    return saved[0]


def test_mprt_legend_tells_the_bnn_from_the_twin(study, monkeypatch):
    """Each legend entry's handle must differ between the BNN and the twin of a method:
    the line styles alone (solid, dashed) do not show in a handle this short."""
    results, _ = study
    fig = _figure_of(monkeypatch, lambda path: report.figure_mprt(results, path))
    legend = fig.axes[0].get_legend()
    names = [t.get_text() for t in legend.get_texts()]
    handles = dict(zip(names, legend.legend_handles, strict=True))
    for method in ("Gradient", "GradCAM"):
        bnn, twin = handles[f"{method}, BNN"], handles[f"{method}, twin"]
        assert bnn.get_marker() != twin.get_marker(), method


def test_deletion_insertion_axes_are_labelled(study, monkeypatch):
    results, data = study
    fig = _figure_of(
        monkeypatch,
        lambda path: report.figure_deletion_insertion(data, results, METHODS, path),
    )
    labels = {ax.get_ylabel().split(":")[0]: ax.get_xlabel() for ax in fig.axes if ax.get_ylabel()}
    assert labels == {
        "deletion": "fraction of pixels removed",
        "insertion": "fraction of pixels revealed",
    }


def test_the_report_names_the_unit_its_intervals_resample(study):
    """Intervals and tests resample images of one BNN, one twin and one control: the
    report must not let them pass for uncertainty over training runs."""
    results, _ = study
    text = report.render_markdown(results, {})
    assert "cover the variation over images for these three trained models only" in text
    assert "neither they nor the verdicts account for the variation between training" in text


def test_faithfulness_text_does_not_rank_models_by_auc_alone(study):
    """A model's deletion and insertion AUCs scale with its probability of the true class,
    so the report may call lower deletion AUC more faithful only for the same model."""
    results, _ = study
    text = report.render_markdown(results, {})
    assert "mean a more faithful map of the same model" in text
    assert "a less confident model gets lower AUCs of both kinds" in text
