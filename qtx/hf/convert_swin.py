"""Swin <-> Hugging Face (SwinModel, SwinForImageClassification).

Mapping (canonical HF key as on the hub, prefix ``swin.`` removed -> flax path)::

    embeddings.patch_embeddings.projection (D, C, p, p)   embed/patch/kernel (p, p, C, D), bias
    embeddings.norm                                       embed/ln
    encoder.layers.s.blocks.j.layernorm_before / _after   stage_s/layer_j/attn_ln / ffn_ln
    ....attention.self.{query,key,value}                  stage_s/layer_j/attn/{q,k,v}_proj
    ....attention.self.relative_position_bias_table       stage_s/layer_j/rel_pos/table
    ....attention.output.dense                            stage_s/layer_j/attn/o_proj
    ....intermediate.dense / output.dense                 stage_s/layer_j/ffn/fc1 / fc2
    encoder.layers.s.downsample.norm / .reduction         stage_s/merge/ln / reduction (no bias)
    layernorm                                             final_ln
    classifier                                            classifier/dense

Newer ``transformers`` name the same tensors ``attention.{q,k,v,o}_proj``,
``attention.relative_position_bias.relative_position_bias_table`` and ``mlp.fc{1,2}``; both
spellings load. ``relative_position_index`` buffers are checked against the index qtx computes
and dropped (they are not weights).
"""

from __future__ import annotations

import re

import numpy as np

from qtx.errors import UserError
from qtx.hf.common import (
    ACTIVATIONS_TO_HF,
    Entry,
    OriginalEntry,
    OriginalFormat,
    activation_from_hf,
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
from qtx.models.swin import relative_position_index, stage_blocks

MODEL_TYPES = {"swin": "swin"}
BASE_MODELS = {"swin": "SwinModel"}
ARCHITECTURES = {"SwinModel": "none", "SwinForImageClassification": "classification"}
# newer transformers spelling -> the hub's
_RENAMES = (
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (
        r"\.attention\.relative_position_bias\.relative_position_bias_table$",
        ".attention.self.relative_position_bias_table",
    ),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)
_INDEX = re.compile(
    r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\..*relative_position_index$"
)


def config_from_hf(c, arch: str | None, head: str) -> ModelConfig:
    """ModelConfig of a ``SwinConfig`` ``c``."""
    mt = c.model_type
    if not getattr(c, "qkv_bias", True):
        raise unsupported(mt, "qkv_bias=False")
    if getattr(c, "use_absolute_embeddings", False):
        raise unsupported(mt, "use_absolute_embeddings=True")
    image, patch = c.image_size, c.patch_size
    for name, v in (("image_size", image), ("patch_size", patch)):
        if isinstance(v, list | tuple) and len(set(v)) != 1:
            raise unsupported(mt, f"non-square {name}={v}")
    image = int(image[0] if isinstance(image, list | tuple) else image)
    patch = int(patch[0] if isinstance(patch, list | tuple) else patch)
    ffn = int(c.mlp_ratio * c.embed_dim)
    for s in range(len(c.depths)):
        if int(c.mlp_ratio * (c.embed_dim << s)) != ffn << s:
            raise unsupported(mt, f"mlp_ratio={c.mlp_ratio} (stage widths not a whole multiple)")
    return ModelConfig(
        family="swin",
        vocab_size=0,
        hidden_size=c.embed_dim,
        intermediate_size=ffn,
        depths=tuple(c.depths),
        stage_heads=tuple(c.num_heads),
        window_size=int(c.window_size),
        max_positions=int(c.window_size) ** 2,
        type_vocab_size=1,
        pre_ln=True,
        final_ln=True,
        activation=activation_from_hf(c.hidden_act, mt),
        ln_eps=float(c.layer_norm_eps),
        dropout=float(c.hidden_dropout_prob),
        attention_dropout=float(c.attention_probs_dropout_prob),
        drop_path=float(c.drop_path_rate),
        init_std=float(c.initializer_range),
        head=head,
        num_labels=num_labels_from_hf(c.to_dict()),
        pooler=False,
        image_size=image,
        patch_size=patch,
        num_channels=c.num_channels,
    )


def refine(cfg: ModelConfig, keys) -> ModelConfig:
    return cfg


def infer_head(keys) -> str:
    return "classification" if "classifier.weight" in keys else "none"


def canonical(sd: dict, cfg: ModelConfig) -> tuple[dict, list[str]]:
    """Strips ``swin.``, renames the newer spelling to the hub's and drops the
    ``relative_position_index`` buffers after checking them."""
    sd = strip_prefix(sd, ("swin.",))
    out, dropped = {}, []
    windows = [w for _, w, _, _ in stage_blocks(cfg)]
    starts = np.cumsum((0,) + tuple(cfg.depths))
    for key, value in sd.items():
        m = _INDEX.match(key)
        if m:
            s, j = int(m.group(1)), int(m.group(2))
            i = starts[s] + j if s < len(cfg.depths) else None
            want = None if i is None or i >= len(windows) else relative_position_index(windows[i])
            if want is None or not np.array_equal(np.asarray(value).ravel(), want.ravel()):
                raise UserError(
                    f"checkpoint key {key!r} holds another relative position index than the "
                    "window of config.model.window_size gives; the checkpoint's window or "
                    "stages do not match."
                )
            dropped.append(key)
            continue
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        if key in out:
            raise UserError(f"checkpoint has the key {key!r} in two spellings.")
        out[key] = value
    return out, dropped


def layout(cfg: ModelConfig) -> list[Entry]:
    """Every parameter of the vanilla model ``cfg`` with its canonical HF key."""
    proj = "embeddings.patch_embeddings.projection"
    e = [
        Entry(("embed", "patch", "kernel"), f"{proj}.weight", "conv"),
        Entry(("embed", "patch", "bias"), f"{proj}.bias"),
    ]
    e += layer_norm("embed/ln", "embeddings.norm")
    for s, depth in enumerate(cfg.depths):
        for j in range(depth):
            hf, ours = f"encoder.layers.{s}.blocks.{j}", f"stage_{s}/layer_{j}"
            e += layer_norm(f"{ours}/attn_ln", f"{hf}.layernorm_before")
            e.append(
                Entry(
                    (f"stage_{s}", f"layer_{j}", "rel_pos", "table"),
                    f"{hf}.attention.self.relative_position_bias_table",
                )
            )
            for name, key in (("q", "query"), ("k", "key"), ("v", "value")):
                e += dense(f"{ours}/attn/{name}_proj", f"{hf}.attention.self.{key}")
            e += dense(f"{ours}/attn/o_proj", f"{hf}.attention.output.dense")
            e += layer_norm(f"{ours}/ffn_ln", f"{hf}.layernorm_after")
            e += dense(f"{ours}/ffn/fc1", f"{hf}.intermediate.dense")
            e += dense(f"{ours}/ffn/fc2", f"{hf}.output.dense")
        if s < len(cfg.depths) - 1:
            e += layer_norm(f"stage_{s}/merge/ln", f"encoder.layers.{s}.downsample.norm")
            e += dense(
                f"stage_{s}/merge/reduction", f"encoder.layers.{s}.downsample.reduction", False
            )
    e += layer_norm("final_ln", "layernorm")
    if cfg.head == "classification":
        e += dense("classifier/dense", "classifier", head=True)
    return e


def head_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    return ("classifier",) if cfg.head == "classification" else ()


def export_problems(cfg: ModelConfig) -> list[str]:
    return [] if cfg.use_bias else ["config.model.use_bias=False"]


def pretrained_problems(cfg: ModelConfig, ckpt_cfg: ModelConfig) -> list[str]:
    return []


def architecture(cfg: ModelConfig) -> str:
    return "SwinForImageClassification" if cfg.head != "none" else "SwinModel"


def base_prefix(cfg: ModelConfig) -> str:
    return "swin." if cfg.head != "none" else ""


def hf_config(cfg: ModelConfig):
    """The ``transformers`` SwinConfig of ``cfg`` (with ``architectures``)."""
    from transformers import SwinConfig

    c = SwinConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.num_channels,
        embed_dim=cfg.hidden_size,
        depths=list(cfg.depths),
        num_heads=list(cfg.stage_heads),
        window_size=cfg.window_size,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        qkv_bias=True,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        drop_path_rate=cfg.drop_path,
        hidden_act=ACTIVATIONS_TO_HF[cfg.activation],
        use_absolute_embeddings=False,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.ln_eps,
        num_labels=cfg.num_labels,
    )
    c.architectures = [architecture(cfg)]
    return c


