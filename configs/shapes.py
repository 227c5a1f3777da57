"""Procedural shapes with ground-truth masks at 32 px: CPU-friendly, for localisation."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Shapes, BinaryNet at 1/8 width."""
    config = default.get_config()
    config.dataset = "shapes"
    config.image_size = 32
    return config
