"""Multi-head attention with softmax variants and gates (Quantizable Transformers).

Softmax variants (:class:`AttentionConfig.softmax`):

* ``vanilla``;
* ``clipped``: ``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)``; with ``alpha`` set,
  ``gamma = -alpha / T`` (``T`` = ``softmax_T`` or the key length) and ``zeta = 1``;
* ``off_by_one``: ``exp(x_i) / (1 + sum_j exp(x_j))``.

Gates multiply each head's output before the output projection:
``out_h(t) = pi_h(t) * (softmax(q k^T / sqrt(d)) v)_h(t)`` with ``pi = sigmoid(G(x))``:

* ``linear``: per head, ``Linear(d_head -> 1)`` on the head's slice of x;
* ``mlp`` / ``mlp_wide``: per head, ``d_head -> d_head/4`` (or ``d_head``) ``-> 1`` with ReLU;
* ``all_heads_linear``: ``Linear(d_model -> n_heads)`` on the full x;
* initialisation, as the reference code: weights and biases take PyTorch's default Linear init
  (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``) unless ``gate_init_std`` is set (weights
  ``N(0, gate_init_std)``, hidden biases 0); the output bias is ``logit(pi_init)`` when
  ``pi_init`` is set (the papers' recipes set it for the per-head linear gate only);
* ``gate_condition``: ``token`` (one gate per token), ``head`` (logits mean-pooled over the
  real tokens: one gate per head and sequence; in causal models (OPT) a running mean over
  positions <= t, so no gate sees a later token) or ``none`` (one learned scalar per head,
  initialised to 0, or to ``logit(pi_init)`` in fine-tuning mode);
* ``gate_finetune``: the gate is divided by ``pi_init`` (required) and gate weights start at
  ``N(0, gate_init_std)`` (the model family's default when unset: 0.01, OPT 0.001) with the
  output bias ``logit(pi_init)``, for every gate type, so a pretrained model starts unchanged
  (the reference code does this for the linear gate only).

Points (``head_axis`` in brackets): ``q``, ``k``, ``v``, ``context`` (B, T, H, Dh) [2];
``scores`` (after the ``1/sqrt(d)`` scaling, before the mask) and ``softmax`` (B, H, T, S) [1];
``out`` (B, T, D), the output projection. Weights: ``q_proj``, ``k_proj``, ``v_proj`` (or
``qkv_proj``) and ``o_proj``; the gate lives under ``gate/``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtx.errors import UserError
from qtx.nn.kernels import softmax_last
from qtx.nn.layers import Dense
from qtx.quant import POINTS, TOKENS, QuantPlan, QuantPoint
from qtx.quant.integer import as_float, matmul, relayout

ATTENTION = "attention"  # collection of attention probabilities, when made mutable
SOFTMAXES = ("vanilla", "clipped", "off_by_one")
GATES = ("none", "linear", "mlp", "mlp_wide", "all_heads_linear")
GATE_CONDITIONS = ("token", "head", "none")
# how the context is computed: "einsum" (scores, softmax and context as written here, every
# point available), "dot_product_attention" (jax.nn.dot_product_attention wherever nothing
# needs the scores or probabilities) or "auto" (the latter on GPUs: cuDNN flash attention)
ATTENTION_KERNELS = ("auto", "einsum", "dot_product_attention")
FINETUNE_GATE_STD = 0.01  # gate weight std in fine-tuning mode when unset (reference: BERT)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    softmax: str = "vanilla"
    gamma: float = 0.0
    zeta: float = 1.0
    alpha: float | None = None
    softmax_T: int | None = None
    gate: str = "none"
    gate_condition: str = "token"
    pi_init: float | None = None
    gate_finetune: bool = False
    gate_init_std: float | None = None

    def __post_init__(self):
        def bad(field, value, allowed):
            raise UserError(
                f"config.model.attention.{field}={value!r} is invalid; allowed: {allowed}."
            )

        if self.softmax not in SOFTMAXES:
            bad("softmax", self.softmax, ", ".join(SOFTMAXES))
        if self.gate not in GATES:
            bad("gate", self.gate, ", ".join(GATES))
        if self.gate_condition not in GATE_CONDITIONS:
            bad("gate_condition", self.gate_condition, ", ".join(GATE_CONDITIONS))
        if self.pi_init is not None and not 0.0 < self.pi_init < 1.0:
            bad("pi_init", self.pi_init, "a number in (0, 1) or None")
        if self.gate_finetune and self.pi_init is None:
            bad("pi_init", self.pi_init, "a number in (0, 1) when gate_finetune=True")
        if self.gate_init_std is not None and self.gate_init_std < 0:
            bad("gate_init_std", self.gate_init_std, "a number >= 0 or None")
        if self.softmax == "clipped":
            if self.alpha is not None and self.alpha <= 0:
                bad("alpha", self.alpha, "a positive number or None")
            if self.alpha is None and not (self.gamma <= 0 and self.zeta >= 1):
                bad("gamma/zeta", (self.gamma, self.zeta), "gamma <= 0 and zeta >= 1")
        if self.softmax_T is not None and self.softmax_T < 1:
            bad("softmax_T", self.softmax_T, "a positive integer or None")

    def clip_bounds(self, key_len: int) -> tuple[float, float]:
        """``(gamma, zeta)`` of the clipped softmax for keys of length ``key_len``."""
        if self.alpha is not None:
            return -self.alpha / float(self.softmax_T or key_len), 1.0
        return self.gamma, self.zeta


def clipped_softmax(x, gamma: float, zeta: float, axis: int = -1):
    """``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)``; clipped entries get no gradient."""
    return jnp.clip((zeta - gamma) * softmax(x, axis) + gamma, 0.0, 1.0)


def off_by_one_softmax(x, axis: int = -1):
    """``exp(x_i) / (1 + sum_j exp(x_j))``, computed stably."""
    m = jax.lax.stop_gradient(jnp.maximum(jnp.max(x, axis=axis, keepdims=True), 0.0))
    e = jnp.exp(x - m)
    return e / (jnp.exp(-m) + jnp.sum(e, axis=axis, keepdims=True))


def attention_probs(scores, cfg: AttentionConfig):
    """Row-normalised attention weights of the configured variant, float32 (B, H, T, S)."""
    scores = scores.astype(jnp.float32)
    if cfg.softmax == "clipped":
        gamma, zeta = cfg.clip_bounds(scores.shape[-1])
        return clipped_softmax(scores, gamma, zeta)
    if cfg.softmax == "off_by_one":
        return off_by_one_softmax(scores)
    return softmax_last(scores)


def softmax(x, axis: int = -1):
    """Softmax over ``axis``, with the closed-form backward pass over the last axis."""
    if axis in (-1, x.ndim - 1):
        return softmax_last(x)
    return jax.nn.softmax(x, axis=axis)


class Gate(nn.Module):
    """Gate probabilities ``pi`` from the attention input ``x`` (B, T, D).

    Returns (B, T, H) for token gates, (B, 1, H) for per-head and unconditional gates.
    Per-head gates mean-pool the logits over the real tokens (``mask`` (B, T)); in a causal
    model (``causal``) the pool at position t covers positions <= t only, a running mean
    ``sum_{s<=t} m_s l_s / max(sum_{s<=t} m_s, 1)`` of shape (B, T, H), so no gate sees a
    later token.
    """

    num_heads: int
    cfg: AttentionConfig
    plan: QuantPlan = QuantPlan()
    causal: bool = False

    @nn.compact
    def __call__(self, x, mask=None):
        cfg, h = self.cfg, self.num_heads
        b, t, d = x.shape
        dh = d // h
        xf = x.astype(jnp.float32)
        if cfg.gate_condition == "none":
            # initialised to 0, or to logit(pi_init) in fine-tuning mode (gate starts at 1)
            init0 = self._out_bias_init(1) if cfg.gate_finetune else nn.initializers.zeros
            logits = self.param("logit", init0, (h,))[None, None, :]
        elif cfg.gate == "all_heads_linear":
            logits = Dense(
                h,
                self.plan,
                kernel_init=self._weight_init(d),
                bias_init=self._out_bias_init(d),
                name="dense",
            )(xf)
        else:
            xh = xf.reshape(b, t, h, dh)
            if cfg.gate == "linear":
                w = self.param("kernel", self._weight_init(dh), (h, dh))
                logits = jnp.einsum("bthd,hd->bth", xh, w)
                logits = logits + self.param("bias", self._out_bias_init(dh), (h,))
            else:
                hidden = dh if cfg.gate == "mlp_wide" else max(dh // 4, 1)
                w1 = self.param("hidden_kernel", self._weight_init(dh), (h, dh, hidden))
                b1 = self.param("hidden_bias", self._hidden_bias_init(dh), (h, hidden))
                z = jax.nn.relu(jnp.einsum("bthd,hdk->bthk", xh, w1) + b1)
                w2 = self.param("out_kernel", self._weight_init(hidden), (h, hidden))
                b2 = self.param("bias", self._out_bias_init(hidden), (h,))
                logits = jnp.einsum("bthk,hk->bth", z, w2) + b2
        if cfg.gate_condition == "head":
            m = jnp.ones((b, t, 1)) if mask is None else mask.astype(jnp.float32)[..., None]
            if self.causal:
                num, den = jnp.cumsum(logits * m, axis=1), jnp.cumsum(m, axis=1)
            else:
                num, den = (logits * m).sum(1, keepdims=True), m.sum(1, keepdims=True)
            logits = num / jnp.maximum(den, 1.0)
        pi = jax.nn.sigmoid(logits)
        return pi / cfg.pi_init if cfg.gate_finetune else pi

    def _weight_init(self, fan_in: int):
        std = self.cfg.gate_init_std
        if std is None and self.cfg.gate_finetune:
            std = FINETUNE_GATE_STD
        return torch_linear_init(fan_in) if std is None else nn.initializers.normal(std)

    def _hidden_bias_init(self, fan_in: int):
        if self.cfg.gate_init_std is None and not self.cfg.gate_finetune:
            return torch_linear_init(fan_in)
        return nn.initializers.zeros

    def _out_bias_init(self, fan_in: int):
        pi = self.cfg.pi_init
        if pi is None:
            return torch_linear_init(fan_in)
        return nn.initializers.constant(math.log(pi / (1.0 - pi)))


def torch_linear_init(fan_in: int):
    """PyTorch's default ``nn.Linear`` init of weights and biases: ``U(-1/sqrt(fan_in),
    1/sqrt(fan_in))`` (std ``1/sqrt(3 fan_in)``)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


