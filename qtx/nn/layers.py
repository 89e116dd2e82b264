"""Dense, Embed, LayerNorm and patch embedding with weight quantization points.

Every layer quantizes its weight through a :class:`~qtx.quant.QuantPoint` named ``weight``
(so ``layer_3/ffn/fc1/weight``); LayerNorm also owns the point ``out`` on its output. Biases
and LayerNorm's beta are never quantized. In an integer plan, Dense runs ``x @ W`` as an int8
matmul when both are quantized (:func:`qtx.quant.integer.matmul`) and reads converted int8
weights from ``quant_int`` (:func:`quantized_weight`). Parameters are float32; matmuls run
in ``dtype`` (bfloat16 for mixed precision). Embedding lookups, patch embeddings and
LayerNorm return float32, so the residual stream stays float32 in mixed precision (as
PyTorch AMP keeps it).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtx.errors import UserError
from qtx.nn.kernels import dense_dot
from qtx.quant import QuantPlan, QuantPoint
from qtx.quant.integer import QArray, as_float, dense_subscripts, matmul, take_rows

Dtype = Any


class Dense(nn.Module):
    """``y = x @ W_q + b``; kernel (in, out), per-channel axis = out; ``out_point`` adds the
    point ``out`` on ``y``."""

    features: int
    plan: QuantPlan = QuantPlan()
    use_bias: bool = True
    kernel_init: Any = nn.initializers.normal(0.02)
    dtype: Dtype = jnp.float32
    bias_init: Any = nn.initializers.zeros
    out_point: bool = False

    @nn.compact
    def __call__(self, x, mask=None):
        """``x`` (..., in), a float array or a QArray -> (..., features) in ``dtype``;
        ``mask`` (the leading axes, True at real tokens) goes to the ``out`` point."""
        shape = (x.shape[-1], self.features)
        kernel = quantized_weight(self, "kernel", self.kernel_init, shape, self.plan)
        dtype = self.dtype
        y = matmul(
            dense_subscripts(len(x.shape)),
            x,
            kernel,
            lambda a, w: dense_dot(a.astype(dtype), w.astype(dtype)),
            "/".join(self.path),
            not self.plan.float_matmuls,
        ).astype(dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return QuantPoint(self.plan, name="out")(y, mask) if self.out_point else y


def quantized_weight(module: nn.Module, name: str, init, shape, plan: QuantPlan):
    """``module``'s weight ``name`` behind its point ``weight`` (per-channel axis -1): a float
    array, or in an integer plan a QArray (stored int8 codes of a converted model, else the
    float parameter quantized here)."""
    point = QuantPoint(plan, "weight", channel_axis=-1, operand=True, name="weight")
    stored = point.stored_weight(shape)
    if stored is not None:
        return stored
    return point(module.param(name, init, shape, jnp.float32))


class Embed(nn.Module):
    """Lookup in a quantized table (num, features); per-channel axis = rows (tokens).

    Only the looked-up rows are fake-quantized where that equals quantizing the whole table
    bit for bit (per-tensor or per-row ranges and steps; see ``QuantPoint._lookup``); other
    cases (calibration, initialisation, ``quant_weights`` records, ...) quantize the table.

    In a converted integer model the table is stored as int8 codes (``quant_int/.../weight``)
    instead of the float parameter: lookups dequantize the looked-up rows (the fake-quant
    rows bit for bit), and :meth:`attend` (a tied LM head) reads the dequantized table.
    """

    num_embeddings: int
    features: int
    plan: QuantPlan = QuantPlan()
    embedding_init: Any = nn.initializers.normal(0.02)
    dtype: Dtype = jnp.float32

    def setup(self):
        shape = (self.num_embeddings, self.features)
        self.weight = QuantPoint(self.plan, "weight", channel_axis=0, table=True)
        self.embedding = None  # a converted integer model holds the int8 table only
        if self.is_initializing() or self.has_variable("params", "embedding"):
            self.embedding = self.param("embedding", self.embedding_init, shape, jnp.float32)

    def _stored(self):
        """The int8 table of a converted integer model (a QArray), else None."""
        if self.embedding is not None:
            return None
        stored = self.weight.stored_weight((self.num_embeddings, self.features))
        if stored is None:
            raise UserError(
                f"embedding '{'/'.join(self.path)}' has neither a float parameter 'embedding' "
                "nor int8 codes; load the variables the model was built (or converted) with."
            )
        return stored

    def __call__(self, ids):
        """Rows of the (quantized) table, float32 (B, T, features)."""
        stored = self._stored()
        if stored is not None:
            return take_rows(stored, ids)
        return self.weight(self.embedding, rows=ids)

    def attend(self, x):
        """``x @ E^T`` with the full-precision table (tied LM heads stay unquantized); in an
        integer model whose table is stored as int8 codes, with the dequantized codes (the
        float table is not kept)."""
        stored = self._stored()
        table = self.embedding if stored is None else stored.value
        if stored is None and self.plan.integer:  # not converted yet: the codes it will store
            q = self.weight(self.embedding)
            table = q.value if isinstance(q, QArray) else table
        return jnp.dot(x.astype(self.dtype), table.T.astype(self.dtype))


class LayerNorm(nn.Module):
    """``y = gamma * (x - mu) / sqrt(var + eps) + beta``, float32; points ``weight``, ``out``.

    ``non_scaling=True`` is Outlier Suppression's non-scaling LayerNorm (after gamma
    migration): the output is ``y' = m * (x - mu) / sqrt(var + eps) + beta'`` with the stored
    beta' = beta / g, ``g = where(gamma == 0, 1, gamma)`` (:meth:`migrated_gamma`) and ``m =
    (gamma != 0)``, so that ``y = g * y'`` exactly: a channel whose gamma is 0 outputs the
    constant beta in both forms. The caller applies ``g`` where it was migrated (the
    shortcut); the weights that read ``y'`` already hold it.

    ``alias``: a second name rules may give the output point (``head_ln/out``, see
    ``qtx.nn.transformer``); a full-precision rule for it that precedes the rules for ``out``
    leaves the output without a point (:func:`alias_removes`).

    ``shortcut_affine=True`` (a post-LN LayerNorm that feeds a residual shortcut, in a model
    smoothed by SmoothQuant / OS+) adds the parameters ``shortcut_scale`` (ones) and
    ``shortcut_shift`` (zeros) (D,): the shortcut reads ``y * shortcut_scale +
    shortcut_shift`` (:meth:`shortcut`) while the weights that read ``y`` absorb the same
    scale and shift, so smoothing the output stays exact.
    """

    plan: QuantPlan = QuantPlan()
    eps: float = 1e-5
    non_scaling: bool = False
    operand: bool = False  # the output feeds matmuls (a QArray in an integer plan)
    alias: str | None = None  # a second name of ``out`` for rules (see alias_removes)
    shortcut_affine: bool = False  # holds shortcut_scale / shortcut_shift (see above)

    @nn.compact
    def __call__(self, x, mask=None):
        """``x`` (..., D) -> float32 (..., D); ``mask`` (leading axes, True at real tokens)
        restricts the ``out`` point's statistics to real tokens."""
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        if self.shortcut_affine:
            self.param("shortcut_scale", nn.initializers.ones, (d,), jnp.float32)
            self.param("shortcut_shift", nn.initializers.zeros, (d,), jnp.float32)
        xf = x.astype(jnp.float32)
        mu = xf.mean(-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
        y = (xf - mu) * jnp.reciprocal(jnp.sqrt(var + self.eps))
        if self.non_scaling:
            y = jnp.where(scale != 0, y, 0.0)
        else:
            y = y * QuantPoint(self.plan, "weight", channel_axis=-1, name="weight")(scale)
        if self.alias and alias_removes(self.plan, "/".join(self.path) + "/out", self.alias):
            return y + bias
        return QuantPoint(self.plan, name="out", operand=self.operand)(y + bias, mask)

    def migrated_gamma(self):
        """(D,) float32 ``where(gamma == 0, 1, gamma)``: what a non-scaling LN's consumers
        multiply by (call after ``__call__``)."""
        return migrated_gamma(self.get_variable("params", "scale"))

    def shortcut(self) -> tuple:
        """``(shortcut_scale, shortcut_shift)`` (D,) float32 of a LayerNorm with
        ``shortcut_affine`` (call after ``__call__``)."""
        get = lambda n: self.get_variable("params", n).astype(jnp.float32)  # noqa: E731
        return get("shortcut_scale"), get("shortcut_shift")


def alias_removes(plan: QuantPlan, name: str, alias: str) -> bool:
    """Whether the activation point ``name`` is left out (not placed, listed or calibrated)
    through its second name ``alias``: the first rule matching ``alias`` has no spec and
    comes before every rule matching ``name``. A rule matching both names (``.``) or only
    ``name`` decides as usual, so an alias changes nothing unless a rule names it."""
    i = plan.rule_for(alias, "act")
    j = plan.rule_for(name, "act")
    return i is not None and plan.rules[i].spec is None and (j is None or i < j)


def migrated_gamma(gamma):
    """``where(gamma == 0, 1, gamma)``: the factor gamma migration moves out of a LayerNorm
    (a zero gamma moves nothing; that channel keeps its constant beta inside the LN)."""
    return jnp.where(gamma == 0, 1.0, gamma).astype(jnp.float32)


class PatchEmbed(nn.Module):
    """Non-overlapping patches ``(B, H, W, C) -> (B, N, D)``; kernel (p, p, C, D) as a conv."""

    features: int
    patch_size: int
    plan: QuantPlan = QuantPlan()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        b, h, w, c = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise UserError(
                f"image size {h}x{w} is not divisible by patch_size={p}; allowed: image sizes "
                f"that are multiples of {p}."
            )
        shape = (p, p, c, self.features)
        init = nn.initializers.lecun_normal()
        kernel = as_float(quantized_weight(self, "kernel", init, shape, self.plan))
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        y = dense_dot(x, kernel.reshape(p * p * c, self.features).astype(self.dtype))
        return y.astype(jnp.float32) + self.param("bias", nn.initializers.zeros, (self.features,))


def drop_path(module: nn.Module, x, rate, deterministic: bool):
    """Stochastic depth: drops the whole residual branch per example with probability rate
    (a float, or a traced scalar inside scanned layers)."""
    if deterministic or (isinstance(rate, int | float) and rate <= 0):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.shape[0], 1, 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
