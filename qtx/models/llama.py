"""LLaMA-style decoders: Llama 2/3, Mistral (no sliding window), Qwen2, Qwen3 and the
full-attention layers of Qwen3.5, as one family (``llama``) of configuration fields.

A pre-RMSNorm stack of :class:`~qtx.nn.decoder.DecoderLayer` (GQA attention with RoPE, SwiGLU
FFN) between the word embedding and a final RMSNorm, with a tied or untied LM head. Points
besides the layers' (docs/quantization_points.md)::

    embed/word/weight             (V, D) the embedding table
    embed/sum                     (B, T, D) the embedding output, start of the residual stream
    final_ln/weight, final_ln/out the final RMSNorm
    lm_head/weight                (D, V) untied heads only
    lm_head/logits                (B, T, V)

Positions count real tokens, ``pos = max(cumsum(mask) - 1, 0)``, so left-padded batches give
every sequence the positions it has alone (pass the same ``position_ids`` to HF). What differs
between the HF model types is configuration: ``num_kv_heads``, ``head_dim``, ``rope_theta``,
``partial_rotary_factor``, ``rope_scaling`` (Llama 3), ``norm`` (``rmsnorm`` or Qwen3.5's
``rmsnorm_zero_centered``), ``qk_norm`` (Qwen3, Qwen3.5), ``qkv_bias`` (Qwen2), ``use_bias``
(o_proj), ``mlp_bias``, ``tie_embeddings``; Qwen3.5's output gate is the attention variant
``gate="elementwise"`` (docs/methods.md §4).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from qtx.models.family import (
    PRE_LN_OUTLIER_POINTS,
    Family,
    causal_layers,
    text_dummy_inputs,
    text_inputs,
    text_tokens,
)
from qtx.nn.layers import Embed, quantized_weight
from qtx.nn.norms import RMS_NORMS, RMSNorm
from qtx.nn.rope import inv_frequencies, rope_tables, rotary_dims
from qtx.quant import QuantPlan, QuantPoint
from qtx.quant.integer import as_float


def decoder_position_ids(attention_mask):
    """``max(cumsum(mask) - 1, 0)`` (B, T): each real token's index among the real tokens."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


class DecoderEmbed(nn.Module):
    """Token embedding ``word`` and the point ``sum`` on its output (B, T, D)."""

    cfg: object  # ModelConfig
    plan: QuantPlan = QuantPlan()

    def setup(self):
        c = self.cfg
        init = nn.initializers.normal(c.init_std)
        self.word = Embed(c.vocab_size, c.hidden_size, self.plan, init, c.compute_dtype)
        self.sum = QuantPoint(self.plan)

    def __call__(self, input_ids, token_mask):
        return self.sum(self.word(input_ids), token_mask)


class DecoderLMHead(nn.Module):
    """``h @ E^T`` with the full-precision embedding table (tied) or ``h @ W`` with its own
    kernel (D, V) behind the point ``weight`` (untied); point ``logits``."""

    cfg: object  # ModelConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, h, attend, token_mask=None):
        c = self.cfg
        if c.tie_embeddings:
            logits = attend(h)
        else:
            init = nn.initializers.normal(c.init_std)
            shape = (c.hidden_size, c.vocab_size)
            w = as_float(quantized_weight(self, "kernel", init, shape, self.plan))
            logits = jnp.dot(h.astype(c.compute_dtype), w.astype(c.compute_dtype))
        return QuantPoint(self.plan, name="logits")(logits.astype(jnp.float32), token_mask)


class Llama(nn.Module):
    """``input_ids`` (B, T) -> dict with ``last_hidden_state`` (B, T, D) (after ``final_ln``),
    ``logits`` (B, T, V) for the ``clm`` head and, with ``output_hidden_states``, the L + 1
    ``hidden_states`` as HF reports them (embeddings, each layer's output; the last one after
    the final norm)."""

    cfg: object  # ModelConfig
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
        embed = DecoderEmbed(c, p, name="embed")
        h = embed(input_ids, token_mask)
        inv_freq = inv_frequencies(
            c.attention_head_dim, c.rope_theta, c.partial_rotary_factor, c.rope_scaling
        )
        rope = rope_tables(decoder_position_ids(attention_mask), inv_freq)
        h, states = causal_layers(c, p, h, token_mask, deterministic, output_hidden_states, rope)
        h = RMSNorm(p, c.ln_eps, c.norm, name="final_ln")(h, token_mask)
        out = {"last_hidden_state": h}
        if output_hidden_states:
            out["hidden_states"] = states[:-1] + (h,)
        if c.head == "clm":
            out["logits"] = DecoderLMHead(c, p, name="lm_head")(h, embed.word.attend, token_mask)
        return out


