"""Saliency maps for any Flax model: pure, jitted, vmapped and sharded.

Input-gradient methods take ``fn``, a function ``x -> logits`` (B, K) in inference
mode (``jbnn.models.apply_fn(model, variables)``); GradCAM takes the Linen model, its
variables and a layer path. Images are NHWC (B, H, W, C); ``target`` is an int array
(B,) or None for the predicted class. Every public function checks its input at the
boundary (clear errors, NaN included) and runs one jitted computation that is not
retraced on a second call with the same shapes, even with new variables.

* :func:`gradient`, :func:`input_x_gradient`, :func:`smoothgrad` (``smoothgrad``,
  ``smoothgrad_sq``, ``vargrad``), :func:`integrated_gradients`;
* :func:`gradcam`, :func:`gradcam_plus_plus` (and
  :func:`layer_activation_and_gradient`);
* :func:`reduce_channels`, :func:`normalize_captum`, :func:`normalize_pair`;
* :func:`explain_dataset` and the :data:`METHODS` registry.

To explain a BNN under another backward surrogate, explain
``jbnn.models.with_surrogate(model, "approx_sign")`` with the same variables: the
logits are bit for bit the same, only the gradients change.
"""

from jbnn.saliency.cam import (
    INTERPOLATIONS,
    gradcam,
    gradcam_plus_plus,
    layer_activation_and_gradient,
)
from jbnn.saliency.dataset import METHODS, explain_dataset
from jbnn.saliency.display import (
    CAPTUM_SIGNS,
    REDUCTIONS,
    normalize_captum,
    normalize_pair,
    reduce_channels,
)
from jbnn.saliency.gradients import (
    AUTO_CHUNK_PIXELS,
    IG_METHODS,
    SMOOTHGRAD_VARIANTS,
    gradient,
    input_x_gradient,
    integrated_gradients,
    quadrature,
    smoothgrad,
)

__all__ = [
    "AUTO_CHUNK_PIXELS",
    "CAPTUM_SIGNS",
    "IG_METHODS",
    "INTERPOLATIONS",
    "METHODS",
    "REDUCTIONS",
    "SMOOTHGRAD_VARIANTS",
    "explain_dataset",
    "gradcam",
    "gradcam_plus_plus",
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "layer_activation_and_gradient",
    "normalize_captum",
    "normalize_pair",
    "quadrature",
    "reduce_channels",
    "smoothgrad",
]
