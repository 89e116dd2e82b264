"""Fake-quantization primitives with straight-through gradients (``jax.custom_vjp``).

Every op here is quantize-dequantize ("fake quant"): outputs stay floating point but lie on
the quantization grid. The uniform grid with integer bounds ``qmin..qmax``, step ``s`` and
offset ``beta`` is::

    v     = (x - beta) / s
    x_hat = clip(round(v), qmin, qmax) * s + beta

A frozen asymmetric quantizer with integer zero point ``z`` is the case ``beta = 0`` on the
shifted grid ``qmin - z .. qmax - z`` (``(clip(round(x/s) + z, qmin, qmax) - z) * s``; adding
``z`` after rounding keeps 16-bit grids exact in float32); symmetric and unsigned quantizers
have ``beta = 0`` and no shift. The bounds may be traced arrays broadcastable to ``x``. The
unsigned 1-bit grid ``{0, 1}`` (``x_hat = s * clip(round((x - beta)/s), 0, 1) + beta``, BiT's
elastic binarisation of non-negative inputs) is this grid too; ``sign(x) * alpha`` is
:func:`binary_quant`.

Gradients (``inside`` means ``qmin <= v <= qmax``, i.e. clamp-then-round as in LSQ):

* ``d x_hat / d x    = 1`` inside, ``0`` outside (clipped straight-through estimator);
* ``d x_hat / d s    = round(v) - v`` inside, ``qmin`` or ``qmax`` at the clip (LSQ);
* ``d x_hat / d beta = 0`` inside, ``1`` at the clip (LSQ+; equals ``-s`` per unit of ``z``).

The step and offset gradients are multiplied by the gradient scale ``g`` (LSQ's
``1/sqrt(N * Qp)`` or any other choice, see :func:`grad_scale_value`).

Rounding: ``v`` is written ``(x - beta) / s``; XLA:CPU compiles a divide by a broadcast step
as a multiply by its float32 reciprocal, which can differ from the exact quotient by an ulp
of ``v`` (an ``x`` within about an ulp of a ``.5`` boundary may round to the neighbouring
grid point: one step, rare, most likely at high bit widths). The integer model computes its
grid integers with the same ops, so codes and fake-quant values stay bit-identical. Writing
the reciprocal multiply out instead made XLA:CPU's compile of a W8A8 QAT step of opt-125m
3.5x slower and the step 1.9x slower (the divide keeps ``v`` fusable with the range's
reduction).

Backward: only ``v`` is saved (the clip mask for frozen quantizers, :func:`ste_quant`); the
mask and ``round(v)`` are recomputed. Where a sum runs over the last axis (per-tensor,
per-token, per-head steps) the step and offset sums are one variadic reduction fused with
the per-element terms (no full-size temporary on XLA:CPU), rows first, then the row sums.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "round_ste",
    "uniform_quant",
    "ste_quant",
    "binary_quant",
    "grid_bounds",
    "sum_to_shape",
    "grad_scale_value",
]


@jax.custom_vjp
def round_ste(x):
    """round(x) forward, identity gradient."""
    return jnp.round(x)


round_ste.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


def grid_bounds(bits: int, scheme: str) -> tuple[int, int]:
    """Integer grid of a scheme: symmetric ``[-2^(b-1), 2^(b-1)-1]``, else ``[0, 2^b-1]``
    (``{0, 1}`` for an unsigned 1-bit grid; a symmetric 1-bit point is the sign binarisation
    :func:`binary_quant`, not a grid)."""
    if scheme == "symmetric":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _sum_axes(x_shape: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Axes of ``x_shape`` that broadcasting ``shape`` to it added or stretched."""
    lead = len(x_shape) - len(shape)
    stretched = (lead + i for i, n in enumerate(shape) if n == 1 and x_shape[lead + i] != 1)
    return (*range(lead), *stretched)


def sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums a broadcast cotangent ``x`` back to ``shape`` (the inverse of broadcasting)."""
    if x.shape == tuple(shape):
        return x
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead > 0 else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True).reshape(shape)


def _rows_reduced(x_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether summing ``x_shape`` to ``shape`` reduces the last axis (per-tensor, per-token
    and per-head steps; not a step per channel of the last axis)."""
    return len(x_shape) > 0 and len(x_shape) - 1 in _sum_axes(x_shape, shape)


