"""Quantization Variation's QAT recipe (docs/methods.md §3), shared by the DeiT configs
(``deit_t``, ``deit_s``, ``deit_b``) and ``swin_t``, at W4A4 / W3A3 / W2A2.

Each ``arg`` is ``<bits>[,tiny]`` (:func:`configs.common.parse_arg` with ``combined``);
``tiny`` runs offline on a 2-core CPU (MNIST from ``../shared/data``), starting from the FP
run named in the config file's docstring.
"""

from __future__ import annotations

import ml_collections

from configs.common import overridable, parse_arg, vit_image

QV_BITS = ("W4A4", "W3A3", "W2A2")
IMAGENET = 1_281_167


def qv_qat(c: ml_collections.ConfigDict, bits: str, tiny: bool, fp_workdir: str):
    """The paper's QAT recipe on the FP image config ``c``: module-dependent LSQ
    (``qv_lsq``); AdamW lr 5e-4, no warmup, cosine to 0, weight decay 1e-4; 150 epochs counted
    FKD-style with batch 1024 = 256 images x 4 random-resized crops (``repeated_aug=4``); soft
    cross-entropy distillation from the teacher (default: the FP model), no hard labels; OBR
    to lambda 0.01 from 25 % of training; oscillation tracking. Tiny: 600 steps on MNIST from
    ``fp_workdir``, 3000 held-out test images."""
    c.quant.update(preset="qv_lsq", bits=bits, mode="learn")
    c.data.update(
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        label_smoothing=0.0,
        random_erase=0.0,
        randaugment="",
        repeated_aug=4,
    )
    c.optim.update(
        lr=5e-4, warmup_steps=0, schedule="cosine", weight_decay=1e-4, decay_ln_gamma=False
    )
    c.train.update(
        distill=1.0,
        distill_loss="soft_ce",
        task_loss_weight=0.0,
        obr=0.01,
        obr_start=0.25,
        track_oscillation=True,
        calib_batches=1,
    )
    c.eval.update(setups=())
    if tiny:
        c.init_from = fp_workdir
        c.data.update(crop_scale=(0.5, 1.0), holdout=3000, max_eval_batches=None)
        c.train.update(steps=600, checkpoint_every=300)  # eval on all 3000 held-out images
    else:
        epoch = IMAGENET // 1024
        c.data.update(batch_size=1024)
        c.train.update(steps=150 * epoch, eval_every=5 * epoch, checkpoint_every=epoch)
    return overridable(c)


def deit_qv(size: str, arg: str | None) -> ml_collections.ConfigDict:
    """QAT of DeiT-{T,S,B} (``arg``: ``W4A4`` (default), ``W3A3`` or ``W2A2``, optionally
    ``,tiny``: ViT-tiny on MNIST from the FP run of ``vit_s16_vanilla.py:tiny``)."""
    bits, variant = parse_arg(arg, f"deit_{size[-1]}", QV_BITS, combined=True)
    tiny = variant == "tiny"
    c = vit_image("vanilla", variant, size=size)
    c.model.drop_path = 0.0 if tiny else 0.1
    return qv_qat(c, bits, tiny, "runs/vit_s16_vanilla_tiny")
