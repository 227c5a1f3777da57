"""ImageNet (ILSVRC 2012) with Bi-Real Net 18, ImageNet stem: 57.5% top-1 in larq-zoo.

Multi-device / multi-host scale. TFDS builds ``imagenet2012`` from the archives
(``ILSVRC2012_img_train.tar``, ``ILSVRC2012_img_val.tar``) in ``--config.manual_dir``;
``--config.data_dir`` is where the prepared dataset goes.
"""

import ml_collections

from configs import default

IMAGENET_TRAIN_EXAMPLES = 1_281_167


def get_config() -> ml_collections.ConfigDict:
    """ImageNet, Bi-Real Net 18, Adam 5e-3 with warmup and cosine decay, batch 1024."""
    config = default.get_config()
    config.dataset = "imagenet2012"
    config.eval_split = "test"  # jbnn.data reads ImageNet's validation split
    config.image_size = 224
    config.augment = ml_collections.ConfigDict(dict(crop_padding=0, flip=True))
    config.model = "birealnet18"
    config.model_kwargs = ml_collections.ConfigDict(dict(width=1.0, stem="imagenet"))
    config.batch_size = 1024
    config.eval_batch_size = 1024
    config.num_epochs = 120
    steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // config.batch_size
    config.optimizer.learning_rate = 5e-3
    config.optimizer.warmup_steps = 5 * steps_per_epoch
    config.train_control = False
    config.checkpoint_every_steps = 2500
    config.log_every_steps = 200
    # Saliency study (explain.py) at GPU scale; needs the control: train with
    # --config.train_control=True.
    config.explain.num_images = 500
    config.explain.batch_size = 50
    config.explain.sample_batch_size = 25
    config.explain.mprt_images = 50
    config.explain.gradcam_layer = "stage4"  # the last stage, 7x7 at 224 px (as GradCAM)
    return config
