"""The BNN-versus-twin saliency study (Widdicombe & Julier 2021), measured.

``run_study(config, workdir)`` reads the three models that :mod:`jbnn.training` left
in ``workdir`` (``bnn``, its full-precision twin ``fp`` and a second full-precision
``control`` trained with another seed), explains ``config.explain.num_images`` test
images with every method for every model, turns the paper's three findings into
numbers with 95% bootstrap intervals and paired Wilcoxon tests, and writes
``workdir/report/`` (``report.md``, ``results.json``, PNG figures).

The decision rules that turn numbers into a verdict are pure functions of per-image
values (:func:`similarity_finding`, :func:`noise_finding`), stated here once:

* similarity (Gradient "alike", GradCAM "differ"): for each image, ``d = s(BNN, twin)
  - s(twin, control)``. With the margin ``m = similarity_margin * |mean s(twin,
  control)|``, a metric says **alike** when the lower end of the 95% interval of mean
  ``d`` is above ``-m`` (the BNN is as close to its twin as a second full-precision seed
  is, up to the margin), **less similar** when the upper end is below ``-m`` and the
  Wilcoxon test rejects at ``alpha``, and **inconclusive** otherwise.
* noise (SmoothGrad "noisier for BNNs"): ``d = noise(BNN) - noise(twin)`` per image,
  with total variation and complexity growing and sparseness falling with noise. A
  metric says **noisier** when the interval of mean ``d`` excludes 0 in the noisy
  direction, Wilcoxon rejects at ``alpha`` and ``|mean d|`` exceeds the seed-to-seed
  difference ``s = |mean(noise(control) - noise(twin))|``; **less noisy** in the mirrored
  case; **within seed-to-seed** when the noisy end of the interval is at most ``s`` (the
  BNN's maps are at most as much noisier than the twin's as a second full-precision
  seed's: evidence against the claim); **no clear difference** (undecided) otherwise.
* each metric supports the finding, goes against it (less similar for Gradient, alike
  for GradCAM; less noisy or within seed-to-seed for SmoothGrad) or does not decide
  (inconclusive, no clear difference). A finding **holds** when every metric supports
  it, **does not hold** when every metric goes against it, is **inconclusive** when no
  metric decides, and **mixed** otherwise; a mixed finding's sentence counts the
  metrics that support it, go against it and do not decide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# --------------------------------------------------------------------------- statistics


def _ci_dict(values: np.ndarray, seed: int, num_bootstrap: int, confidence: float) -> dict:
    """Mean and bootstrap interval of one series. Every series of a study resamples the
    same image indices, drawn from ``seed`` alone (common random numbers): a series shown
    in two tables gets one interval, and values that move by float rounding (another
    machine or XLA version) move their interval by about as much, where a seed drawn
    from the values themselves gave a new resampling (a bound moved by 3% of the mean)."""
    from jbnn import stats

    values = np.asarray(values, np.float64)
    mean, lo, hi = stats.bootstrap_ci(
        values, key_or_seed=int(seed), num_resamples=num_bootstrap, confidence=confidence
    )
    return {"mean": float(mean), "lo": float(lo), "hi": float(hi)}


def _wilcoxon_dict(a: np.ndarray, b: np.ndarray) -> dict:
    from jbnn import stats

    statistic, p_value = stats.wilcoxon(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return {"statistic": float(statistic), "p_value": float(p_value)}


def compare(
    a: np.ndarray,
    b: np.ndarray,
    *,
    seed: int,
    num_bootstrap: int = 2000,
    confidence: float = 0.95,
) -> dict:
    """Means of two paired per-image series, their difference and a Wilcoxon test.

    Args:
      a: (N,) per-image values of series A.
      b: (N,) per-image values of series B, paired with A image by image.
      seed: seed of the bootstrap resampling; every interval resamples the same image
        indices, drawn from ``seed`` (the same values, the same interval).
      num_bootstrap: bootstrap resamples.
      confidence: coverage of the intervals.

    Returns:
      ``{"a": CI, "b": CI, "difference": CI, "wilcoxon": {"statistic", "p_value"}}``,
      each CI a ``{"mean", "lo", "hi"}`` dict; the difference is ``mean(a - b)`` with the
      interval of the paired differences.

    Raises:
      ValueError: if the series are not 1-D of the same length or hold a non-finite value.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"compare expects two non-empty 1-D series of the same length, got shapes "
            f"{a.shape} and {b.shape}"
        )
    for name, v in (("a", a), ("b", b)):
        if not np.isfinite(v).all():
            raise ValueError(
                f"compare: series {name} holds {int((~np.isfinite(v)).sum())} non-finite "
                "value(s); the metric that produced it must return finite values"
            )
    return {
        "a": _ci_dict(a, seed, num_bootstrap, confidence),
        "b": _ci_dict(b, seed, num_bootstrap, confidence),
        "difference": _ci_dict(a - b, seed, num_bootstrap, confidence),
        "wilcoxon": _wilcoxon_dict(a, b),
    }


# --------------------------------------------------------------------------- verdicts
ALIKE, LESS_SIMILAR, INCONCLUSIVE = "alike", "less similar", "inconclusive"
NOISIER, LESS_NOISY = "noisier", "less noisy"
WITHIN_SEED, NO_DIFFERENCE = "within seed-to-seed", "no clear difference"
HOLDS, DOES_NOT_HOLD, MIXED = "holds", "does not hold", "mixed"

# +1: the metric grows with noise; -1: it falls with noise.
NOISE_DIRECTION: dict[str, int] = {"total_variation": +1, "complexity": +1, "sparseness": -1}


def similarity_verdict(row: Mapping, margin: float, alpha: float) -> str:
    """``alike`` / ``less similar`` / ``inconclusive`` for one similarity row.

    Args:
      row: a :func:`compare` result with A = s(BNN, twin) and B = s(twin, control).
      margin: the relative equivalence margin (a fraction of ``|mean B|``).
      alpha: the level of the Wilcoxon test.

    Returns:
      The row's verdict (see the module docstring for the rule).
    """
    m = margin * abs(row["b"]["mean"])
    d = row["difference"]
    if d["lo"] >= -m:
        return ALIKE
    if d["hi"] < -m and row["wilcoxon"]["p_value"] < alpha:
        return LESS_SIMILAR
    return INCONCLUSIVE


def noise_verdict(row: Mapping, metric: str, seed_difference: float, alpha: float) -> str:
    """``noisier`` / ``less noisy`` / ``within seed-to-seed`` / ``no clear difference``
    for one noise row.

    Args:
      row: a :func:`compare` result with A = noise(BNN), B = noise(twin).
      metric: one of :data:`NOISE_DIRECTION`.
      seed_difference: mean noise(control) - noise(twin), the seed-to-seed effect.
      alpha: the level of the Wilcoxon test.

    Returns:
      The row's verdict (see the module docstring for the rule).
    """
    if metric not in NOISE_DIRECTION:
        raise ValueError(f"Unknown noise metric {metric!r}; known: {sorted(NOISE_DIRECTION)}")
    sign = NOISE_DIRECTION[metric]
    d = row["difference"]
    significant = row["wilcoxon"]["p_value"] < alpha
    beyond_seed = abs(d["mean"]) > abs(seed_difference)
    lo, hi = (d["lo"], d["hi"]) if sign > 0 else (-d["hi"], -d["lo"])
    if lo > 0 and significant and beyond_seed:
        return NOISIER
    if hi < 0 and significant and beyond_seed:
        return LESS_NOISY
    if hi <= abs(seed_difference):  # not noisier than a second full-precision seed
        return WITHIN_SEED
    return NO_DIFFERENCE


def combine(supports: Sequence[bool | None]) -> str:
    """A finding's verdict from its metrics' support (True / False / None: undecided)."""
    if not supports:
        raise ValueError("combine needs at least one metric")
    if all(s is True for s in supports):
        return HOLDS
    if all(s is False for s in supports):
        return DOES_NOT_HOLD
    if all(s is None for s in supports):
        return INCONCLUSIVE
    return MIXED


