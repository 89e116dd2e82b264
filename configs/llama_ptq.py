"""Post-training quantization of a LLaMA decoder with the methods after gamma migration.

``eval.py`` calibrates three LLM settings (docs/quantization_points.md, "LLM presets") on
128 WikiText-2 sequences and reports WikiText-2 perplexity for round-to-nearest
(``minmax``), GPTQ on the weights (damping 0.01, groups of 128), QuaRot's Hadamard
rotation alone and with GPTQ (QuaRot's recipe), and SmoothQuant (alpha 0.85, the Llama-2
setting of its authors' demo) (docs/methods.md §5):

* ``w8a8_dynamic``: W8A8 with per-token dynamic activations (SmoothQuant's setting);
* ``w4a8:W4A4``: 4-bit weights per group of 128, 4-bit per-token activations (QuaRot's
  W4A4, without its 4-bit KV cache), and ``w4a8`` (the same at 8-bit activations);
* ``w4a16``: weight-only 4-bit (GPTQ's setting).

On GPUs, the real Llama-2-7B (``:llama2_7b``, the default; accept its license on the hub
first, or give a local copy)::

    python eval.py --config=configs/llama_ptq.py --workdir=runs/llama2_7b_ptq \\
        --hf_checkpoint=meta-llama/Llama-2-7b-hf

Expected, from the papers (their own code and evaluation): SmoothQuant W8A8 WikiText-2
perplexity 5.823 FP16, 5.931 naive W8A8, 5.856 SmoothQuant; QuaRot W4A4KV4 6.4 against
5.5 FP (SpinQuant 5.9); GPTQ keeps W4A16 within a few tenths of FP. Where it differs: no
KV-cache quantization, one alpha for SmoothQuant, calibration on WikiText-2's validation
split (QuaRot: 128 training samples).

Offline on a 2-core CPU (``:tiny``, a few minutes): the tiny LLaMA of
``configs/llama_vanilla.py:tiny`` trained on the embedded WikiText-2, then the table
(``bench/ptq_decoder.py`` runs the same and writes ``bench/results/ptq_decoder.json``)::

    python train.py --config=configs/llama_ptq.py:tiny --workdir=runs/llama_ptq_tiny
    python eval.py  --config=configs/llama_ptq.py:tiny --workdir=runs/llama_ptq_tiny
"""

import ml_collections

from configs import common

SETUPS = ("w8a8_dynamic", "w4a8:W4A4", "w4a8", "w4a16")
METHODS = ("minmax", "gptq", "rotation", "rotation+gptq", "smoothquant")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: ``llama2_7b`` (the default: Llama-2-7B's shape, evaluated from its HF
    checkpoint) or ``tiny``."""
    size, tiny = common.parse_arg(arg, "llama_ptq", ("llama2_7b",))
    c = common.llama_clm("vanilla", "tiny" if tiny else None)
    c.eval.update(setups=SETUPS, ptq_methods=METHODS, ptq_options={"smoothquant_alpha": 0.85})
    if not tiny:
        c.model.update(name="llama2-7b", dtype="bfloat16", max_positions=4096, remat=False)
        c.data.update(
            name="wikitext2",
            tokenizer="meta-llama/Llama-2-7b-hf",
            seq_len=2048,
            batch_size=8,
            max_eval_batches=None,  # the whole test split
        )
        c.eval.update(calib_batches=16, calib_batch_size=8)
        c.mesh.update(data=-1, fsdp=1)
    return common.overridable(c)
