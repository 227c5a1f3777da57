"""Figures, tables and the markdown report of the BNN-versus-twin saliency study.

Everything here is a function of plain data: the ``results`` dictionary that
:mod:`jbnn.study` builds (JSON-serialisable, written as ``results.json``) and a
:class:`FigureData` with the arrays that only the figures need (example images and
maps, per-image metric values, mean curves). Nothing is recomputed here, so every
number in the report is a number in ``results.json``.

Figures use matplotlib's object-oriented API (``matplotlib.figure.Figure``, which
renders with the Agg backend) so that importing this module selects no backend and
opens no window.

The ``results`` layout (see :func:`jbnn.study.run_study` for how it is filled)::

    meta:        dataset, model, num_images, image_shape, seed, gradcam_layer,
                 methods, surrogates, bootstrap_samples, confidence (the intervals'
                 coverage), models {name: {test_accuracy, ...}}, ...
    findings:    {gradient|smoothgrad|gradcam: Finding}
                 Finding = {title, claim, verdict, sentence, rows: [Row], extra_rows: [Row]}
                 Row = {group, metric, label, a_name, a, b_name, b, difference, wilcoxon,
                        better, verdict}
                 with a, b, difference = {mean, lo, hi} and wilcoxon = {statistic, p_value}
    faithfulness: {method: {model: {deletion_auc: CI, insertion_auc: CI}}}
    localisation: {method: {model: {pointing_game: CI, relevance_mass: CI}}} or absent
    mprt:        {method: {model: {layers: [...], spearman_abs: [CI], ssim: [CI]}}}
    surrogates:  {reference, trained, rows: {surrogate: {method: {metric: CI}}}}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# Display names, in display order.
METHOD_LABELS: dict[str, str] = {
    "gradient": "Gradient",
    "smoothgrad": "SmoothGrad",
    "smoothgrad_sq": "SmoothGrad²",
    "vargrad": "VarGrad",
    "gradcam": "GradCAM",
    "integrated_gradients": "Integrated Gradients",
}
MODEL_LABELS: dict[str, str] = {"bnn": "BNN", "twin": "twin", "control": "control"}
MODEL_COLOURS: dict[str, str] = {"bnn": "#d62728", "twin": "#1f77b4", "control": "#7f7f7f"}
SHORT_METHOD_LABELS: dict[str, str] = {
    **METHOD_LABELS,
    "integrated_gradients": "Integrated\nGradients",
}
METRIC_LABELS: dict[str, str] = {
    "spearman_abs": "Spearman ρ (|map|)",
    "spearman_signed": "Spearman ρ (signed map)",
    "ssim": "SSIM",
    "total_variation": "total variation",
    "complexity": "complexity (entropy)",
    "sparseness": "sparseness (Gini)",
    "tv_reduction": "TV reduction by SmoothGrad",
    "deletion_auc": "deletion AUC",
    "insertion_auc": "insertion AUC",
    "pointing_game": "pointing game",
    "relevance_mass": "relevance mass",
}
SALIENCY_CMAP = "inferno"

__all__ = [
    "FigureData",
    "METHOD_LABELS",
    "display_map",
    "figure_deletion_insertion",
    "figure_distributions",
    "figure_grid",
    "figure_mprt",
    "figure_surrogates",
    "format_ci",
    "headline_table",
    "render_markdown",
    "write_report",
]


@dataclasses.dataclass(frozen=True)
class FigureData:
    """The arrays behind the figures (numpy, host memory).

    Attributes:
      images: (N, H, W, C) example inputs in display range [0, 1].
      titles: N row titles for the example images (true class, predictions).
      maps: method -> model -> (N, H, W) example maps (any scale; normalised for display).
      per_image: name -> (num_images,) per-image metric values for the distributions,
        keyed "<method>/<metric>/<series>" (e.g. "gradient/spearman_abs/bnn_vs_twin").
      curves: "deletion"|"insertion" -> method -> model -> (num_steps + 1,) mean curve.
      surrogate_maps: surrogate -> (N, H, W) maps of the BNN under it.
      surrogate_method: the method of ``surrogate_maps``.
    """

    images: np.ndarray
    titles: Sequence[str]
    maps: Mapping[str, Mapping[str, np.ndarray]]
    per_image: Mapping[str, np.ndarray]
    curves: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]
    surrogate_maps: Mapping[str, np.ndarray]
    surrogate_method: str = "gradient"


# --------------------------------------------------------------------------- helpers
def display_map(saliency: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Scales a map to [0, 1] for display, as PAIR's ``VisualizeImageGrayscale`` does.

    ``a = |map|``, then ``(a - min a) / (percentile(a) - min a)`` clipped to [0, 1]; a
    constant map (where PAIR would divide by zero) becomes all zero.

    Args:
      saliency: (H, W) or (N, H, W) maps; each map is scaled on its own.
      percentile: the percentile that maps to 1.

    Returns:
      An array of the same shape in [0, 1].
    """
    a = np.abs(np.asarray(saliency, dtype=np.float64))
    squeeze = a.ndim == 2
    if squeeze:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"display_map expects (H, W) or (N, H, W) maps, got shape {a.shape}")
    flat = a.reshape(a.shape[0], -1)
    vmin = flat.min(axis=1)
    vmax = np.percentile(flat, percentile, axis=1)
    vmax = np.where(vmax > vmin, vmax, flat.max(axis=1))  # heavy ties at the top
    span = np.where(vmax > vmin, vmax - vmin, np.inf)  # constant map -> 0
    out = np.clip((a - vmin[:, None, None]) / span[:, None, None], 0.0, 1.0)
    return out[0] if squeeze else out


