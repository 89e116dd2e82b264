"""Shared pieces of the HF <-> qtx converters: the layout table and tensor transforms.

A family's *layout* lists, for one :class:`~qtx.models.ModelConfig`, every parameter of the
vanilla model as an :class:`Entry` pairing its flax path (``("layer_0", "attn", "q_proj",
"kernel")``) with its *canonical* HF key, i.e. the key with the base-model prefix
(``bert.``, ``roberta.``, ``model.decoder.``, ``vit.``, ``deit.``) removed. Head keys
(``cls.``, ``lm_head.``, ``classifier.``) never carry that prefix. The same table drives
loading (HF -> qtx) and export (qtx -> HF). ``original_*`` build the layouts of the
original-format (timm) files, an :class:`OriginalFormat` of the families that have them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from qtx.errors import UserError
from qtx.models.config import ModelConfig

ACTIVATIONS_FROM_HF = {
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: flax path <-> canonical HF key; ``kind`` picks the transform."""

    ours: tuple[str, ...]
    hf: str
    kind: str = "copy"  # copy | linear (torch (out, in)) | conv (torch (D, C, p, p))
    head: bool = False  # part of the task head (HF keys without the base prefix)


def dense(ours: str, hf: str, bias: bool = True, head: bool = False) -> list[Entry]:
    """A Linear: ``hf.weight`` (out, in) <-> ``ours/kernel`` (in, out), ``hf.bias``."""
    p = tuple(ours.split("/"))
    out = [Entry(p + ("kernel",), f"{hf}.weight", "linear", head)]
    if bias:
        out.append(Entry(p + ("bias",), f"{hf}.bias", "copy", head))
    return out


def layer_norm(ours: str, hf: str, head: bool = False) -> list[Entry]:
    """A LayerNorm: ``hf.weight`` / ``hf.bias`` <-> ``ours/scale`` / ``ours/bias``."""
    p = tuple(ours.split("/"))
    return [
        Entry(p + ("scale",), f"{hf}.weight", "copy", head),
        Entry(p + ("bias",), f"{hf}.bias", "copy", head),
    ]


def rms_norm(ours: str, hf: str) -> list[Entry]:
    """An RMSNorm: ``hf.weight`` <-> ``ours/scale`` (no bias)."""
    return [Entry(tuple(ours.split("/")) + ("scale",), f"{hf}.weight")]


def embed(ours: str, hf: str) -> list[Entry]:
    """An embedding table (num, D) on both sides."""
    return [Entry(tuple(ours.split("/")) + ("embedding",), hf)]


def attention_block(i: int, hf: str, q: str, k: str, v: str, o: str, bias: bool) -> list[Entry]:
    """q/k/v/o projections of layer ``i``: ``{hf}.{q|k|v|o}`` -> ``layer_i/attn/*_proj``."""
    out = []
    for ours, name in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", o)):
        out += dense(f"layer_{i}/attn/{ours}", f"{hf}.{name}", bias)
    return out


# One parameter of an original-format (timm) checkpoint: (flax path, key, kind, part), part
# being the q / k / v third (0, 1, 2) of a fused ``qkv`` tensor or None.
OriginalEntry = tuple[tuple[str, ...], str, str, int | None]


@dataclasses.dataclass(frozen=True)
class OriginalFormat:
    """A family's checkpoints in its original repository's format (timm and the like),
    read by :mod:`qtx.hf.original`: ``layout(cfg, keys)`` lists every parameter of the vanilla
    ``cfg`` (``keys``: the file's keys, to tell spellings apart; empty when writing);
    ``check_buffer(cfg, key, value)`` raises on a buffer (``relative_position_index``) that
    disagrees with ``cfg`` (None: buffers are dropped unchecked)."""

    names: str  # the models, for messages ("ViT, DeiT")
    layout: Callable[[ModelConfig, set], list[OriginalEntry]]
    check_buffer: Callable[[ModelConfig, str, np.ndarray], None] | None = None


def original_linear(
    ours: str, key: str, bias: bool = True, part: int | None = None
) -> list[OriginalEntry]:
    """A Linear ``key.weight`` / ``key.bias`` (``part``: its third of a fused qkv)."""
    p = tuple(ours.split("/"))
    out = [(p + ("kernel",), f"{key}.weight", "linear", part)]
    if bias:
        out.append((p + ("bias",), f"{key}.bias", "copy", part))
    return out


