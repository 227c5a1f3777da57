"""CIFAR-10 with Bi-Real Net 18 (small-input stem). GPU/TPU scale.

Needs TFDS cifar10 in ``--config.data_dir``.
"""

import ml_collections

from configs import cifar10_binarynet


def get_config() -> ml_collections.ConfigDict:
    """CIFAR-10, Bi-Real Net 18, Adam with cosine decay, crop + flip."""
    config = cifar10_binarynet.get_config()
    config.model = "birealnet18"
    config.model_kwargs = ml_collections.ConfigDict(dict(width=1.0, stem="small"))
    config.optimizer.learning_rate = 2e-3
    config.explain.gradcam_layer = "stage3"  # 8x8 feature maps at 32 px
    return config
