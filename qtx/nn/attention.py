"""Multi-head self-attention with named quantization points, variants, GQA and RoPE.

The normalisers (vanilla, clipped, normalized clipped, off-by-one, learned sinks, softpick) and
gates (Quantizable Transformers' and the output gate of Qiu et al.) are configured by
:class:`~qtx.nn.attention_variants.AttentionConfig` and defined in
:mod:`qtx.nn.attention_variants` (docs/methods.md §1, §4).

Decoders (``qtx.models.llama``) add grouped-query attention (``num_kv_heads`` key/value heads,
each shared by ``H / KV`` query heads), a head width ``head_dim`` independent of D / H,
per-head RMSNorm on q and k (``qk_norm``, Qwen3) and rotary position embeddings applied to q
and k after that norm (``rope``, :mod:`qtx.nn.rope`).

Points (``head_axis`` in brackets): ``q`` (B, T, H, Dh), ``k``, ``v`` (B, S, KV, Dh), ``context``
(B, T, H, Dh) [2]; ``scores`` (after the ``1/sqrt(Dh)`` scaling, before the mask) and ``softmax``
(B, H, T, S) [1]; ``out`` (B, T, D), the output projection. Weights: ``q_proj``, ``k_proj``,
``v_proj`` (or ``qkv_proj``), ``o_proj`` and, with ``qk_norm``, ``q_norm`` / ``k_norm``; gates
live under ``gate/``, learned sink logits in ``sink`` (H,).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtx.errors import UserError
from qtx.nn.attention_variants import (
    FINETUNE_GATE_STD,
    GATE_CONDITIONS,
    GATES,
    SOFTMAXES,
    AttentionConfig,
    Gate,
    attention_probs,
    clipped_softmax,
    off_by_one_softmax,
    softmax,
    softpick,
    torch_linear_init,
)
from qtx.nn.hadamard import online_hadamard
from qtx.nn.layers import Dense
from qtx.nn.norms import RMSNorm
from qtx.nn.rope import apply_rope
from qtx.quant import POINTS, TOKENS, QuantPlan, QuantPoint
from qtx.quant.integer import as_float, matmul, merge_trailing, repeat

__all__ = [
    "ATTENTION",
    "ATTENTION_KERNELS",
    "FINETUNE_GATE_STD",
    "GATES",
    "GATE_CONDITIONS",
    "SOFTMAXES",
    "AttentionConfig",
    "Gate",
    "MultiHeadAttention",
    "attention_probs",
    "block_attention",
    "clipped_softmax",
    "off_by_one_softmax",
    "softmax",
    "softpick",
    "torch_linear_init",
]

ATTENTION = "attention"  # collection of attention probabilities, when made mutable
# how the context is computed: "einsum" (scores, softmax and context as written here, every
# point available), "dot_product_attention" (jax.nn.dot_product_attention wherever nothing
# needs the scores or probabilities) or "auto" (the latter on GPUs: cuDNN flash attention)
ATTENTION_KERNELS = ("auto", "einsum", "dot_product_attention")


class MultiHeadAttention(nn.Module):
    """Self-attention ``x`` (B, T, D) -> (B, T, D) with named points (see module docstring).

    ``mask``: bool (B, 1 or H, T, S), True where attention is allowed. ``token_mask``: bool
    (B, T) of real tokens, used by per-head gates. ``score_bias`` (1 or B, H, T, S) is added
    to the scaled scores before the ``scores`` point (Swin's relative position bias). ``rope``:
    ``(cos, sin)`` (B, T, R) rotary tables (:func:`qtx.nn.rope.rope_tables`), or None.
    ``x`` may be a QArray (a quantized LayerNorm output in an integer plan); ``q k^T``
    (``qk``) and ``probs v`` (``pv``) run as integer matmuls when their inputs are quantized.
    """

    num_heads: int
    cfg: AttentionConfig = AttentionConfig()
    plan: QuantPlan = QuantPlan()
    fused_qkv: bool = False
    use_bias: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    out_init_std: float | None = None
    dtype: Any = jnp.float32
    causal: bool = False  # only gates need it (their per-head pooling); ``mask`` is causal
    torch_init: str = ""  # projections (letters of "qkvo") with PyTorch's default Linear init
    kernel: str = "auto"  # see ATTENTION_KERNELS
    num_kv_heads: int | None = None  # grouped-query attention (None: num_heads)
    head_dim: int | None = None  # None: D / num_heads
    qkv_bias: bool | None = None  # biases of q/k/v (None: use_bias, which o_proj always follows)
    qk_norm: str = ""  # "" or the RMSNorm kind of the per-head q/k norms (qtx.nn.norms)
    norm_eps: float = 1e-6  # epsilon of the q/k norms
    online_hadamard: bool = False  # o_proj input times I ⊗ H_b before the context point

    @nn.compact
    def __call__(
        self,
        x,
        mask=None,
        token_mask=None,
        deterministic: bool = True,
        score_bias=None,
        rope=None,
    ):
        b, t, d = x.shape
        h = self.num_heads
        kv = self.num_kv_heads or h
        if self.head_dim is None and d % h:
            raise UserError(f"hidden_size={d} is not divisible by num_heads={h}.")
        if h % kv:
            raise UserError(f"num_heads={h} is not divisible by num_kv_heads={kv}.")
        dh = self.head_dim or d // h
        p = self.plan
        name = "/".join(self.path)
        qkv_bias = self.use_bias if self.qkv_bias is None else self.qkv_bias

        def dense(name, features, std=None):
            use_bias = self.use_bias if name == "o_proj" else qkv_bias
            if name[0] in self.torch_init:  # PyTorch's default Linear init, weight and bias
                init = torch_linear_init(x.shape[-1] if name != "o_proj" else h * dh)
                return Dense(features, p, use_bias, init, self.dtype, init, name=name)
            init = nn.initializers.normal(std or self.init_std)
            return Dense(features, p, use_bias, init, self.dtype, name=name)

        if self.fused_qkv:
            qkv = dense("qkv_proj", (h + 2 * kv) * dh)(x)
            q, k, v = jnp.split(qkv, [h * dh, (h + kv) * dh], axis=-1)
        else:
            q = dense("q_proj", h * dh)(x)
            k, v = (dense(n, kv * dh)(x) for n in ("k_proj", "v_proj"))
        q, k, v = q.reshape(b, t, h, dh), k.reshape(b, t, kv, dh), v.reshape(b, t, kv, dh)
        if self.qk_norm:
            q = RMSNorm(p, self.norm_eps, self.qk_norm, out_point=False, name="q_norm")(q)
            k = RMSNorm(p, self.norm_eps, self.qk_norm, out_point=False, name="k_norm")(k)
        if rope is not None:
            q, k = apply_rope(q, *rope).astype(q.dtype), apply_rope(k, *rope).astype(k.dtype)
        # the points' statistics see real tokens only: (B, T) rows, (B, 1, T, S) pairs
        pairs = None  # the (query, key) pairs of real tokens
        if token_mask is not None:
            pairs = token_mask[:, None, :, None] & token_mask[:, None, None, :]
        q = QuantPoint(p, head_axis=2, operand=True, name="q")(q, token_mask)
        k = QuantPoint(p, head_axis=2, operand=True, name="k")(k, token_mask)
        v = QuantPoint(p, head_axis=2, operand=True, name="v")(v, token_mask)
        if kv != h:  # every key/value head serves h / kv consecutive query heads
            k, v = (repeat(y, h // kv, axis=2) for y in (k, v))
        o_proj = lambda c: dense("o_proj", d, self.out_init_std)(c)  # noqa: E731
        sink = None
        if self.cfg.softmax == "sink":
            sink = self.param("sink", nn.initializers.constant(self.cfg.sink_init), (h,))
        if self._fused(name, deterministic):
            context = jax.nn.dot_product_attention(
                as_float(q).astype(self.dtype),
                as_float(k).astype(self.dtype),
                as_float(v).astype(self.dtype),
                bias=None if score_bias is None else score_bias.astype(self.dtype),
                mask=mask,
            )
            return self._output(x, context, token_mask, o_proj)
        heads_first = lambda y: y.transpose(0, 2, 1, 3)  # noqa: E731
        qk = lambda lhs, rhs: jnp.einsum(  # noqa: E731
            "bhtd,bhsd->bhts", heads_first(lhs), heads_first(rhs)
        )
        dtype = as_float(q).dtype
        inv_sqrt_d = 1.0 / math.sqrt(dh)  # applied to q (B, T, H, Dh), 1/T the work of scores
        scores = matmul(
            "bthd,bshd->bhts", q, k, qk, f"{name}/qk", not p.float_matmuls, lhs_scale=inv_sqrt_d
        ).astype(dtype)
        if score_bias is not None:
            scores = scores + score_bias.astype(scores.dtype)
        scores = QuantPoint(p, head_axis=1, name="scores")(scores, pairs)
        if mask is not None:
            scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = attention_probs(scores, self.cfg, mask, sink).astype(self.dtype)
        probs = QuantPoint(p, head_axis=1, operand=True, name="softmax")(probs, pairs)
        if self.is_mutable_collection(ATTENTION) and not self.is_initializing():
            self.sow(ATTENTION, "probs", as_float(probs))  # for the no-op attention figures
        if self.dropout > 0 and not deterministic:
            probs = nn.Dropout(self.dropout)(as_float(probs), deterministic=False)
        pv = lambda lhs, rhs: heads_first(  # noqa: E731
            jnp.einsum("bhts,bhsd->bhtd", lhs, heads_first(rhs))
        )
        context = matmul("bhts,bshd->bthd", probs, v, pv, f"{name}/pv", not p.float_matmuls)
        context = context.astype(jnp.result_type(as_float(probs), as_float(v)))
        return self._output(x, context, token_mask, o_proj)

    def _fused(self, name: str, deterministic: bool) -> bool:
        """Whether ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPUs) computes
        the context: the kernel allows it, the softmax is vanilla, and nothing needs the
        scores or probabilities (no rule or statistic at ``scores`` / ``softmax``, no
        attention dropout in training, no collection of probabilities or points)."""
        if self.kernel == "einsum" or (self.kernel == "auto" and jax.default_backend() != "gpu"):
            return False
        if self.cfg.softmax != "vanilla" or self.plan.integer:
            return False
        if self.dropout > 0 and not deterministic:
            return False
        if any(self.is_mutable_collection(c) for c in (ATTENTION, POINTS, TOKENS)):
            return False
        for point in ("scores", "softmax"):
            full = f"{name}/{point}"
            if self.plan.resolve(full, "act")[0] is not None or self.plan.tracks(full):
                return False
        return True

    def _output(self, x, context, token_mask, o_proj):
        """Gate, online Hadamard (rotated decoders: ``context`` flattened to H·Dh times
        :func:`qtx.nn.hadamard.online_hadamard`), ``context`` point and ``o_proj`` of
        ``context`` (B, T, H, Dh)."""
        b, t, h, dh = context.shape
        p = self.plan
        if self.cfg.gate != "none":
            gate = Gate(h, self.cfg, p, causal=self.causal, head_dim=dh, name="gate")
            pi = gate(as_float(x), token_mask)
            pi = pi if pi.ndim == 4 else pi[..., None]  # elementwise: (B, T, H, Dh)
            context = context * pi.astype(context.dtype)
        if self.online_hadamard:
            context = online_hadamard(context.reshape(b, t, h * dh)).reshape(b, t, h, dh)
        context = QuantPoint(p, head_axis=2, operand=True, name="context")(context, token_mask)
        context = merge_trailing(context, 2)  # (B, T, H·Dh); a per-token QArray stays one
        return QuantPoint(p, name="out")(o_proj(context), token_mask)


def block_attention(c, plan: QuantPlan) -> MultiHeadAttention:
    """The self-attention of a layer whose settings are ``c`` (a
    :class:`qtx.nn.transformer.BlockConfig`), for both the transformer and the decoder block."""
    return MultiHeadAttention(
        c.num_heads,
        c.attention,
        plan,
        fused_qkv=c.fused_qkv,
        use_bias=c.use_bias,
        dropout=c.attention_dropout,
        init_std=c.init_std,
        out_init_std=c.out_init_std,
        dtype=c.dtype,
        causal=c.causal,
        torch_init=c.attn_torch_init,
        kernel=c.attention_kernel,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        qkv_bias=c.qkv_bias,
        qk_norm=c.norm if c.qk_norm else "",
        norm_eps=c.ln_eps,
        online_hadamard=c.online_hadamard and c.layer == "decoder",  # rotated decoders only
    )
