"""Weight oscillation tracking during QAT (Quantization Variation, docs/methods.md §3).

Per quantized weight, the integer code ``q_t = clip(round((w - offset) / step), qmin, qmax)``
of every step is compared with the previous one. A change in the direction opposite to the
weight's last change is an oscillation event. The events feed an EMA (momentum ``m``)::

    ema_t = m * event_t + (1 - m) * ema_{t-1}

and a weight oscillates when ``ema > threshold`` (paper: ``m = 0.001``, threshold 0.005).

The tracker is a pytree kept in ``TrainState.extra['oscillation']`` (so a resumed run goes on
with the same counts)::

    {"started": bool[], "points": {name: {"code": int16[w], "direction": int8[w],
                                         "ema": float32[w]}}}

where ``w`` is the weight's shape in its quantization view.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

COLLECTION = "oscillation"
MOMENTUM = 0.001
THRESHOLD = 0.005


def weight_codes(record: dict):
    """Integer codes (int16, the view's shape) of one weight record
    (:func:`qtx.quant.weight_records`)."""
    levels = record["levels"]
    v = (jax.lax.stop_gradient(record["w"]) - record["offset"]) / record["step"]
    return jnp.clip(jnp.round(v), levels[0], levels[-1]).astype(jnp.int16)


def codes_of(records: dict[str, dict]) -> dict:
    """``{name: int16 codes}`` of every weight record (no gradient)."""
    return {name: weight_codes(r) for name, r in records.items()}


def init_tracker(codes: dict) -> dict:
    """A tracker for weights with these codes (or ``ShapeDtypeStruct``s of them) that has
    seen no step yet."""
    points = {
        name: {
            "code": jnp.zeros(c.shape, jnp.int16),
            "direction": jnp.zeros(c.shape, jnp.int8),
            "ema": jnp.zeros(c.shape, jnp.float32),
        }
        for name, c in codes.items()
    }
    return {"started": jnp.zeros((), jnp.bool_), "points": points}


def update_tracker(tracker: dict, codes: dict, momentum: float = MOMENTUM):
    """``tracker`` after seeing ``codes`` (one step). The first call only stores the codes;
    every later call counts events and updates the EMA of every weight."""
    started = tracker["started"]
    points = {}
    for name, st in tracker["points"].items():
        code = codes[name].astype(jnp.int16)
        delta = jnp.sign(code.astype(jnp.int32) - st["code"].astype(jnp.int32)).astype(jnp.int8)
        moved = started & (delta != 0)
        event = moved & (st["direction"] != 0) & (delta == -st["direction"])
        ema = momentum * event.astype(jnp.float32) + (1.0 - momentum) * st["ema"]
        points[name] = {
            "code": code,
            "direction": jnp.where(moved, delta, st["direction"]),
            "ema": jnp.where(started, ema, st["ema"]),
        }
    return {"started": jnp.ones((), jnp.bool_), "points": points}


def oscillating_fractions(tracker: dict, threshold: float = THRESHOLD) -> dict:
    """``{"oscillating": total fraction, "oscillating/<module>": fraction}`` of weights whose
    EMA exceeds ``threshold`` (``<module>`` is the point name without its ``/weight``), and
    ``"oscillation_rate"``: the mean EMA over every weight, the tracker's estimate of
    oscillation events per weight and step. A run much shorter than ``1 / momentum`` steps
    leaves few weights above the threshold; the rate still compares such runs (divided by
    ``1 - (1 - m)^(t - 1)`` after ``t`` steps it is unbiased, as Adam's moments)."""
    out, hits, total, size = {}, 0.0, 0.0, 0
    for name, st in tracker["points"].items():
        over = jnp.sum(st["ema"] > threshold).astype(jnp.float32)
        module = name[: -len("/weight")] if name.endswith("/weight") else name
        out[f"oscillating/{module}"] = over / max(st["ema"].size, 1)
        hits, size = hits + over, size + st["ema"].size
        total = total + jnp.sum(st["ema"])
    zero = jnp.zeros((), jnp.float32)
    out["oscillating"] = hits / max(size, 1) if size else zero
    out["oscillation_rate"] = total / max(size, 1) if size else zero
    return out
