"""The post-training methods after gamma migration on a GLUE-fine-tuned BERT (docs/methods.md §5).

Fine-tunes exactly as ``configs/bert_glue_os.py`` (``arg`` = the GLUE task, ``tiny`` or
``minilm``; the same checkpoint serves both configs), then ``eval.py`` calibrates the
FasterTransformer placement at W-E-A 8-8-8, 6-6-6 and 4-4-4 on 256 training samples with
MinMax and Outlier Suppression (the reference columns), SmoothQuant (alpha 0.5, and alpha
searched per layer on the quantized output error), Outlier Suppression+ (shift and scale),
GPTQ on the weights, and the combinations OS+ with token-wise clipping and OS+ with GPTQ:

    python train.py --config=configs/bert_glue_ptq.py:sst2 \\
        --config.init_from=/ckpt/bert-base-uncased --workdir=runs/ptq_sst2
    python eval.py  --config=configs/bert_glue_ptq.py:sst2 --workdir=runs/ptq_sst2

Expected, from the papers (different models and settings; none reports this exact table):
Outlier Suppression+ at or above Outlier Suppression at 6-6-6 and 4-4-4, SmoothQuant above
MinMax, GPTQ above round-to-nearest for 4-bit weights. SmoothQuant's own W8A8 results:
OPT-13B LAMBADA 0.786 FP16, 0.048 naive W8A8, 0.793 SmoothQuant; Llama-2-7B WikiText-2
perplexity 5.823 / 5.931 / 5.856 (the decoder recipe is ``configs/llama_ptq.py``).

Offline on a 2-core CPU, the pretrained MiniLM on SST-2. ``:tiny`` is bert_base_glue's short
fine-tuning and the 6-6-6 row with five methods and small searches (about 8 min):

    python train.py --config=configs/bert_glue_ptq.py:tiny --workdir=runs/ptq_tiny
    python eval.py  --config=configs/bert_glue_ptq.py:tiny --workdir=runs/ptq_tiny

``:minilm`` is the README's table (``bench/ptq_sst2.py`` runs it, with the W4A8 and W4A16
cells, and writes ``bench/results/ptq_sst2.json``).
"""

import ml_collections

from configs import bert_glue_os

PTQ_TABLE = (
    "minmax",
    "outlier_suppression",
    "smoothquant",
    "smoothquant_search",
    "os_plus",
    "gptq",
    "os_plus+token_wise_clipping",
    "os_plus+gptq",
)
TINY_METHODS = ("minmax", "smoothquant", "os_plus", "gptq", "os_plus+token_wise_clipping")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``configs/bert_glue_os.py:<arg>`` evaluated with the methods after gamma migration."""
    c = bert_glue_os.glue_ptq(arg, "bert_glue_ptq")
    c.eval.ptq_methods = TINY_METHODS if arg == "tiny" else PTQ_TABLE
    return c
