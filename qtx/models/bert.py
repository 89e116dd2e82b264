"""BERT and RoBERTa (post-LN encoders) with MLM and sequence-classification heads.

Points besides the layers' (see ``qtx.nn.transformer``)::

    embed/word/weight, embed/position/weight, embed/token_type/weight
    embed/sum                      word + position + token-type embeddings
    embed/ln/weight, embed/ln/out
    pooler/in, pooler/dense/weight, pooler/out       (tanh(dense(h[:, 0])))
    classifier/in, classifier/dense/weight, classifier/logits
    mlm_head/transform/weight, mlm_head/act, mlm_head/ln/weight, mlm_head/ln/out,
    mlm_head/logits                (tied to embed/word, full precision table)

RoBERTa differs in its positions (``padding_idx + 1 + cumsum`` over real tokens) and its
classification head, whose dense + tanh is our pooler.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from qtx.models.config import ModelConfig
from qtx.models.family import (
    Family,
    layer_points,
    text_dummy_inputs,
    text_inputs_with_token_types,
    text_tokens,
)
from qtx.nn.heads import Classifier
from qtx.nn.layers import Dense, Embed, LayerNorm
from qtx.nn.transformer import ACTIVATIONS, run_layers
from qtx.quant import QuantPlan, QuantPoint
from qtx.quant.integer import as_float


def roberta_position_ids(input_ids, pad_token_id: int):
    """``pad + cumsum(mask) * mask``: real tokens count from ``pad + 1``, padding gets ``pad``."""
    mask = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask + pad_token_id


class BertEmbeddings(nn.Module):
    """``LN(word + position + token_type)`` (B, T) -> (B, T, D); ``word.attend`` ties heads."""

    cfg: ModelConfig
    plan: QuantPlan = QuantPlan()

    def setup(self):
        c, p = self.cfg, self.plan
        init = nn.initializers.normal(c.init_std)
        self.word = Embed(c.vocab_size, c.hidden_size, p, init, c.compute_dtype)
        self.position = Embed(c.max_positions, c.hidden_size, p, init, c.compute_dtype)
        self.token_type = Embed(c.type_vocab_size, c.hidden_size, p, init, c.compute_dtype)
        self.sum = QuantPoint(p)
        self.ln = LayerNorm(
            p,
            c.ln_eps,
            non_scaling=c.gamma_migrated,
            operand=True,
            shortcut_affine=c.shortcut_affine,  # it feeds layer 0's shortcut
        )
        self.drop = nn.Dropout(c.dropout)

    def __call__(self, input_ids, token_type_ids, deterministic=True, token_mask=None):
        c = self.cfg
        if c.family == "roberta":
            pos = roberta_position_ids(input_ids, c.pad_token_id)
        else:
            pos = jnp.broadcast_to(jnp.arange(input_ids.shape[1])[None], input_ids.shape)
        h = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)
        h = self.ln(self.sum(h, token_mask), token_mask)
        return self.drop(h, deterministic=deterministic or c.dropout == 0)


class Bert(nn.Module):
    """BERT / RoBERTa. ``input_ids`` (B, T) -> dict with ``last_hidden_state`` (B, T, D),
    ``pooled`` (B, D) when there is a pooler, ``logits`` ((B, T, V) for ``mlm``, (B, L) for
    ``classification``) and ``hidden_states`` (L + 1 tensors) when ``output_hidden_states``.
    """

    cfg: ModelConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ):
        c, p = self.cfg, self.plan
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        token_mask = attention_mask.astype(bool)
        embed = BertEmbeddings(c, p, name="embed")
        h = embed(input_ids, token_type_ids, deterministic, token_mask)
        mask = token_mask[:, None, None, :]
        pooled = c.pooler or c.head == "classification"
        h, states = run_layers(
            c.block(),
            p,
            c.num_layers,
            h,
            mask,
            token_mask,
            deterministic,
            c.remat,
            output_hidden_states,
            _embed_shortcut(c, embed),
            scan=c.scan_layers,
            remat_policy=c.remat_policy,
            pooled=pooled,
        )
        hq, h = h, as_float(h)  # hq: a QArray in an integer plan (the MLM transform's input)
        out = {"last_hidden_state": h}
        if output_hidden_states:
            out["hidden_states"] = states
        dropout = nn.Dropout(c.dropout)
        init = nn.initializers.normal(c.init_std)
        if pooled:
            out["pooled"] = Pooler(c, p, name="pooler")(h[:, 0])
        if c.head == "classification":
            x = dropout(out["pooled"], deterministic=deterministic or c.dropout == 0)
            out["logits"] = Classifier(c.num_labels, p, init, c.compute_dtype, name="classifier")(x)
        elif c.head == "mlm":
            out["logits"] = MLMHead(c, p, name="mlm_head")(hq, embed.word.attend, token_mask)
        return out


def _embed_shortcut(c: ModelConfig, embed: BertEmbeddings):
    """How layer 0's shortcut reads the embedding LN output (``qtx.nn.transformer``)."""
    if c.gamma_migrated:
        return embed.ln.migrated_gamma()
    return embed.ln.shortcut() if c.shortcut_affine else None


class Pooler(nn.Module):
    """``tanh(dense(x))`` on the first token; points ``in``, ``dense/weight``, ``out``."""

    cfg: ModelConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, x):
        c, p = self.cfg, self.plan
        x = QuantPoint(p, name="in", operand=True)(x)
        init = nn.initializers.normal(c.init_std)
        x = jnp.tanh(Dense(c.hidden_size, p, True, init, c.compute_dtype, name="dense")(x))
        return QuantPoint(p, name="out")(x)


class MLMHead(nn.Module):
    """``LN(act(dense(h))) @ E^T + b`` with the word embedding ``E`` (tied)."""

    cfg: ModelConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, h, attend, token_mask=None):
        c, p = self.cfg, self.plan
        init = nn.initializers.normal(c.init_std)
        h = Dense(c.hidden_size, p, True, init, c.compute_dtype, name="transform")(h)
        h = QuantPoint(p, name="act")(ACTIVATIONS[c.activation](h), token_mask)
        h = LayerNorm(p, c.ln_eps, name="ln")(h, token_mask)
        logits = attend(h)
        logits = logits + self.param("bias", nn.initializers.zeros, (c.vocab_size,))
        return QuantPoint(p, name="logits")(logits.astype(jnp.float32), token_mask)


BERT_FAMILY = Family(
    name="bert",
    module=Bert,
    heads=("mlm", "classification", "none"),
    tasks=("mlm", "classification"),
    model_inputs=text_inputs_with_token_types,
    dummy_inputs=text_dummy_inputs,
    kurtosis_points=(layer_points("ffn/out|ffn_ln/out"),),
    inf_norm_points=(layer_points("ffn/out|ffn_ln/out|residual_ffn"),),
    headline_point=r"ffn/out$",
    migrate_embed_ln=True,
    tokens_per_example=text_tokens,
)
ROBERTA_FAMILY = dataclasses.replace(BERT_FAMILY, name="roberta")
