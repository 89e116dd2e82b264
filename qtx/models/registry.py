"""Models chosen by name: the registered families, size presets and dummy inputs.

``model_config("opt-125m", attention={"gate": "linear"})`` gives a :class:`ModelConfig`;
``build(cfg, plan)`` the Flax module. Sizes follow the papers (docs/methods.md §1, §3) and the
public checkpoints; ``*-tiny`` sizes are for tests and CPU runs. Each family's record
(:class:`~qtx.models.family.Family`) is defined beside its module and registered here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from qtx.errors import UserError
from qtx.models.bert import BERT_FAMILY, ROBERTA_FAMILY
from qtx.models.config import ModelConfig, model_config_from_dict
from qtx.models.family import family_record, register
from qtx.models.llama import LLAMA_FAMILY
from qtx.models.opt import OPT_FAMILY
from qtx.models.scan import ScannedModel
from qtx.models.swin import SWIN_FAMILY
from qtx.models.vit import VIT_FAMILY
from qtx.quant import QuantPlan

register(BERT_FAMILY)
register(ROBERTA_FAMILY)
register(OPT_FAMILY)
register(VIT_FAMILY)
register(SWIN_FAMILY)
register(LLAMA_FAMILY)

_BERT = dict(
    family="bert",
    vocab_size=30522,
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    intermediate_size=3072,
    max_positions=512,
    ln_eps=1e-12,
    head="mlm",
)
_ROBERTA = dict(
    _BERT,
    family="roberta",
    vocab_size=50265,
    max_positions=514,
    type_vocab_size=1,
    pad_token_id=1,
    ln_eps=1e-5,
)
_OPT = dict(
    family="opt",
    vocab_size=50272,
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    intermediate_size=3072,
    max_positions=2048,
    pre_ln=True,
    final_ln=True,
    activation="relu",
    ln_eps=1e-5,
    dropout=0.1,
    attention_dropout=0.0,
    pad_token_id=1,
    position_offset=2,
    head="clm",
    pooler=False,
    type_vocab_size=1,
)
_VIT = dict(
    family="vit",
    vocab_size=0,
    hidden_size=384,
    num_layers=12,
    num_heads=6,
    intermediate_size=1536,
    pre_ln=True,
    final_ln=True,
    ln_eps=1e-6,
    dropout=0.0,
    attention_dropout=0.0,
    head="classification",
    num_labels=1000,
    pooler=False,
    image_size=224,
    patch_size=16,
    max_positions=197,
    type_vocab_size=1,
)

_SWIN = dict(
    _VIT,
    family="swin",
    hidden_size=96,
    intermediate_size=384,
    depths=(2, 2, 6, 2),
    stage_heads=(3, 6, 12, 24),
    window_size=7,
    patch_size=4,
    ln_eps=1e-5,
    max_positions=49,  # tokens of one window
)

# LLaMA-style decoders (qtx.models.llama): pre-RMSNorm, SwiGLU, RoPE, GQA
_LLAMA = dict(
    family="llama",
    vocab_size=32000,
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    num_kv_heads=4,
    intermediate_size=2560,
    max_positions=2048,
    pre_ln=True,
    final_ln=True,
    activation="silu",
    norm="rmsnorm",
    ln_eps=1e-5,
    dropout=0.0,
    attention_dropout=0.0,
    use_bias=False,
    pad_token_id=0,
    head="clm",
    pooler=False,
    type_vocab_size=1,
    tie_embeddings=True,
)

# Tiny text models for tests and CPU runs (vocabulary of the embedded tokenizers).
_TINY_TEXT = dict(
    vocab_size=8192,
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    intermediate_size=512,
    max_positions=128,
)

SIZES: dict[str, dict[str, Any]] = {
    "bert-base": _BERT,
    "bert-6L": dict(_BERT, num_layers=6),
    "bert-large": dict(
        _BERT, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096
    ),
    "minilm-l6": dict(_BERT, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    "bert-tiny": dict(_BERT, **_TINY_TEXT),
    "roberta-base": _ROBERTA,
    "roberta-tiny": dict(_ROBERTA, **{**_TINY_TEXT, "max_positions": 130}),
    "opt-125m": _OPT,
    "opt-6L": dict(_OPT, num_layers=6),
    "opt-350m": dict(
        _OPT,
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        intermediate_size=4096,
        word_embed_proj_dim=512,
        pre_ln=False,
        final_ln=False,
    ),
    "opt-1.3b": dict(_OPT, hidden_size=2048, num_layers=24, num_heads=32, intermediate_size=8192),
    # Quantizable Transformers' OPT-350m / 1.3B: the reference code builds them from HF's default
    # OPTConfig (pre-LN, final LN, word_embed_proj_dim 768) with its yaml overrides.
    "opt-350m-qt": dict(
        _OPT,
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        intermediate_size=4096,
        word_embed_proj_dim=768,
        max_positions=1024,
    ),
    "opt-1.3b-qt": dict(
        _OPT,
        hidden_size=2048,
        num_layers=24,
        num_heads=32,
        intermediate_size=8192,
        word_embed_proj_dim=768,
        max_positions=1024,
    ),
    "opt-tiny": dict(_OPT, **_TINY_TEXT),
    # ~114M parameters: GPT-small width and depth, 4 key/value heads
    "llama-125m": _LLAMA,
    # Llama-3.2-1B's shape (1.24B parameters, tied embeddings, Llama-3 RoPE scaling)
    "llama-1b": dict(
        _LLAMA,
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        rope_theta=500000.0,
        rope_scaling=(32.0, 1.0, 4.0, 8192),
    ),
    # Qwen3-0.6B's shape: head width 128 != D / H, q/k RMSNorm, theta 1e6
    "qwen3-0.6b": dict(
        _LLAMA,
        vocab_size=151936,
        hidden_size=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        max_positions=40960,
        rope_theta=1000000.0,
        qk_norm=True,
        ln_eps=1e-6,
    ),
    # Llama-2-7B's shape (6.7B parameters, multi-head attention, untied LM head): the
    # post-training quantization baselines' model (configs/llama_ptq.py)
    "llama2-7b": dict(
        _LLAMA,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        intermediate_size=11008,
        max_positions=4096,
        tie_embeddings=False,
    ),
    "llama-tiny": dict(_LLAMA, **{**_TINY_TEXT, "num_kv_heads": 2, "intermediate_size": 384}),
    "vit-s16": _VIT,
    "vit-b16": dict(_VIT, hidden_size=768, num_heads=12, intermediate_size=3072),
    "deit-t": dict(_VIT, hidden_size=192, num_heads=3, intermediate_size=768),
    "deit-s": _VIT,
    "deit-b": dict(_VIT, hidden_size=768, num_heads=12, intermediate_size=3072),
    "vit-tiny": dict(
        _VIT,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        image_size=16,
        patch_size=4,
        num_channels=1,
        num_labels=10,
        max_positions=17,
    ),
    "swin-t": _SWIN,
    "swin-s": dict(_SWIN, depths=(2, 2, 18, 2)),
    "swin-b": dict(
        _SWIN,
        hidden_size=128,
        intermediate_size=512,
        depths=(2, 2, 18, 2),
        stage_heads=(4, 8, 16, 32),
    ),
    # MNIST-sized: 14 x 14 patches -> windows of 4 (padded to 16), 7 x 7 (padded to 8), 4 x 4
    "swin-tiny": dict(
        _SWIN,
        hidden_size=32,
        intermediate_size=64,
        depths=(2, 2, 2),
        stage_heads=(2, 4, 8),
        window_size=4,
        image_size=28,
        patch_size=2,
        num_channels=1,
        num_labels=10,
        max_positions=16,
    ),
}


def model_config(name: str, overrides: Mapping[str, Any] | None = None, **kw) -> ModelConfig:
    """The preset ``name`` with ``overrides`` (``attention`` may be a nested mapping)."""
    if name not in SIZES:
        raise UserError(
            f"config.model.name={name!r} is unknown; allowed: {', '.join(sorted(SIZES))}."
        )
    base = ModelConfig(**SIZES[name])
    return model_config_from_dict({**dict(overrides or {}), **kw}, base)


def build(cfg: ModelConfig, plan: QuantPlan | None = None) -> nn.Module:
    """The Flax module of ``cfg.family`` with the quantization plan ``plan``; with
    ``cfg.scan_layers`` wrapped in :class:`~qtx.models.scan.ScannedModel` (same variables),
    except for integer plans, which run the layer loop (scan is a training-time option)."""
    plan = plan or QuantPlan()
    if cfg.scan_layers and plan.integer:
        cfg = cfg.replace(scan_layers=False)
    module = family_record(cfg.family).module(cfg, plan)
    return ScannedModel(module, cfg.num_layers) if cfg.scan_layers else module


def dummy_inputs(cfg: ModelConfig, batch: int = 2, seq_len: int = 8) -> dict[str, Any]:
    """Keyword inputs for ``init`` (the family's): token ids for text models, images for
    ViT and Swin."""
    return family_record(cfg.family).dummy_inputs(cfg, batch, seq_len)
