"""BERT-base MLM pretraining with gated attention (Quantizable Transformers).

Full recipe (GPUs; docs/methods.md §1):

    python train.py --config=configs/bert_base_gated.py --workdir=runs/bert_base_gated
    python eval.py --config=configs/bert_base_gated.py --workdir=runs/bert_base_gated

Expected (paper, Table 2): FP ppl 4.45, max inf norm 39.2, avg kurtosis 201, W8A8 ppl 4.65.

Where it differs from the paper (docs/recipes.md): bfloat16 matmuls instead of fp16 AMP
(parameters, LayerNorms, the residual stream and quantization stay float32); the corpus is
wiki40b alone unless BookCorpus text files are given (--config.data.text_files=...), which
are then mixed in as in the paper; the expected numbers assume BookCorpus + Wikipedia.

Offline on a 2-core CPU in a few minutes (tiny model, embedded / local data):

    python train.py --config=configs/bert_base_gated.py:tiny --workdir=runs/bert_base_gated_tiny
    python eval.py --config=configs/bert_base_gated.py:tiny --workdir=runs/bert_base_gated_tiny
"""

from configs import common


def get_config(arg=None):
    return common.bert_mlm("gated", arg)
