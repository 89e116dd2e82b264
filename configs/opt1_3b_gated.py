"""OPT-1.3B causal-LM pretraining with gated attention (Quantizable Transformers).

Full recipe (GPUs; REFERENCE.md §1):

    python train.py --config=configs/opt1_3b_gated.py --workdir=runs/opt1_3b_gated
    python eval.py --config=configs/opt1_3b_gated.py --workdir=runs/opt1_3b_gated

Expected (paper): W8A8 ppl 29.95 (all-heads linear gate).

Offline on a 2-core CPU in a few minutes (tiny model, embedded data):

    python train.py --config=configs/opt1_3b_gated.py:tiny --workdir=runs/opt1_3b_gated_tiny
"""

from configs import common


def get_config(arg=None):
    return common.opt_clm("gated", arg, size="opt-1.3b")
