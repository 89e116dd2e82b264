"""Outlier Suppression's quantization-aware training of a GLUE BERT at W-E-A 4-4-4.

The paper's method: gamma migration (``config.model.gamma_migrated``), LSQ+ quantizers in the
FasterTransformer placement (``os_fastertransformer`` with ``learn='lsq+'``) whose activation
ranges start from the coarse token-wise clipping stage (``config.train.qat_init``), weights
and ranges trained jointly; ``--config.train.distill=1.0`` adds distillation from the
full-precision model. Start from the FP fine-tuned model of ``configs/bert_glue_os.py``:

    python train.py --config=configs/bert_glue_os_qat.py:sst2 \\
        --config.init_from=runs/os_sst2 --workdir=runs/os_qat_sst2 --config.train.distill=1.0
    python eval.py  --config=configs/bert_glue_os_qat.py:sst2 --workdir=runs/os_qat_sst2

The LSQ+ baseline: ``--config.model.gamma_migrated=False --config.train.qat_init=calibrate``.

Expected (paper, BERT-base GLUE average at 4-4-4): LSQ+ 71.49, the method 81.13, with
distillation 83.56 (FP 83.83). ``bench/qat_sst2.py`` measures the three on the real MiniLM
(SST-2), in the README's "Low-bit QAT of a real pretrained BERT".

Offline on a 2-core CPU, MiniLM on SST-2 (``init_from`` defaults to the pretrained MiniLM;
give the fine-tuned ``runs/os_minilm`` of ``configs/bert_glue_os.py:minilm`` to start as the
paper does, which distillation needs):

    python train.py --config=configs/bert_glue_os_qat.py:tiny --workdir=runs/os_qat_tiny \\
        --config.init_from=runs/os_minilm --config.train.distill=1.0
    python eval.py  --config=configs/bert_glue_os_qat.py:tiny --workdir=runs/os_qat_tiny

Where it differs from the paper: the QAT learning rate and steps are ours (the paper's QAT
code is not released); distillation is the temperature-scaled KL on the logits.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Outlier Suppression's QAT at W-E-A 4-4-4 on GLUE (``arg``: the GLUE task, default sst2,
    or ``tiny``): gamma migration, LSQ+ quantizers whose activation ranges start from the
    coarse token-wise clipping stage, weights and ranges trained jointly."""
    _, variant = common.parse_arg(arg, "bert_glue_os_qat", common.GLUE_TASKS)
    c = common.bert_glue(arg, config="bert_glue_os_qat")
    c.model.gamma_migrated = True
    c.quant.update(preset="os_fastertransformer", bits="W4A4E4", mode="learn")
    c.quant.options = {"learn": "lsq+"}
    c.train.update(qat_init="token_wise_clipping", calib_batches=8, calib_batch_size=32)
    c.eval.update(setups=(), figures=False)
    if variant == "tiny":
        c.data.update(batch_size=32)
        c.optim.update(lr=1e-4, warmup_steps=30)
        c.train.update(steps=300, log_every=50, checkpoint_every=300)
    return c
