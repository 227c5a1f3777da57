"""jbnn: Binarized Neural Networks in JAX/Flax and the tools to explain them."""

from jbnn import layers, models, quantizers

__version__ = "0.1.0"

__all__ = ["layers", "models", "quantizers", "__version__"]
