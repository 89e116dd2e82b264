"""Configurations of qtx models exported with attention variants (clipped / off-by-one
softmax, attention gates); written by qtx next to ``modeling_qtx.py``.

Each class is the Hugging Face configuration of its family with ``model_type`` prefixed by
``qtx_`` (so that a loader without ``trust_remote_code=True`` fails instead of silently
running vanilla attention) and one more field, ``qtx_attention``: the qtx
``AttentionConfig`` as a dict::

    softmax         "vanilla" | "clipped" | "off_by_one"
    gamma, zeta     clipped softmax clip((zeta - gamma) * softmax(x) + gamma, 0, 1)
    alpha           if set: gamma = -alpha / T (T = softmax_T or the key length), zeta = 1
    gate            "none" | "linear" | "mlp" | "mlp_wide" | "all_heads_linear"
    gate_condition  "token" | "head" | "none"
    pi_init, gate_finetune   fine-tuning gates are divided by pi_init
"""

from transformers import BertConfig, DeiTConfig, OPTConfig, RobertaConfig, SwinConfig, ViTConfig


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