def format_ci(ci: Mapping[str, float] | None, digits: int = 3) -> str:
    """``mean [lo, hi]`` with ``digits`` decimals; an em dash for a missing value."""
    if ci is None:
        return "—"
    mean, lo, hi = ci["mean"], ci.get("lo"), ci.get("hi")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    if lo is None or hi is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _format_p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    if p < 1e-4:
        return f"{p:.1e}"
    return f"{p:.4f}"


def _coverage(results: Mapping) -> str:
    """The intervals' coverage as a percentage (``config.explain.confidence``), e.g. "95%"."""
    return f"{100 * results['meta']['confidence']:g}%"


def _label(table: Mapping[str, str], key: str) -> str:
    return table.get(key, key.replace("_", " "))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    return path


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# --------------------------------------------------------------------------- figures
def figure_grid(data: FigureData, methods: Sequence[str], path: str | Path) -> Path:
    """The paper-style grid: rows are images, columns the input then each method's
    map for the twin and the BNN side by side.

    Args:
      data: the example images and maps (``data.maps[method]["twin"|"bnn"]``).
      methods: the methods to show, in column order.
      path: where to write the PNG.

    Returns:
      The path written.
    """
    path = Path(path)
    n = len(data.images)
    cols = 1 + 2 * len(methods)
    fig = _new_figure(1.25 * cols + 0.9, 1.3 * n + 0.9)
    axes = fig.subplots(n, cols, squeeze=False)
    image = None
    for row in range(n):
        img = np.clip(data.images[row], 0.0, 1.0)
        ax = axes[row, 0]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        ax.set_ylabel(data.titles[row], fontsize=8)
        for j, method in enumerate(methods):
            for k, model in enumerate(("twin", "bnn")):
                ax = axes[row, 1 + 2 * j + k]
                shown = display_map(data.maps[method][model][row])
                image = ax.imshow(shown, cmap=SALIENCY_CMAP, vmin=0, vmax=1)
                if row == 0:
                    ax.set_title(
                        f"{_label(SHORT_METHOD_LABELS, method)}\n{MODEL_LABELS[model]}", fontsize=9
                    )
    axes[0, 0].set_title("input", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.6, pad=0.01)
        bar.set_label("(|saliency| − min) / (99th percentile − min), per map", fontsize=8)
    fig.suptitle("Saliency maps of the full-precision twin and the BNN (true class as target)")
    return _save(fig, path)