def _fused_sums(parts: tuple[jax.Array, ...], shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """``sum_to_shape`` of several same-shape arrays whose last axis is summed.

    One variadic reduce over the last axis, then plain sums of the (``1/n_last`` as large)
    row sums. A single-output reduce is handed to a library kernel on XLA:CPU that takes its
    operand materialised (one full-size temporary per array); the variadic reduce fuses the
    elementwise terms that produce ``parts`` instead. Summing rows first also keeps the
    float32 error of a per-tensor sum near that of a pairwise sum.
    """
    axes = _sum_axes(parts[0].shape, shape)
    last = parts[0].ndim - 1
    zeros = tuple(jnp.zeros((), p.dtype) for p in parts)
    rows = jax.lax.reduce(
        parts, zeros, lambda a, b: tuple(u + w for u, w in zip(a, b, strict=True)), (last,)
    )
    rest = tuple(a for a in axes if a != last)
    return tuple((r.sum(axis=rest) if rest else r).reshape(shape) for r in rows)


@jax.custom_vjp
def uniform_quant(x, scale, offset, qmin, qmax, grad_scale):
    """Uniform fake quant ``clip(round((x - offset) / scale), qmin, qmax) * scale + offset``.

    Args:
      x: any shape.
      scale, offset: broadcastable to ``x`` (scalar, or keepdims shape for per-channel/group).
      qmin, qmax: integer-valued grid bounds, Python numbers or arrays broadcastable to ``x``
        (no gradient).
      grad_scale: multiplier of the ``scale``/``offset`` gradients, a scalar or broadcastable
        to ``scale`` (one per step, e.g. ``weight_l1`` per channel).
    """
    v = (x - offset) / scale
    return jnp.clip(jnp.round(v), qmin, qmax) * scale + offset


def _uniform_fwd(x, scale, offset, qmin, qmax, grad_scale):
    # Only v is saved: the clip mask and round(v) are recomputed from it in the backward
    # pass, where they fuse into the consumers. Saving x instead would let XLA duplicate x's
    # producer (a LayerNorm, a residual sum) into the backward pass.
    v = (x - offset) / scale
    y = jnp.clip(jnp.round(v), qmin, qmax) * scale + offset
    return y, (v, scale, offset, qmin, qmax, grad_scale)


def _uniform_bwd(res, ct):
    v, scale, offset, qmin, qmax, grad_scale = res
    q = jnp.clip(jnp.round(v), qmin, qmax)
    inside = (v >= qmin) & (v <= qmax)
    zero = jnp.zeros_like(ct)
    dx = jnp.where(inside, ct, zero)
    s_shape, o_shape = jnp.shape(scale), jnp.shape(offset)
    # g multiplies a sum when it broadcasts onto the sum's shape (a scalar, or one g per
    # step), else every element (e.g. one g per channel for a per-tensor offset)
    g = grad_scale.astype(ct.dtype)
    g_s, g_o = (jnp.broadcast_shapes(g.shape, sh) == sh for sh in (s_shape, o_shape))
    ct_s, ct_o = (ct if fits else ct * g for fits in (g_s, g_o))
    clipped = jnp.where(inside, zero, ct_o)  # d/d offset per element
    if _rows_reduced(jnp.shape(ct), s_shape):
        # d/ds = round(v) - v inside, q at the clip: as two partial sums, so that the
        # reduction stays variadic and fuses with the terms (see _fused_sums).
        parts = (jnp.where(inside, ct_s * (q - v), zero), jnp.where(inside, zero, ct_s) * q)
        if o_shape == s_shape:
            s_in, s_out, doffset = _fused_sums((*parts, clipped), s_shape)
        else:
            (s_in, s_out), doffset = _fused_sums(parts, s_shape), sum_to_shape(clipped, o_shape)
        dscale = s_in + s_out
    else:  # column sums (a step per last-axis channel): XLA's own reductions are faster
        dscale = sum_to_shape(ct_s * jnp.where(inside, q - v, q), s_shape)
        doffset = sum_to_shape(clipped, o_shape)
    return (
        dx,
        (dscale * g if g_s else dscale).astype(jnp.result_type(scale)),
        (doffset * g if g_o else doffset).astype(jnp.result_type(offset)),
        jnp.zeros_like(qmin),
        jnp.zeros_like(qmax),
        jnp.zeros_like(grad_scale),
    )


uniform_quant.defvjp(_uniform_fwd, _uniform_bwd)


@jax.custom_vjp
def ste_quant(x, scale, qmin, qmax):
    """Frozen uniform fake quant ``clip(round(x / scale), qmin, qmax) * scale``: the
    values of ``uniform_quant(x, scale, 0, qmin, qmax, g)``, with the clipped STE in ``x``
    alone (``d/dx = 1`` inside the grid, 0 outside) and no step or offset gradient, so a
    frozen quantizer traces no gradient sums at all."""
    return jnp.clip(jnp.round(x / scale), qmin, qmax) * scale


def _ste_fwd(x, scale, qmin, qmax):
    # the mask is saved (one byte an element), not x: recomputing it from x in the backward
    # pass lets XLA duplicate x's producer (a LayerNorm, a residual sum) into the backward
    v = x / scale
    inside = (v >= qmin) & (v <= qmax)
    return jnp.clip(jnp.round(v), qmin, qmax) * scale, (inside, scale, qmin, qmax)


def _ste_bwd(res, ct):
    inside, scale, qmin, qmax = res
    zeros = (jnp.zeros_like(scale), jnp.zeros_like(qmin), jnp.zeros_like(qmax))
    return (jnp.where(inside, ct, jnp.zeros_like(ct)), *zeros)


ste_quant.defvjp(_ste_fwd, _ste_bwd)


@jax.custom_vjp
def binary_quant(x, alpha):
    """1-bit quant ``sign(x) * alpha`` (``sign(0) = +1``), STE through ``clip(x, -1, 1)``.

    ``alpha`` (usually ``mean|x|`` per tensor or channel, broadcastable to ``x``) gets no
    gradient: ``d/dx = 1`` where ``|x| <= 1``, else ``0``.
    """
    return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype) * alpha


