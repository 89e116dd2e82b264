"""ViT-S/16 ImageNet-1K training with gated attention (Quantizable Transformers).

Full recipe (GPUs; docs/methods.md §1):

    python train.py --config=configs/vit_s16_gated.py --workdir=runs/vit_s16_gated
    python eval.py --config=configs/vit_s16_gated.py --workdir=runs/vit_s16_gated

Expected (paper, Table 2): FP top-1 81.01 %, max inf norm 79.8, avg kurtosis 19.9, W8A8 79.82 %.

Where it differs from the paper (docs/recipes.md): bfloat16 matmuls instead of fp16 AMP
(parameters, LayerNorms, the residual stream and quantization stay float32); the ViT
clipped-softmax alpha and the gate's pi_init are not given by the paper (alpha 4, T 197;
pi_init 0.25 as OPT). The expected numbers assume ImageNet-1K with the DeiT recipe.

Offline on a 2-core CPU in a few minutes (tiny model, embedded / local data):

    python train.py --config=configs/vit_s16_gated.py:tiny --workdir=runs/vit_s16_gated_tiny
    python eval.py --config=configs/vit_s16_gated.py:tiny --workdir=runs/vit_s16_gated_tiny
"""

from configs import common


def get_config(arg=None):
    return common.vit_image("gated", arg)
