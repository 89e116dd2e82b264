"""A LLaMA-style decoder with softpick attention (arXiv 2504.20966).

``softpick(x)_i = relu(exp(x_i) - 1) / (sum_j |exp(x_j) - 1| + eps)``: rows need not sum to
one and can be exactly zero, so a head can attend to nothing instead of parking its mass on
a sink token (docs/methods.md §4). The softpick paper reports, at 340M parameters, 0 % sink
rate and hidden-state kurtosis 340 against 33,510 for softmax.

Full recipes (GPUs; ``:1b`` is Llama-3.2-1B's shape with FSDP over 8 devices):

    python train.py --config=configs/llama_softpick.py --workdir=runs/llama125m_softpick
    python eval.py --config=configs/llama_softpick.py --workdir=runs/llama125m_softpick
    python train.py --config=configs/llama_softpick.py:1b --workdir=/ckpt/llama1b_softpick

Where it differs from the softpick paper: wiki40b and the llama_clm schedule
(``configs/common.py``) instead of its data and budget; attention runs as einsums (softpick
is not a softmax, so cuDNN's fused attention steps aside on GPUs).

Offline on a 2-core CPU in a few minutes (tiny model, embedded WikiText-2):

    python train.py --config=configs/llama_softpick.py:tiny --workdir=runs/llama_softpick_tiny
    python eval.py --config=configs/llama_softpick.py:tiny --workdir=runs/llama_softpick_tiny
"""

from configs import common


def get_config(arg=None):
    return common.llama_clm("softpick", arg)
