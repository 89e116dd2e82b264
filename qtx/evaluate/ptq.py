"""Calibration of a quantization plan on trained parameters (PTQ, and the start of QAT).

The model is rebuilt with the plan's rules and run over calibration batches in ``calibrate``
mode (ranges accumulate in ``quant_stats``); the ranges are then frozen for ``quantize`` mode,
and learnable steps (LSQ) start from them. ``qtx.run.ptq`` evaluates the calibrated setups.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from qtx import quant
from qtx.models import ModelConfig, build, dummy_inputs
from qtx.train.losses import model_inputs
from qtx.train.pretrained import merge_pretrained


def with_quantizer_params(cfg: ModelConfig, plan: quant.QuantPlan, params) -> dict:
    """Adds the parameters the plan's learnable points declare (steps / offsets)."""
    if not any(r.spec is not None and r.spec.learn != "none" for r in plan.rules):
        return params
    model = build(cfg, plan.with_mode("calibrate"))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(cfg)))["params"]
    if set(flatten_dict(shapes)) == set(flatten_dict(params)):
        return params  # trained with the plan's quantizers: nothing to add, nothing copied
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    return merge_pretrained(fresh, params, new_ok=(quant.QUANTIZER_PARAM_PATTERN,), droppable=())


def calibrate_setup(
    cfg: ModelConfig, plan: quant.QuantPlan, params, batches: Sequence[dict]
) -> dict:
    """Variables (params + frozen ``quant_stats``) of ``plan`` calibrated on ``batches``: the
    model in ``calibrate`` mode accumulates each point's range over the batches, and LSQ/LSQ+
    steps and offsets start from the ranges (``quant.init_learnable``).

    ``params`` may lack the quantizer parameters (trained in full precision) or hold them
    (trained with the plan's quantizers). On several processes ``batches`` should be global
    device arrays (``global_batch``), so that every process computes the same statistics."""
    variables = {"params": with_quantizer_params(cfg, plan, params)}
    cal = build(cfg, plan.with_mode("calibrate"))
    variables = quant.calibrate(
        lambda v, b: cal.apply(v, **model_inputs(cfg.family, b), mutable=[quant.STATS]),
        variables,
        batches,
    )
    return quant.init_learnable(variables)
