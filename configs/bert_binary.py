"""Binary BERT on GLUE (Quantization Variation's binary mode, docs/methods.md §3).

Every encoder weight ``sign(W) mean|W|`` and every matmul input ``sign(x) mean|x|`` (preset
``binary``; attention probabilities, embeddings and the classifier stay at 8 bits), trained
from the FP fine-tuned model with soft cross-entropy distillation from it. ``arg``: the GLUE
task (sst2, mnli, qnli, qqp, mrpc, rte, cola, stsb) or ``tiny``::

    python train.py --config=configs/bert_base_glue.py:sst2 \\
        --config.init_from=/ckpt/bert-base-uncased --workdir=runs/glue_sst2
    python train.py --config=configs/bert_binary.py:sst2 --workdir=runs/binary_sst2 \\
        --config.init_from=runs/glue_sst2

Expected (paper): binary BERT-base GLUE average 74.9 (unconfirmed).

Offline on a 2-core CPU (MiniLM on SST-2, from the FP run of ``bert_base_glue.py:tiny``)::

    python train.py --config=configs/bert_base_glue.py:tiny --workdir=runs/glue_tiny
    python train.py --config=configs/bert_binary.py:tiny --workdir=runs/binary_tiny
"""

from configs import qv_common


def get_config(arg=None):
    return qv_common.bert_binary(arg)
