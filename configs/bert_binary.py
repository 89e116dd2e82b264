"""Binary BERT on GLUE (Quantization Variation's binary mode, docs/methods.md §3).

Every encoder weight ``sign(W) mean|W|`` and every matmul input ``sign(x) mean|x|`` except the
GELU output, binarised to ``{b, a + b}`` (unsigned 1-bit LSQ+; preset ``binary``; attention
probabilities, embeddings and the classifier stay at 8 bits), trained from the FP
fine-tuned model with soft cross-entropy distillation from it. ``arg``: the GLUE
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

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Binary BERT on GLUE (``arg``: the task, default sst2, or ``tiny``): every encoder weight
    and matmul input ``sign(x) * mean|x|``, the GELU output ``{b, a + b}`` (unsigned 1-bit
    LSQ+; preset ``binary``: the attention probabilities, embeddings and classifier stay at
    8 bits), QAT from the FP fine-tuned model with soft
    cross-entropy distillation from it and no hard labels. ``tiny``: MiniLM on SST-2 from the
    FP run of ``bert_base_glue.py:tiny`` (``runs/glue_tiny``)."""
    _, variant = common.parse_arg(arg, "bert_binary", common.GLUE_TASKS)
    tiny = variant == "tiny"
    c = common.bert_glue(arg, config="bert_binary")
    c.quant.update(preset="binary", bits="W1A1", mode="learn")
    c.train.update(distill=1.0, distill_loss="soft_ce", task_loss_weight=0.0, calib_batches=1)
    c.eval.update(setups=(), figures=False)
    c.optim.update(lr=1e-4, warmup_steps=0, schedule="cosine")
    c.init_from = "runs/glue_tiny" if tiny else ""
    if tiny:
        c.optim.update(lr=2e-4)
        c.train.update(steps=300, log_every=50, checkpoint_every=300)
    return c
