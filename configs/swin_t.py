"""Quantization Variation on Swin-T: the FP run and QAT at W4A4 / W3A3 / W2A2 on ImageNet-1K.

Full recipe (GPUs; docs/methods.md §3), from the FP Swin-T checkpoint (a local Hugging Face
directory such as a download of microsoft/swin-tiny-patch4-window7-224, or a qtx workdir)::

    python train.py --config=configs/swin_t.py:W2A2 --workdir=runs/swin_t_w2a2 \\
        --config.init_from=/path/to/swin-checkpoint
    python eval.py  --config=configs/swin_t.py:W2A2 --workdir=runs/swin_t_w2a2

``arg``: ``W4A4`` (default), ``W3A3``, ``W2A2``, or ``FP`` (Swin's own 300-epoch recipe);
``,tiny`` for the offline variant. QAT: module-dependent LSQ (``qv_lsq``, which also
quantizes the patch-merging layers), soft cross-entropy distillation from the FP model over 4
random-resized crops per image, OBR and oscillation tracking; the relative position bias
stays in full precision.

Expected (paper, ImageNet top-1): Swin-T FP 81.0, W4A4 82.42, W3A3 81.37, W2A2 77.66.

Offline on a 2-core CPU (Swin-tiny, windows of 4 on 14 x 14 patches, on MNIST; 3000
held-out test images)::

    python train.py --config=configs/swin_t.py:FP,tiny --workdir=runs/swin_t_fp_tiny
    python train.py --config=configs/swin_t.py:W2A2,tiny --workdir=runs/swin_t_w2a2_tiny
"""

from configs import qv_common


def get_config(arg=None):
    return qv_common.swin_qv("swin-t", arg)
