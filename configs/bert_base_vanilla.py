"""BERT-base MLM pretraining with vanilla softmax (Quantizable Transformers).

Full recipe (GPUs; REFERENCE.md §1):

    python train.py --config=configs/bert_base_vanilla.py --workdir=runs/bert_base_vanilla
    python eval.py --config=configs/bert_base_vanilla.py --workdir=runs/bert_base_vanilla

Expected (paper, Table 2): FP ppl 4.49, max inf norm 735, avg kurtosis 3076, W8A8 ppl 1294.

Offline on a 2-core CPU in a few minutes (tiny model, embedded / local data):

    python train.py --config=configs/bert_base_vanilla.py:tiny --workdir=runs/bert_base_vanilla_tiny
    python eval.py --config=configs/bert_base_vanilla.py:tiny --workdir=runs/bert_base_vanilla_tiny
"""

from configs import common


def get_config(arg=None):
    return common.bert_mlm("vanilla", arg)
