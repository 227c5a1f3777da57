"""jbnn: Binarized Neural Networks in JAX/Flax and the tools to explain them."""

import importlib

from jbnn import layers, models, ops, quantizers
from jbnn.ops import forward_mode
from jbnn.summary import summary  # the function; its module stays importable by name

__version__ = "0.1.0"

# Imported on first use (``jbnn.saliency``...), so that ``import jbnn`` stays light and
# TensorFlow is never imported unless a TFDS dataset is read.
_LAZY = ("data", "metrics", "optim", "report", "saliency", "stats", "study", "training")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"jbnn.{name}")
    raise AttributeError(f"module 'jbnn' has no attribute {name!r}")


__all__ = [
    "forward_mode",
    "layers",
    "models",
    "ops",
    "quantizers",
    "summary",
    "__version__",
    *_LAZY,
]
