"""Attention normalisers and gates selected by :class:`AttentionConfig` (docs/methods.md §1, §4).

Normalisers (``softmax``), over the keys a query may see (``mask``), float32 (B, H, T, S):

* ``vanilla``: ``softmax(x)``;
* ``clipped`` (Quantizable Transformers): ``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)``;
  with ``alpha`` set, ``gamma = -alpha / T`` (``T`` = ``softmax_T`` or the key length) and
  ``zeta = 1``;
* ``normalized_clipped`` (after Liao & Monz, 2024): the clipped softmax with ``gamma_i =
  -alpha / n_i`` and ``zeta = 1``, i.e. ``clip((1 + alpha / n_i) softmax(x) - alpha / n_i, 0, 1)``
  where ``n_i`` is the number of keys query ``i`` actually sees (its causal prefix of real
  tokens), so the clipping depends neither on padding nor on the training length;
* ``off_by_one`` (softmax_1): ``exp(x_i) / (1 + sum_j exp(x_j))``;
* ``sink`` (learned attention sinks, gpt-oss): ``exp(x_i) / (exp(s_h) + sum_j exp(x_j))`` with one
  learned logit ``s_h`` per head (parameter ``sink`` (H,), initialised to ``sink_init``);
  ``s_h = 0`` is ``off_by_one``;
* ``softpick``: ``relu(exp(x_i) - 1) / (sum_j |exp(x_j) - 1| + eps)``; rows need not sum to 1
  and may be all zero. Computed as ``relu(e^{x_i - m} - e^{-m}) / (sum_j |e^{x_j - m} - e^{-m}|
  + eps e^{-m})`` with ``m`` the row max (the same value); masked keys contribute nothing.

Gates multiply each head's output before the output projection, ``pi = sigmoid(G(x))`` from the
attention input ``x`` (B, T, D):

* Quantizable Transformers' gates: ``linear`` (per head, ``Linear(D/H -> 1)`` on the head's
  slice of x), ``mlp`` / ``mlp_wide`` (``D/H -> D/H/4`` (or ``D/H``) ``-> 1`` with ReLU),
  ``all_heads_linear`` (``Linear(D -> H)``). Initialisation as the reference code: PyTorch's
  default Linear init unless ``gate_init_std`` is set (weights ``N(0, gate_init_std)``, hidden
  biases 0); the output bias is ``logit(pi_init)`` when ``pi_init`` is set.
* The output gate of Qiu et al. (2025; Qwen3-Next, Qwen3.5): ``headwise`` (``W`` (D, H), one
  scalar per head) or ``elementwise`` (``W`` (D, H*Dh), one per channel), query-dependent, with
  the paper's init ``N(0, gate_init_std or 0.02)`` and no bias (the gate starts near 0.5);
  ``pi_init`` adds a bias initialised to ``logit(pi_init)`` to choose the starting value.
* ``gate_condition``: ``token`` (one gate per token), ``head`` (logits mean-pooled over the real
  tokens, in causal models a running mean over positions <= t) or ``none`` (one learned logit per
  head, initialised to 0, or ``logit(pi_init)`` in fine-tuning mode); output gates are
  token-conditioned only.
* ``gate_finetune``: the gate is divided by ``pi_init`` (required) and gate weights start at
  ``N(0, gate_init_std)`` (the family's default when unset: 0.01; OPT and llama 0.001) with
  the output bias ``logit(pi_init)``, for every gate type, so a pretrained model starts
  unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtx.errors import UserError
from qtx.nn.kernels import softmax_last
from qtx.nn.layers import Dense
from qtx.quant import QuantPlan

SOFTMAXES = ("vanilla", "clipped", "normalized_clipped", "off_by_one", "sink", "softpick")
QT_GATES = ("linear", "mlp", "mlp_wide", "all_heads_linear")  # Quantizable Transformers
OUTPUT_GATES = ("headwise", "elementwise")  # Qiu et al.'s output gate
GATES = ("none", *QT_GATES, *OUTPUT_GATES)
GATE_CONDITIONS = ("token", "head", "none")
FINETUNE_GATE_STD = 0.01  # gate weight std in fine-tuning mode when unset (reference: BERT)
OUTPUT_GATE_STD = 0.02  # the output gate's rows are extra rows of q_proj: N(0, 0.02)


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
    sink_init: float = 0.0  # starting value of the learned sink logits (softmax "sink")
    softpick_eps: float = 1e-6  # softpick's denominator epsilon

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
        if self.gate in OUTPUT_GATES and self.gate_condition != "token":
            bad("gate_condition", self.gate_condition, f"'token' with gate={self.gate!r}")
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
        if self.softmax == "normalized_clipped" and not (self.alpha or 0) > 0:
            bad("alpha", self.alpha, "a positive number with softmax='normalized_clipped'")
        if self.softmax_T is not None and self.softmax_T < 1:
            bad("softmax_T", self.softmax_T, "a positive integer or None")
        if not self.softpick_eps > 0:
            bad("softpick_eps", self.softpick_eps, "a positive number")
        if not math.isfinite(self.sink_init):
            bad("sink_init", self.sink_init, "a finite number")

    def clip_bounds(self, key_len: int) -> tuple[float, float]:
        """``(gamma, zeta)`` of the clipped softmax for keys of length ``key_len``."""
        if self.alpha is not None:
            return -self.alpha / float(self.softmax_T or key_len), 1.0
        return self.gamma, self.zeta


def softmax(x, axis: int = -1):
    """Softmax over ``axis``, with the closed-form backward pass over the last axis."""
    if axis in (-1, x.ndim - 1):
        return softmax_last(x)
    return jax.nn.softmax(x, axis=axis)


def clipped_softmax(x, gamma, zeta, axis: int = -1):
    """``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)``; clipped entries get no gradient.
    ``gamma`` / ``zeta`` may be arrays broadcasting against ``x`` (one per query row)."""
    return jnp.clip((zeta - gamma) * softmax(x, axis) + gamma, 0.0, 1.0)


def off_by_one_softmax(x, axis: int = -1):
    """``exp(x_i) / (1 + sum_j exp(x_j))``, computed stably."""
    m = jax.lax.stop_gradient(jnp.maximum(jnp.max(x, axis=axis, keepdims=True), 0.0))
    e = jnp.exp(x - m)
    return e / (jnp.exp(-m) + jnp.sum(e, axis=axis, keepdims=True))


def sink_softmax(x, sink):
    """``exp(x_i) / (exp(s_h) + sum_j exp(x_j))`` over the last axis of ``x`` (B, H, T, S);
    ``sink`` (H,) logits, computed stably."""
    s = sink.astype(jnp.float32)[None, :, None, None]
    m = jax.lax.stop_gradient(jnp.maximum(jnp.max(x, axis=-1, keepdims=True), s))
    e = jnp.exp(x - m)
    return e / (jnp.exp(s - m) + jnp.sum(e, axis=-1, keepdims=True))


def softpick(x, mask=None, eps: float = 1e-6):
    """``relu(e^{x_i} - 1) / (sum_j |e^{x_j} - 1| + eps)`` over the last axis; keys where
    ``mask`` is False contribute nothing (their output is 0). Shifted by the row max ``m``:
    ``relu(e^{x-m} - e^{-m}) / (sum |e^{x-m} - e^{-m}| + eps e^{-m})``, the same value."""
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row without keys
    shifted = jnp.exp(x - m) - jnp.exp(-m)
    if mask is not None:
        shifted = jnp.where(mask, shifted, 0.0)
    den = jnp.sum(jnp.abs(shifted), axis=-1, keepdims=True) + eps * jnp.exp(-m)
    return jax.nn.relu(shifted) / den


def visible_keys(mask, key_len: int):
    """Keys each query sees, float32 (B, 1|H, T, 1) (``key_len`` everywhere without a mask),
    at least 1."""
    if mask is None:
        return jnp.full((1, 1, 1, 1), float(key_len), jnp.float32)
    n = jnp.sum(mask.astype(jnp.float32), axis=-1, keepdims=True)
    return jnp.maximum(n, 1.0)


def attention_probs(scores, cfg: AttentionConfig, mask=None, sink=None):
    """Attention weights of the configured normaliser, float32 (B, H, T, S).

    ``scores`` are already masked (a large negative value where ``mask`` is False); ``mask``
    bool (B, 1|H, T, S) is needed by ``softpick`` and ``normalized_clipped``, ``sink`` (H,) by
    ``sink``."""
    scores = scores.astype(jnp.float32)
    if cfg.softmax == "clipped":
        gamma, zeta = cfg.clip_bounds(scores.shape[-1])
        return clipped_softmax(scores, gamma, zeta)
    if cfg.softmax == "normalized_clipped":
        a = cfg.alpha / visible_keys(mask, scores.shape[-1])
        return clipped_softmax(scores, -a, 1.0)
    if cfg.softmax == "off_by_one":
        return off_by_one_softmax(scores)
    if cfg.softmax == "sink":
        return sink_softmax(scores, sink)
    if cfg.softmax == "softpick":
        return softpick(scores, mask, cfg.softpick_eps)
    return softmax_last(scores)


class Gate(nn.Module):
    """Gate probabilities ``pi`` from the attention input ``x`` (B, T, D).

    Returns (B, T, H) for token gates (``elementwise``: (B, T, H, Dh)), (B, 1, H) for per-head
    and unconditional gates. Per-head gates mean-pool the logits over the real tokens (``mask``
    (B, T)); in a causal model (``causal``) the pool at position t covers positions <= t only, a
    running mean ``sum_{s<=t} m_s l_s / max(sum_{s<=t} m_s, 1)`` of shape (B, T, H), so no gate
    sees a later token.
    """

    num_heads: int
    cfg: AttentionConfig
    plan: QuantPlan = QuantPlan()
    causal: bool = False
    head_dim: int | None = None  # Dh of the elementwise output gate (default D / H)

    @nn.compact
    def __call__(self, x, mask=None):
        cfg, h = self.cfg, self.num_heads
        b, t, d = x.shape
        xf = x.astype(jnp.float32)
        if cfg.gate in OUTPUT_GATES:
            return self._output_gate(xf)
        if d % h:
            raise UserError(
                f"config.model.attention.gate={cfg.gate!r} splits hidden_size={d} into "
                f"num_heads={h} slices; allowed: a hidden_size divisible by num_heads, or the "
                "gates 'all_heads_linear', 'headwise', 'elementwise'."
            )
        dh = d // h
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
        return self._finish(logits)

    def _output_gate(self, xf):
        """Qiu et al.'s gate: ``sigmoid(x W (+ b))``, (B, T, H) or (B, T, H, Dh)."""
        cfg, h = self.cfg, self.num_heads
        b, t, d = xf.shape
        dh = self.head_dim or d // h
        width = h if cfg.gate == "headwise" else h * dh
        std = cfg.gate_init_std
        if std is None:
            std = FINETUNE_GATE_STD if cfg.gate_finetune else OUTPUT_GATE_STD
        logits = Dense(
            width,
            self.plan,
            use_bias=cfg.pi_init is not None,
            kernel_init=nn.initializers.normal(std),
            bias_init=self._out_bias_init(d),
            name="dense",
        )(xf)
        if cfg.gate == "elementwise":
            logits = logits.reshape(b, t, h, dh)
        return self._finish(logits)

    def _finish(self, logits):
        pi = jax.nn.sigmoid(logits)
        return pi / self.cfg.pi_init if self.cfg.gate_finetune else pi

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
