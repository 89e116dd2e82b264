"""Evaluates a trained model: FP metrics, outlier statistics and quantized setups.

    python eval.py --config=configs/opt125m_gated.py:tiny --workdir=runs/opt_tiny
    python eval.py --config=configs/bert_base_vanilla.py --hf_checkpoint=/path/to/hf/dir

Loads the newest intact checkpoint in --workdir (or --hf_checkpoint), then writes
<workdir>/eval.json, outliers.png and attention_mass.png and prints a table.
A user error prints one line (``error: ...``) and exits with status 2.
"""

from absl import flags
from ml_collections import config_flags

from qtx import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config>).")
_HF = flags.DEFINE_string("hf_checkpoint", None, "Evaluate a local Hugging Face checkpoint.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from qtx.evaluate.runner import evaluate
    from qtx.train.experiment import default_workdir

    workdir = _WORKDIR.value or default_workdir(cli.config_path())
    evaluate(_CONFIG.value, workdir, _HF.value)


if __name__ == "__main__":
    cli.run(main, "eval.py")
