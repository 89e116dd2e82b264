"""A LLaMA-style decoder with the output gate of Gated Attention for LLMs (Qiu et al., 2025).

Each head's attention output is multiplied by ``sigmoid(x W)``, one gate per channel
(``elementwise``, the paper's best position G1: after attention, before ``o_proj``), computed
from the same normalised hidden state that feeds q, k and v; no bias, ``N(0, 0.02)`` init.
Qwen3-Next and Qwen3.5 ship it (docs/methods.md §4).

Full recipes (GPUs; ``:1b`` is Llama-3.2-1B's shape with FSDP over 8 devices):

    python train.py --config=configs/llama_gated.py --workdir=runs/llama125m_gated
    python eval.py --config=configs/llama_gated.py --workdir=runs/llama125m_gated
    python train.py --config=configs/llama_gated.py:1b --workdir=/ckpt/llama1b_gated

Expected: the paper reports, on a 15B mixture-of-experts model, the attention on the first
token falling from 46.7 % to 4.8 %, the largest activation from 1053 to 94 and perplexity from
6.026 to 5.761. Where it differs from the paper: dense models of ~114M / 1.2B parameters
trained on wiki40b for 16B / 52B tokens (``configs/common.py llama_clm``) instead of the
paper's models, data and budget, and no q/k norm (Llama's attention; set
``--config.model.qk_norm=True`` for Qwen3's). Those numbers are the paper's at its scale, not
expectations for these runs.

Offline on a 2-core CPU in a few minutes (tiny model, embedded WikiText-2):

    python train.py --config=configs/llama_gated.py:tiny --workdir=runs/llama_gated_tiny
    python eval.py --config=configs/llama_gated.py:tiny --workdir=runs/llama_gated_tiny
"""

from configs import common


def get_config(arg=None):
    return common.llama_clm("gated", arg)
