"""Explains the BNN, its full-precision twin and the seed control that train.py left in a
workdir, and writes the study report (report.md, results.json, figures) to workdir/report.

    python train.py --config configs/shapes.py --workdir runs/shapes
    python explain.py --config configs/shapes.py --workdir runs/shapes
    python explain.py --config configs/shapes.py --workdir runs/shapes \\
        --config.explain.num_images=500 --config.explain.gradcam_layer=block6

Pass the config used for training: only its ``explain`` section may differ. Everything is
checked before anything is written, and the report replaces workdir/report only once it
is complete.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to the training config (configs/*.py).")
flags.DEFINE_string("workdir", None, "Directory train.py wrote bnn/, fp/ and control/ into.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from jbnn import study

    logging.set_verbosity(logging.WARNING)  # progress goes to stderr; no checkpoint chatter
    try:
        report_dir = study.run_study(FLAGS.config, FLAGS.workdir)
    except study.StudyError as e:
        raise SystemExit(f"explain.py: {e}") from None
    print(study.summary(report_dir))


if __name__ == "__main__":
    from jbnn._cli import flags_parser

    app.run(main, flags_parser=flags_parser("explain.py"))
