"""OPT-350M causal-LM pretraining with vanilla softmax (Quantizable Transformers).

Full recipe (GPUs; REFERENCE.md §1):

    python train.py --config=configs/opt350m_vanilla.py --workdir=runs/opt350m_vanilla
    python eval.py --config=configs/opt350m_vanilla.py --workdir=runs/opt350m_vanilla

Expected (paper): FP ppl 13.19, max inf norm 253, avg kurtosis 2689, W8A8 ppl 37.52 [unconfirmed].

Offline on a 2-core CPU in a few minutes (tiny model, embedded data):

    python train.py --config=configs/opt350m_vanilla.py:tiny --workdir=runs/opt350m_vanilla_tiny
"""

from configs import common


def get_config(arg=None):
    return common.opt_clm("vanilla", arg, size="opt-350m")
