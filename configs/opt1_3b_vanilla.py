"""OPT-1.3B causal-LM pretraining with vanilla softmax (Quantizable Transformers).

Full recipe (GPUs; REFERENCE.md §1):

    python train.py --config=configs/opt1_3b_vanilla.py --workdir=runs/opt1_3b_vanilla
    python eval.py --config=configs/opt1_3b_vanilla.py --workdir=runs/opt1_3b_vanilla

Expected (paper): W8A8 ppl 989.6.

Offline on a 2-core CPU in a few minutes (tiny model, embedded data):

    python train.py --config=configs/opt1_3b_vanilla.py:tiny --workdir=runs/opt1_3b_vanilla_tiny
"""

from configs import common


def get_config(arg=None):
    return common.opt_clm("vanilla", arg, size="opt-1.3b")