def _binary_fwd(x, alpha):
    return binary_quant(x, alpha), (x, alpha)


def _binary_bwd(res, ct):
    x, alpha = res
    return jnp.where(jnp.abs(x) <= 1, ct, jnp.zeros_like(ct)), jnp.zeros_like(alpha)


binary_quant.defvjp(_binary_fwd, _binary_bwd)


def grad_scale_value(
    kind, x: jax.Array, num_scales: int, qmax: int, axes: tuple[int, ...] | None = None
) -> jax.Array:
    """Gradient scale ``g`` for a learnable step.

    ``N`` is the number of elements sharing one step (``x.size / num_scales``).

    * ``"lsq"``: ``1 / sqrt(N * Qp)`` (LSQ);
    * ``"weight_l1"``: ``1 / sqrt(Qp * ||W||_1)`` (Quantization Variation, weights); with
      several steps and ``axes`` (the axes of ``x`` that one step spans, e.g. a view's
      ``axes``), each step's own ``1 / sqrt(Qp * ||W_c||_1)`` in the keepdims shape of the
      step; without ``axes``, the mean channel L1 for every step;
    * ``"act_qv"``: ``1 / (Qp * sqrt(N))`` (Quantization Variation, activations);
    * ``"none"``: ``1``; a number: that number.

    A scalar, except ``weight_l1`` per channel.
    """
    n = max(x.size // max(num_scales, 1), 1)
    qp = max(qmax, 1)
    if kind == "lsq":
        return jnp.asarray(1.0 / math.sqrt(n * qp), jnp.float32)
    if kind == "act_qv":
        return jnp.asarray(1.0 / (qp * math.sqrt(n)), jnp.float32)
    if kind == "weight_l1":
        a = jnp.abs(jax.lax.stop_gradient(x)).astype(jnp.float32)
        if axes is not None and num_scales > 1:
            l1 = jnp.sum(a, axis=tuple(axes), keepdims=True)
        else:
            l1 = jnp.sum(a) / max(num_scales, 1)
        return jax.lax.rsqrt(qp * jnp.maximum(l1, 1e-12))
    if kind == "none":
        return jnp.asarray(1.0, jnp.float32)
    return jnp.asarray(float(kind), jnp.float32)
