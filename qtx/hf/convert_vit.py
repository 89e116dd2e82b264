"""ViT and DeiT <-> Hugging Face (ViTModel, ViTForImageClassification, DeiTModel,
DeiTForImageClassification, DeiTForImageClassificationWithTeacher).

Mapping (canonical HF key, prefix ``vit.`` / ``deit.`` removed -> flax path)::

    embeddings.cls_token / distillation_token            embed/cls / embed/dist   (1, 1, D)
    embeddings.position_embeddings                       embed/position/embedding (1, N, D)
    embeddings.patch_embeddings.projection (D, C, p, p)  embed/patch/kernel (p, p, C, D), bias
    encoder.layer.i.attention.attention.{query,key,value} layer_i/attn/{q,k,v}_proj
    encoder.layer.i.attention.output.dense               layer_i/attn/o_proj
    encoder.layer.i.layernorm_before / layernorm_after   layer_i/attn_ln / layer_i/ffn_ln
    encoder.layer.i.intermediate.dense / output.dense    layer_i/ffn/fc1 / fc2
    layernorm                                            final_ln
    classifier                                           classifier/dense        (ViT)
    cls_classifier / distillation_classifier             classifier/dense / dist_classifier/dense

``pooler.dense`` (ViTModel/DeiTModel's pooling layer) is not part of qtx's ViT and is dropped.
DeiTForImageClassification classifies the CLS token only; qtx's distilled ViT averages two
heads, so its classifier is loaded as ``2 * W`` and the distillation head as zeros, which
gives identical logits (``cls_logits`` / ``dist_logits`` then read ``2x`` and ``0``).
"""

from __future__ import annotations

import numpy as np

from qtx.hf.common import (
    ACTIVATIONS_TO_HF,
    Entry,
    OriginalEntry,
    OriginalFormat,
    activation_from_hf,
    attention_block,
    dense,
    layer_norm,
    num_labels_from_hf,
    original_block,
    original_head,
    original_linear,
    original_norm,
    original_patch_embed,
    strip_prefix,
    unsupported,
)
from qtx.models.config import ModelConfig

MODEL_TYPES = {"vit": "vit", "deit": "vit"}
BASE_MODELS = {"vit": "ViTModel", "deit": "DeiTModel"}
ARCHITECTURES = {
    "ViTModel": "none",
    "ViTForImageClassification": "classification",
    "DeiTModel": "none",
    "DeiTForImageClassification": "classification",
    "DeiTForImageClassificationWithTeacher": "classification",
}
DROPPED = ("pooler.dense.weight", "pooler.dense.bias")


