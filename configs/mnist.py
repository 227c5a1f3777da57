"""MNIST with BinaryNet's binarized MLP (Courbariaux/Hubara 2016: 0.96% test error).

Needs the TFDS copy of MNIST in ``--config.data_dir`` (no download here).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """MNIST, a 3x1024 binarized MLP, Adam with cosine decay."""
    config = default.get_config()
    config.dataset = "mnist"
    config.image_size = None  # native 28 px
    config.model = "mlp"
    config.model_kwargs = ml_collections.ConfigDict(dict(hidden=(1024, 1024, 1024)))
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 30
    config.optimizer.learning_rate = 1e-3
    config.train_control = False
    config.checkpoint_every_steps = 2000
    config.log_every_steps = 100
    return config
