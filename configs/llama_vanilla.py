"""A LLaMA-style decoder with vanilla softmax attention: the baseline of the llama configs.

Pre-RMSNorm, SwiGLU, rotary positions, grouped-query attention (docs/methods.md §4). The
baseline against which ``llama_gated`` and ``llama_softpick`` are compared: its first-token
attention mass and largest residual activation are what the variants remove.

Full recipes (GPUs; ``:1b`` is Llama-3.2-1B's shape with FSDP over 8 devices):

    python train.py --config=configs/llama_vanilla.py --workdir=runs/llama125m_vanilla
    python eval.py --config=configs/llama_vanilla.py --workdir=runs/llama125m_vanilla
    python train.py --config=configs/llama_vanilla.py:1b --workdir=/ckpt/llama1b_vanilla

Expected: no published numbers for these exact runs (wiki40b, 16B / 52B tokens); the Gated
Attention paper's vanilla 15B MoE puts 46.7 % of the attention on the first token with a
largest activation of 1053. Learned sinks (gpt-oss) are one override away:
``--config.model.attention.softmax=sink``.

Offline on a 2-core CPU in a few minutes (tiny model, embedded WikiText-2):

    python train.py --config=configs/llama_vanilla.py:tiny --workdir=runs/llama_vanilla_tiny
    python eval.py --config=configs/llama_vanilla.py:tiny --workdir=runs/llama_vanilla_tiny
"""

from configs import common


def get_config(arg=None):
    return common.llama_clm("vanilla", arg)
