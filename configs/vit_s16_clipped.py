"""ViT-S/16 ImageNet-1K training with clipped softmax (Quantizable Transformers).

Full recipe (GPUs; docs/methods.md §1):

    python train.py --config=configs/vit_s16_clipped.py --workdir=runs/vit_s16_clipped
    python eval.py --config=configs/vit_s16_clipped.py --workdir=runs/vit_s16_clipped

Expected (paper, Table 2): FP top-1 80.89 %, max inf norm 73.7, avg kurtosis 22.9, W8A8 79.77 %.

Where it differs from the paper (docs/recipes.md): bfloat16 matmuls instead of fp16 AMP
(parameters, LayerNorms, the residual stream and quantization stay float32); the ViT
clipped-softmax alpha and the gate's pi_init are not given by the paper (alpha 4, T 197;
pi_init 0.25 as OPT). The expected numbers assume ImageNet-1K with the DeiT recipe.

Offline on a 2-core CPU in a few minutes (tiny model, embedded / local data):

    python train.py --config=configs/vit_s16_clipped.py:tiny --workdir=runs/vit_s16_clipped_tiny
    python eval.py --config=configs/vit_s16_clipped.py:tiny --workdir=runs/vit_s16_clipped_tiny
"""

from configs import common


def get_config(arg=None):
    return common.vit_image("clipped", arg)
