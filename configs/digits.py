"""scikit-learn's 8x8 handwritten digits at 32 px: trains BNN, twin and control on a CPU."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Digits, BinaryNet at 1/8 width."""
    config = default.get_config()
    config.dataset = "digits"
    config.image_size = 32
    return config
