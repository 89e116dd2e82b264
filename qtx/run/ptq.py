"""Post-training quantization of one setup: calibrate with the preset's estimators or a
registered PTQ method, evaluate, report which points the rules matched."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax

from qtx import quant
from qtx.evaluate.metrics import scores
from qtx.evaluate.ptq import calibrate_setup
from qtx.methods import registry
from qtx.models import ModelConfig, build, dummy_inputs


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
    with its preset's estimators or with a post-training ``method`` (a name of
    ``qtx.methods.registry.PTQ``), and evaluates it.

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
    best, seconds, tried = None, 0.0, []
    ptq = registry.ptq_method(method)
    for c in ptq.calibrate(cfg, setup, params, calib, options, calibration, ptq_options):
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
