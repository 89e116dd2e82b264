"""OPT-350M causal-LM pretraining with vanilla softmax (Quantizable Transformers).

Full recipe (GPUs; docs/methods.md §1):

    python train.py --config=configs/opt350m_vanilla.py --workdir=runs/opt350m_vanilla
    python eval.py --config=configs/opt350m_vanilla.py --workdir=runs/opt350m_vanilla

Expected (paper): FP ppl 13.19, max inf norm 253, avg kurtosis 2689, W8A8 ppl 37.52 [unconfirmed].

Where it differs from the paper (docs/recipes.md): the architecture is the reference code's
(pre-LN, 768-wide embedding projection; not the HF checkpoint's); bfloat16 matmuls instead
of fp16 AMP (parameters, LayerNorms, the residual stream and quantization stay float32);
micro-batches sized for JAX (same global batch); the corpus is wiki40b alone unless
BookCorpus text files are given (--config.data.text_files=...), then mixed in as in the
paper; the expected numbers assume BookCorpus + Wikipedia.

Offline on a 2-core CPU in a few minutes (tiny model, embedded data):

    python train.py --config=configs/opt350m_vanilla.py:tiny --workdir=runs/opt350m_vanilla_tiny
"""

from configs import common


def get_config(arg=None):
    return common.opt_clm("vanilla", arg, size="opt-350m")
