"""BERT-base MLM pretraining with gated attention (Quantizable Transformers).

Full recipe (GPUs; REFERENCE.md §1):

    python train.py --config=configs/bert_base_gated.py --workdir=runs/bert_base_gated
    python eval.py --config=configs/bert_base_gated.py --workdir=runs/bert_base_gated

Expected (paper, Table 2): FP ppl 4.45, max inf norm 39.2, avg kurtosis 201, W8A8 ppl 4.65.

Offline on a 2-core CPU in a few minutes (tiny model, embedded / local data):

    python train.py --config=configs/bert_base_gated.py:tiny --workdir=runs/bert_base_gated_tiny
    python eval.py --config=configs/bert_base_gated.py:tiny --workdir=runs/bert_base_gated_tiny
"""

from configs import common


def get_config(arg=None):
    return common.bert_mlm("gated", arg)
