"""Evaluates a trained model: FP metrics, outlier statistics and quantized setups.

    python eval.py --config=configs/opt125m_gated.py:tiny --workdir=runs/opt_tiny
    python eval.py --config=configs/bert_base_vanilla.py --hf_checkpoint=/path/to/hf/dir
    python eval.py --config=configs/opt125m_gated.py:tiny --int8=runs/opt_tiny_int8

Loads the newest intact checkpoint in --workdir (or --hf_checkpoint), then writes
<workdir>/eval.json, outliers.png and attention_mass.png and prints a table. With --int8 it
evaluates an integer model written by ``export.py --int8`` next to its fake-quant twin
(-> <int8 dir>/eval.json).
A user error prints one line (``error: ...``) and exits with status 2.
"""

from qtx.hugepages import reexec_with_huge_pages

reexec_with_huge_pages()  # before jax starts: huge pages for XLA's large buffers

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from qtx.run import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config>).")
_HF = flags.DEFINE_string("hf_checkpoint", None, "Evaluate a local Hugging Face checkpoint.")
_INT8 = flags.DEFINE_string("int8", None, "Evaluate an int8 directory (export.py --int8).")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from qtx.run.evaluate import evaluate
    from qtx.run.experiment import default_workdir

    if _INT8.value:
        from qtx.errors import UserError
        from qtx.run.int8 import evaluate_directory

        if _HF.value:
            raise UserError("--int8 and --hf_checkpoint exclude each other; allowed: one of them.")

        evaluate_directory(_CONFIG.value, _INT8.value)
        return

    workdir = _WORKDIR.value or default_workdir(cli.config_path())
    evaluate(_CONFIG.value, workdir, _HF.value)


if __name__ == "__main__":
    cli.run(main, "eval.py")
