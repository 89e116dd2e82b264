"""OPT-125m causal-LM pretraining with gated attention (Quantizable Transformers).

Full recipe (GPUs; docs/methods.md §1):

    python train.py --config=configs/opt125m_gated.py --workdir=runs/opt125m_gated
    python eval.py --config=configs/opt125m_gated.py --workdir=runs/opt125m_gated

Expected (paper, Table 2): FP ppl 15.55, max inf norm 8.7, avg kurtosis 18.9, W8A8 ppl 16.02.

Where it differs from the paper (docs/recipes.md): bfloat16 matmuls instead of fp16 AMP
(parameters, LayerNorms, the residual stream and quantization stay float32); the corpus is
wiki40b alone unless BookCorpus text files are given (--config.data.text_files=...), which
are then mixed in as in the paper; the expected numbers assume BookCorpus + Wikipedia.

Offline on a 2-core CPU in a few minutes (tiny model, embedded / local data):

    python train.py --config=configs/opt125m_gated.py:tiny --workdir=runs/opt125m_gated_tiny
    python eval.py --config=configs/opt125m_gated.py:tiny --workdir=runs/opt125m_gated_tiny
"""

from configs import common


def get_config(arg=None):
    return common.opt_clm("gated", arg)
