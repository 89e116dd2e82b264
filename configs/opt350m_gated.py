"""OPT-350M causal-LM pretraining with gated attention (Quantizable Transformers).

Full recipe (GPUs; docs/methods.md §1):

    python train.py --config=configs/opt350m_gated.py --workdir=runs/opt350m_gated
    python eval.py --config=configs/opt350m_gated.py --workdir=runs/opt350m_gated

Expected (paper): FP ppl 13.01, max inf norm 65.4, avg kurtosis 261, W8A8 ppl 14.42 [unconfirmed].

Where it differs from the paper (docs/recipes.md): the architecture is the reference code's
(pre-LN, 768-wide embedding projection; not the HF checkpoint's); bfloat16 matmuls instead
of fp16 AMP (parameters, LayerNorms, the residual stream and quantization stay float32);
micro-batches sized for JAX (same global batch); the corpus is wiki40b alone unless
BookCorpus text files are given (--config.data.text_files=...), then mixed in as in the
paper; the expected numbers assume BookCorpus + Wikipedia.

Offline on a 2-core CPU in a few minutes (tiny model, embedded data):

    python train.py --config=configs/opt350m_gated.py:tiny --workdir=runs/opt350m_gated_tiny
"""

from configs import common


def get_config(arg=None):
    return common.opt_clm("gated", arg, size="opt-350m")
