"""OPT-125m causal-LM pretraining with vanilla softmax (Quantizable Transformers).

Full recipe (GPUs; docs/methods.md §1):

    python train.py --config=configs/opt125m_vanilla.py --workdir=runs/opt125m_vanilla
    python eval.py --config=configs/opt125m_vanilla.py --workdir=runs/opt125m_vanilla

Expected (paper, Table 2): FP ppl 15.84, max inf norm 340, avg kurtosis 1778, W8A8 ppl 21.18.

Where it differs from the paper (docs/recipes.md): bfloat16 matmuls instead of fp16 AMP
(parameters, LayerNorms, the residual stream and quantization stay float32); the corpus is
wiki40b alone unless BookCorpus text files are given (--config.data.text_files=...), which
are then mixed in as in the paper; the expected numbers assume BookCorpus + Wikipedia.

Offline on a 2-core CPU in a few minutes (tiny model, embedded / local data):

    python train.py --config=configs/opt125m_vanilla.py:tiny --workdir=runs/opt125m_vanilla_tiny
    python eval.py --config=configs/opt125m_vanilla.py:tiny --workdir=runs/opt125m_vanilla_tiny
"""

from configs import common


def get_config(arg=None):
    return common.opt_clm("vanilla", arg)
