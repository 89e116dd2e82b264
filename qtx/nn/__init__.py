"""Building blocks shared by all models: quantized layers, attention variants, blocks, heads."""

from qtx.nn.attention import (
    ATTENTION,
    AttentionConfig,
    Gate,
    MultiHeadAttention,
    attention_probs,
    clipped_softmax,
    off_by_one_softmax,
)
from qtx.nn.heads import Classifier
from qtx.nn.layers import Dense, Embed, LayerNorm, PatchEmbed
from qtx.nn.transformer import FFN, BlockConfig, TransformerLayer, run_layers

__all__ = [
    "ATTENTION",
    "FFN",
    "AttentionConfig",
    "BlockConfig",
    "Classifier",
    "Dense",
    "Embed",
    "Gate",
    "LayerNorm",
    "MultiHeadAttention",
    "PatchEmbed",
    "TransformerLayer",
    "attention_probs",
    "clipped_softmax",
    "off_by_one_softmax",
    "run_layers",
]
