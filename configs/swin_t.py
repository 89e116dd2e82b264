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

import ml_collections

from configs import common, qv_common


def swin_image(tiny: bool) -> ml_collections.ConfigDict:
    """Swin's own FP recipe on ImageNet-1K (Liu et al. 2021): 300 epochs, batch 1024, AdamW lr
    1e-3, 20 warmup epochs, cosine, weight decay 0.05 (not on norms, biases and the relative
    position tables), gradient clipping 5.0, drop path 0.2, DeiT's augmentation without
    repeated augmentation. ``tiny``: Swin-tiny on MNIST (1200 steps)."""
    c = common.vit_image("vanilla", "tiny" if tiny else None)
    c.model.update(name="swin-t", drop_path=0.2)
    epoch = qv_common.IMAGENET // 1024
    c.data.update(repeated_aug=1)
    c.optim.update(warmup_steps=20 * epoch, clip_norm=5.0, no_decay=())
    if tiny:
        c.model.update(
            name="swin-tiny",
            drop_path=0.0,
            image_size=28,
            patch_size=2,
            num_channels=1,
            num_labels=10,
        )
        c.optim.update(warmup_steps=100)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Swin FP training (``arg`` ``FP``) or QAT at ``W4A4`` (default) / ``W3A3`` / ``W2A2``;
    ``,tiny``: Swin-tiny on MNIST, QAT from the workdir of ``swin_t.py:FP,tiny``."""
    bits, variant = common.parse_arg(arg, "swin_t", (*qv_common.QV_BITS, "FP"), combined=True)
    tiny = variant == "tiny"
    c = swin_image(tiny)
    if bits == "FP":
        if tiny:
            c.data.update(holdout=3000, max_eval_batches=None)
        return common.overridable(c)
    c.model.drop_path = 0.0 if tiny else 0.1
    c.optim.update(clip_norm=0.0)
    return qv_common.qv_qat(c, bits, tiny, "runs/swin_t_fp_tiny")