def original_layout(cfg: ModelConfig, keys) -> list[OriginalEntry]:
    """microsoft/Swin-Transformer / timm keys (see :mod:`qtx.hf.original`); timm >= 0.9
    keeps stage s's patch merging in ``layers.{s+1}.downsample``."""
    out = original_patch_embed()
    out += original_norm("embed/ln", "patch_embed.norm")
    shifted = "layers.0.downsample.reduction.weight" not in keys  # timm >= 0.9
    for s, depth in enumerate(cfg.depths):
        for j in range(depth):
            key = f"layers.{s}.blocks.{j}"
            out += original_block(cfg, f"stage_{s}/layer_{j}", key)
            table = f"{key}.attn.relative_position_bias_table"
            out.append(((f"stage_{s}", f"layer_{j}", "rel_pos", "table"), table, "copy", None))
        if s < len(cfg.depths) - 1:
            d = f"layers.{s + 1 if shifted else s}.downsample"
            out += original_norm(f"stage_{s}/merge/ln", f"{d}.norm")
            out += original_linear(f"stage_{s}/merge/reduction", f"{d}.reduction", bias=False)
    out += original_norm("final_ln", "norm")
    if cfg.head == "classification":
        out += original_linear("classifier/dense", original_head(keys))
    return out


def check_original_buffer(cfg: ModelConfig, key: str, value) -> None:
    """A block's ``relative_position_index`` must equal qtx's (shift masks are recomputed)."""
    m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index$", key)
    if not m or int(m.group(1)) >= len(cfg.depths):
        return
    windows = [w for _, w, _, _ in stage_blocks(cfg)]
    i = int(np.cumsum((0,) + tuple(cfg.depths))[int(m.group(1))]) + int(m.group(2))
    want = relative_position_index(windows[i]) if i < len(windows) else None
    if want is not None and np.array_equal(np.asarray(value).ravel(), want.ravel()):
        return
    raise UserError(
        f"checkpoint key {key!r} holds another relative position index than "
        f"config.model.window_size={cfg.window_size} gives; the checkpoint's window or "
        "stages do not match."
    )


ORIGINAL_FORMAT = OriginalFormat("Swin", original_layout, check_original_buffer)
