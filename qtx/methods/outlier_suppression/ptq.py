"""Outlier Suppression's post-training quantization methods, for any setup (preset + bits).

Methods (``PTQ_METHODS``):

* ``minmax``: per-batch min/max of every activation (averaged over batches in the
  ``os_fastertransformer`` preset);
* ``percentile``: the 99.9 / 99.99 / 99.999 percentile of |x| (``percentiles``), the best on
  the evaluation split reported, as the paper does (a choice made on the data it reports);
* ``omse``: golden-section search of the range with the least L2 quantization error;
* ``gamma_migration``: MinMax on the gamma-migrated model;
* ``token_wise_clipping``: the coarse alpha search and the fine LSQ+ stage on the output MSE;
* ``outlier_suppression``: gamma migration, then token-wise clipping (the paper's method).

Each method returns one or more calibrated candidates (:class:`Calibrated`) with the seconds
its calibration took (compilation included); the caller evaluates them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Mapping, Sequence

import jax

from qtx import quant
from qtx.errors import UserError
from qtx.methods.outlier_suppression.gamma_migration import migrate_gamma
from qtx.methods.outlier_suppression.token_wise_clipping import (
    Reference,
    TWCSettings,
    activation_bits,
    coarse_search,
    fine_tune,
    length_buckets,
)
from qtx.models import ModelConfig

PTQ_METHODS = (
    "minmax",
    "percentile",
    "omse",
    "gamma_migration",
    "token_wise_clipping",
    "outlier_suppression",
)
PERCENTILES = (99.9, 99.99, 99.999)
_ESTIMATOR = {"percentile": "percentile", "omse": "omse"}


@dataclasses.dataclass
class Calibrated:
    """A calibrated model ready to evaluate: config, plan (mode quantize), variables."""

    cfg: ModelConfig
    plan: quant.QuantPlan
    variables: dict
    seconds: float
    info: dict


def method_settings(options: Mapping | None) -> tuple[TWCSettings, tuple[float, ...]]:
    """``(token-wise clipping settings, percentiles)`` from ``config.eval.ptq_options``."""
    opts = dict(options or {})
    pcts = tuple(float(p) for p in opts.pop("percentiles", PERCENTILES))
    if not pcts or any(not 0.0 < p <= 100.0 for p in pcts):
        raise UserError(
            f"config.eval.ptq_options.percentiles={pcts!r} is invalid; allowed: one or more "
            "numbers in (0, 100]."
        )
    names = {f.name for f in dataclasses.fields(TWCSettings)}
    unknown = sorted(set(opts) - names)
    if unknown:
        raise UserError(
            f"config.eval.ptq_options has unknown field(s) {unknown}; allowed: "
            f"{sorted(names | {'percentiles'})}."
        )
    return TWCSettings(**opts), pcts


def method_rules(setup: str, method: str, options: Mapping | None = None, percentile=None):
    """The rules of ``setup`` calibrated the way ``method`` calibrates activations."""
    if method not in PTQ_METHODS:
        raise UserError(
            f"post-training quantization method {method!r} is unknown; allowed: "
            f"{', '.join(PTQ_METHODS)}."
        )
    opts = {**dict(options or {}), "act_estimator": _ESTIMATOR.get(method, "minmax")}
    if percentile is not None:
        opts["percentile"] = percentile
    try:
        return quant.setup_rules(setup, **opts)
    except TypeError:
        raise UserError(
            f"post-training quantization method {method!r} needs a setup whose preset takes "
            f"an activation estimator; {setup!r} does not (allowed presets: w8a8_all, "
            "os_fastertransformer, or a bit shortcut)."
        ) from None


def _ready(tree):
    jax.block_until_ready(tree)
    return tree


def calibrate_method(
    method: str,
    cfg: ModelConfig,
    setup: str,
    params,
    calib: Sequence[dict],
    options: Mapping | None = None,
    calibration: str = "sequential",
    ptq_options: Mapping | None = None,
) -> Iterator[Calibrated]:
    """Yields the calibrated candidates of ``method`` on ``setup`` (several for percentile)."""
    from qtx.evaluate.ptq import calibrate_setup

    settings, percentiles = method_settings(ptq_options)
    for p in percentiles if method == "percentile" else (None,):
        t0 = time.perf_counter()
        plan = quant.QuantPlan(
            method_rules(setup, method, options, p), mode="quantize", calibration=calibration
        )
        qcfg, variables = cfg, {"params": params}
        if method in ("gamma_migration", "outlier_suppression"):
            qcfg, variables = migrate_gamma(cfg, variables)
        variables = _ready(calibrate_setup(qcfg, plan, variables["params"], calib))
        info = {} if p is None else {"percentile": p}
        if method in ("token_wise_clipping", "outlier_suppression"):
            search_plan = plan
            if not settings.quantize_weights:
                search_plan = plan.prepend((quant.rule(".", "weight", off=True),))
            search = length_buckets(calib)
            ref = Reference(qcfg, variables["params"], search, settings.output)
            bits = activation_bits(plan)
            variables, info["coarse"] = coarse_search(
                qcfg, search_plan, variables, search, ref, bits, settings
            )
            fine_plan, fine_vars, info["fine"] = fine_tune(
                qcfg, search_plan, variables, search, ref, settings
            )
            # The learnable quantizers start equal to the coarse ones up to float rounding
            # (x + z s)/s vs x/s + z, which flips a few elements at rounding boundaries; keep
            # the coarse stage when the fine one ends no better (as at 8 bits, where the
            # objective is that noisy).
            fine_mse = info["fine"].get("output_mse_after", math.inf)
            info["fine"]["kept"] = fine_mse < info["coarse"]["output_mse"]
            if info["fine"]["kept"]:
                variables = fine_vars
                plan = fine_plan if settings.quantize_weights else _with_weights(fine_plan, plan)
            _ready(variables)
        yield Calibrated(qcfg, plan, variables, time.perf_counter() - t0, info)


def _with_weights(fine_plan: quant.QuantPlan, plan: quant.QuantPlan) -> quant.QuantPlan:
    """The fine stage's plan without the rule that kept weights in full precision during the
    search (the final model quantizes weights as ``plan`` does)."""
    return dataclasses.replace(fine_plan, rules=fine_plan.rules[1:])