def _violin(ax, series: Sequence[np.ndarray], names: Sequence[str], colours: Sequence[str]):
    finite = [np.asarray(s, dtype=np.float64)[np.isfinite(s)] for s in series]
    keep = [i for i, s in enumerate(finite) if s.size]
    if not keep:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
        return
    pos = np.arange(1, len(keep) + 1)
    varying = [i for i in keep if np.ptp(finite[i]) > 0]
    if varying:
        parts = ax.violinplot(
            [finite[i] for i in varying],
            positions=[pos[keep.index(i)] for i in varying],
            showextrema=False,
            widths=0.8,
        )
        for body, i in zip(parts["bodies"], varying, strict=True):
            body.set_facecolor(colours[i])
            body.set_alpha(0.35)
    ax.boxplot(
        [finite[i] for i in keep],
        positions=pos,
        widths=0.18,
        showfliers=False,
        medianprops={"color": "black"},
    )
    ax.set_xticks(pos, [names[i] for i in keep], fontsize=8)


def figure_distributions(data: FigureData, path: str | Path) -> Path:
    """Violin and box plots of the per-image metrics behind the three findings.

    Top row: similarity of Gradient and GradCAM maps (BNN vs twin against twin vs
    control); bottom row: noise of SmoothGrad maps for each model, and the fraction of
    total variation that SmoothGrad removes relative to Gradient.

    Args:
      data: ``data.per_image`` keyed "<method>/<metric>/<series>".
      path: where to write the PNG.

    Returns:
      The path written.
    """
    path = Path(path)
    per = data.per_image
    pairs = ("bnn_vs_twin", "twin_vs_control")
    pair_names = ("BNN vs\ntwin", "twin vs\ncontrol")
    pair_colours = (MODEL_COLOURS["bnn"], MODEL_COLOURS["control"])
    models = ("bnn", "twin", "control")
    top = [
        (m, metric)
        for m in ("gradient", "gradcam")
        for metric in ("spearman_abs", "ssim")
        if all(f"{m}/{metric}/{p}" in per for p in pairs)
    ]
    bottom = [
        metric
        for metric in ("total_variation", "complexity", "sparseness", "tv_reduction")
        if all(f"smoothgrad/{metric}/{m}" in per for m in models)
    ]
    cols = max(len(top), len(bottom), 1)
    fig = _new_figure(3.0 * cols, 6.4)
    axes = fig.subplots(2, cols, squeeze=False)
    for j, (method, metric) in enumerate(top):
        ax = axes[0, j]
        _violin(ax, [per[f"{method}/{metric}/{p}"] for p in pairs], pair_names, pair_colours)
        ax.set_title(
            f"{_label(METHOD_LABELS, method)}: {_label(METRIC_LABELS, metric)}", fontsize=10
        )
        ax.set_ylabel(_label(METRIC_LABELS, metric))
        ax.grid(axis="y", alpha=0.3)
    for j, metric in enumerate(bottom):
        ax = axes[1, j]
        _violin(
            ax,
            [per[f"smoothgrad/{metric}/{m}"] for m in models],
            [MODEL_LABELS[m] for m in models],
            [MODEL_COLOURS[m] for m in models],
        )
        what = "noise reduction" if metric == "tv_reduction" else "noise"
        ax.set_title(f"SmoothGrad: {what}", fontsize=10)
        ax.set_ylabel(_label(METRIC_LABELS, metric))
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes[0, len(top) :]) + list(axes[1, len(bottom) :]):
        ax.set_axis_off()
    n = len(next(iter(per.values()))) if per else 0
    fig.suptitle(f"Per-image metrics ({n} test images)")
    return _save(fig, path)