def _square(value, name: str, mt: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise unsupported(mt, f"non-square {name}={value}")
        value = value[0]
    return int(value)


def config_from_hf(c, arch: str | None, head: str) -> ModelConfig:
    """ModelConfig of a ``ViTConfig`` / ``DeiTConfig`` ``c``."""
    mt = c.model_type
    if not getattr(c, "qkv_bias", True):
        raise unsupported(mt, "qkv_bias=False")
    image = _square(c.image_size, "image_size", mt)
    patch = _square(c.patch_size, "patch_size", mt)
    dist = mt == "deit"
    return ModelConfig(
        family="vit",
        vocab_size=0,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        max_positions=(image // patch) ** 2 + 1 + int(dist),
        type_vocab_size=1,
        pre_ln=True,
        final_ln=True,
        activation=activation_from_hf(c.hidden_act, mt),
        ln_eps=float(c.layer_norm_eps),
        dropout=float(c.hidden_dropout_prob),
        attention_dropout=float(c.attention_probs_dropout_prob),
        init_std=float(c.initializer_range),
        head=head,
        num_labels=num_labels_from_hf(c.to_dict()),
        pooler=False,
        image_size=image,
        patch_size=patch,
        num_channels=c.num_channels,
        distillation_token=dist,
    )


def refine(cfg: ModelConfig, keys) -> ModelConfig:
    return cfg


def infer_head(keys) -> str:
    """The head of a checkpoint whose config names no architecture."""
    return (
        "classification"
        if "classifier.weight" in keys or "cls_classifier.weight" in keys
        else "none"
    )


def canonical(sd: dict, cfg: ModelConfig) -> tuple[dict, list[str]]:
    """Strips ``vit.``/``deit.``, drops the pooler; maps DeiT's single CLS classifier onto
    the two averaged heads (``2 W`` and ``0``)."""
    sd = strip_prefix(sd, ("vit.", "deit."))
    dropped = [k for k in DROPPED if k in sd]
    for k in dropped:
        sd.pop(k)
    if cfg.distillation_token and "classifier.weight" in sd and "cls_classifier.weight" not in sd:
        for p in ("weight", "bias"):
            if f"classifier.{p}" in sd:
                w = np.asarray(sd.pop(f"classifier.{p}"), np.float32)
                sd[f"cls_classifier.{p}"] = 2.0 * w
                sd[f"distillation_classifier.{p}"] = np.zeros_like(w)
    return sd, dropped


def layout(cfg: ModelConfig) -> list[Entry]:
    """Every parameter of the vanilla model ``cfg`` with its canonical HF key."""
    e = [Entry(("embed", "cls"), "embeddings.cls_token")]
    if cfg.distillation_token:
        e.append(Entry(("embed", "dist"), "embeddings.distillation_token"))
    e.append(Entry(("embed", "position", "embedding"), "embeddings.position_embeddings"))
    proj = "embeddings.patch_embeddings.projection"
    e += [
        Entry(("embed", "patch", "kernel"), f"{proj}.weight", "conv"),
        Entry(("embed", "patch", "bias"), f"{proj}.bias"),
    ]
    for i in range(cfg.num_layers):
        hf = f"encoder.layer.{i}"
        e += attention_block(
            i,
            f"{hf}.attention",
            "attention.query",
            "attention.key",
            "attention.value",
            "output.dense",
            True,
        )
        e += layer_norm(f"layer_{i}/attn_ln", f"{hf}.layernorm_before")
        e += dense(f"layer_{i}/ffn/fc1", f"{hf}.intermediate.dense")
        e += dense(f"layer_{i}/ffn/fc2", f"{hf}.output.dense")
        e += layer_norm(f"layer_{i}/ffn_ln", f"{hf}.layernorm_after")
    e += layer_norm("final_ln", "layernorm")
    if cfg.head == "classification":
        if cfg.distillation_token:
            e += dense("classifier/dense", "cls_classifier", head=True)
            e += dense("dist_classifier/dense", "distillation_classifier", head=True)
        else:
            e += dense("classifier/dense", "classifier", head=True)
    return e


def head_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    return ("classifier", "dist_classifier") if cfg.head == "classification" else ()


def export_problems(cfg: ModelConfig) -> list[str]:
    out = []
    if not cfg.pre_ln:
        out.append("config.model.pre_ln=False (HF ViT/DeiT are pre-LN)")
    if not cfg.final_ln:
        out.append("config.model.final_ln=False")
    if not cfg.use_bias:
        out.append("config.model.use_bias=False")
    return out


def pretrained_problems(cfg: ModelConfig, ckpt_cfg: ModelConfig) -> list[str]:
    return []


def architecture(cfg: ModelConfig) -> str:
    if cfg.distillation_token:
        return "DeiTForImageClassificationWithTeacher" if cfg.head != "none" else "DeiTModel"
    return "ViTForImageClassification" if cfg.head != "none" else "ViTModel"


def base_prefix(cfg: ModelConfig) -> str:
    if cfg.head == "none":
        return ""
    return "deit." if cfg.distillation_token else "vit."


def hf_config(cfg: ModelConfig):
    """The ``transformers`` ViT/DeiT config of ``cfg`` (with ``architectures``)."""
    from transformers import DeiTConfig, ViTConfig

    cls = DeiTConfig if cfg.distillation_token else ViTConfig
    c = cls(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=ACTIVATIONS_TO_HF[cfg.activation],
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.ln_eps,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.num_channels,
        qkv_bias=True,
        num_labels=cfg.num_labels,
    )
    c.architectures = [architecture(cfg)]
    return c


def original_layout(cfg: ModelConfig, keys) -> list[OriginalEntry]:
    """timm / facebookresearch/deit keys (see :mod:`qtx.hf.original`)."""
    out = original_patch_embed()
    out.append((("embed", "cls"), "cls_token", "copy", None))
    if cfg.distillation_token:
        out.append((("embed", "dist"), "dist_token", "copy", None))
    out.append((("embed", "position", "embedding"), "pos_embed", "copy", None))
    for i in range(cfg.num_layers):
        out += original_block(cfg, f"layer_{i}", f"blocks.{i}")
    out += original_norm("final_ln", "norm")
    if cfg.head == "classification":
        out += original_linear("classifier/dense", original_head(keys))
        if cfg.distillation_token:
            out += original_linear("dist_classifier/dense", "head_dist")
    return out


ORIGINAL_FORMAT = OriginalFormat("ViT, DeiT", original_layout)
