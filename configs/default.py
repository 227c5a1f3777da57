"""Shared base config: every field jbnn's training reads, with CPU-friendly defaults.

Variants import this module and override a few fields. On the command line:
``python train.py --config configs/digits.py --config.num_epochs=5``.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """The base config (digits, BinaryNet at 1/8 width, Adam with cosine decay)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # init and data order of bnn and fp; the control uses seed + 1
    config.data_seed = 0  # decides procedural data and fixed splits, never the order

    # Data (jbnn.data.load).
    config.dataset = "digits"
    config.train_split = "train"
    config.eval_split = "test"
    config.data_dir = config_dict.placeholder(str)  # TFDS data folder
    config.manual_dir = config_dict.placeholder(str)  # ImageNet archives
    config.image_size = config_dict.placeholder(int)  # None: the dataset's default
    config.data_kwargs = ml_collections.ConfigDict()  # extra options of jbnn.data.load
    config.augment = ml_collections.ConfigDict(dict(crop_padding=0, flip=False))

    # Model (jbnn.models.get(model, binary=..., num_classes=..., **model_kwargs)).
    config.model = "binarynet"
    config.model_kwargs = ml_collections.ConfigDict(dict(width=0.125, stem="small"))

    # Optimisation.
    config.batch_size = 64
    config.eval_batch_size = 256
    config.num_epochs = 10
    config.optimizer = ml_collections.ConfigDict(
        dict(name="adam", learning_rate=1e-2, schedule="cosine", warmup_steps=0, weight_decay=0.0)
    )
    # "latent": binary kernels are latent weights trained by `optimizer` (no weight
    # decay) and clipped after every step; "bop": Bop (threshold, gamma) trains them.
    config.binary_optimizer = ml_collections.ConfigDict(
        dict(name="latent", threshold=1e-8, gamma=1e-4)
    )
    config.train_control = True  # also train a twin with seed + 1 into workdir/control

    # Bookkeeping.
    config.checkpoint_every_steps = 200
    config.log_every_steps = 20
    config.progress_bar = True

    # Saliency study (explain.py; jbnn.study.Settings documents every field). Defaults fit
    # the whole study on 200 images of the embedded datasets in a few minutes on 2 cores.
    config.explain = ml_collections.ConfigDict()
    config.explain.num_images = 200  # test images (all of them if the split is smaller)
    config.explain.batch_size = 50  # images per jitted call
    config.explain.num_examples = 6  # rows of the saliency grid figure
    config.explain.channel_reduction = "abs_sum"  # (B,H,W,C) -> (B,H,W): sum |a| (PAIR)
    config.explain.smoothgrad_samples = 50  # noisy copies per image (Smilkov et al.: ~50)
    config.explain.smoothgrad_noise = 0.15  # sigma / (max - min) of each image
    config.explain.sample_batch_size = 10  # noisy copies / IG points evaluated together
    config.explain.ig_steps = 32  # Integrated Gradients path points (zero baseline)
    config.explain.gradcam_layer = "block5"  # module path, same position in both twins
    config.explain.gradcam_relu = True  # ReLU of the map (paper, PAIR); False: Captum's
    config.explain.surrogates = ("ste_sign", "approx_sign", "swish_sign", "identity")
    config.explain.surrogate_methods = ("gradient", "smoothgrad", "gradcam")
    config.explain.faithfulness_steps = 16  # deletion / insertion steps
    config.explain.deletion_substrate = "blur"  # what deleted pixels become
    config.explain.insertion_substrate = "blur"  # what insertion starts from
    config.explain.mprt_images = 32  # images of the MPRT sanity check
    config.explain.mprt_methods = ("gradient", "gradcam")
    # Fold inference BatchNorms into the convolutions that feed them (jbnn.models.fold):
    # the same models up to float rounding, SmoothGrad 1.11x faster on an H100 (bf16
    # twin). Off: a BNN's sign within rounding of 0 can flip, and the results would move.
    config.explain.fold_batchnorm = False
    # () = every layer with weights, from the logits down, each with its BatchNorm; a
    # stage of several layers joins their paths by "+", e.g. ("head+head_bn", "block6").
    config.explain.mprt_layers = ()
    config.explain.bootstrap_samples = 2000
    config.explain.confidence = 0.95
    config.explain.alpha = 0.05  # level of the Wilcoxon tests
    config.explain.similarity_margin = 0.2  # "alike": within 20% of twin-vs-control
    return config
