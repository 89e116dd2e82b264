"""Checkpoints in the original repositories' format (timm, facebookresearch/deit,
microsoft/Swin-Transformer): fused ``qkv`` projections split into q, k and v, strictly.

These files carry no config, so the architecture is the configured model's
(``config.model.name`` and overrides). A family's converter says whether it has such files
(``ORIGINAL_FORMAT``: ``convert_vit.original_layout``, ``convert_swin.original_layout``).
Mapping (timm key -> flax path)::

    ViT / DeiT: cls_token, dist_token, pos_embed          embed/cls, embed/dist, embed/position
                patch_embed.proj                          embed/patch
                blocks.i.norm1 / norm2                    layer_i/attn_ln / ffn_ln
                blocks.i.attn.qkv (3D, D) = [q; k; v]     layer_i/attn/{q,k,v}_proj (or qkv_proj
                                                          when config.model.fused_qkv)
                blocks.i.attn.proj                        layer_i/attn/o_proj
                blocks.i.mlp.fc1 / fc2                    layer_i/ffn/fc1 / fc2
                norm, head, head_dist                     final_ln, classifier, dist_classifier
    Swin:       patch_embed.proj / .norm                  embed/patch / embed/ln
                layers.s.blocks.j.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}
                layers.s.blocks.j.attn.relative_position_bias_table   stage_s/layer_j/rel_pos
                layers.s.downsample.{norm,reduction}      stage_s/merge/{ln,reduction}
                (timm >= 0.9: layers.{s+1}.downsample, head.fc)
                norm, head                                final_ln, classifier

Buffers (``relative_position_index``, ``attn_mask``) are checked or dropped; every other key
must map and every parameter must be present, else one error names them (the reference code
loads such files with ``strict=False`` and silently leaves q, k, v random).
"""

from __future__ import annotations

import os
import re

import numpy as np
from flax.traverse_util import unflatten_dict

from qtx.errors import UserError
from qtx.hf import io
from qtx.hf.common import OriginalEntry, OriginalFormat, to_hf, to_ours
from qtx.hf.converter import converter, converters
from qtx.models.config import ModelConfig

SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")
_WRAPPERS = ("model", "state_dict", "model_ema", "module")


def is_original(path: str) -> bool:
    """A checkpoint file, or a directory of timm's hub layout (``config.json`` with
    ``architecture`` and no ``model_type``, plus the weights)."""
    if os.path.isfile(path):
        return path.endswith(SUFFIXES)
    cfg = os.path.join(path, io.CONFIG)
    if not os.path.isfile(cfg):
        return False
    import json

    with open(cfg) as f:
        raw = json.load(f)
    return isinstance(raw, dict) and "architecture" in raw and "model_type" not in raw


def read(path: str) -> dict[str, np.ndarray]:
    """The state dict of a checkpoint file or timm hub directory, unwrapped from
    ``{"model": ...}`` and with a DDP ``module.`` prefix removed."""
    if os.path.isdir(path):
        for name in (io.SAFETENSORS, "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return read(os.path.join(path, name))
        raise UserError(f"{path!r} holds no model.safetensors or pytorch_model.bin.")
    if path.endswith(".safetensors"):
        sd = io.read_safetensors(path)
    elif path.endswith(".npz"):
        sd = dict(np.load(path))
    else:
        try:
            import torch
        except ImportError:
            raise UserError(
                f"reading {path!r} needs PyTorch (pip install torch); or convert it to safetensors."
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=True)
        while isinstance(obj, dict) and any(k in obj for k in _WRAPPERS):
            obj = obj[next(k for k in _WRAPPERS if k in obj)]
        sd = {k: v.float().numpy() for k, v in obj.items() if hasattr(v, "numpy")}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _format(cfg: ModelConfig) -> OriginalFormat:
    """The original format of ``cfg``'s family (its converter's ``ORIGINAL_FORMAT``)."""
    fmt = converter(cfg.family).ORIGINAL_FORMAT
    if fmt is None:
        names = [c.ORIGINAL_FORMAT.names for c in converters() if c.ORIGINAL_FORMAT is not None]
        listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        raise UserError(
            f"original-format checkpoints exist for {listed}; config.model.family="
            f"{cfg.family!r} loads from a Hugging Face directory or a qtx workdir."
        )
    return fmt


def _entries(cfg: ModelConfig, keys) -> list[OriginalEntry]:
    """``(flax path, key, kind, qkv part)`` of every parameter of the vanilla ``cfg``."""
    return _format(cfg).layout(cfg, keys)


_BUFFERS = re.compile(r"(relative_position_index|attn_mask)$")


def _check_buffers(sd: dict, cfg: ModelConfig) -> None:
    """Relative position indices must equal qtx's (the format's ``check_buffer``); shift
    masks are recomputed, so dropped."""
    check = _format(cfg).check_buffer
    for key in [k for k in sd if _BUFFERS.search(k)]:
        value = sd.pop(key)
        if check is not None:
            check(cfg, key, value)


def params_from_original(sd: dict, cfg: ModelConfig) -> dict:
    """Nested flax params of the vanilla ``cfg`` model from an original-format state dict;
    raises naming every unknown key, missing key and shape mismatch."""
    sd = dict(sd)
    _check_buffers(sd, cfg)
    entries = _entries(cfg, set(sd))
    used = {e[1] for e in entries}
    unknown = sorted(k for k in sd if k not in used)
    missing = sorted({k for _, k, _, _ in entries if k not in sd})
    if unknown or missing:
        raise UserError(
            f"the checkpoint does not match the configured {cfg.family} model "
            f"(config.model.*): "
            + "; ".join(
                s
                for s in (
                    f"keys with no parameter {unknown[:8]}" if unknown else "",
                    f"parameters with no key {missing[:8]}" if missing else "",
                )
                if s
            )
            + "; nothing was loaded."
        )
    flat, bad = {}, []
    for ours, key, kind, part in entries:
        value = np.asarray(sd[key], np.float32)
        if part is not None:
            if value.shape[0] % 3:
                bad.append(f"{key} {value.shape} is not a fused [q; k; v]")
                continue
            value = np.split(value, 3, axis=0)[part]
        flat[ours] = to_ours(kind, value)
    if bad:
        raise UserError("checkpoint tensor shape(s) do not match: " + "; ".join(bad) + ".")
    return unflatten_dict(flat)


def original_state_dict(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """The original-format state dict of ``params`` (q, k and v fused into ``qkv``): the
    inverse of :func:`params_from_original`, e.g. to hand a model to timm users."""
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(dict(params))
    parts: dict[str, list] = {}
    out = {}
    for ours, key, kind, part in _entries(cfg, set()):
        value = to_hf(kind, np.asarray(flat[ours]))
        if part is None:
            out[key] = value
        else:
            parts.setdefault(key, [None] * 3)[part] = value
    out.update({k: np.concatenate(v, axis=0) for k, v in parts.items()})
    return out


def pretrained_params(path: str, cfg: ModelConfig) -> dict:
    """Parameters (numpy tree) of the original-format checkpoint at ``path`` for ``cfg``."""
    return params_from_original(read(path), cfg)
