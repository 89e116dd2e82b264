"""Post-training quantization of trained parameters: calibrate, freeze, evaluate.

For a setup (``"W8A8"``, ``"os_fastertransformer:W6A6E6"``, ...): the model is rebuilt with
the setup's rules, run over calibration batches from the *training* split in ``calibrate``
mode (ranges accumulate in ``quant_stats``), and then evaluated in ``quantize`` mode with the
ranges frozen. Setups with learnable steps (LSQ) get them from the calibrated ranges.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax

from qtx import quant
from qtx.evaluate.metrics import scores
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
    method: str | None = None,
    ptq_options: dict | None = None,
    select_by: str | None = None,
    keep: list | None = None,
) -> tuple[dict, quant.MatchReport, float, dict]:
    """Calibrates ``setup`` (``sequential`` or ``parallel``, see :class:`qtx.quant.QuantPlan`),
    with its preset's estimators or with a post-training ``method`` (see
    ``qtx.methods.outlier_suppression.PTQ_METHODS``), and evaluates it.

    ``run(model, variables)`` evaluates a model and returns its metrics. Returns ``(metrics,
    match report, calibration seconds, method details)``; a method with several candidates
    (percentile) reports the best by ``select_by`` (default accuracy, or perplexity; lower is
    better only for perplexity) and the seconds of all of them. ``keep``, a list, receives
    ``(model config, plan, variables)`` of the setup evaluated (the best candidate).
    """
    if method is None:
        t0 = time.perf_counter()
        rules = quant.setup_rules(setup, **dict(options or {}))
        plan = quant.QuantPlan(rules, mode="quantize", calibration=calibration)
        variables = jax.block_until_ready(calibrate_setup(cfg, plan, params, calib))
        seconds = time.perf_counter() - t0
        model = build(cfg, plan)
        if keep is not None:
            keep.append((cfg, plan, variables))
        return run(model, variables), _report(cfg, plan, model, variables), seconds, {}
    from qtx.methods.outlier_suppression import calibrate_method

    best, seconds, tried = None, 0.0, []
    for c in calibrate_method(method, cfg, setup, params, calib, options, calibration, ptq_options):
        seconds += c.seconds
        model = build(c.cfg, c.plan)
        r = run(model, c.variables)
        tried.append({**c.info, **scores(r)})
        if best is None or _better(r, best[0], select_by):
            best = (r, _report(c.cfg, c.plan, model, c.variables), c.info, c)
    r, report, info, c = best
    if keep is not None:
        keep.append((c.cfg, c.plan, c.variables))
    if len(tried) > 1:
        info = {**info, "candidates": tried}
    return r, report, seconds, info


def _better(a: dict, b: dict, key: str | None) -> bool:
    key = key or ("accuracy" if "accuracy" in a else "perplexity")
    if key == "perplexity":
        return a[key] < b[key]
    return a[key] > b[key]


def _report(cfg, plan, model, variables) -> quant.MatchReport:
    points = quant.list_points(model.apply, variables, **dummy_inputs(cfg))
    return quant.match_report(plan, {k: v[0] for k, v in points.items()})
