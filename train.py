"""Trains a model from an ml_collections config.

    python train.py --config=configs/opt125m_gated.py:tiny --workdir=runs/opt_tiny
    python train.py --config=configs/bert_base_clipped.py --config.optim.lr=2e-4

Runs always resume from the newest intact checkpoint in --workdir (default: runs/<config>).
SIGTERM or SIGINT saves a checkpoint at the current step and exits; rerunning continues.
A user error prints one line (``error: ...``) and exits with status 2.
"""

from qtx.hugepages import reexec_with_huge_pages

reexec_with_huge_pages()  # before jax starts: huge pages for XLA's large buffers

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from qtx.run import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and eval output.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from qtx.run.experiment import default_workdir
    from qtx.run.train import train

    train(_CONFIG.value, _WORKDIR.value or default_workdir(cli.config_path()))


if __name__ == "__main__":
    cli.run(main, "train.py")
