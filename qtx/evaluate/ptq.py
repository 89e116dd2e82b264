"""Post-training quantization of trained parameters: calibrate, freeze, evaluate.

For a setup (``"W8A8"``, ``"os_fastertransformer:W6A6E6"``, ...): the model is rebuilt with
the setup's rules, run over calibration batches from the *training* split in ``calibrate``
mode (ranges accumulate in ``quant_stats``), and then evaluated in ``quantize`` mode with the
ranges frozen. Setups with learnable steps (LSQ) get them from the calibrated ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

from qtx import quant
from qtx.models import ModelConfig, build, dummy_inputs
from qtx.train.losses import model_inputs
from qtx.train.pretrained import merge_pretrained


def with_quantizer_params(cfg: ModelConfig, plan: quant.QuantPlan, params) -> dict:
    """Adds the parameters the plan's learnable points declare (steps / offsets)."""
    if not any(r.spec is not None and r.spec.learn != "none" for r in plan.rules):
        return params
    model = build(cfg, plan.with_mode("calibrate"))
    fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(cfg)))["params"]
    fresh = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), fresh)
    return merge_pretrained(fresh, params, new_ok=(r"/(step|offset)$",), droppable=())


def calibrate_setup(
    cfg: ModelConfig, plan: quant.QuantPlan, params, batches: Sequence[dict]
) -> dict:
    """Variables (params + frozen ``quant_stats``) of ``plan`` calibrated on ``batches``."""
    variables = {"params": with_quantizer_params(cfg, plan, params)}
    cal = build(cfg, plan.with_mode("calibrate"))
    variables = quant.calibrate(
        lambda v, b: cal.apply(v, **model_inputs(cfg.family, b), mutable=[quant.STATS]),
        variables,
        batches,
    )
    return quant.init_learnable(variables)


def evaluate_setup(
    cfg: ModelConfig,
    setup: str,
    params,
    calib: Sequence[dict],
    run: Callable,
    options: dict | None = None,
    calibration: str = "sequential",
) -> tuple[dict, quant.MatchReport]:
    """Calibrates ``setup`` (``sequential`` or ``parallel``, see :class:`qtx.quant.QuantPlan`)
    and returns ``(run(model, variables), match report)``."""
    rules = quant.setup_rules(setup, **dict(options or {}))
    plan = quant.QuantPlan(rules, mode="quantize", calibration=calibration)
    variables = calibrate_setup(cfg, plan, params, calib)
    model = build(cfg, plan)
    points = quant.list_points(model.apply, variables, **dummy_inputs(cfg))
    report = quant.match_report(plan, {k: v[0] for k, v in points.items()})
    return run(model, variables), report
