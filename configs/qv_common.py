"""Quantization Variation's recipes (docs/methods.md §3): DeiT and Swin QAT at W4A4 / W3A3 / W2A2,
Swin's full-precision run they start from, and binary BERT on GLUE.

Each ``arg`` is ``<bits>[,tiny]``; ``tiny`` runs offline on a 2-core CPU (MNIST or SST-2 from
``../shared/data``), starting from the FP run named in the config file's docstring.
"""

from __future__ import annotations

import ml_collections

from configs.common import bert_glue, check_arg, overridable, vit_image
from qtx.errors import UserError

QV_BITS = ("W4A4", "W3A3", "W2A2")
IMAGENET = 1_281_167


def parse_arg(arg: str | None, name: str, allowed: tuple[str, ...]) -> tuple[str, bool]:
    """``"W2A2,tiny"`` -> ``("W2A2", True)``; the first of ``allowed`` is the default."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    if (
        any(p not in (*allowed, "tiny") for p in parts)
        or len(parts) > 2
        or len(set(parts)) < len(parts)
    ):
        raise UserError(
            f"config arg {arg!r} of {name} is invalid; allowed: one of {', '.join(allowed)}, "
            f"optionally followed by ',tiny' (e.g. '{allowed[-1]},tiny')."
        )
    return next((p for p in parts if p in allowed), allowed[0]), "tiny" in parts


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
    bits, tiny = parse_arg(arg, f"deit_{size[-1]}", QV_BITS)
    c = vit_image("vanilla", "tiny" if tiny else None, size=size)
    c.model.drop_path = 0.0 if tiny else 0.1
    return qv_qat(c, bits, tiny, "runs/vit_s16_vanilla_tiny")


def swin_image(arg: str | None, size: str = "swin-t") -> ml_collections.ConfigDict:
    """Swin's own FP recipe on ImageNet-1K (Liu et al. 2021): 300 epochs, batch 1024, AdamW lr
    1e-3, 20 warmup epochs, cosine, weight decay 0.05 (not on norms, biases and the relative
    position tables), gradient clipping 5.0, drop path 0.2, DeiT's augmentation without
    repeated augmentation. ``tiny``: Swin-tiny on MNIST (1200 steps)."""
    check_arg(arg, ("tiny",), size.replace("-", "_"))
    c = vit_image("vanilla", arg)
    c.model.update(name=size, drop_path=0.2)
    epoch = IMAGENET // 1024
    c.data.update(repeated_aug=1)
    c.optim.update(warmup_steps=20 * epoch, clip_norm=5.0, no_decay=())
    if arg == "tiny":
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


def swin_qv(size: str, arg: str | None) -> ml_collections.ConfigDict:
    """Swin FP training (``arg`` ``FP``) or QAT at ``W4A4`` (default) / ``W3A3`` / ``W2A2``;
    ``,tiny``: Swin-tiny on MNIST, QAT from the workdir of ``<size>.py:FP,tiny``."""
    name = size.replace("-", "_")
    bits, tiny = parse_arg(arg, name, QV_BITS + ("FP",))
    c = swin_image("tiny" if tiny else None, size)
    if bits == "FP":
        if tiny:
            c.data.update(holdout=3000, max_eval_batches=None)
        return overridable(c)
    c.model.drop_path = 0.0 if tiny else 0.1
    c.optim.update(clip_norm=0.0)
    return qv_qat(c, bits, tiny, f"runs/{name}_fp_tiny")


def bert_binary(arg: str | None) -> ml_collections.ConfigDict:
    """Binary BERT on GLUE (``arg``: the task, default sst2, or ``tiny``): every encoder weight
    and matmul input ``sign(x) * mean|x|`` (preset ``binary``: the attention probabilities,
    embeddings and classifier stay at 8 bits), QAT from the FP fine-tuned model with soft
    cross-entropy distillation from it and no hard labels. ``tiny``: MiniLM on SST-2 from the
    FP run of ``bert_base_glue.py:tiny`` (``runs/glue_tiny``)."""
    c = bert_glue(arg)
    tiny = arg == "tiny"
    c.quant.update(preset="binary", bits="W1A1", mode="learn")
    c.train.update(distill=1.0, distill_loss="soft_ce", task_loss_weight=0.0, calib_batches=1)
    c.eval.update(setups=(), figures=False)
    c.optim.update(lr=1e-4, warmup_steps=0, schedule="cosine")
    c.init_from = "runs/glue_tiny" if tiny else ""
    if tiny:
        c.optim.update(lr=2e-4)
        c.train.update(steps=300, log_every=50, checkpoint_every=300)
    return c