class MultiHeadAttention(nn.Module):
    """Self-attention ``x`` (B, T, D) -> (B, T, D) with named points (see module docstring).

    ``mask``: bool (B, 1 or H, T, S), True where attention is allowed. ``token_mask``: bool
    (B, T) of real tokens, used by per-head gates. ``score_bias`` (1 or B, H, T, S) is added
    to the scaled scores before the ``scores`` point (Swin's relative position bias).
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

    @nn.compact
    def __call__(self, x, mask=None, token_mask=None, deterministic: bool = True, score_bias=None):
        b, t, d = x.shape
        h = self.num_heads
        if d % h:
            raise UserError(f"hidden_size={d} is not divisible by num_heads={h}.")
        dh = d // h
        p = self.plan
        name = "/".join(self.path)

        def dense(name, features, std=None):
            if name[0] in self.torch_init:  # PyTorch's default Linear init, weight and bias
                init = torch_linear_init(d)
                return Dense(features, p, self.use_bias, init, self.dtype, init, name=name)
            init = nn.initializers.normal(std or self.init_std)
            return Dense(features, p, self.use_bias, init, self.dtype, name=name)

        if self.fused_qkv:
            q, k, v = jnp.split(dense("qkv_proj", 3 * d)(x), 3, axis=-1)
        else:
            q, k, v = (dense(n, d)(x) for n in ("q_proj", "k_proj", "v_proj"))
        split = lambda y: y.reshape(b, t, h, dh)  # noqa: E731
        # the points' statistics see real tokens only: (B, T) rows, (B, 1, T, S) pairs
        pairs = None  # the (query, key) pairs of real tokens
        if token_mask is not None:
            pairs = token_mask[:, None, :, None] & token_mask[:, None, None, :]
        q = QuantPoint(p, head_axis=2, operand=True, name="q")(split(q), token_mask)
        k = QuantPoint(p, head_axis=2, operand=True, name="k")(split(k), token_mask)
        v = QuantPoint(p, head_axis=2, operand=True, name="v")(split(v), token_mask)
        o_proj = lambda c: dense("o_proj", d, self.out_init_std)(c)  # noqa: E731
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
        probs = attention_probs(scores, self.cfg).astype(self.dtype)
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
        """Gate, ``context`` point and ``o_proj`` of ``context`` (B, T, H, Dh)."""
        b, t, h, dh = context.shape
        p = self.plan
        if self.cfg.gate != "none":
            pi = Gate(h, self.cfg, p, causal=self.causal, name="gate")(as_float(x), token_mask)
            context = context * pi[..., None].astype(context.dtype)
        context = QuantPoint(p, head_axis=2, operand=True, name="context")(context, token_mask)
        context = relayout(context, lambda y: y.reshape(b, t, h * dh))
        return QuantPoint(p, name="out")(o_proj(context), token_mask)
