"""Trains a model from an ml_collections config.

    python train.py --config=configs/opt125m_gated.py:tiny --workdir=runs/opt_tiny
    python train.py --config=configs/bert_base_clipped.py --config.optim.lr=2e-4

Runs always resume from the latest checkpoint in --workdir (default: runs/<config>).
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and eval output.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # progress lines are printed; logs on request
    from qtx.train.experiment import default_workdir
    from qtx.train.loop import train

    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or default_workdir(config_path)
    print(f"workdir: {workdir}", flush=True)
    train(_CONFIG.value, workdir)


if __name__ == "__main__":
    app.run(main)
