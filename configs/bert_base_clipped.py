"""BERT-base MLM pretraining with clipped softmax (Quantizable Transformers).

Full recipe (GPUs; REFERENCE.md §1):

    python train.py --config=configs/bert_base_clipped.py --workdir=runs/bert_base_clipped
    python eval.py --config=configs/bert_base_clipped.py --workdir=runs/bert_base_clipped

Expected (paper, Table 2): FP ppl 4.39, max inf norm 21.5, avg kurtosis 80, W8A8 ppl 4.52.

Offline on a 2-core CPU in a few minutes (tiny model, embedded / local data):

    python train.py --config=configs/bert_base_clipped.py:tiny --workdir=runs/bert_base_clipped_tiny
    python eval.py --config=configs/bert_base_clipped.py:tiny --workdir=runs/bert_base_clipped_tiny
"""

from configs import common


def get_config(arg=None):
    return common.bert_mlm("clipped", arg)
