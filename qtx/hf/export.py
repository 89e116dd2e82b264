"""Exporting qtx models as Hugging Face checkpoints (``save_pretrained`` layout).

``export(path, cfg, variables)`` writes ``config.json`` (with ``model_type`` and
``architectures``) and ``model.safetensors`` in torch layout, loadable with
``transformers.AutoModel*.from_pretrained(path)``. Attention variants (gates, clipped /
off-by-one softmax) are written with qtx's PyTorch modeling code next to the weights
(:mod:`qtx.hf.variants`), loadable with ``trust_remote_code=True``. Fused QKV, gamma-migrated
LayerNorms and other settings HF cannot represent raise UserError; qtx's own (orbax)
checkpoints keep them.

Parts HF has and qtx lacks (a BERT/ViT pooler of a model without one, BERT's next-sentence
head) are left out of the file; ``from_pretrained`` initialises them and says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
from flax.traverse_util import flatten_dict

from qtx.errors import UserError
from qtx.hf import io, variants
from qtx.hf.common import ACTIVATIONS_TO_HF, to_hf
from qtx.hf.converter import converter
from qtx.hf.load import full_layout
from qtx.models.config import ModelConfig


def export_problems(cfg: ModelConfig) -> list[str]:
    """Settings of ``cfg`` a HF checkpoint cannot represent (empty when exportable)."""
    out = []
    if cfg.fused_qkv:
        out.append("config.model.fused_qkv=True")
    if cfg.activation not in ACTIVATIONS_TO_HF:
        out.append(f"config.model.activation={cfg.activation!r}")
    if cfg.gamma_migrated:  # non-scaling LayerNorms: export the parameters before migration
        out.append("config.model.gamma_migrated=True")
    if cfg.shortcut_affine:  # post-LN shortcuts with their own scale and shift (smoothing)
        out.append("config.model.shortcut_affine=True")
    return out + converter(cfg.family).export_problems(cfg)


def state_dict_to_hf(cfg: ModelConfig, params: Mapping) -> dict[str, np.ndarray]:
    """HF state dict (torch layout, full keys of ``architecture(cfg)``) of ``params``."""
    module = converter(cfg.family)
    flat = flatten_dict(dict(params))
    entries = full_layout(cfg)
    known = {e.ours for e in entries}
    missing = sorted("/".join(e.ours) for e in entries if e.ours not in flat)
    extra = sorted("/".join(p) for p in flat if p not in known)
    if missing or extra:
        raise UserError(
            f"params do not match the {cfg.family} model of this config: missing "
            f"{missing}, not exportable {extra} (quantizer or variant parameters have no HF "
            "equivalent; qtx's own orbax checkpoints keep them)."
        )
    prefix = module.base_prefix(cfg)
    sd = {e.hf: to_hf(e.kind, np.asarray(flat[e.ours])) for e in entries}
    if hasattr(module, "fuse"):  # tensors HF fuses (a q_proj holding the output gate)
        sd = module.fuse(sd, cfg, entries)
    head = {e.hf for e in entries if e.head}
    return {("" if k in head else prefix) + k: v for k, v in sd.items()}


def export(path, cfg: ModelConfig, variables: Mapping) -> str:
    """Writes ``config.json`` + ``model.safetensors`` of ``cfg`` / ``variables`` to ``path``.

    Raises:
      UserError: naming the ``config.model.*`` settings HF cannot represent.
    """
    problems = export_problems(cfg)
    if problems:
        raise UserError(
            f"cannot export to Hugging Face: {', '.join(problems)} has no equivalent in HF's "
            f"{converter(cfg.family).architecture(cfg)}; use qtx's own (orbax) checkpoints, "
            "which keep these settings and their parameters."
        )
    params = variables["params"] if "params" in variables else variables
    tensors = state_dict_to_hf(cfg, params)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    hf_config = converter(cfg.family).hf_config(cfg)
    if variants.is_variant(cfg):
        config = variants.remote_config(cfg, hf_config.to_dict())
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        variants.copy_remote_code(path)
    else:
        hf_config.save_pretrained(path)
    io.write_safetensors(os.path.join(path, io.SAFETENSORS), tensors)
    return path