def conclusion(verdict: str, supports: Sequence[bool | None]) -> str:
    """The words of a finding's sentence for ``verdict`` (from :func:`combine`): a mixed
    finding counts its metrics that support it, go against it and do not decide."""
    if verdict != MIXED:
        return _CONCLUSION[verdict]
    n = len(supports)
    counts = [sum(x is v for x in supports) for v in (True, False, None)]
    words = ["holds on {}", "does not hold on {}", "cannot be decided on {}"]
    parts = [w.format(c) for w, c in zip(words, counts, strict=True) if c]
    parts[0] += f" of {n} metrics"
    return "is mixed on this data: it " + ", ".join(parts[:-1]) + " and " + parts[-1]


def _fmt(ci: Mapping, digits: int = 3) -> str:
    return f"{ci['mean']:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"


_CONCLUSION = {
    HOLDS: "holds on this data",
    DOES_NOT_HOLD: "does not hold on this data",
    INCONCLUSIVE: "cannot be decided on this data (the intervals are too wide)",
}


def similarity_finding(
    *,
    title: str,
    claim: str,
    expect: str,
    group: str,
    series: Mapping[str, tuple[np.ndarray, np.ndarray]],
    labels: Mapping[str, str],
    num_images: int,
    margin: float,
    alpha: float,
    seed: int,
    num_bootstrap: int,
    confidence: float,
) -> dict:
    """A similarity finding (Gradient "alike" or GradCAM "differ") from per-image values.

    Args:
      title: the section title.
      claim: the paper's claim in a few words (headline table).
      expect: ``"alike"`` (the claim is that the maps look alike) or ``"differ"``.
      group: the maps compared, for the table (e.g. "Gradient").
      series: metric -> (s(BNN, twin), s(twin, control)), each (N,) per image.
      labels: metric -> display label.
      num_images: the number of images (for the sentence).
      margin: relative equivalence margin (see :func:`similarity_verdict`).
      alpha: level of the Wilcoxon tests.
      seed: seed of the bootstrap (see :func:`compare`).
      num_bootstrap: bootstrap resamples.
      confidence: coverage of the intervals.

    Returns:
      The finding: ``{title, claim, verdict, sentence, method_note, rows}``.
    """
    if expect not in ("alike", "differ"):
        raise ValueError(f"expect must be 'alike' or 'differ', got {expect!r}")
    rows, supports, parts = [], [], []
    for metric, (a, b) in series.items():
        row = compare(a, b, seed=seed, num_bootstrap=num_bootstrap, confidence=confidence)
        verdict = similarity_verdict(row, margin, alpha)
        row.update(
            group=group,
            metric=metric,
            label=labels.get(metric, metric),
            a_name="BNN vs twin",
            b_name="twin vs control",
            verdict=verdict,
        )
        rows.append(row)
        if verdict == INCONCLUSIVE:
            supports.append(None)
        else:
            supports.append((verdict == ALIKE) == (expect == "alike"))
        relation = {
            ALIKE: "at least about as similar as two full-precision seeds",
            LESS_SIMILAR: "less similar than two full-precision seeds",
            INCONCLUSIVE: "neither clearly as similar as nor clearly less similar than "
            "two full-precision seeds",
        }[verdict]
        parts.append(
            f"by {row['label']} they are {relation} ({row['a']['mean']:.3f} vs "
            f"{row['b']['mean']:.3f}; difference {_fmt(row['difference'])}, Wilcoxon "
            f"p = {row['wilcoxon']['p_value']:.2g})"
        )
    verdict = combine(supports)
    sentence = (
        f"The paper's finding “{claim}” {conclusion(verdict, supports)}: on "
        f"{num_images} test images, comparing BNN–twin {group} maps with twin–control maps, "
        + "; ".join(parts)
        + "."
    )
    note = (
        f"Similarity of {group} maps, image by image: A = s(BNN, twin), B = s(twin, "
        f"control). A metric calls the maps *alike* when the {100 * confidence:g}% interval "
        "of A − B lies "
        f"above −{margin:g} × |B| (the BNN is as close to its twin as a second "
        "full-precision seed is, within that margin), *less similar* when it lies below "
        f"and Wilcoxon p < {alpha:g}."
    )
    return {
        "title": title,
        "claim": claim,
        "verdict": verdict,
        "sentence": sentence,
        "method_note": note,
        "rows": rows,
    }


def noise_finding(
    *,
    title: str,
    claim: str,
    group: str,
    noise: Mapping[str, Mapping[str, np.ndarray]],
    reduction: Mapping[str, np.ndarray],
    labels: Mapping[str, str],
    num_images: int,
    alpha: float,
    seed: int,
    num_bootstrap: int,
    confidence: float,
) -> dict:
    """The SmoothGrad finding ("noisier for BNNs") from per-image noise values.

    Args:
      title: the section title.
      claim: the paper's claim in a few words.
      group: the maps compared (e.g. "SmoothGrad").
      noise: metric (keys of :data:`NOISE_DIRECTION`) -> {"bnn", "twin", "control"} ->
        (N,) per-image values on the SmoothGrad maps.
      reduction: {"bnn", "twin", "control"} -> (N,) fraction of the Gradient map's total
        variation that SmoothGrad removes, 1 - TV(SmoothGrad) / TV(Gradient).
      labels: metric -> display label.
      num_images: the number of images.
      alpha: level of the Wilcoxon tests.
      seed: seed of the bootstrap (see :func:`compare`).
      num_bootstrap: bootstrap resamples.
      confidence: coverage of the intervals.

    Returns:
      The finding: ``{title, claim, verdict, sentence, method_note, rows, extra_rows,
      extra_note}``; ``rows`` decide the verdict, ``extra_rows`` hold the seed-to-seed
      reference (control vs twin) and the noise reduction by SmoothGrad.
    """
    kw = dict(num_bootstrap=num_bootstrap, confidence=confidence)
    rows, extra, supports, parts = [], [], [], []
    for metric, values in noise.items():
        row = compare(values["bnn"], values["twin"], seed=seed, **kw)
        ref = compare(values["control"], values["twin"], seed=seed, **kw)
        verdict = noise_verdict(row, metric, ref["difference"]["mean"], alpha)
        direction = "higher" if NOISE_DIRECTION[metric] > 0 else "lower"
        label = f"{labels.get(metric, metric)} ({direction} = noisier)"
        row.update(
            group=group, metric=metric, label=label, a_name="BNN", b_name="twin", verdict=verdict
        )
        ref.update(
            group=f"{group} (seed reference)",
            metric=metric,
            label=label,
            a_name="control",
            b_name="twin",
            verdict="reference",
        )
        rows.append(row)
        extra.append(ref)
        supports.append(None if verdict == NO_DIFFERENCE else verdict == NOISIER)
        parts.append(
            f"{labels.get(metric, metric)} {row['a']['mean']:.3g} vs {row['b']['mean']:.3g} "
            f"({verdict}; difference {_fmt(row['difference'], 3)}, seed-to-seed "
            f"|control − twin| {abs(ref['difference']['mean']):.3g})"
        )
    red = compare(reduction["bnn"], reduction["twin"], seed=seed, **kw)
    red.update(
        group=group,
        metric="tv_reduction",
        label="TV reduction by SmoothGrad vs Gradient",
        a_name="BNN",
        b_name="twin",
        verdict="",
    )
    red_ctrl = compare(reduction["control"], reduction["twin"], seed=seed, **kw)
    red_ctrl.update(
        group=f"{group} (seed reference)",
        metric="tv_reduction",
        label="TV reduction by SmoothGrad vs Gradient",
        a_name="control",
        b_name="twin",
        verdict="reference",
    )
    extra.extend([red, red_ctrl])
    verdict = combine(supports)
    less = red["difference"]["hi"] < 0 and red["wilcoxon"]["p_value"] < alpha
    more = red["difference"]["lo"] > 0 and red["wilcoxon"]["p_value"] < alpha
    if less:  # the BNN's reduction is smaller: its change is higher
        red_text = "the change is higher for the BNN than for the twin"
    elif more:
        red_text = "the change is lower for the BNN than for the twin"
    else:
        red_text = "no clear difference between BNN and twin"

    def change(r: float) -> str:
        return f"{-100 * r:+.0f}%"

    sentence = (
        f"The paper's finding “{claim}” {conclusion(verdict, supports)}: on "
        f"{num_images} test images, {group} maps of the BNN vs the twin have "
        + "; ".join(parts)
        + ". Relative to the Gradient maps, SmoothGrad changes total variation by "
        f"{change(red['a']['mean'])} for the BNN and {change(red['b']['mean'])} for the twin "
        f"(means of the per-image changes; {red_text})."
    )
    note = (
        f"Noise of {group} maps, image by image (A = BNN, B = twin). A metric calls the "
        f"BNN's maps *noisier* when the {100 * confidence:g}% interval of A − B excludes 0 "
        "in the noisy "
        f"direction, Wilcoxon p < {alpha:g}, and |mean A − B| exceeds the seed-to-seed "
        "difference |mean control − twin|; *less noisy* in the mirrored case; *within "
        "seed-to-seed* when the interval's noisy end is at most |mean control − twin|; "
        "*no clear difference* (undecided) otherwise."
    )
    return {
        "title": title,
        "claim": claim,
        "verdict": verdict,
        "sentence": sentence,
        "method_note": note,
        "rows": rows,
        "extra_rows": extra,
        "extra_note": (
            "Seed-to-seed reference (control vs twin) and the fraction of total variation "
            "that SmoothGrad removes relative to Gradient, 1 − TV(SmoothGrad) / TV(Gradient):"
        ),
    }


