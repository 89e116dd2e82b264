"""OPT-1.3B causal-LM pretraining with vanilla softmax (Quantizable Transformers).

Full recipe (GPUs; docs/methods.md §1):

    python train.py --config=configs/opt1_3b_vanilla.py --workdir=runs/opt1_3b_vanilla
    python eval.py --config=configs/opt1_3b_vanilla.py --workdir=runs/opt1_3b_vanilla

Expected (paper): W8A8 ppl 989.6.

Where it differs from the paper (docs/recipes.md): the architecture is the reference code's
(pre-LN, 768-wide embedding projection; not the HF checkpoint's); bfloat16 matmuls instead
of fp16 AMP (parameters, LayerNorms, the residual stream and quantization stay float32);
micro-batches sized for JAX (same global batch); the corpus is wiki40b alone unless
BookCorpus text files are given (--config.data.text_files=...), then mixed in as in the
paper; the expected numbers assume BookCorpus + Wikipedia.

Offline on a 2-core CPU in a few minutes (tiny model, embedded data):

    python train.py --config=configs/opt1_3b_vanilla.py:tiny --workdir=runs/opt1_3b_vanilla_tiny
"""

from configs import common


def get_config(arg=None):
    return common.opt_clm("vanilla", arg, size="opt-1.3b")
