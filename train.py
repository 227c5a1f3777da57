"""Trains a BNN, its full-precision twin and a seed control from one config.

    python train.py --config configs/digits.py --workdir runs/digits
    python train.py --config configs/cifar10_binarynet.py --workdir runs/c10 \\
        --config.batch_size=256 --config.data_dir=~/tensorflow_datasets

Writes workdir/bnn, workdir/fp and workdir/control (config.json, metrics.jsonl, orbax
checkpoints, results.json). Rerunning the same command resumes an interrupted run from
its last checkpoint and skips finished ones (--force retrains). Training is
data-parallel over all local devices; on several hosts, start the same command on every
host with --multihost (calls jax.distributed.initialize(); see jbnn/training.py).
"""

import logging as pylogging

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Directory of the study (bnn/, fp/, control/).")
flags.DEFINE_bool("force", False, "Retrain finished runs from scratch.")
flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (multi-host training)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if FLAGS.multihost:
        import jax

        jax.distributed.initialize()
    from jbnn import training

    logging.set_verbosity(logging.INFO)
    # Orbax logs every save at INFO; keep its warnings, drop the chatter.
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno >= pylogging.WARNING or "orbax" not in record.pathname
    )
    from jbnn.data import DatasetNotAvailableError

    try:
        results = training.train_and_evaluate(FLAGS.config, FLAGS.workdir, force=FLAGS.force)
    except (training.ConfigError, DatasetNotAvailableError, training.NonFiniteLossError) as e:
        # Found before anything was written (or, for a NaN loss, with the last finite
        # checkpoint kept): the message says what to do; no traceback needed.
        raise SystemExit(f"train.py: {e}") from None
    for name, res in results.items():
        logging.info(
            "%s: test_accuracy=%.4f test_loss=%.4f (%s)",
            name,
            res["test_accuracy"],
            res["test_loss"],
            f"{FLAGS.workdir}/{name}/results.json",
        )


if __name__ == "__main__":
    from jbnn._cli import flags_parser

    app.run(main, flags_parser=flags_parser("train.py"))
