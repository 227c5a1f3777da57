"""CIFAR-10 with BinaryNet (2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10).

Reference: 11.40% test error (Courbariaux/Hubara 2016); Larq's tutorial reaches 83.2%
without augmentation. GPU/TPU scale; needs TFDS cifar10 in ``--config.data_dir``.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """CIFAR-10, full-width BinaryNet, Adam with cosine decay, crop + flip."""
    config = default.get_config()
    config.dataset = "cifar10"
    config.image_size = None  # native 32 px
    config.augment = ml_collections.ConfigDict(dict(crop_padding=4, flip=True))
    config.model = "binarynet"
    config.model_kwargs = ml_collections.ConfigDict(dict(width=1.0, stem="small"))
    config.batch_size = 256
    config.eval_batch_size = 1000
    config.num_epochs = 150
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 500
    config.train_control = False
    config.checkpoint_every_steps = 2000
    config.log_every_steps = 100
    # Saliency study (explain.py) at GPU scale; needs the control: train with
    # --config.train_control=True.
    config.explain.num_images = 1000
    config.explain.batch_size = 200
    config.explain.sample_batch_size = 50
    config.explain.mprt_images = 100
    config.explain.gradcam_layer = "block5"  # 8x8: the last unpooled block (block6 pools to 4x4)
    return config
