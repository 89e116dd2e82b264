"""Exports a trained workdir as a Hugging Face directory, ready for ``from_pretrained``.

    python export.py --config=configs/opt125m_gated.py:tiny --workdir=runs/opt_tiny \\
        --out=runs/opt_tiny_hf
    python export.py --config=configs/opt125m_gated.py:tiny --workdir=runs/opt_tiny \\
        --out=runs/opt_tiny_w8a8 --quantize=W8A8
    python export.py --config=configs/opt125m_gated.py:tiny --workdir=runs/opt_tiny \\
        --out=runs/opt_tiny_int8 --quantize=W8A8 --int8
    python export.py --config=configs/llama_ptq.py:tiny --workdir=runs/llama_ptq_tiny \\
        --out=runs/llama_ptq_tiny_w4a8 --quantize=w4a8 --method=rotation+gptq

Writes config.json, model.safetensors and the tokenizer of the newest intact checkpoint (or
--step). Attention variants (clipped / off-by-one softmax, gates) ship qtx's PyTorch modeling
code (load with ``trust_remote_code=True``); a QAT-trained model, or --quantize=SETUP (calibrated
as eval.py does; --method=NAME calibrates it with a post-training method of
config.eval.ptq_methods' kind, e.g. smoothquant+gptq, and exports its transformed
parameters), adds quantization.json/.safetensors and quantization_qtx.py.
--int8 writes the integer model instead (int8_config.json, int8_model.safetensors: int8
weights, scales, zero points; ``eval.py --int8=DIR`` evaluates it).
A user error prints one line (``error: ...``) and exits with status 2.
"""

from absl import flags
from ml_collections import config_flags

from qtx.run import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config>).")
_OUT = flags.DEFINE_string("out", None, "Output directory (new or empty).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the contents of a non-empty --out.")
_QUANTIZE = flags.DEFINE_string(
    "quantize", None, "Calibrate this PTQ setup (e.g. W8A8) and write its sidecar."
)
_METHOD = flags.DEFINE_string(
    "method", None, "Calibrate --quantize with this post-training method (e.g. rotation+gptq)."
)
_INT8 = flags.DEFINE_bool(
    "int8", False, "Write the integer model (int8 weights) instead of a Hugging Face directory."
)
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    from qtx.run.experiment import default_workdir
    from qtx.run.export import export_integer, export_workdir

    workdir = _WORKDIR.value or default_workdir(cli.config_path())
    export = export_integer if _INT8.value else export_workdir
    export(
        _CONFIG.value,
        workdir,
        _OUT.value,
        _STEP.value,
        _OVERWRITE.value,
        _QUANTIZE.value,
        _METHOD.value,
    )


if __name__ == "__main__":
    cli.run(main, "export.py")