# --------------------------------------------------------------------------- settings
MODELS = ("bnn", "twin", "control")
RUN_DIRS = {"bnn": "bnn", "twin": "fp", "control": "control"}
METHODS = (
    "gradient",
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
    "gradcam",
    "integrated_gradients",
)
GRID_METHODS = ("gradient", "smoothgrad", "gradcam", "integrated_gradients")
SURROGATES = ("ste_sign", "approx_sign", "swish_sign", "identity")
SIGNED_METHODS = ("gradient", "smoothgrad", "integrated_gradients")
SIMILARITY_METRICS = ("spearman_abs", "ssim")
REPORT_DIR = "report"
# What run_study writes into REPORT_DIR (and so may replace there).
REPORT_FILES = frozenset(
    {
        "report.md",
        "results.json",
        "per_image.npz",
        "timings.json",
        "saliency_grid.png",
        "metric_distributions.png",
        "mprt.png",
        "deletion_insertion.png",
        "surrogates.png",
    }
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated ``config.explain`` section (defaults in ``configs/default.py``).

    The fields that list names (``surrogates``, ``surrogate_methods``, ``mprt_methods``,
    ``mprt_layers``) take a tuple, a list or comma-separated names
    (``--config.explain.mprt_methods=gradient,gradcam``; commas inside a surrogate's
    brackets do not split it).

    Attributes:
      num_images: test images of the study, a seeded sample (>= 2; all of them if the
        split is smaller).
      batch_size: images per jitted explainer call (>= 1).
      num_examples: rows of the saliency grid figure (>= 1).
      channel_reduction: how (B, H, W, C) maps become (B, H, W) before every metric, one
        of :data:`jbnn.saliency.REDUCTIONS` (``"abs_sum"``: sum of |a|, PAIR's map).
      smoothgrad_samples: noisy copies per image (>= 1).
      smoothgrad_noise: the noise's sigma as a fraction of each image's (max - min)
        (finite, >= 0).
      sample_batch_size: noisy copies or IG path points evaluated together, the memory
        knob (>= 1).
      ig_steps: Integrated Gradients path points, zero baseline (>= 2).
      gradcam_layer: module path of GradCAM's layer, the same in BNN and twin.
      gradcam_relu: apply GradCAM's ReLU to the map (the paper, PAIR); False keeps the
        signed map (Captum's default).
      surrogates: backward surrogates of the BNN's input binarisation for the ablation
        (forward pass unchanged).
      surrogate_methods: methods run under each surrogate.
      faithfulness_steps: deletion / insertion steps (>= 1).
      deletion_substrate, insertion_substrate: what deleted pixels become / what
        insertion starts from: ``"zero"``, ``"blur"`` or ``"mean"``.
      mprt_images: images of the MPRT sanity check (>= 2).
      mprt_methods: methods of the MPRT check.
      mprt_layers: the stages re-initialised in turn, from the logits down: each a layer
        path, or several joined by ``"+"`` (randomised together); empty: every top-level
        layer with a kernel, each with the kernel-free layers after it (its BatchNorm),
        so the last stage has randomised every parameter.
      bootstrap_samples: bootstrap resamples of every interval (>= 100).
      confidence: coverage of the intervals, in (0, 1).
      alpha: level of the Wilcoxon tests, in (0, 1).
      similarity_margin: the margin m of the similarity verdicts as a fraction of
        |mean s(twin, control)|, in [0, 1).
      fold_batchnorm: fold inference BatchNorms into the convolutions that feed them
        (faster on GPUs; results move by float rounding).
    """

    num_images: int = 200
    batch_size: int = 50
    num_examples: int = 6
    channel_reduction: str = "abs_sum"
    smoothgrad_samples: int = 50
    smoothgrad_noise: float = 0.15
    sample_batch_size: int = 10
    ig_steps: int = 32
    gradcam_layer: str = "block5"
    gradcam_relu: bool = True
    surrogates: tuple[str, ...] = SURROGATES
    surrogate_methods: tuple[str, ...] = ("gradient", "smoothgrad", "gradcam")
    faithfulness_steps: int = 16
    deletion_substrate: str = "blur"
    insertion_substrate: str = "blur"
    mprt_images: int = 32
    mprt_methods: tuple[str, ...] = ("gradient", "gradcam")
    mprt_layers: tuple[str, ...] = ()
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    alpha: float = 0.05
    similarity_margin: float = 0.2
    fold_batchnorm: bool = False

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _split_names(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes, each part stripped,
    empty parts dropped: ``"ste_sign(clip_value=2.0, x=1), identity"`` is two names."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _as_names(value, field: str) -> tuple[str, ...]:
    """A tuple of names from a tuple, a list or a comma-separated string. An entry with
    a comma is split too: ml_collections reads ``--config.explain.mprt_methods=a,b``
    into the 1-tuple ``("a,b",)``. Other entries are kept as they are (an empty one is
    then refused as an unknown name)."""
    if isinstance(value, str):
        return tuple(_split_names(value))
    if not isinstance(value, tuple | list) or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f"config.explain.{field} must be a tuple of names (or a comma-separated string), "
            f"got {value!r}"
        )
    names: list[str] = []
    for entry in value:
        names += _split_names(entry) if "," in entry else [entry]
    return tuple(names)


def settings_from_config(explain: Mapping | None) -> Settings:
    """Validates ``config.explain`` into :class:`Settings` (missing fields: defaults).

    Args:
      explain: the ``config.explain`` section (a ConfigDict or dict), or None.

    Returns:
      The settings.

    Raises:
      ValueError: for an unknown field or a value out of range, naming both.
    """
    from jbnn.metrics import faithfulness
    from jbnn.saliency import display

    explain = {} if explain is None else dict(explain.items())
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = sorted(set(explain) - set(fields))
    if unknown:
        raise ValueError(f"Unknown config.explain field(s) {unknown}; known: {sorted(fields)}")
    values = {}
    for name, value in explain.items():
        default = fields[name].default
        if isinstance(default, tuple):
            value = _as_names(value, name)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"config.explain.{name} must be True or False, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"config.explain.{name} must be an int, got {value!r}")
            value = int(value)
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise ValueError(f"config.explain.{name} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"config.explain.{name} must be a finite number, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"config.explain.{name} must be a string, got {value!r}")
        values[name] = value
    s = Settings(**values)
    minimum = {
        "num_images": 2,
        "batch_size": 1,
        "num_examples": 1,
        "smoothgrad_samples": 1,
        "sample_batch_size": 1,
        "ig_steps": 2,
        "faithfulness_steps": 1,
        "mprt_images": 2,
        "bootstrap_samples": 100,
    }
    for name, lo in minimum.items():
        if getattr(s, name) < lo:
            raise ValueError(f"config.explain.{name} must be >= {lo}, got {getattr(s, name)}")
    for name in ("confidence", "alpha"):
        if not 0.0 < getattr(s, name) < 1.0:
            raise ValueError(f"config.explain.{name} must be in (0, 1), got {getattr(s, name)}")
    if not 0.0 <= s.similarity_margin < 1.0:
        raise ValueError(
            f"config.explain.similarity_margin must be in [0, 1), got {s.similarity_margin}"
        )
    if s.smoothgrad_noise < 0:
        raise ValueError(f"config.explain.smoothgrad_noise must be >= 0, got {s.smoothgrad_noise}")
    if s.channel_reduction not in display.REDUCTIONS:
        raise ValueError(
            f"Unknown config.explain.channel_reduction {s.channel_reduction!r}; known: "
            f"{', '.join(display.REDUCTIONS)}"
        )
    for name in ("deletion_substrate", "insertion_substrate"):
        if getattr(s, name) not in faithfulness.SUBSTRATES:
            raise ValueError(
                f"Unknown config.explain.{name} {getattr(s, name)!r}; known: "
                f"{', '.join(faithfulness.SUBSTRATES)}"
            )
    for name in ("surrogate_methods", "mprt_methods"):
        bad = [m for m in getattr(s, name) if m not in METHODS]
        if bad or not getattr(s, name):
            unknown = f" (unknown: {', '.join(map(repr, bad))})" if bad else ""
            raise ValueError(
                f"config.explain.{name} must name some of {', '.join(METHODS)}, got "
                f"{getattr(s, name)!r}{unknown}"
            )
    if not s.surrogates:
        raise ValueError("config.explain.surrogates must name at least one surrogate")
    from jbnn.quantizers import surrogate_gradient

    for spec in s.surrogates:  # before any model is loaded
        try:
            surrogate_gradient(spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"Bad config.explain.surrogates entry {spec!r}: {e}") from None
    return s


# --------------------------------------------------------------------------- loading
class StudyError(ValueError):
    """The workdir or the config cannot give a study (nothing has been written)."""


@dataclasses.dataclass
class Plan:
    """Everything the study needs, loaded and checked before any computation.

    Attributes:
      settings: the validated ``config.explain``.
      seed: ``config.seed``; every random draw derives from it.
      workdir: the study directory.
      models: "bnn" / "twin" / "control" -> Linen module (twin and control share one).
      variables: the same keys -> variables.
      run_results: the same keys -> the run's ``results.json``.
      surrogate_models: surrogate spec -> the BNN module with that backward surrogate.
      dataset: the dataset name; class_names: its class names.
      images: (N, H, W, C) model inputs; labels: (N,) int32; masks: (N, H, W) or None.
      display: (N, H, W, C) the images in [0, 1] for figures.
      indices: (N,) the images' indices in the test split.
      mprt_layers: MPRT's stages, from the logits down: layer paths, several joined by "+".
    """

    settings: Settings
    seed: int
    workdir: Path
    models: dict
    variables: dict
    run_results: dict
    surrogate_models: dict
    dataset: str
    class_names: tuple
    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    display: np.ndarray
    indices: np.ndarray
    mprt_layers: tuple


def _config_dict(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            name = f"{prefix}.{key}" if prefix else key
            out += _diff(a.get(key, "(absent)"), b.get(key, "(absent)"), name)
        return out
    return [] if a == b else [f"{prefix}: trained with {a!r}, this config has {b!r}"]


def _check_runs(config, workdir: Path) -> None:
    """Each run directory exists and was trained with this config (training fields)."""
    from jbnn import training

    if workdir.exists() and not workdir.is_dir():
        raise StudyError(
            f"workdir {workdir} is a file, not a directory: pass the --workdir that train.py "
            "wrote bnn/, fp/ and control/ into."
        )
    if not workdir.is_dir():
        raise StudyError(
            f"workdir {workdir} does not exist; train the models first with "
            f"python train.py --config <config> --workdir {workdir}"
        )
    current = _config_dict(config)
    ignore = set(training.NON_TRAINING_FIELDS)
    for name, sub in RUN_DIRS.items():
        run_dir = workdir / sub
        stored = run_dir / training.CONFIG_FILE
        if not stored.exists():
            extra = (
                " The study compares against a second full-precision model: set "
                "config.train_control=True and rerun train.py."
                if name == "control"
                else ""
            )
            raise StudyError(
                f"{run_dir} is missing or is not a jbnn run (no {training.CONFIG_FILE}); "
                f"explain.py needs the {name} model trained by train.py in {workdir}.{extra}"
            )
        advice = (
            f"it records the config the {name} model was trained with: restore it from a "
            f"copy, or delete {run_dir} and rerun train.py (same --config and --workdir) to "
            "train that model again."
        )
        try:
            trained = json.loads(stored.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StudyError(f"{stored} is not valid JSON ({e}); {advice}") from e
        if not isinstance(trained, dict):
            raise StudyError(
                f"{stored} is not a jbnn config (a JSON object expected, found "
                f"{type(trained).__name__}); {advice}"
            )
        changes = _diff(
            {k: v for k, v in trained.items() if k not in ignore},
            {k: v for k, v in current.items() if k not in ignore},
        )
        if changes:
            dataset = [c for c in changes if c.startswith(("dataset", "image_size", "data"))]
            lead = (
                f"the config is for another dataset than the one {run_dir} was trained on"
                if dataset
                else f"{run_dir} was trained with another config"
            )
            raise StudyError(
                f"{lead}: " + "; ".join((dataset or changes)[:6]) + ". Pass the config used "
                "for training (explain settings may differ: only config.explain is free)."
            )


def _load_test_data(config, settings: Settings, key: jax.Array):
    """The study images: a seeded sample of ``num_images`` test images.

    The sample is drawn from ``key`` (from ``config.seed``) alone, the same for a split
    held in memory and for one streamed from TFDS (which is read in stored order up to
    the last sampled image; only the sampled images are decoded)."""
    from jbnn import data as jdata

    kwargs = dict(
        image_size=config.get("image_size"),
        data_dir=config.get("data_dir"),
        manual_dir=config.get("manual_dir"),
        seed=config.get("data_seed", 0),
    )
    kwargs.update(dict(config.get("data_kwargs", {}) or {}))
    source = jdata.load(config.dataset, split=config.get("eval_split", "test"), **kwargs)
    n = min(settings.num_images, source.num_examples)
    order = np.asarray(jax.random.permutation(key, source.num_examples))
    indices = np.sort(order[:n])
    batch = source.take(indices)  # an ArraySource or a StreamSource
    images = np.asarray(batch["image"], np.float32)
    display = np.clip(source.unnormalize(images), 0.0, 1.0)
    masks = batch.get("mask")
    return source, images, np.asarray(batch["label"], np.int32), masks, display, indices


def _spatial_layers(model, input_shape) -> dict:
    from jbnn import models

    paths = models.layer_paths(model, input_shape)
    return {p: s for p, s in paths.items() if len(s) == 4 and all(isinstance(d, int) for d in s)}


def _mprt_stages(model, variables, input_shape) -> list[str]:
    """MPRT's default stages, from the logits down, as ``"+"``-joined top-level layer paths.

    Each top-level layer holding a kernel (conv / dense weights) starts a stage; the
    top-level layers with parameters but no kernel that the forward pass calls after it
    (the BatchNorm that normalises its output) join that stage, as a block's BatchNorm
    goes with the block: ``["head+head_bn", "dense2+dense2_bn", ..., "block1"]`` for
    BinaryNet, so every parameter of the model is randomised by the last stage.
    """
    from jbnn import models

    params = variables["params"]

    def has_kernel(tree) -> bool:
        if not isinstance(tree, Mapping):
            return False
        return "kernel" in tree or any(has_kernel(v) for v in tree.values())

    stages: list[list[str]] = []
    for path in models.layer_paths(model, input_shape):
        if "/" in path or path not in params:
            continue
        if has_kernel(params[path]) or not stages:
            stages.append([path])
        else:
            stages[-1].append(path)
    return ["+".join(stage) for stage in reversed(stages)]


def _mprt_layers(settings: Settings, params, default: Sequence[str]) -> tuple[str, ...]:
    """``config.explain.mprt_layers`` checked against the parameters, or the default."""
    from jbnn.metrics.sanity import _subtree

    if not settings.mprt_layers:
        return tuple(default)
    bad = [
        stage
        for stage in settings.mprt_layers
        if not stage
        or any(
            not part or _subtree(params, part.split("/")) is None for part in str(stage).split("+")
        )
    ]
    if bad:
        raise StudyError(
            f"Unknown config.explain.mprt_layers {bad}: each entry is a layer path with "
            "parameters, or several joined by '+' (randomised together); the default stages: "
            f"{', '.join(default)}"
        )
    return tuple(str(stage) for stage in settings.mprt_layers)


def prepare(config, workdir: str | Path) -> Plan:
    """Loads and checks everything the study needs; writes nothing.

    Args:
      config: the config the models were trained with (``config.explain`` may differ).
      workdir: the directory train.py wrote ``bnn``, ``fp`` and ``control`` into.

    Returns:
      The :class:`Plan`.

    Raises:
      StudyError: for a missing workdir, a missing, half-trained or damaged model, a config of
        another dataset or model, an unknown GradCAM or MPRT layer, a bad surrogate or
        another bad ``config.explain`` field, a dataset that cannot be loaded.
    """
    try:
        return _prepare(config, Path(workdir))
    except StudyError:
        raise
    except (FileNotFoundError, ValueError, TypeError) as e:
        # training.DamagedCheckpointError, a ValueError, lands here. Notes (what an error
        # was about, added on its way up) are part of the message.
        notes = [" ".join(note.split()) for note in getattr(e, "__notes__", [])]
        raise StudyError("; ".join([str(e), *notes])) from e


def _check_report_dir(report_dir: Path) -> None:
    """The report folder is replaced as a whole: refuse while it holds other files (or
    is not a folder)."""
    if not report_dir.exists():
        return
    if not report_dir.is_dir():
        raise StudyError(
            f"{report_dir} exists and is not a folder; explain.py writes its report there, "
            "so move it out first (nothing was changed)."
        )
    foreign = sorted(p.name for p in report_dir.iterdir() if p.name not in REPORT_FILES)
    if foreign:
        shown = ", ".join(foreign[:10]) + (", ..." if len(foreign) > 10 else "")
        raise StudyError(
            f"{report_dir} holds files explain.py did not write ({shown}); it replaces that "
            "folder as a whole, so move them out first (nothing was changed)."
        )


def _prepare(config, workdir: Path) -> Plan:
    from jbnn import models, training

    settings = settings_from_config(config.get("explain"))
    seed = int(config.seed)
    _check_runs(config, workdir)
    _check_report_dir(workdir / REPORT_DIR)
    loaded, run_results = {}, {}
    for name, sub in RUN_DIRS.items():
        try:
            loaded[name] = training.load_run(workdir / sub)  # half-trained: a clear error
            run_results[name] = json.loads((workdir / sub / training.RESULTS_FILE).read_text())
        except (json.JSONDecodeError, KeyError) as e:  # a damaged results.json or config.json
            raise StudyError(
                f"{workdir / sub} holds a damaged run ({type(e).__name__}: {e}); train the "
                f"{name} model again with train.py"
            ) from e
    if not run_results["bnn"].get("binary", True) or run_results["twin"].get("binary", False):
        raise StudyError(f"{workdir}/bnn must hold the BNN and {workdir}/fp its twin")
    bnn_model, twin_model = loaded["bnn"][0], loaded["twin"][0]
    if loaded["control"][0] != twin_model:
        raise StudyError(f"{workdir}/control does not hold the twin's architecture")

    key = jax.random.key(seed)
    source, images, labels, masks, display, indices = _load_test_data(
        config, settings, jax.random.fold_in(key, _IMAGES_TAG)
    )
    input_shape = (1, *images.shape[1:])
    spatial = _spatial_layers(bnn_model, input_shape)
    if not spatial:
        raise StudyError(
            f"Model {config.model!r} has no layer with a (B, h, w, C) output, so GradCAM "
            "(the third finding) cannot run: the study needs a convolutional model, e.g. "
            "--config.model=binarynet."
        )
    if settings.gradcam_layer not in spatial:
        listing = ", ".join(f"{p} {s[1:]}" for p, s in spatial.items())
        raise StudyError(
            f"Unknown config.explain.gradcam_layer {settings.gradcam_layer!r} for model "
            f"{config.model!r}: GradCAM needs a layer path with a (B, h, w, C) output; "
            f"valid ones (output h, w, C): {listing}"
        )
    if (
        _spatial_layers(twin_model, input_shape)[settings.gradcam_layer]
        != spatial[settings.gradcam_layer]
    ):
        raise StudyError(f"layer {settings.gradcam_layer!r} differs between BNN and twin")
    surrogate_models = {}
    for spec in settings.surrogates:
        try:
            surrogate_models[spec] = models.with_surrogate(bnn_model, spec)
        except (ValueError, TypeError) as e:
            raise StudyError(f"Bad config.explain.surrogates entry {spec!r}: {e}") from None
    mprt_layers = _mprt_layers(
        settings,
        loaded["bnn"][1]["params"],
        _mprt_stages(bnn_model, loaded["bnn"][1], input_shape),
    )
    return Plan(
        settings=settings,
        seed=seed,
        workdir=workdir,
        models={"bnn": bnn_model, "twin": twin_model, "control": twin_model},
        # Uncommitted arrays, like the fresh ones MPRT draws: a mix of committed and
        # uncommitted leaves would compile the saliency function again at every stage.
        variables={
            k: jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), v[1]) for k, v in loaded.items()
        },
        run_results=run_results,
        surrogate_models=surrogate_models,
        dataset=str(config.dataset),
        class_names=tuple(source.class_names),
        images=images,
        labels=labels,
        masks=None if masks is None else np.asarray(masks) > 0.5,
        display=display,
        indices=indices,
        mprt_layers=mprt_layers,
    )


_IMAGES_TAG, _SMOOTHGRAD_TAG, _MPRT_TAG = 1, 2, 3


# --------------------------------------------------------------------------- maps
def _log(message: str, verbose: bool) -> None:
    if verbose:
        print(f"[explain] {message}", file=sys.stderr, flush=True)


class _Clock:
    """Wall and process CPU seconds since creation, as ``"12.3 s (cpu 20.1 s)"``."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu

    def __str__(self) -> str:
        wall, cpu = self.seconds()
        return f"{wall:6.1f} s (cpu {cpu:6.1f} s)"


def method_options(method: str, settings: Settings) -> dict:
    """The keyword options the study passes to saliency ``method``."""
    if method in ("smoothgrad", "smoothgrad_sq", "vargrad"):
        return dict(
            num_samples=settings.smoothgrad_samples,
            noise_level=settings.smoothgrad_noise,
            batch_size=min(settings.sample_batch_size, settings.smoothgrad_samples),
        )
    if method == "integrated_gradients":
        return dict(
            num_steps=settings.ig_steps,
            batch_size=min(settings.sample_batch_size, settings.ig_steps),
        )
    if method == "gradcam":
        return dict(layer=settings.gradcam_layer, relu=settings.gradcam_relu)
    return {}


def _variants(plan: Plan) -> list[tuple[str, object, object, tuple[str, ...]]]:
    """(name, model, variables, methods) of every model variant the study explains.

    The BNN under a surrogate identical to its own input quantizer (e.g. ``ste_sign``
    for a BinaryNet trained with ``ste_sign``) has the BNN's own gradients: its maps
    are the BNN's, not recomputed.
    """
    out = [(m, plan.models[m], plan.variables[m], METHODS) for m in MODELS]
    for spec, model in plan.surrogate_models.items():
        if spec != getattr(plan.models["bnn"], "input_quantizer", None):
            out.append(
                (f"bnn@{spec}", model, plan.variables["bnn"], plan.settings.surrogate_methods)
            )
    return out


def surrogate_variant(plan: Plan, spec: str) -> str:
    """The name of the variant whose maps are the BNN's under surrogate ``spec``."""
    if spec == getattr(plan.models["bnn"], "input_quantizer", None):
        return "bnn"
    return f"bnn@{spec}"


def compute_maps(plan: Plan, verbose: bool = True) -> tuple[dict, dict]:
    """Every map of the study, reduced over channels.

    Args:
      plan: the loaded study.
      verbose: print progress to stderr.

    Returns:
      ``(maps, signed)``: (variant, method) -> (N, H, W) maps reduced with
      ``settings.channel_reduction`` (GradCAM maps as they are), and (variant, method) ->
      (N, H, W) signed maps (channel sum) for the methods of :data:`SIGNED_METHODS`.
    """
    from jbnn import saliency

    s = plan.settings
    batches = [
        {"image": plan.images[i : i + s.batch_size], "label": plan.labels[i : i + s.batch_size]}
        for i in range(0, len(plan.labels), s.batch_size)
    ]
    key = jax.random.fold_in(jax.random.key(plan.seed), _SMOOTHGRAD_TAG)
    maps, signed = {}, {}
    for variant, model, variables, methods in _variants(plan):
        for method in methods:
            clock = _Clock()
            out = saliency.explain_dataset(
                method,
                batches,
                model=model,
                variables=variables,
                key=key,  # the same noise for every model: a paired comparison
                target="label",
                progress=False,
                fold_batchnorm=s.fold_batchnorm,
                **method_options(method, s),
            )["maps"]
            if out.ndim == 4:
                maps[variant, method] = np.asarray(
                    saliency.reduce_channels(out, s.channel_reduction), np.float32
                )
                if method in SIGNED_METHODS:
                    signed[variant, method] = np.asarray(
                        saliency.reduce_channels(out, "sum"), np.float32
                    )
            else:
                maps[variant, method] = np.asarray(out, np.float32)
            _log(f"{method:>20} maps of {variant:<16} {clock}", verbose)
    return maps, signed


# --------------------------------------------------------------------------- metrics
PAIRS = {"bnn_vs_twin": ("bnn", "twin"), "twin_vs_control": ("twin", "control")}
NOISE_METRICS = ("total_variation", "complexity", "sparseness")


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _zero_maps(m) -> np.ndarray:
    return np.asarray(np.abs(m).max(axis=(1, 2)) == 0)


def pointing_game(maps, masks) -> np.ndarray:
    """The study's pointing game: :func:`jbnn.metrics.pointing_game`, and a miss for an
    all-zero map.

    The metric (as Quantus) counts a constant map as a hit when any pixel of its tied
    maximum lies in the mask; an all-zero map (a GradCAM map the ReLU emptied) points
    nowhere, and counting it as a hit would reward the model that produced it.

    Returns:
      (N,) float64 of 0.0 / 1.0.
    """
    from jbnn import metrics

    return np.where(_zero_maps(maps), 0.0, _np(metrics.pointing_game(maps, masks)))


def tv_reduction(tv_smooth: np.ndarray, tv_gradient: np.ndarray) -> np.ndarray:
    """Per image, the fraction of the Gradient map's total variation that SmoothGrad
    removes, ``1 - TV(SmoothGrad) / TV(Gradient)``; 0 where the Gradient map is constant
    (TV 0: there is no noise to remove)."""
    tv_smooth = _np(tv_smooth)
    tv_gradient = _np(tv_gradient)
    safe = np.where(tv_gradient > 0, tv_gradient, 1.0)
    return np.where(tv_gradient > 0, 1.0 - tv_smooth / safe, 0.0)


def per_image_metrics(plan: Plan, maps: Mapping, signed: Mapping, verbose: bool = True):
    """Every per-image score of the study.

    Args:
      plan: the loaded study.
      maps: (variant, method) -> (N, H, W) reduced maps from :func:`compute_maps`.
      signed: (variant, method) -> (N, H, W) signed maps.
      verbose: print progress to stderr.

    Returns:
      ``(values, curves)``: "<method>/<metric>/<series>" -> (N,) float64 scores, and
      "deletion"|"insertion" -> method -> model -> (N, steps + 1) curves.
    """
    from jbnn import metrics
    from jbnn.models import apply_fn

    s = plan.settings
    clock = _Clock()
    values: dict[str, np.ndarray] = {}
    for method in METHODS:
        for pair, (a, b) in PAIRS.items():
            ma, mb = maps[a, method], maps[b, method]
            values[f"{method}/spearman_abs/{pair}"] = _np(metrics.spearman(ma, mb, absolute=True))
            values[f"{method}/ssim/{pair}"] = _np(metrics.ssim(ma, mb))
            if method in SIGNED_METHODS:
                values[f"{method}/spearman_signed/{pair}"] = _np(
                    metrics.spearman(signed[a, method], signed[b, method])
                )
        for model in MODELS:
            m = maps[model, method]
            values[f"{method}/total_variation/{model}"] = _np(metrics.total_variation(m))
            values[f"{method}/complexity/{model}"] = _np(metrics.complexity(m))
            values[f"{method}/sparseness/{model}"] = _np(metrics.sparseness(m))
            values[f"{method}/zero_map/{model}"] = _zero_maps(m).astype(np.float64)
            if plan.masks is not None:
                values[f"{method}/pointing_game/{model}"] = pointing_game(m, plan.masks)
                values[f"{method}/relevance_mass/{model}"] = _np(
                    metrics.relevance_mass_accuracy(m, plan.masks)
                )
    for model in MODELS:
        values[f"smoothgrad/tv_reduction/{model}"] = tv_reduction(
            values[f"smoothgrad/total_variation/{model}"],
            values[f"gradient/total_variation/{model}"],
        )
    for spec in s.surrogates:
        variant = surrogate_variant(plan, spec)
        for method in s.surrogate_methods:
            m = maps[variant, method]
            prefix = f"surrogate/{spec}/{method}"
            twin = maps["twin", method]
            values[f"{prefix}/spearman_abs_vs_twin"] = _np(metrics.spearman(m, twin, absolute=True))
            values[f"{prefix}/ssim_vs_twin"] = _np(metrics.ssim(m, twin))
            values[f"{prefix}/spearman_abs_vs_bnn"] = _np(
                metrics.spearman(m, maps["bnn", method], absolute=True)
            )
            values[f"{prefix}/total_variation"] = _np(metrics.total_variation(m))
    _log(f"similarity, noise and localisation scores {clock}", verbose)

    curves: dict[str, dict[str, dict[str, np.ndarray]]] = {"deletion": {}, "insertion": {}}
    images = plan.images
    chunk = max(s.batch_size, 1) * 4
    for kind, curve_fn, substrate in (
        ("deletion", metrics.deletion_curve, s.deletion_substrate),
        ("insertion", metrics.insertion_curve, s.insertion_substrate),
    ):
        clock = _Clock()
        for method in METHODS:
            curves[kind][method] = {}
            for model in MODELS:
                fn = apply_fn(
                    plan.models[model], plan.variables[model], s.fold_batchnorm, input_like=images
                )
                c, auc = curve_fn(
                    fn,
                    images,
                    maps[model, method],
                    plan.labels,
                    num_steps=s.faithfulness_steps,
                    substrate=substrate,
                    batch_size=chunk,
                )
                curves[kind][method][model] = np.asarray(c, np.float64)
                values[f"{method}/{kind}_auc/{model}"] = _np(auc)
        _log(f"{kind} curves {clock}", verbose)
    return values, curves


def _mprt_explain(methods: Sequence[str], settings: Settings, key: jax.Array):
    """``explain(model, variables, x, target) -> (B, H, W)`` for :func:`jbnn.metrics.mprt`
    that explains ``len(methods)`` stacked copies of the images, copy ``i`` with
    ``methods[i]``: one MPRT pass (one re-initialisation) serves every method."""
    from jbnn import saliency
    from jbnn.models import apply_fn

    def one(method, model, variables, x, target):
        options = method_options(method, settings)
        if method == "gradcam":
            return saliency.gradcam(model, variables, x, target, **options)
        fn = apply_fn(model, variables, settings.fold_batchnorm)
        if method == "gradient":
            out = saliency.gradient(fn, x, target)
        elif method == "integrated_gradients":
            out = saliency.integrated_gradients(fn, x, target, **options)
        else:
            out = saliency.smoothgrad(fn, x, target, key, variant=method, **options)
        return saliency.reduce_channels(out, settings.channel_reduction)

    def explain(model, variables, x, target):
        n = x.shape[0] // len(methods)
        return jnp.concatenate(
            [
                one(m, model, variables, x[i * n : (i + 1) * n], target[i * n : (i + 1) * n])
                for i, m in enumerate(methods)
            ]
        )

    return explain


def run_mprt(plan: Plan, verbose: bool = True) -> dict:
    """MPRT for the BNN and the twin on the first ``mprt_images`` study images.

    The same random weights (one key) replace the trained ones in both twins.

    Returns:
      method -> model -> {"layers": [...], "similarity": name -> (S, M) scores}.
    """
    from jbnn import metrics

    s = plan.settings
    methods = s.mprt_methods
    n = min(s.mprt_images, len(plan.labels))
    x = np.concatenate([plan.images[:n]] * len(methods))
    target = np.concatenate([plan.labels[:n]] * len(methods))
    root = jax.random.fold_in(jax.random.key(plan.seed), _MPRT_TAG)
    explain = _mprt_explain(methods, s, jax.random.fold_in(root, 1))
    out: dict = {m: {} for m in methods}
    for model in ("bnn", "twin"):
        clock = _Clock()
        result = metrics.mprt(
            plan.models[model],
            plan.variables[model],
            x,
            target,
            explain,
            key=jax.random.fold_in(root, 0),
            layers=[tuple(p.split("+")) if "+" in p else p for p in plan.mprt_layers],
            similarity={
                "spearman_abs": lambda a, b: metrics.spearman(a, b, absolute=True),
                "ssim": metrics.ssim,
            },
        )
        for i, method in enumerate(methods):
            out[method][model] = {
                "layers": list(plan.mprt_layers),
                "similarity": {
                    k: _np(v)[:, i * n : (i + 1) * n] for k, v in result["similarity"].items()
                },
            }
        _log(f"MPRT ({', '.join(methods)}) of {model:<8} {clock}", verbose)
    return out


# --------------------------------------------------------------------------- results
SURROGATE_METRIC_LABELS = {
    "spearman_abs_vs_twin": "Spearman ρ (|map|) vs twin",
    "ssim_vs_twin": "SSIM vs twin",
    "spearman_abs_vs_bnn": "Spearman ρ (|map|) vs BNN's own",
    "total_variation": "total variation",
}


def build_results(plan: Plan, values: Mapping, curves: Mapping, mprt: Mapping) -> dict:
    """The results dictionary (``results.json``) from the per-image scores.

    Args:
      plan: the loaded study.
      values: per-image scores from :func:`per_image_metrics`.
      curves: deletion / insertion curves from :func:`per_image_metrics`.
      mprt: from :func:`run_mprt`.

    Returns:
      The results, as documented in :mod:`jbnn.report`.
    """
    from jbnn.report import METRIC_LABELS

    s = plan.settings
    # Every interval resamples the same image indices, drawn from config.seed (_ci_dict):
    # a series reported in two tables gets one interval.
    seed = int(plan.seed)
    kw = dict(num_bootstrap=s.bootstrap_samples, confidence=s.confidence)

    def ci(v) -> dict:
        return _ci_dict(v, seed, s.bootstrap_samples, s.confidence)

    n = len(plan.labels)
    common = dict(num_images=n, alpha=s.alpha, **kw)
    labels = dict(METRIC_LABELS)
    gradient = similarity_finding(
        title="Gradient maps look alike for the BNN and its twin",
        claim="Gradient maps look alike for BNN and twin",
        expect="alike",
        group="Gradient",
        series={
            m: (values[f"gradient/{m}/bnn_vs_twin"], values[f"gradient/{m}/twin_vs_control"])
            for m in SIMILARITY_METRICS
        },
        labels=labels,
        margin=s.similarity_margin,
        seed=seed,
        **common,
    )
    smooth = noise_finding(
        title="SmoothGrad maps are noisier for the BNN",
        claim="SmoothGrad maps are noisier for BNNs",
        group="SmoothGrad",
        noise={m: {k: values[f"smoothgrad/{m}/{k}"] for k in MODELS} for m in NOISE_METRICS},
        reduction={k: values[f"smoothgrad/tv_reduction/{k}"] for k in MODELS},
        labels=labels,
        seed=seed,
        **common,
    )
    gradcam = similarity_finding(
        title="GradCAM maps differ between the BNN and its twin",
        claim="GradCAM maps differ between BNN and twin",
        expect="differ",
        group="GradCAM",
        series={
            m: (values[f"gradcam/{m}/bnn_vs_twin"], values[f"gradcam/{m}/twin_vs_control"])
            for m in SIMILARITY_METRICS
        },
        labels=labels,
        margin=s.similarity_margin,
        seed=seed,
        **common,
    )
    if plan.masks is not None:
        extra = []
        for metric in ("pointing_game", "relevance_mass"):
            row = compare(
                values[f"gradcam/{metric}/bnn"],
                values[f"gradcam/{metric}/twin"],
                seed=seed,
                **kw,
            )
            row.update(
                group="GradCAM localisation",
                metric=metric,
                label=labels[metric],
                a_name="BNN",
                b_name="twin",
                verdict="",
            )
            extra.append(row)
        gradcam["extra_rows"] = extra
        gradcam["extra_note"] = (
            "Localisation against the ground-truth object masks (higher is better), BNN vs "
            "twin on the same images:"
        )

    similarity = {
        method: {
            metric: {pair: ci(values[f"{method}/{metric}/{pair}"]) for pair in PAIRS}
            for metric in ("spearman_abs", "ssim", "spearman_signed")
            if f"{method}/{metric}/bnn_vs_twin" in values
        }
        for method in METHODS
    }
    noise = {
        method: {
            metric: {k: ci(values[f"{method}/{metric}/{k}"]) for k in MODELS}
            for metric in NOISE_METRICS
        }
        for method in METHODS
    }
    faithfulness = {
        method: {
            k: {
                f"{kind}_auc": ci(values[f"{method}/{kind}_auc/{k}"])
                for kind in ("deletion", "insertion")
            }
            for k in MODELS
        }
        for method in METHODS
    }
    localisation = None
    if plan.masks is not None:
        localisation = {
            method: {
                k: {m: ci(values[f"{method}/{m}/{k}"]) for m in ("pointing_game", "relevance_mass")}
                for k in MODELS
            }
            for method in METHODS
        }
    one = {"mean": 1.0, "lo": 1.0, "hi": 1.0}
    mprt_results = {
        method: {
            model: {
                "layers": entry["layers"],
                **{
                    name: [one] + [ci(stage) for stage in scores]
                    for name, scores in entry["similarity"].items()
                },
            }
            for model, entry in per_model.items()
        }
        for method, per_model in mprt.items()
    }
    surrogates = {
        "trained": str(getattr(plan.models["bnn"], "input_quantizer", "unknown")),
        "reference": "the BNN's own backward pass",
        "metric_labels": dict(SURROGATE_METRIC_LABELS),
        "rows": {
            spec: {
                method: {
                    metric: ci(values[f"surrogate/{spec}/{method}/{metric}"])
                    for metric in SURROGATE_METRIC_LABELS
                }
                for method in s.surrogate_methods
            }
            for spec in s.surrogates
        },
    }
    zero_maps = {
        method: {k: int(values[f"{method}/zero_map/{k}"].sum()) for k in MODELS}
        for method in METHODS
    }
    image_shape = list(plan.images.shape[1:])
    meta = {
        "dataset": plan.dataset,
        "model": str(plan.run_results["bnn"].get("model", type(plan.models["bnn"]).__name__)),
        "architecture": type(plan.models["bnn"]).__name__,
        "num_images": n,
        "image_shape": image_shape,
        "image_indices": [int(i) for i in plan.indices],
        "seed": plan.seed,
        "gradcam_layer": s.gradcam_layer,
        "channel_reduction": s.channel_reduction,
        "methods": list(METHODS),
        "surrogates": list(s.surrogates),
        "bootstrap_samples": s.bootstrap_samples,
        "confidence": s.confidence,
        "models": {
            k: {
                "run_dir": RUN_DIRS[k],
                "test_accuracy": float(plan.run_results[k]["test_accuracy"]),
                "test_loss": float(plan.run_results[k]["test_loss"]),
            }
            for k in MODELS
        },
        "zero_maps": zero_maps,
        "faithfulness": {
            "num_steps": s.faithfulness_steps,
            "substrate": s.deletion_substrate,
            "insertion_substrate": s.insertion_substrate,
        },
        "mprt": {
            "num_images": min(s.mprt_images, n),
            "layers": list(plan.mprt_layers),
        },
        "explain_config": s.to_dict(),
    }
    if plan.masks is not None:
        meta["mask_fraction"] = ci(plan.masks.reshape(n, -1).mean(axis=1))
    return {
        "meta": meta,
        "findings": {"gradient": gradient, "smoothgrad": smooth, "gradcam": gradcam},
        "similarity": similarity,
        "noise": noise,
        "faithfulness": faithfulness,
        "localisation": localisation,
        "mprt": mprt_results,
        "surrogates": surrogates,
    }


# --------------------------------------------------------------------------- run
def _predictions(plan: Plan) -> dict[str, np.ndarray]:
    from jbnn.models import apply_fn

    s = plan.settings
    out = {}
    for model in MODELS:
        fn = jax.jit(
            apply_fn(
                plan.models[model], plan.variables[model], s.fold_batchnorm, input_like=plan.images
            )
        )
        preds = [
            np.asarray(fn(plan.images[i : i + s.batch_size]).argmax(-1))
            for i in range(0, len(plan.labels), s.batch_size)
        ]
        out[model] = np.concatenate(preds)
    return out


def figure_data(plan: Plan, maps: Mapping, values: Mapping, curves: Mapping, predictions):
    """The arrays behind the figures (see :class:`jbnn.report.FigureData`)."""
    from jbnn.report import FigureData

    s = plan.settings
    k = min(s.num_examples, len(plan.labels))
    names = plan.class_names

    def title(i: int) -> str:
        return (
            f"{names[plan.labels[i]]}\ntwin: {names[predictions['twin'][i]]}\n"
            f"BNN: {names[predictions['bnn'][i]]}"
        )

    surrogate_method = "gradient" if "gradient" in s.surrogate_methods else s.surrogate_methods[0]
    return FigureData(
        images=plan.display[:k],
        titles=[title(i) for i in range(k)],
        maps={m: {model: maps[model, m][:k] for model in MODELS} for m in METHODS},
        per_image=dict(values),
        curves={
            kind: {m: {model: c.mean(axis=0) for model, c in per.items()} for m, per in by.items()}
            for kind, by in curves.items()
        },
        surrogate_maps={
            spec: maps[surrogate_variant(plan, spec), surrogate_method][:k] for spec in s.surrogates
        },
        surrogate_method=surrogate_method,
    )


_TMP_PREFIX = ".report-tmp-"


def _host() -> str:
    """This machine's name with every character but letters, digits, ``_`` and ``.``
    replaced by ``_`` (no ``-``: it separates the parts of a temporary folder's name)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _tmp_prefix() -> str:
    """``.report-tmp-<host>-<pid>-``: whose temporary report folder it is."""
    return f"{_TMP_PREFIX}{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or not a pid): leave its folder alone
    return True


def _remove_stale_tmp(workdir: Path) -> None:
    """Removes the temporary report folders of runs on this machine whose process is
    gone (killed with SIGKILL, or by a power cut): a folder of a process that still
    runs, of another machine or not named by :func:`_tmp_prefix` is left alone."""
    host = _host()
    for path in workdir.glob(_TMP_PREFIX + "*"):
        parts = path.name[len(_TMP_PREFIX) :].split("-")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid != os.getpid() and path.is_dir() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


class _CleanStop:
    """While it is entered, SIGTERM raises ``SystemExit(143)`` in the main thread where it
    would end the process at once, so that ``except`` and ``finally`` blocks (the removal
    of the temporary report folder) run; a second SIGTERM during that cleanup is ignored.
    Inside :meth:`deferred`, SIGTERM and Ctrl-C (SIGINT) wait until the block is done.

    Only signals with their default action are taken over (SIGINT's raises
    KeyboardInterrupt, as before), only in the main thread (elsewhere nothing changes),
    and the previous handlers come back on exit. Blocking the signals
    (``pthread_sigmask``) would not defer them: the kernel hands a blocked signal to
    another thread (XLA's), and Python runs its handler in the main thread all the same.
    """

    def __init__(self):
        self._previous: dict[int, object] = {}
        self._critical = False
        self._pending: int | None = None

    def __enter__(self) -> _CleanStop:
        if threading.current_thread() is not threading.main_thread():
            return self
        defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handler(self, signum, frame) -> None:
        del frame
        if self._critical:
            self._pending = signum
            return
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_IGN)  # restored to the default by __exit__
        raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def deferred(self):
        """The signals that arrive in the block take effect once it is done."""
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            self._stop(signum)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Replaces ``final`` by ``tmp`` (same filesystem): the old report is removed only
    once the new one is in place."""
    os.chmod(tmp, 0o755)
    if final.exists():
        old = final.with_name(f".{final.name}-old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def run_study(config, workdir: str | Path, *, verbose: bool = True) -> Path:
    """Runs the whole study and writes ``workdir/report``.

    Everything is loaded and checked first (:func:`prepare`); the report is written to
    a temporary folder inside ``workdir`` and moved into place at the end, so an error
    (or a SIGTERM, which raises ``SystemExit(143)`` while the report is written) at any
    point leaves the workdir as it was. A temporary folder that a killed run on this
    machine left behind (SIGKILL) is removed.

    Args:
      config: the config the models were trained with; ``config.explain`` holds the
        study settings (see ``configs/default.py``).
      workdir: where train.py left ``bnn``, ``fp`` and ``control``.
      verbose: print progress to stderr.

    Returns:
      The report folder, ``workdir/report``.

    Raises:
      StudyError: see :func:`prepare`.
    """
    from jbnn import report

    total = _Clock()
    timings: dict[str, list[float]] = {}

    def stage(name: str, clock: _Clock) -> None:
        timings[name] = [round(v, 2) for v in clock.seconds()]

    clock = _Clock()
    plan = prepare(config, workdir)
    stage("load", clock)
    _log(
        f"{len(plan.labels)} {plan.dataset} test images; models loaded and checked {clock}", verbose
    )
    clock = _Clock()
    maps, signed = compute_maps(plan, verbose)
    stage("maps", clock)
    clock = _Clock()
    values, curves = per_image_metrics(plan, maps, signed, verbose)
    stage("metrics", clock)
    clock = _Clock()
    mprt = run_mprt(plan, verbose)
    stage("mprt", clock)
    clock = _Clock()
    results = build_results(plan, values, curves, mprt)
    predictions = _predictions(plan)
    results["meta"]["study_accuracy"] = {
        k: float(np.mean(predictions[k] == plan.labels)) for k in MODELS
    }
    data = figure_data(plan, maps, values, curves, predictions)
    stage("statistics", clock)

    clock = _Clock()
    final = plan.workdir / REPORT_DIR
    _remove_stale_tmp(plan.workdir)
    tmp = None
    with _CleanStop() as stop:  # a SIGTERM removes the temporary folder too
        try:
            with stop.deferred():  # made and named as one step
                tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=plan.workdir))
            report.write_report(results, data, tmp, GRID_METHODS)
            text = json.dumps(results, indent=1, allow_nan=False)
            (tmp / "results.json").write_text(text + "\n", encoding="utf-8")
            np.savez_compressed(tmp / "per_image.npz", **values)
            stage("figures", clock)
            stage("total", total)
            timings_text = json.dumps(
                {k: {"wall_s": w, "cpu_s": c} for k, (w, c) in timings.items()}
            )
            (tmp / "timings.json").write_text(timings_text + "\n")
            with stop.deferred():  # the swap of old and new report is not cut in half
                _move_into_place(tmp, final)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    _log(f"figures and report {clock}; total {total}", verbose)
    return final


def summary(report_dir: str | Path) -> str:
    """The headline table and the three verdict sentences of a written report, as text.

    Args:
      report_dir: a folder written by :func:`run_study`.

    Returns:
      Markdown: the headline table, one line per finding, and where the report is.
    """
    from jbnn.report import headline_table

    report_dir = Path(report_dir)
    results = json.loads((report_dir / "results.json").read_text(encoding="utf-8"))
    lines = headline_table(results) + [""]
    lines += [f"- {f['sentence']}" for f in results["findings"].values()]
    lines += ["", f"Report: {report_dir / 'report.md'} (figures and results.json beside it)"]
    return "\n".join(lines)
