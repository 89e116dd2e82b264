"""OPT-350M causal-LM pretraining with gated attention (Quantizable Transformers).

Full recipe (GPUs; REFERENCE.md §1):

    python train.py --config=configs/opt350m_gated.py --workdir=runs/opt350m_gated
    python eval.py --config=configs/opt350m_gated.py --workdir=runs/opt350m_gated

Expected (paper): FP ppl 13.01, max inf norm 65.4, avg kurtosis 261, W8A8 ppl 14.42 [unconfirmed].

Offline on a 2-core CPU in a few minutes (tiny model, embedded data):

    python train.py --config=configs/opt350m_gated.py:tiny --workdir=runs/opt350m_gated_tiny
"""

from configs import common


def get_config(arg=None):
    return common.opt_clm("gated", arg, size="opt-350m")
