"""jbnn: Binarized Neural Networks in JAX/Flax and the tools to explain them."""

from jbnn import layers, models, quantizers
from jbnn.summary import summary  # the function; its module stays importable by name

__version__ = "0.1.0"

__all__ = ["layers", "models", "quantizers", "summary", "__version__"]