def figure_mprt(results: Mapping, path: str | Path) -> Path:
    """MPRT sanity curves: similarity of each map to the original as layers are
    re-initialised top-down and cumulatively, for the BNN and the twin.

    Args:
      results: the study results (``results["mprt"]``).
      path: where to write the PNG.

    Returns:
      The path written.
    """
    path = Path(path)
    mprt = results["mprt"]
    methods = list(mprt)
    metrics = [
        k for k in ("spearman_abs", "ssim") if any(k in mprt[m][s] for m in mprt for s in mprt[m])
    ]
    fig = _new_figure(5.2 * max(len(metrics), 1), 4.2)
    axes = fig.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]
    styles = {"bnn": "-", "twin": "--", "control": ":"}
    # A marker per model as well: in a legend handle this short, a dashed line with a
    # marker in its middle looks solid.
    markers = {"bnn": "o", "twin": "s", "control": "^"}
    layers: list[str] = []
    for ax, metric in zip(axes, metrics, strict=False):
        for c, method in enumerate(methods):
            for model, entry in mprt[method].items():
                if metric not in entry:
                    continue
                layers = list(entry["layers"])
                x = np.arange(len(entry[metric]))
                mean = np.array([v["mean"] for v in entry[metric]], dtype=float)
                lo = np.array([v["lo"] for v in entry[metric]], dtype=float)
                hi = np.array([v["hi"] for v in entry[metric]], dtype=float)
                colour = colours[c % len(colours)]
                ax.plot(
                    x,
                    mean,
                    styles.get(model, "-"),
                    color=colour,
                    marker=markers.get(model, "o"),
                    ms=3,
                    label=f"{_label(METHOD_LABELS, method)}, {MODEL_LABELS.get(model, model)}",
                )
                ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)
        ticks = ["none", *layers]
        ax.set_xticks(np.arange(len(ticks)), ticks, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("randomised down to layer (cumulative, from the logits)")
        ax.set_ylabel(f"{_label(METRIC_LABELS, metric)} to the original map")
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.grid(alpha=0.3)
        ax.set_title(_label(METRIC_LABELS, metric))
    axes[0].legend(fontsize=7, loc="best", handlelength=3.5)
    fig.suptitle(
        f"Model parameter randomisation test (mean and {_coverage(results)} bootstrap interval)"
    )
    return _save(fig, path)


def figure_deletion_insertion(
    data: FigureData, results: Mapping, methods: Sequence[str], path: str | Path
) -> Path:
    """Mean deletion and insertion curves per method, one line per model, AUC in the legend.

    Args:
      data: ``data.curves["deletion"|"insertion"][method][model]`` mean curves.
      results: the study results (``results["faithfulness"]`` for the AUCs in the legend).
      methods: the methods to show, one column each.
      path: where to write the PNG.

    Returns:
      The path written.
    """
    path = Path(path)
    kinds = [k for k in ("deletion", "insertion") if k in data.curves]
    fig = _new_figure(3.1 * len(methods), 2.9 * len(kinds) + 0.4)
    axes = fig.subplots(len(kinds), len(methods), squeeze=False, sharey=True)
    for i, kind in enumerate(kinds):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            for model, curve in data.curves[kind][method].items():
                curve = np.asarray(curve, dtype=float)
                x = np.linspace(0.0, 1.0, len(curve))
                auc = results["faithfulness"][method][model][f"{kind}_auc"]["mean"]
                ax.plot(
                    x,
                    curve,
                    color=MODEL_COLOURS.get(model),
                    label=f"{MODEL_LABELS.get(model, model)} (AUC {auc:.3f})",
                )
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper right" if kind == "deletion" else "lower right")
            if i == 0:
                ax.set_title(_label(METHOD_LABELS, method), fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{kind}: probability of true class")
            what = "removed" if kind == "deletion" else "revealed"
            ax.set_xlabel(f"fraction of pixels {what}")
    fig.suptitle(
        "Faithfulness: deletion (lower AUC is better) and insertion (higher is better), "
        "most salient pixels first"
    )
    return _save(fig, path)


def figure_surrogates(data: FigureData, results: Mapping, path: str | Path) -> Path:
    """The surrogate ablation: example BNN maps under each backward surrogate
    next to the twin's, and bars of similarity to the twin's maps per surrogate and method.

    Args:
      data: ``data.surrogate_maps`` and the twin's maps of ``data.surrogate_method``.
      results: the study results (``results["surrogates"]``).
      path: where to write the PNG.

    Returns:
      The path written.
    """
    path = Path(path)
    sur = results["surrogates"]
    names = list(sur["rows"])
    methods = list(next(iter(sur["rows"].values())))
    method_shown = data.surrogate_method
    shown = _label(METHOD_LABELS, method_shown)
    n_show = min(3, len(data.images))
    cols = 2 + len(names)
    fig = _new_figure(max(1.35 * cols, 7.5), 1.35 * n_show + 3.6)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.35 * n_show + 0.4, 3.2])
    axes = top.subplots(n_show, cols, squeeze=False)
    image = None
    for row in range(n_show):
        img = np.clip(data.images[row], 0.0, 1.0)
        axes[row, 0].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        image = axes[row, 1].imshow(
            display_map(data.maps[method_shown]["twin"][row]), cmap=SALIENCY_CMAP, vmin=0, vmax=1
        )
        for k, name in enumerate(names):
            axes[row, 2 + k].imshow(
                display_map(data.surrogate_maps[name][row]), cmap=SALIENCY_CMAP, vmin=0, vmax=1
            )
    axes[0, 0].set_title("input", fontsize=9)
    axes[0, 1].set_title("twin", fontsize=9)
    for k, name in enumerate(names):
        axes[0, 2 + k].set_title(f"BNN\n{name}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        bar = top.colorbar(image, ax=axes, shrink=0.7, pad=0.01)
        bar.set_label(f"|{shown}| (normalised)", fontsize=8)
    top.suptitle(f"BNN {shown} maps under each backward surrogate (forward pass unchanged)")

    ax = bottom.subplots()
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(names))
    for m, method in enumerate(methods):
        ci = [sur["rows"][s][method]["spearman_abs_vs_twin"] for s in names]
        mean = np.array([c["mean"] for c in ci])
        err = np.array([[c["mean"] - c["lo"] for c in ci], [c["hi"] - c["mean"] for c in ci]])
        ax.bar(
            x + (m - (len(methods) - 1) / 2) * width,
            mean,
            width,
            yerr=err,
            capsize=3,
            label=_label(METHOD_LABELS, method),
        )
    ax.set_xticks(x, names)
    ax.set_xlabel("backward surrogate of the BNN's input binarisation")
    ax.set_ylabel("Spearman ρ (|map|) to the twin")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=len(methods))
    ax.set_title(
        f"Similarity to the twin's maps (trained with {sur.get('trained', '?')})", fontsize=10
    )
    return _save(fig, path)


