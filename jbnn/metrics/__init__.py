"""Metrics for saliency maps: similarity, noise, faithfulness, localisation, sanity checks.

Maps are batches (B, H, W); each metric returns one float32 score per map, shape (B,),
and is a jittable, vmappable JAX function (REFERENCE.md section 4). Every docstring states
how each map is normalised: always per sample, never over the batch.

Inputs are checked at the boundary: shapes that do not match raise ``ValueError``, and
concrete inputs holding NaN or inf raise ``ValueError`` (inside ``jit`` or ``vmap`` the
values are unknown, so that check is skipped and a NaN or inf in a sample's inputs gives
NaN for that sample's score; only :func:`spearman`, like scipy, ranks +-inf and gives NaN
for NaN alone). Degenerate but finite inputs (constant maps, empty masks) get the
documented finite values, never NaN. Maps of subnormal values (below ~1.2e-38, which XLA
on CPU adds and compares as 0) score as the same maps scaled into the normal range: maps
are rescaled and ranked by their bits, not by float arithmetic.

* similarity: :func:`spearman`, :func:`pearson`, :func:`ssim`, :func:`hog_similarity`
  (features by :func:`hog`), :func:`topk_intersection`;
* noise and complexity: :func:`total_variation`, :func:`sparseness`, :func:`complexity`;
* faithfulness: :func:`deletion_curve`, :func:`insertion_curve`, :func:`road`
  (:func:`noisy_linear_imputation`);
* localisation: :func:`pointing_game`, :func:`relevance_mass_accuracy`;
* sanity checks: :func:`mprt`, :func:`random_logit_test`.

Confidence intervals and paired tests over per-image scores are in :mod:`jbnn.stats`.
"""

from jbnn.metrics.complexity import complexity, sparseness, total_variation
from jbnn.metrics.faithfulness import (
    blur,
    deletion_curve,
    insertion_curve,
    make_substrate,
    noisy_linear_imputation,
    road,
)
from jbnn.metrics.localisation import pointing_game, relevance_mass_accuracy
from jbnn.metrics.sanity import default_similarities, mprt, parameter_layers, random_logit_test
from jbnn.metrics.similarity import (
    hog,
    hog_similarity,
    minmax_scale,
    pearson,
    spearman,
    ssim,
    topk_intersection,
)

__all__ = [
    "blur",
    "complexity",
    "default_similarities",
    "deletion_curve",
    "hog",
    "hog_similarity",
    "insertion_curve",
    "make_substrate",
    "minmax_scale",
    "mprt",
    "noisy_linear_imputation",
    "parameter_layers",
    "pearson",
    "pointing_game",
    "random_logit_test",
    "relevance_mass_accuracy",
    "road",
    "sparseness",
    "spearman",
    "ssim",
    "topk_intersection",
    "total_variation",
]