def check_llama(cfg, bad) -> None:
    """The decoder fields of a ``llama`` config (normalises ``rope_scaling`` to a tuple)."""
    if cfg.norm not in RMS_NORMS:
        bad("norm", f"{', '.join(RMS_NORMS)} for family 'llama'")
    if cfg.activation != "silu":
        bad("activation", "'silu' for family 'llama' (SwiGLU)")
    if not cfg.pre_ln or not cfg.final_ln:
        bad("pre_ln" if not cfg.pre_ln else "final_ln", "True for family 'llama'")
    if cfg.word_embed_proj_dim is not None:
        bad("word_embed_proj_dim", "None for family 'llama'")
    if cfg.position_offset != 0:
        bad("position_offset", "0 for family 'llama' (rotary positions)")
    if cfg.gamma_migrated:
        bad("gamma_migrated", "False for family 'llama' (gamma migration moves LayerNorm gammas)")
    if cfg.rotated and cfg.tie_embeddings:
        bad(
            "tie_embeddings",
            "False with rotated=True (the rotation folds the final norm into its own LM head)",
        )
    if cfg.rotated and cfg.head != "clm":
        bad("head", "'clm' with rotated=True (the final norm is folded into the LM head)")
    kv = cfg.num_kv_heads
    if kv is not None and (int(kv) < 1 or cfg.num_heads % int(kv)):
        bad("num_kv_heads", f"None or a positive divisor of num_heads={cfg.num_heads}")
    if cfg.head_dim is not None and int(cfg.head_dim) < 2:
        bad("head_dim", "None or an integer >= 2")
    head_dim = cfg.attention_head_dim
    if not 0.0 < cfg.partial_rotary_factor <= 1.0:
        bad("partial_rotary_factor", "a number in (0, 1]")
    elif (
        int(head_dim * cfg.partial_rotary_factor) % 2
        or rotary_dims(head_dim, cfg.partial_rotary_factor) < 2
    ):
        bad(
            "partial_rotary_factor",
            f"a factor giving an even number >= 2 of rotated dims of head_dim={head_dim}",
        )
    if not cfg.rope_theta > 0:
        bad("rope_theta", "a positive number")
    if cfg.rope_scaling is not None:
        scaling = tuple(cfg.rope_scaling)
        ok = len(scaling) == 4 and all(isinstance(v, int | float) for v in scaling)
        if not ok or not (scaling[0] > 0 and 0 < scaling[1] < scaling[2] and scaling[3] > 0):
            bad(
                "rope_scaling",
                "None or Llama-3's (factor > 0, low_freq_factor, high_freq_factor > low, "
                "original_max_positions > 0)",
            )
        object.__setattr__(cfg, "rope_scaling", scaling)


LLAMA_FAMILY = Family(
    name="llama",
    module=Llama,
    heads=("clm", "none"),
    tasks=("clm",),
    model_inputs=text_inputs,
    dummy_inputs=text_dummy_inputs,
    kurtosis_points=PRE_LN_OUTLIER_POINTS,
    inf_norm_points=PRE_LN_OUTLIER_POINTS,
    headline_point=r"residual_ffn$",
    causal=True,
    finetune_gate_std=0.001,
    tokens_per_example=text_tokens,
    check=check_llama,
    decoder_fields=True,
    unfit_presets=("qv_lsq", "lsq", "binary"),
    unfit_presets_reason=(
        "written for fc1/fc2 FFNs with an unsigned GELU output, they would leave SwiGLU's "
        "gate/up/down kernels in full precision and clip its signed product at 0"
    ),
)