# --------------------------------------------------------------------------- markdown
def _row(cells: Sequence[object]) -> str:
    """One markdown table row; a ``|`` inside a cell is escaped."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _header(cells: Sequence[str]) -> list[str]:
    return [_row(cells), "|" + "---|" * len(cells)]


def _finding_table(finding: Mapping, coverage: str, rows_key: str = "rows") -> list[str]:
    rows = finding.get(rows_key) or []
    if not rows:
        return []
    lines = _header(
        [
            "maps",
            "metric",
            "series A",
            f"mean A [{coverage} CI]",
            "series B",
            f"mean B [{coverage} CI]",
            f"A − B [{coverage} CI]",
            "Wilcoxon p",
            "verdict",
        ]
    )
    for r in rows:
        lines.append(
            _row(
                [
                    r["group"],
                    r["label"],
                    r["a_name"],
                    format_ci(r["a"]),
                    r["b_name"],
                    format_ci(r["b"]),
                    format_ci(r["difference"]),
                    _format_p(r["wilcoxon"]["p_value"]),
                    r.get("verdict", ""),
                ]
            )
        )
    return lines


def headline_table(results: Mapping) -> list[str]:
    """The one-table summary of the three findings (markdown lines).

    One row per finding: the claim, the main metric with both series and their
    difference, the Wilcoxon p-value and the verdict decided from these numbers.
    """
    coverage = _coverage(results)
    lines = _header(
        [
            "finding (paper)",
            "metric",
            "A",
            "B",
            f"A − B [{coverage} CI]",
            "Wilcoxon p",
            "on this data",
        ]
    )
    for finding in results["findings"].values():
        r = finding["rows"][0]
        lines.append(
            _row(
                [
                    finding["claim"],
                    f"{r['group']}: {r['label']}",
                    f"{r['a_name']} {format_ci(r['a'], 2)}",
                    f"{r['b_name']} {format_ci(r['b'], 2)}",
                    format_ci(r["difference"], 3),
                    _format_p(r["wilcoxon"]["p_value"]),
                    f"**{finding['verdict']}**",
                ]
            )
        )
    return lines


def _model_label(key: str) -> str:
    return MODEL_LABELS.get(key, key)


def _overview_tables(results: Mapping) -> list[str]:
    """Similarity and noise of every method (means with their intervals)."""
    out: list[str] = []
    similarity = results.get("similarity")
    if similarity:
        out += ["## Similarity of every method", ""]
        out.append(
            f"Mean similarity per image ({_coverage(results)} interval) of the BNN's maps to "
            "the twin's, and of "
            "the twin's to the control's (the seed-to-seed reference)."
        )
        out.append("")
        metrics = [
            m
            for m in ("spearman_abs", "ssim", "spearman_signed")
            if any(m in entry for entry in similarity.values())
        ]
        out += _header(
            ["method"]
            + [
                f"{_label(METRIC_LABELS, m)}: {p}"
                for m in metrics
                for p in ("BNN–twin", "twin–control")
            ]
        )
        for method, entry in similarity.items():
            cells = [_label(METHOD_LABELS, method)]
            for m in metrics:
                for pair in ("bnn_vs_twin", "twin_vs_control"):
                    cells.append(format_ci(entry[m][pair], 3) if m in entry else "—")
            out.append(_row(cells))
        out.append("")
    noise = results.get("noise")
    if noise:
        out += ["## Noise of every method", ""]
        out.append(
            "Total variation and complexity grow with noise, sparseness falls with it; each map "
            "is normalised by its own max |value| first."
        )
        out.append("")
        metrics = list(next(iter(noise.values())))
        models = list(next(iter(next(iter(noise.values())).values())))
        out += _header(
            ["method"]
            + [f"{_label(METRIC_LABELS, m)}: {_model_label(k)}" for m in metrics for k in models]
        )
        for method, entry in noise.items():
            cells = [_label(METHOD_LABELS, method)]
            cells += [format_ci(entry[m][k], 3) for m in metrics for k in models]
            out.append(_row(cells))
        out.append("")
    return out


def render_markdown(results: Mapping, figures: Mapping[str, str]) -> str:
    """The text of ``report.md``.

    Args:
      results: the study results.
      figures: figure key -> file name relative to the report folder
        (keys: grid, distributions, mprt, deletion_insertion, surrogates).

    Returns:
      The markdown text.
    """
    meta = results["meta"]
    out: list[str] = []
    out.append(f"# BNN vs full-precision twin: saliency study on `{meta['dataset']}`")
    out.append("")
    acc = ", ".join(
        f"{_model_label(k)} {v['test_accuracy']:.4f}" for k, v in meta["models"].items()
    )
    study_acc = meta.get("study_accuracy")
    if study_acc:
        acc += (
            " (on the study images: "
            + ", ".join(f"{_model_label(k)} {v:.3f}" for k, v in study_acc.items())
            + ")"
        )
    out.append(
        f"Model `{meta['model']}`; test accuracy: {acc}. "
        f"{meta['num_images']} test images of shape {tuple(meta['image_shape'])}, "
        f"true label as target, seed {meta['seed']}. The *control* is a second "
        "full-precision model trained with another seed: BNN–twin differences are "
        "judged against this seed-to-seed variation. (The BNN and its twin share their "
        "seed, so their initial weights and data order; the control shares neither.)"
    )
    out.append("")
    out.append(
        "Every number below comes from this run and is also in `results.json`. "
        f"Intervals are {_coverage(results)} bootstrap intervals of the mean over images "
        f"({meta['bootstrap_samples']} resamples); p-values are from a paired, two-sided "
        "Wilcoxon signed-rank test over the same images. Both cover the variation over "
        "images for these three trained models only: the seed-to-seed reference is one "
        "control model, so neither they nor the verdicts account for the variation "
        "between training runs (that needs several seeds of each model)."
    )
    zero = meta.get("zero_maps") or {}
    flat = [
        f"{_label(METHOD_LABELS, m)} {_model_label(k)} {c}"
        for m, per in zero.items()
        for k, c in per.items()
        if c
    ]
    if flat:
        out.append("")
        out.append(
            "All-zero maps (GradCAM: the weighted activations are negative everywhere, "
            "so the ReLU leaves nothing; gradient methods: no gradient reaches the input): "
            + ", ".join(flat)
            + " of the images. Spearman ρ with an all-zero map counts as 0 (1 between two); "
            "SSIM compares it as an all-zero image: 1 between two, and against another map "
            "not 0 but higher the more of that map is near zero. An all-zero map is a miss "
            "in the pointing game and has relevance mass 0; as a constant map it has total "
            "variation 0, the highest complexity and sparseness 0."
        )
    out.append("")
    out.append("## Summary")
    out.append("")
    out.extend(headline_table(results))
    out.append("")
    for finding in results["findings"].values():
        out.append(f"- {finding['sentence']}")
    out.append("")
    if "grid" in figures:
        out.append(f"![Saliency maps of twin and BNN]({figures['grid']})")
        out.append("")
    names = {"gradient": "1", "smoothgrad": "2", "gradcam": "3"}
    for key, finding in results["findings"].items():
        out.append(f"## Finding {names.get(key, '')}: {finding['title']}")
        out.append("")
        out.append(finding["method_note"])
        out.append("")
        out.extend(_finding_table(finding, _coverage(results)))
        out.append("")
        if finding.get("extra_rows"):
            out.append(finding.get("extra_note", ""))
            out.append("")
            out.extend(_finding_table(finding, _coverage(results), "extra_rows"))
            out.append("")
        out.append(f"**{finding['verdict'].capitalize()}.** {finding['sentence']}")
        out.append("")
    if "distributions" in figures:
        out.append(f"![Per-image metric distributions]({figures['distributions']})")
        out.append("")
    out.extend(_overview_tables(results))

    if results.get("localisation"):
        out.append("## Localisation (ground-truth object masks)")
        out.append("")
        out.append(
            "Pointing game: fraction of images whose map peaks inside the object mask. "
            "Relevance mass: share of the map's mass inside the mask "
            f"(the mask covers {format_ci(meta.get('mask_fraction'), 3)} of the image "
            "on average, the value a uniform map would get)."
        )
        out.append("")
        models = list(next(iter(results["localisation"].values())))
        out += _header(
            ["method"] + [f"{_model_label(m)} {w}" for m in models for w in ("pointing", "mass")]
        )
        for method, entry in results["localisation"].items():
            cells = [
                format_ci(entry[m][w], 2)
                for m in models
                for w in ("pointing_game", "relevance_mass")
            ]
            out.append(_row([_label(METHOD_LABELS, method), *cells]))
        out.append("")

    out.append("## Faithfulness (deletion and insertion)")
    out.append("")
    fa = meta["faithfulness"]
    out.append(
        f"Pixels are deleted (replaced by the `{fa['substrate']}` substrate) or inserted "
        f"(revealed on a `{fa['insertion_substrate']}` start image) most salient first, in "
        f"{fa['num_steps']} steps; the curve is the softmax probability of the true class, "
        "the AUC the area under it over the fraction of pixels. Lower deletion AUC and "
        "higher insertion AUC mean a more faithful map of the same model; between models, "
        "the AUCs also follow each model's probability of the true class on the intact "
        "image and on the substrate (where the curves start and end): a less confident "
        "model gets lower AUCs of both kinds whatever its maps."
    )
    out.append("")
    models = list(next(iter(results["faithfulness"].values())))
    out += _header(
        ["method"] + [f"{_model_label(m)} {k}" for m in models for k in ("deletion", "insertion")]
    )
    for method, entry in results["faithfulness"].items():
        cells = [
            format_ci(entry[m][k], 3) for m in models for k in ("deletion_auc", "insertion_auc")
        ]
        out.append(_row([_label(METHOD_LABELS, method), *cells]))
    out.append("")
    if "deletion_insertion" in figures:
        out.append(f"![Deletion and insertion curves]({figures['deletion_insertion']})")
        out.append("")

    out.append("## Sanity check: model parameter randomisation (MPRT)")
    out.append("")
    mp = meta["mprt"]
    out.append(
        f"On {mp['num_images']} images, the layers are re-initialised cumulatively from the "
        "logits down (Adebayo et al. 2018), with the same random weights for both twins; a "
        "method that depends on the model gives maps whose similarity to the original falls "
        "as more layers are randomised. Spearman ρ of |maps| to the original maps:"
    )
    out.append("")
    out += _header(["method", "model", "first layer randomised", "all layers randomised"])
    for method, entry in results["mprt"].items():
        for model, curve in entry.items():
            s = curve["spearman_abs"]
            out.append(
                _row(
                    [
                        _label(METHOD_LABELS, method),
                        _model_label(model),
                        f"{format_ci(s[1], 3)} ({curve['layers'][0]})",
                        f"{format_ci(s[-1], 3)} (down to {curve['layers'][-1]})",
                    ]
                )
            )
    out.append("")
    if "mprt" in figures:
        out.append(f"![MPRT curves]({figures['mprt']})")
        out.append("")

    sur = results["surrogates"]
    out.append("## Surrogate ablation")
    out.append("")
    out.append(
        f"The same trained BNN (its input binarisation trained with `{sur['trained']}`) "
        "explained with each backward surrogate: the forward pass and the predictions are "
        "unchanged, only the gradients differ. The columns compare its maps with the "
        f"twin's and with {sur['reference']}, and give their total variation."
    )
    out.append("")
    metric_names = list(next(iter(next(iter(sur["rows"].values())).values())))
    out += _header(["surrogate", "method"] + [sur["metric_labels"][m] for m in metric_names])
    for name, entry in sur["rows"].items():
        for method, values in entry.items():
            out.append(
                _row(
                    [name, _label(METHOD_LABELS, method)]
                    + [format_ci(values[m], 3) for m in metric_names]
                )
            )
    out.append("")
    if "surrogates" in figures:
        out.append(f"![Surrogate ablation]({figures['surrogates']})")
        out.append("")

    out.append("## Settings")
    out.append("")
    out.append("`config.explain` of this run:")
    out.append("")
    out.append("```")
    for key, value in sorted(meta["explain_config"].items()):
        out.append(f"{key} = {value}")
    out.append("```")
    out.append("")
    return "\n".join(out)


def write_report(
    results: Mapping, data: FigureData, out_dir: str | Path, methods_in_grid: Sequence[str]
) -> dict[str, Path]:
    """Writes every figure and ``report.md`` into ``out_dir`` (which must exist).

    ``results.json`` is written by the caller (:mod:`jbnn.study`), which owns the
    atomic move of the folder into place.

    Args:
      results: the study results.
      data: the arrays behind the figures.
      out_dir: an existing folder.
      methods_in_grid: the methods shown in the grid and the faithfulness figure.

    Returns:
      name -> path of everything written.
    """
    out_dir = Path(out_dir)
    written = {
        "grid": figure_grid(data, methods_in_grid, out_dir / "saliency_grid.png"),
        "distributions": figure_distributions(data, out_dir / "metric_distributions.png"),
        "mprt": figure_mprt(results, out_dir / "mprt.png"),
        "deletion_insertion": figure_deletion_insertion(
            data, results, methods_in_grid, out_dir / "deletion_insertion.png"
        ),
        "surrogates": figure_surrogates(data, results, out_dir / "surrogates.png"),
    }
    text = render_markdown(results, {k: p.name for k, p in written.items()})
    report = out_dir / "report.md"
    report.write_text(text, encoding="utf-8")
    written["report"] = report
    return written
