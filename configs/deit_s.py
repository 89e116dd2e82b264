"""Quantization Variation: QAT of DeiT-S at W4A4 / W3A3 / W2A2 on ImageNet-1K.

Full recipe (GPUs; docs/methods.md §3), from the FP DeiT-S checkpoint (a local Hugging Face
directory such as a download of facebook/deit-small-patch16-224, or a qtx workdir)::

    python train.py --config=configs/deit_s.py:W2A2 --workdir=runs/deit_s_w2a2 \\
        --config.init_from=/path/to/deit-checkpoint
    python eval.py  --config=configs/deit_s.py:W2A2 --workdir=runs/deit_s_w2a2

Module-dependent LSQ (``qv_lsq``), soft cross-entropy distillation from the FP model over 4
random-resized crops per image, OBR and oscillation tracking; 150 epochs counted FKD-style at
batch 1024 crops. ``--config.train.teacher=DIR`` distills from another (stronger) model.

Expected: the paper reports DeiT-T (FP 73.75, W4A4 74.71, W3A3 71.22, W2A2 59.73 top-1),
SReT-T and Swin-T, not DeiT-S; the same recipe applies.

Where it differs from the paper: the teacher is online (the reference reads precomputed
top-5 soft labels of a RegNetY teacher for stored crops, FKD); by default it is the FP model.

Offline on a 2-core CPU (ViT-tiny on MNIST, from the FP run of vit_s16_vanilla.py:tiny;
3000 held-out test images)::

    python train.py --config=configs/vit_s16_vanilla.py:tiny --workdir=runs/vit_s16_vanilla_tiny \\
        --config.data.holdout=3000
    python train.py --config=configs/deit_s.py:W2A2,tiny --workdir=runs/deit_s_w2a2_tiny
"""

from configs import qv_common


def get_config(arg=None):
    return qv_common.deit_qv("deit-s", arg)