def original_norm(ours: str, key: str) -> list[OriginalEntry]:
    """A LayerNorm ``key.weight`` / ``key.bias``."""
    p = tuple(ours.split("/"))
    return [
        (p + ("scale",), f"{key}.weight", "copy", None),
        (p + ("bias",), f"{key}.bias", "copy", None),
    ]


def original_block(cfg: ModelConfig, ours: str, key: str) -> list[OriginalEntry]:
    """timm's ``Block``: norm1, attn.qkv (split into q, k, v unless ``cfg.fused_qkv``),
    attn.proj, norm2, mlp.fc1, mlp.fc2."""
    out = original_norm(f"{ours}/attn_ln", f"{key}.norm1")
    if cfg.fused_qkv:
        out += original_linear(f"{ours}/attn/qkv_proj", f"{key}.attn.qkv", cfg.use_bias)
    else:
        for i, n in enumerate("qkv"):
            out += original_linear(f"{ours}/attn/{n}_proj", f"{key}.attn.qkv", cfg.use_bias, i)
    out += original_linear(f"{ours}/attn/o_proj", f"{key}.attn.proj", cfg.use_bias)
    out += original_norm(f"{ours}/ffn_ln", f"{key}.norm2")
    out += original_linear(f"{ours}/ffn/fc1", f"{key}.mlp.fc1", cfg.use_bias)
    out += original_linear(f"{ours}/ffn/fc2", f"{key}.mlp.fc2", cfg.use_bias)
    return out


def original_patch_embed() -> list[OriginalEntry]:
    """timm's ``patch_embed.proj`` convolution."""
    return [
        (("embed", "patch", "kernel"), "patch_embed.proj.weight", "conv", None),
        (("embed", "patch", "bias"), "patch_embed.proj.bias", "copy", None),
    ]


def original_head(keys) -> str:
    """The classifier's key: ``head.fc`` (timm >= 0.9) where the file has it, else ``head``."""
    return "head.fc" if "head.fc.weight" in keys else "head"


def to_ours(kind: str, x: np.ndarray) -> np.ndarray:
    """Torch layout -> flax layout, as float32."""
    x = np.asarray(x, np.float32)
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)  # (D, C, p, p) -> (p, p, C, D)
    return x


def to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    """Flax layout -> torch layout (contiguous float32)."""
    x = np.asarray(x, np.float32)
    if kind == "linear":
        x = x.T
    elif kind == "conv":
        x = x.transpose(3, 2, 0, 1)  # (p, p, C, D) -> (D, C, p, p)
    return np.ascontiguousarray(x)


def strip_prefix(sd: dict, prefixes: tuple[str, ...]) -> dict:
    """Removes the first matching base-model prefix of every key; renames old-style
    LayerNorm ``gamma``/``beta`` to ``weight``/``bias``."""
    out = {}
    for key, value in sd.items():
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p) :]
                break
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        if key in out:
            raise UserError(f"checkpoint has the key {key!r} twice (with and without prefix).")
        out[key] = value
    return out


def pop_tied(sd: dict, key: str, target: str, what: str) -> None:
    """Drops ``sd[key]`` if it equals ``sd[target]`` (a tied copy); raises when it differs."""
    if key not in sd:
        return
    value = sd.pop(key)
    if target in sd and np.array_equal(np.asarray(value), np.asarray(sd[target])):
        return
    raise UserError(
        f"checkpoint key {key!r} is not tied to {target!r}; qtx ties the {what} to the word "
        "embeddings and cannot represent an untied one."
    )


def pop_alias(sd: dict, key: str, target: str) -> None:
    """Moves ``sd[key]`` to ``sd[target]`` when absent; else checks they are equal."""
    if key not in sd:
        return
    value = sd.pop(key)
    if target not in sd:
        sd[target] = value
    elif not np.array_equal(np.asarray(value), np.asarray(sd[target])):
        raise UserError(f"checkpoint keys {key!r} and {target!r} should be equal but differ.")


def unsupported(model_type: str, what: str) -> UserError:
    return UserError(f"{model_type} checkpoint with {what} is not supported by qtx.")


def activation_from_hf(name: str, model_type: str) -> str:
    if name not in ACTIVATIONS_FROM_HF:
        raise unsupported(
            model_type, f"activation {name!r} (allowed: {', '.join(ACTIVATIONS_FROM_HF)})"
        )
    return ACTIVATIONS_FROM_HF[name]


def num_labels_from_hf(d: dict) -> int:
    if d.get("id2label"):
        return len(d["id2label"])
    return int(d.get("num_labels") or 2)
