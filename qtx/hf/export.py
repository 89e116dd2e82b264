"""Exporting qtx models as Hugging Face checkpoints (``save_pretrained`` layout).

``export(path, cfg, variables)`` writes ``config.json`` (with ``model_type`` and
``architectures``) and ``model.safetensors`` in torch layout, loadable with
``transformers.AutoModel*.from_pretrained(path)``. Only vanilla architectures can be
exported: attention variants (gates, clipped / off-by-one softmax), fused QKV and other
settings HF cannot represent raise ValueError; qtx's own (orbax) checkpoints keep them.

Parts HF has and qtx lacks (a BERT/ViT pooler of a model without one, BERT's next-sentence
head) are left out of the file; ``from_pretrained`` initialises them and says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from flax.traverse_util import flatten_dict

from qtx.errors import UserError
from qtx.hf import io
from qtx.hf.common import ACTIVATIONS_TO_HF, to_hf
from qtx.hf.load import CONVERTERS
from qtx.models.config import ModelConfig


def export_problems(cfg: ModelConfig) -> list[str]:
    """Settings of ``cfg`` a HF checkpoint cannot represent (empty when exportable)."""
    a = cfg.attention
    out = []
    if a.softmax != "vanilla":
        out.append(f"config.model.attention.softmax={a.softmax!r}")
    if a.gate != "none":
        out.append(f"config.model.attention.gate={a.gate!r}")
    if cfg.fused_qkv:
        out.append("config.model.fused_qkv=True")
    if cfg.activation not in ACTIVATIONS_TO_HF:
        out.append(f"config.model.activation={cfg.activation!r}")
    if cfg.gamma_migrated:  # non-scaling LayerNorms: export the parameters before migration
        out.append("config.model.gamma_migrated=True")
    return out + CONVERTERS[cfg.family].export_problems(cfg)


def state_dict_to_hf(cfg: ModelConfig, params: Mapping) -> dict[str, np.ndarray]:
    """HF state dict (torch layout, full keys of ``architecture(cfg)``) of ``params``."""
    module = CONVERTERS[cfg.family]
    flat = flatten_dict(dict(params))
    entries = module.layout(cfg)
    known = {e.ours for e in entries}
    missing = sorted("/".join(e.ours) for e in entries if e.ours not in flat)
    extra = sorted("/".join(p) for p in flat if p not in known)
    if missing or extra:
        raise UserError(
            f"params do not match the vanilla {cfg.family} model of this config: missing "
            f"{missing}, not exportable {extra} (quantizer or variant parameters have no HF "
            "equivalent; qtx's own orbax checkpoints keep them)."
        )
    prefix = module.base_prefix(cfg)
    return {
        ("" if e.head else prefix) + e.hf: to_hf(e.kind, np.asarray(flat[e.ours])) for e in entries
    }


def export(path, cfg: ModelConfig, variables: Mapping) -> str:
    """Writes ``config.json`` + ``model.safetensors`` of ``cfg`` / ``variables`` to ``path``.

    Raises:
      ValueError: naming the ``config.model.*`` settings HF cannot represent.
    """
    problems = export_problems(cfg)
    if problems:
        raise UserError(
            f"cannot export to Hugging Face: {', '.join(problems)} has no equivalent in HF's "
            f"{CONVERTERS[cfg.family].architecture(cfg)}; use qtx's own (orbax) checkpoints, "
            "which keep these settings and their parameters."
        )
    params = variables["params"] if "params" in variables else variables
    tensors = state_dict_to_hf(cfg, params)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    CONVERTERS[cfg.family].hf_config(cfg).save_pretrained(path)
    io.write_safetensors(os.path.join(path, io.SAFETENSORS), tensors)
    return path
