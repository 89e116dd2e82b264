"""The LLaMA-style decoder block: pre-RMSNorm, GQA attention with RoPE, SwiGLU FFN.

Layer ``i`` (module ``layer_i``)::

    x = x + Attn(RMSNorm_attn(x))        points attn_ln/{weight,out}, attn/..., residual_attn
    x = x + FFN(RMSNorm_ffn(x))          points ffn_ln/{weight,out}, ffn/..., residual_ffn

with the SwiGLU FFN ``down(silu(gate(x)) * up(x))`` (points ``ffn/gate`` (B, T, F), the
``gate_proj`` output before SiLU; ``ffn/up`` the ``up_proj`` output; ``ffn/act`` the product,
``down_proj``'s input; ``ffn/out`` the ``down_proj`` output). A rotated decoder
(``online_hadamard``, :mod:`qtx.methods.quarot`) multiplies the product by the online
Hadamard transform :func:`qtx.nn.hadamard.online_hadamard` before ``ffn/act``, as attention
does before its ``context`` point; ``down_proj`` / ``o_proj`` hold ``H^T`` in their rows.
Attention is :class:`~qtx.nn.attention.MultiHeadAttention` with ``num_kv_heads``,
``head_dim``, q/k norms and the rotary tables the model computes once
(docs/quantization_points.md).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from qtx.nn.attention import block_attention
from qtx.nn.hadamard import online_hadamard
from qtx.nn.layers import Dense, drop_path
from qtx.nn.norms import RMSNorm
from qtx.quant import QuantPlan, QuantPoint
from qtx.quant.integer import as_float


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (B, T, D) -> (B, T, D) with the points above."""

    cfg: object  # qtx.nn.transformer.BlockConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, x, token_mask=None):
        c, p, m = self.cfg, self.plan, token_mask
        init = nn.initializers.normal(c.init_std)
        out_init = nn.initializers.normal(c.out_init_std or c.init_std)
        f = c.intermediate_size
        gate = Dense(f, p, c.mlp_bias, init, c.dtype, name="gate_proj")(x)
        gate = as_float(QuantPoint(p, name="gate")(gate, m))
        up = Dense(f, p, c.mlp_bias, init, c.dtype, name="up_proj")(x)
        up = as_float(QuantPoint(p, name="up")(up, m))
        h = jax.nn.silu(gate) * up
        if c.online_hadamard:
            h = online_hadamard(h)
        h = QuantPoint(p, name="act", operand=True)(h, m)
        out = Dense(x.shape[-1], p, c.mlp_bias, out_init, c.dtype, name="down_proj")(h)
        return QuantPoint(p, name="out")(out, m)


class DecoderLayer(nn.Module):
    """One pre-RMSNorm decoder block ``x`` (B, T, D) -> (B, T, D); ``mask`` bool (B, 1, T, S),
    ``rope`` the ``(cos, sin)`` tables (B, T, R). Same call signature as
    :class:`~qtx.nn.transformer.TransformerLayer` (``shortcut_gamma`` must be None)."""

    cfg: object  # qtx.nn.transformer.BlockConfig
    plan: QuantPlan = QuantPlan()
    head_ln: bool = False
    pooled: bool = False

    def setup(self):
        c, p = self.cfg, self.plan
        self.attn = block_attention(c, p)
        self.ffn = SwiGLU(c, p)
        self.attn_ln = RMSNorm(p, c.ln_eps, c.norm, operand=True)
        self.ffn_ln = RMSNorm(p, c.ln_eps, c.norm, operand=True)
        self.residual_attn = QuantPoint(p)
        self.residual_ffn = QuantPoint(p)
        self.drop = nn.Dropout(c.dropout)

    def output_gamma(self):
        return None

    def __call__(
        self,
        x,
        mask=None,
        token_mask=None,
        deterministic=True,
        shortcut_gamma=None,
        drop_rate=None,
        rope=None,
    ):
        c, m = self.cfg, token_mask
        rate = c.drop_path if drop_rate is None else drop_rate

        def branch(y):  # dropout, then stochastic depth (as the transformer block)
            y = self.drop(y, deterministic=deterministic or c.dropout == 0)
            return drop_path(self, y, rate, deterministic)

        a = branch(self.attn(self.attn_ln(x, m), mask, m, deterministic, rope=rope))
        x = self.residual_attn(as_float(x) + a, m)
        f = branch(self.ffn(self.ffn_ln(x, m), m))
        return self.residual_ffn(as_float(x) + f, m)
