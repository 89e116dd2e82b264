"""Configurations of qtx models exported with attention variants (softmax variants, attention
gates, sinks); written by qtx next to ``modeling_qtx.py``.

Each class is the Hugging Face configuration of its family with ``model_type`` prefixed by
``qtx_`` (so that a loader without ``trust_remote_code=True`` fails instead of silently
running vanilla attention) and one more field, ``qtx_attention``: the qtx
``AttentionConfig`` as a dict::

    softmax         "vanilla" | "clipped" | "normalized_clipped" | "off_by_one" | "sink"
                    | "softpick"
    gamma, zeta     clipped softmax clip((zeta - gamma) * softmax(x) + gamma, 0, 1)
    alpha           if set: gamma = -alpha / T (T = softmax_T or the key length), zeta = 1;
                    normalized_clipped: gamma = -alpha / (keys the query sees)
    sink_init       starting value of the sink logits (the exported values are in the weights)
    softpick_eps    softpick's denominator epsilon
    gate            "none" | "linear" | "mlp" | "mlp_wide" | "all_heads_linear" | "headwise"
                    | "elementwise"
    gate_condition  "token" | "head" | "none"
    pi_init, gate_finetune   fine-tuning gates are divided by pi_init
    gate_init_std   the gates' initialisation (training only)
"""

from transformers import (
    BertConfig,
    DeiTConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3_5TextConfig,
    Qwen3Config,
    RobertaConfig,
    SwinConfig,
    ViTConfig,
)


class QtxBertConfig(BertConfig):
    model_type = "qtx_bert"


class QtxRobertaConfig(RobertaConfig):
    model_type = "qtx_roberta"


class QtxOPTConfig(OPTConfig):
    model_type = "qtx_opt"


class QtxViTConfig(ViTConfig):
    model_type = "qtx_vit"


class QtxDeiTConfig(DeiTConfig):
    model_type = "qtx_deit"


class QtxSwinConfig(SwinConfig):
    model_type = "qtx_swin"


class QtxLlamaConfig(LlamaConfig):
    model_type = "qtx_llama"


class QtxMistralConfig(MistralConfig):
    model_type = "qtx_mistral"


class QtxQwen2Config(Qwen2Config):
    model_type = "qtx_qwen2"


class QtxQwen3Config(Qwen3Config):
    model_type = "qtx_qwen3"


class QtxQwen3_5TextConfig(Qwen3_5TextConfig):
    model_type = "qtx_qwen3_5_text"
