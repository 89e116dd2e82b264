"""OPT-125m causal-LM pretraining with clipped softmax (Quantizable Transformers).

Full recipe (GPUs; docs/methods.md §1):

    python train.py --config=configs/opt125m_clipped.py --workdir=runs/opt125m_clipped
    python eval.py --config=configs/opt125m_clipped.py --workdir=runs/opt125m_clipped

Expected (paper, Table 2): FP ppl 16.29, max inf norm 63.2, avg kurtosis 19728, W8A8 ppl 37.20.

Where it differs from the paper (docs/recipes.md): bfloat16 matmuls instead of fp16 AMP
(parameters, LayerNorms, the residual stream and quantization stay float32); the corpus is
wiki40b alone unless BookCorpus text files are given (--config.data.text_files=...), which
are then mixed in as in the paper; the expected numbers assume BookCorpus + Wikipedia.

Offline on a 2-core CPU in a few minutes (tiny model, embedded / local data):

    python train.py --config=configs/opt125m_clipped.py:tiny --workdir=runs/opt125m_clipped_tiny
    python eval.py --config=configs/opt125m_clipped.py:tiny --workdir=runs/opt125m_clipped_tiny
"""

from configs import common


def get_config(arg=None):
    return common.opt_clm("clipped", arg)
