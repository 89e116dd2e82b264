"""Checkpoints in the original repositories' format (timm, facebookresearch/deit,
microsoft/Swin-Transformer): fused ``qkv`` projections split into q, k and v, strictly.

These files carry no config, so the architecture is the configured model's
(``config.model.name`` and overrides). Mapping (timm key -> flax path)::

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
from qtx.hf.common import to_hf, to_ours
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


def _entries(cfg: ModelConfig, keys) -> list[tuple[tuple[str, ...], str, str, int | None]]:
    """``(flax path, key, kind, qkv part)`` of every parameter of the vanilla ``cfg``."""
    out = []

    def linear(ours, key, bias=True, part=None):
        p = tuple(ours.split("/"))
        out.append((p + ("kernel",), f"{key}.weight", "linear", part))
        if bias:
            out.append((p + ("bias",), f"{key}.bias", "copy", part))

    def norm(ours, key):
        p = tuple(ours.split("/"))
        out.extend([(p + ("scale",), f"{key}.weight", "copy", None)])
        out.extend([(p + ("bias",), f"{key}.bias", "copy", None)])

    def block(ours, key):
        norm(f"{ours}/attn_ln", f"{key}.norm1")
        if cfg.fused_qkv:
            linear(f"{ours}/attn/qkv_proj", f"{key}.attn.qkv", cfg.use_bias)
        else:
            for i, n in enumerate("qkv"):
                linear(f"{ours}/attn/{n}_proj", f"{key}.attn.qkv", cfg.use_bias, i)
        linear(f"{ours}/attn/o_proj", f"{key}.attn.proj", cfg.use_bias)
        norm(f"{ours}/ffn_ln", f"{key}.norm2")
        linear(f"{ours}/ffn/fc1", f"{key}.mlp.fc1", cfg.use_bias)
        linear(f"{ours}/ffn/fc2", f"{key}.mlp.fc2", cfg.use_bias)

    out.append((("embed", "patch", "kernel"), "patch_embed.proj.weight", "conv", None))
    out.append((("embed", "patch", "bias"), "patch_embed.proj.bias", "copy", None))
    head = "head.fc" if "head.fc.weight" in keys else "head"
    if cfg.family == "vit":
        out.append((("embed", "cls"), "cls_token", "copy", None))
        if cfg.distillation_token:
            out.append((("embed", "dist"), "dist_token", "copy", None))
        out.append((("embed", "position", "embedding"), "pos_embed", "copy", None))
        for i in range(cfg.num_layers):
            block(f"layer_{i}", f"blocks.{i}")
    elif cfg.family == "swin":
        norm("embed/ln", "patch_embed.norm")
        shifted = "layers.0.downsample.reduction.weight" not in keys  # timm >= 0.9
        for s, depth in enumerate(cfg.depths):
            for j in range(depth):
                key = f"layers.{s}.blocks.{j}"
                block(f"stage_{s}/layer_{j}", key)
                table = f"{key}.attn.relative_position_bias_table"
                out.append(((f"stage_{s}", f"layer_{j}", "rel_pos", "table"), table, "copy", None))
            if s < len(cfg.depths) - 1:
                d = f"layers.{s + 1 if shifted else s}.downsample"
                norm(f"stage_{s}/merge/ln", f"{d}.norm")
                linear(f"stage_{s}/merge/reduction", f"{d}.reduction", bias=False)
    else:
        raise UserError(
            f"original-format checkpoints exist for ViT, DeiT and Swin; config.model.family="
            f"{cfg.family!r} loads from a Hugging Face directory or a qtx workdir."
        )
    norm("final_ln", "norm")
    if cfg.head == "classification":
        linear("classifier/dense", head)
        if cfg.family == "vit" and cfg.distillation_token:
            linear("dist_classifier/dense", "head_dist")
    return out


_BUFFERS = re.compile(r"(relative_position_index|attn_mask)$")


def _check_buffers(sd: dict, cfg: ModelConfig) -> None:
    """Relative position indices must equal qtx's; shift masks are recomputed, so dropped."""
    from qtx.models.swin import relative_position_index, stage_blocks

    windows = [w for _, w, _, _ in stage_blocks(cfg)] if cfg.family == "swin" else []
    starts = np.cumsum((0,) + tuple(cfg.depths))
    for key in [k for k in sd if _BUFFERS.search(k)]:
        value = sd.pop(key)
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index$", key)
        if m and int(m.group(1)) < len(cfg.depths):
            i = starts[int(m.group(1))] + int(m.group(2))
            want = relative_position_index(windows[i]) if i < len(windows) else None
            if want is not None and np.array_equal(np.asarray(value).ravel(), want.ravel()):
                continue
            raise UserError(
                f"checkpoint key {key!r} holds another relative position index than "
                f"config.model.window_size={cfg.window_size} gives; the checkpoint's window or "
                "stages do not match."
            )


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
