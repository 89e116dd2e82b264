"""Transformer blocks shared by BERT, OPT and ViT: pre-LN or post-LN, with named points.

Layer ``i`` (module ``layer_i``) has the points::

    attn/...                 see qtx.nn.attention
    residual_attn            x + attention branch
    attn_ln/weight, /out     the attention LayerNorm (pre-LN: before the branch; post-LN: after
                             the sum)
    ffn/fc1/weight, ffn/hidden, ffn/act, ffn/fc2/weight, ffn/out
    residual_ffn             x + FFN branch
    ffn_ln/weight, /out      the FFN LayerNorm

Post-LN (BERT, RoBERTa, OPT-350m): ``x = LN(x + Attn(x)); x = LN(x + FFN(x))``.
Pre-LN (OPT, ViT): ``x = x + Attn(LN(x)); x = x + FFN(LN(x))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtx.nn.attention import AttentionConfig, MultiHeadAttention
from qtx.nn.layers import Dense, LayerNorm
from qtx.quant import QuantPlan, QuantPoint

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """What one layer needs; built from the model config."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    pre_ln: bool
    activation: str = "gelu"
    ln_eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    fused_qkv: bool = False
    use_bias: bool = True
    init_std: float = 0.02
    out_init_std: float | None = None
    attention: AttentionConfig = AttentionConfig()
    dtype: Any = jnp.float32
    causal: bool = False  # a decoder: position t sees positions <= t only
    attn_torch_init: str = ""  # attention projections ("qkvo" letters) with PyTorch's init


class FFN(nn.Module):
    """``fc2(act(fc1(x)))`` (B, T, D) -> (B, T, D); points ``hidden``, ``act``, ``out``."""

    cfg: BlockConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        c, p = self.cfg, self.plan
        init = nn.initializers.normal(c.init_std)
        out_init = nn.initializers.normal(c.out_init_std or c.init_std)
        h = Dense(c.intermediate_size, p, c.use_bias, init, c.dtype, name="fc1")(x)
        h = QuantPoint(p, name="hidden")(h)
        h = QuantPoint(p, name="act")(ACTIVATIONS[c.activation](h))
        h = Dense(x.shape[-1], p, c.use_bias, out_init, c.dtype, name="fc2")(h)
        return QuantPoint(p, name="out")(h)


def _drop_path(module: nn.Module, x, rate: float, deterministic: bool):
    """Stochastic depth: drops the whole residual branch per example with probability rate."""
    if rate <= 0 or deterministic:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.shape[0], 1, 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class TransformerLayer(nn.Module):
    """One block ``x`` (B, T, D) -> (B, T, D); ``mask`` bool (B, 1, T, S), True = attend."""

    cfg: BlockConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, x, mask=None, token_mask=None, deterministic: bool = True):
        c, p = self.cfg, self.plan
        attn = MultiHeadAttention(
            c.num_heads,
            c.attention,
            p,
            fused_qkv=c.fused_qkv,
            use_bias=c.use_bias,
            dropout=c.attention_dropout,
            init_std=c.init_std,
            out_init_std=c.out_init_std,
            dtype=c.dtype,
            causal=c.causal,
            torch_init=c.attn_torch_init,
            name="attn",
        )
        ffn = FFN(c, p, name="ffn")
        attn_ln = LayerNorm(p, c.ln_eps, name="attn_ln")
        ffn_ln = LayerNorm(p, c.ln_eps, name="ffn_ln")

        def branch(y):
            y = nn.Dropout(c.dropout)(y, deterministic=deterministic or c.dropout == 0)
            return _drop_path(self, y, c.drop_path, deterministic)

        if c.pre_ln:
            a = branch(attn(attn_ln(x), mask, token_mask, deterministic))
            x = QuantPoint(p, name="residual_attn")(x + a)
            f = branch(ffn(ffn_ln(x), deterministic))
            return QuantPoint(p, name="residual_ffn")(x + f)
        a = branch(attn(x, mask, token_mask, deterministic))
        x = attn_ln(QuantPoint(p, name="residual_attn")(x + a))
        f = branch(ffn(x, deterministic))
        return ffn_ln(QuantPoint(p, name="residual_ffn")(x + f))


def run_layers(
    cfg: BlockConfig,
    plan: QuantPlan,
    num_layers: int,
    x,
    mask=None,
    token_mask=None,
    deterministic=True,
    remat=False,
    collect=False,
):
    """Runs ``layer_0 .. layer_{n-1}`` inside the calling module's compact method, so the
    layers are named at the model's top level (``layer_3/attn/softmax``).

    Returns the final hidden states and, if ``collect``, the ``num_layers + 1`` layer inputs
    and outputs (as HF's ``hidden_states``).
    """
    layer_cls = nn.remat(TransformerLayer, static_argnums=(4,)) if remat else TransformerLayer
    states = [x]
    for i in range(num_layers):
        x = layer_cls(cfg, plan, name=f"layer_{i}")(x, mask, token_mask, deterministic)
        states.append(x)
    return x, (tuple(states) if collect else None)
