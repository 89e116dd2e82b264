"""OPT: a decoder-only causal LM (pre-LN, or post-LN where ``do_layer_norm_before=False``).

Points besides the layers' (see ``qtx.nn.transformer``)::

    embed/word/weight, embed/position/weight
    embed/project_in/weight, embed/project_in/out     (when word_embed_proj_dim != hidden)
    embed/sum                     token (projected) + position embeddings
    final_ln/weight, final_ln/out (pre-LN models)
    project_out/weight, project_out/out               (when word_embed_proj_dim != hidden)
    lm_head/logits                tied to embed/word, full-precision table

Positions are learned with OPT's offset of 2: ``pos = cumsum(mask) * mask - 1 + 2``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from qtx.models.config import ModelConfig
from qtx.models.family import (
    PRE_LN_OUTLIER_POINTS,
    Family,
    causal_layers,
    text_dummy_inputs,
    text_inputs,
    text_tokens,
)
from qtx.nn.layers import Dense, Embed, LayerNorm
from qtx.quant import QuantPlan, QuantPoint


def opt_position_ids(attention_mask, offset: int):
    """``cumsum(mask) * mask - 1 + offset`` (B, T): padding gets ``offset - 1``."""
    m = attention_mask.astype(jnp.int32)
    return jnp.cumsum(m, axis=1) * m - 1 + offset


def _projection(cfg: ModelConfig, plan: QuantPlan, features: int, name=None):
    """OPT's bias-free project_in / project_out, with an ``out`` point."""
    return Dense(
        features,
        plan,
        False,
        nn.initializers.normal(cfg.init_std),
        cfg.compute_dtype,
        out_point=True,
        name=name,
    )


class LMHead(nn.Module):
    """Tied LM head: ``h @ E^T`` with the full-precision table; point ``logits``."""

    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, h, attend, token_mask=None):
        return QuantPoint(self.plan, name="logits")(attend(h).astype(jnp.float32), token_mask)


class OPTEmbeddings(nn.Module):
    cfg: ModelConfig
    plan: QuantPlan = QuantPlan()

    def setup(self):
        c, p = self.cfg, self.plan
        init = nn.initializers.normal(c.init_std)
        width = c.word_embed_proj_dim or c.hidden_size
        self.word = Embed(c.vocab_size, width, p, init, c.compute_dtype)
        self.position = Embed(
            c.max_positions + c.position_offset, c.hidden_size, p, init, c.compute_dtype
        )
        if width != c.hidden_size:
            self.project_in = _projection(c, p, c.hidden_size)
        self.sum = QuantPoint(p)
        self.drop = nn.Dropout(c.dropout)

    def __call__(self, input_ids, attention_mask, deterministic=True):
        c = self.cfg
        h = self.word(input_ids)
        if (c.word_embed_proj_dim or c.hidden_size) != c.hidden_size:
            h = self.project_in(h, attention_mask)
        h = h + self.position(opt_position_ids(attention_mask, c.position_offset))
        h = self.sum(h, attention_mask.astype(bool))
        return self.drop(h, deterministic=deterministic or c.dropout == 0)


class OPT(nn.Module):
    """``input_ids`` (B, T) -> dict with ``last_hidden_state`` (B, T, D), ``logits`` (B, T, V)
    for the ``clm`` head, and ``hidden_states`` (L + 1) when ``output_hidden_states``.

    Like HF, the last hidden state is taken after ``final_ln`` / ``project_out``.
    """

    cfg: ModelConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ):
        c, p = self.cfg, self.plan
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        token_mask = attention_mask.astype(bool)
        embed = OPTEmbeddings(c, p, name="embed")
        h = embed(input_ids, attention_mask, deterministic)
        h, states = causal_layers(c, p, h, token_mask, deterministic, output_hidden_states)
        if c.final_ln:
            h = LayerNorm(p, c.ln_eps, name="final_ln")(h, token_mask)
        width = c.word_embed_proj_dim or c.hidden_size
        if width != c.hidden_size:
            h = _projection(c, p, width, name="project_out")(h, token_mask)
        out = {"last_hidden_state": h}
        if output_hidden_states:
            # HF reports the last state after the final LayerNorm / projection.
            out["hidden_states"] = states[:-1] + (h,)
        if c.head == "clm":
            out["logits"] = LMHead(p, name="lm_head")(h, embed.word.attend, token_mask)
        return out


OPT_FAMILY = Family(
    name="opt",
    module=OPT,
    heads=("clm", "none"),
    tasks=("clm",),
    model_inputs=text_inputs,
    dummy_inputs=text_dummy_inputs,
    kurtosis_points=PRE_LN_OUTLIER_POINTS,
    inf_norm_points=PRE_LN_OUTLIER_POINTS,
    headline_point=r"residual_ffn$",
    causal=True,
    finetune_gate_std=0.001,  # the reference's gate init for OPT (docs/methods.md §1)
    tokens_per_example=text_tokens,
)
