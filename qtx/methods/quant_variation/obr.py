"""Oscillation-aware bin regularization (OBR; Quantization Variation, docs/methods.md §3 (c)).

For a weight ``w`` with step ``alpha`` (and offset ``o``, 0 for symmetric LSQ) on the integer
grid ``[Qn, Qp]``::

    v       = clip((w - o) / alpha, Qn, Qp)
    w_tilde = v * alpha                          (differentiable in w and alpha)
    w_hat   = round(v) * alpha                   (no gradient)
    L       = mean_i (w_hat_i - w_tilde_i)^2
              + sum_k Var_unbiased({w_tilde_i : round(v_i) = k})   (bins with > 1 weight)

Each step value owns its own bins (per-channel steps give one set of bins per channel). The
bins are one segment reduction over ``(step index, k)``, two passes (mean, then squared
deviations), with no Python loop over bins. The training loss is ``L_task + lambda(t) sum_m
L_m`` with the cosine ramp :func:`obr_lambda`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def bin_regularizer(w, step, offset=0.0, qmin=-8, qmax=7, bins: int | None = None):
    """OBR penalty ``L_m`` of one weight tensor, a float32 scalar.

    Args:
      w: the weight, any shape.
      step: the step ``alpha``, broadcastable to ``w`` (a scalar, or keepdims per channel).
      offset: the grid offset, broadcastable to ``w`` (0 for symmetric grids).
      qmin, qmax: the integer grid bounds ``Qn``, ``Qp`` (e.g. -8, 7 at 4 bits).
      bins: the number of levels ``Qp - Qn + 1``; needed only when ``qmin``/``qmax`` are traced.
    """
    w = jnp.asarray(w, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    v = jnp.clip((w - offset) / step, qmin, qmax)
    w_tilde = v * step
    k = jax.lax.stop_gradient(jnp.round(v))
    w_hat = jax.lax.stop_gradient(k * step)
    distance = jnp.mean(jnp.square(w_hat - w_tilde))

    if bins is None:
        bins = int(qmax) - int(qmin) + 1
    owner = jnp.broadcast_to(jnp.arange(step.size).reshape(step.shape), w.shape)
    segment = (owner * bins + (k - qmin).astype(jnp.int32)).reshape(-1)
    n_segments = step.size * bins
    flat = w_tilde.reshape(-1)
    count = jax.ops.segment_sum(jnp.ones_like(flat), segment, n_segments)
    mean = jax.ops.segment_sum(flat, segment, n_segments) / jnp.maximum(count, 1.0)
    squared = jax.ops.segment_sum(jnp.square(flat - mean[segment]), segment, n_segments)
    variance = jnp.where(count > 1, squared / jnp.maximum(count - 1.0, 1.0), 0.0)
    return distance + jnp.sum(variance)


def obr_lambda(step, total_steps: int, peak: float = 0.01, start_fraction: float = 0.25):
    """The OBR weight ``lambda(t)``: 0 before ``start_fraction * E``, then the cosine ramp
    ``peak / 2 * (1 - cos(pi (t - t0) / (E - t0)))`` up to ``peak`` at ``t = E`` (the paper:
    ``t0 = 0.25 E``, peak 0.01). ``step`` may be traced; float32 scalar."""
    t = jnp.asarray(step, jnp.float32)
    t0 = start_fraction * total_steps
    span = max(total_steps - t0, 1e-9)
    ramp = 0.5 * peak * (1.0 - jnp.cos(math.pi * jnp.clip((t - t0) / span, 0.0, 1.0)))
    return jnp.where(t < t0, 0.0, ramp).astype(jnp.float32)


def obr_penalty(records: dict[str, dict]):
    """``(sum_m L_m, {name: L_m})`` over the weight records of a forward pass
    (:func:`qtx.quant.weight_records`)."""
    per = {}
    for name, r in records.items():
        levels = r["levels"]
        per[name] = bin_regularizer(
            r["w"], r["step"], r["offset"], levels[0], levels[-1], bins=levels.shape[0]
        )
    total = sum(per.values()) if per else jnp.zeros((), jnp.float32)
    return total, per
