"""Starting a run from pretrained weights (``config.init_from``): a qtx workdir, an HF dir, or
an original-format ViT / DeiT / Swin checkpoint (timm, the papers' repositories; a file or a
timm hub directory) whose fused qkv is split (see ``qtx.hf.original``).

The pretrained tensors are copied into the freshly initialised parameter tree of the
configured model, which may use another attention variant (clipped softmax, gates in
fine-tuning mode) or quantization plan. Only parameters the new setup adds may stay fresh:
gates (``attn/gate/``), quantizer steps and offsets, and a classification head that the
checkpoint lacks. Every other model parameter without a pretrained value, every pretrained
tensor with no place in the model (outside the heads the task drops) and every shape
mismatch is an error naming the keys: nothing is silently re-initialised.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
from absl import logging
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx import hf
from qtx.errors import UserError
from qtx.hf import original
from qtx.models import ModelConfig
from qtx.models.config import model_config_from_dict
from qtx.quant import QUANTIZER_PARAM_PATTERN
from qtx.train.checkpoint import Checkpointer

NEW_OK = (
    r"(^|/)attn/gate/",
    QUANTIZER_PARAM_PATTERN,
    r"^(classifier|dist_classifier)/",
    r"^pooler/",
)
DROPPABLE = (r"^(mlm_head|lm_head|classifier|dist_classifier|pooler)/",)


def merge_pretrained(fresh, loaded, new_ok=NEW_OK, droppable=DROPPABLE):
    """Copies ``loaded`` into ``fresh`` (both param trees) under the rules above."""
    f = {"/".join(k): v for k, v in flatten_dict(fresh).items()}
    g = {"/".join(k): v for k, v in flatten_dict(loaded).items()}
    missing = [k for k in f if k not in g and not any(re.search(p, k) for p in new_ok)]
    unused = [k for k in g if k not in f and not any(re.search(p, k) for p in droppable)]
    shapes = [
        f"{k} {np.shape(g[k])} vs {np.shape(f[k])}"
        for k in f
        if k in g and np.shape(g[k]) != np.shape(f[k])
    ]
    if missing or unused or shapes:
        raise UserError(
            "config.init_from does not fit the configured model: "
            + "; ".join(
                s
                for s in (
                    f"no pretrained value for {missing[:8]}" if missing else "",
                    f"pretrained tensors with no place in the model {unused[:8]}" if unused else "",
                    f"shape mismatches (pretrained vs model) {shapes[:8]}" if shapes else "",
                )
                if s
            )
            + "."
        )
    fresh_keys = sorted(k for k in f if k not in g)
    if fresh_keys:
        logging.info(
            "init_from: %d new parameter(s) start fresh: %s",
            len(fresh_keys),
            ", ".join(fresh_keys[:12]),
        )
    dropped = sorted(k for k in g if k not in f)
    if dropped:
        logging.info("init_from: dropped %d head tensor(s): %s", len(dropped), ", ".join(dropped))
    out = {
        tuple(k.split("/")): (np.asarray(g[k], np.asarray(v).dtype) if k in g else v)
        for k, v in f.items()
    }
    return unflatten_dict(out)


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, n)) for n in ("model.safetensors", "pytorch_model.bin")
    )


def load_pretrained(path: str, cfg: ModelConfig):
    """Pretrained parameters (a tree of numpy arrays) from a qtx workdir, an HF dir or an
    original-format checkpoint."""

    if os.path.exists(path) and original.is_original(path):
        return original.pretrained_params(path, cfg)
    if not os.path.isdir(path):
        raise UserError(
            f"config.init_from={path!r} is not a directory or checkpoint file; allowed: a qtx "
            "workdir (with checkpoints/), a local Hugging Face checkpoint directory, or an "
            f"original-format ViT/DeiT/Swin checkpoint ({', '.join(original.SUFFIXES)})."
        )
    if is_hf_dir(path):
        return hf.pretrained_params(path, cfg)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        ck = Checkpointer(path, async_save=False)

        def stored(step):  # the tree as stored, in float32
            shapes = ck.stored_params_shapes(step)
            return unflatten_dict(
                {
                    tuple(k.split("/")): jax.ShapeDtypeStruct(s, np.float32)
                    for k, s in shapes.items()
                }
            )

        restored = ck.restore_newest(stored, move_aside=False)  # another run's workdir
        ck.close()
        if restored is None:
            raise UserError(f"config.init_from={path!r} has no checkpoint in checkpoints/.")
        return jax.tree.map(np.asarray, restored.tree)
    raise UserError(
        f"config.init_from={path!r} holds neither checkpoints/ (qtx) nor "
        "config.json + model.safetensors / pytorch_model.bin (Hugging Face)."
    )


def source_model_field(path: str, field: str):
    """``model.<field>`` of the qtx workdir ``path`` (its ``config.json``), e.g. whether
    ``config.init_from`` was trained reparametrised; None for Hugging Face checkpoints (they
    hold original models) and unreadable configs."""
    if is_hf_dir(path):
        return None
    try:
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    return ((raw.get("model") or {}) if isinstance(raw, dict) else {}).get(field)


def teacher_config(path: str, student: ModelConfig) -> ModelConfig:
    """The model of a distillation teacher: a qtx workdir (its ``config.json``) or a local HF
    checkpoint directory (with the student's head). Any size, built in full precision."""
    if not os.path.isdir(path):
        raise UserError(
            f"config.train.teacher={path!r} is not a directory; allowed: a qtx workdir or a "
            "local Hugging Face checkpoint directory."
        )
    if is_hf_dir(path):
        return hf.config_from_hf(hf.read_config(path), head=student.head)

    try:
        with open(os.path.join(path, "config.json")) as f:
            return model_config_from_dict(json.load(f)["model"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"config.train.teacher={path!r} has no readable config.json with a 'model' "
            "section; allowed: the workdir of a qtx training run."
        ) from None


def check_teacher(student_logits, teacher_logits, path: str) -> None:
    """Fails unless the teacher's logits (shapes) match the student's: same task and classes."""
    if tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise UserError(
            f"config.train.teacher={path!r} gives logits of shape {tuple(teacher_logits.shape)} "
            f"but the student's are {tuple(student_logits.shape)}; allowed: a teacher of the "
            "same task with the same classes (or vocabulary)."
        )
