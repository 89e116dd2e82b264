"""Outlier Suppression's post-training quantization methods, for any setup (preset + bits).

The methods of the paper's PTQ table (``PAPER_TABLE``), each a
:class:`qtx.methods.kinds.PTQMethod` registered in :mod:`qtx.methods.registry`:

* ``minmax`` (:data:`MINMAX`): per-batch min/max of every activation (averaged over batches
  in the ``os_fastertransformer`` preset);
* ``percentile`` (:data:`PERCENTILE`): the 99.9 / 99.99 / 99.999 percentile of |x|
  (``percentiles``), the best on the evaluation split reported, as the paper does (a choice
  made on the data it reports);
* ``omse`` (:data:`OMSE`): golden-section search of the range with the least L2 quantization
  error;
* ``gamma_migration`` (:data:`MIGRATED_MINMAX`): gamma migration, then MinMax;
* ``token_wise_clipping`` (:data:`TOKEN_WISE_CLIPPING`): MinMax, then the coarse alpha search
  and the fine LSQ+ stage on the output MSE;
* ``outlier_suppression`` (:data:`OUTLIER_SUPPRESSION`): gamma migration, then token-wise
  clipping (the paper's method).

Each method yields one or more calibrated candidates (:class:`Calibrated`) with the seconds
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
from qtx.evaluate.ptq import calibrate_setup
from qtx.methods.kinds import Calibrated, Reparametrisation, estimator_rules
from qtx.methods.outlier_suppression.gamma_migration import GAMMA_MIGRATION, PAPER
from qtx.methods.outlier_suppression.token_wise_clipping import (
    Reference,
    TWCSettings,
    activation_bits,
    coarse_search,
    fine_tune,
    length_buckets,
)
from qtx.models import ModelConfig

PERCENTILES = (99.9, 99.99, 99.999)


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


def _ready(tree):
    jax.block_until_ready(tree)
    return tree


@dataclasses.dataclass(frozen=True)
class RangeMethod:
    """A :class:`~qtx.methods.kinds.PTQMethod` that calibrates the setup's rules with
    ``estimator`` for activations, on the model after ``reparametrisation`` (None: as
    trained); ``percentile`` yields one candidate per ``config.eval.ptq_options.percentiles``.
    """

    name: str
    estimator: str = "minmax"
    reparametrisation: Reparametrisation | None = None
    paper: str = PAPER

    def rules(self, setup: str, options: Mapping | None = None, percentile=None) -> tuple:
        """The rules of ``setup`` with this method's activation estimator."""
        return estimator_rules(setup, self.name, self.estimator, options, percentile)

    def calibrate(
        self,
        cfg: ModelConfig,
        setup: str,
        params,
        calib: Sequence[dict],
        options: Mapping | None = None,
        calibration: str = "sequential",
        ptq_options: Mapping | None = None,
    ) -> Iterator[Calibrated]:
        """Yields the calibrated candidates on ``setup`` (several for percentile)."""
        _, percentiles = method_settings(ptq_options)
        for p in percentiles if self.estimator == "percentile" else (None,):
            t0 = time.perf_counter()
            plan = quant.QuantPlan(
                self.rules(setup, options, p), mode="quantize", calibration=calibration
            )
            qcfg, variables = cfg, {"params": params}
            if self.reparametrisation is not None:
                qcfg, variables = self.reparametrisation.apply(cfg, variables)
            variables = _ready(calibrate_setup(qcfg, plan, variables["params"], calib))
            info = {} if p is None else {"percentile": p}
            yield Calibrated(qcfg, plan, variables, time.perf_counter() - t0, info)


@dataclasses.dataclass(frozen=True)
class TokenWiseClipping(RangeMethod):
    """:class:`RangeMethod`'s ranges, then token-wise clipping's coarse and fine stages on the
    output MSE (``config.eval.ptq_options``: :class:`TWCSettings` fields)."""

    def calibrate(
        self,
        cfg: ModelConfig,
        setup: str,
        params,
        calib: Sequence[dict],
        options: Mapping | None = None,
        calibration: str = "sequential",
        ptq_options: Mapping | None = None,
    ) -> Iterator[Calibrated]:
        settings, _ = method_settings(ptq_options)
        ranges = super().calibrate(cfg, setup, params, calib, options, calibration, ptq_options)
        for c in ranges:
            t0 = time.perf_counter()
            qcfg, plan, variables, info = c.cfg, c.plan, c.variables, dict(c.info)
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
            seconds = c.seconds + time.perf_counter() - t0
            yield Calibrated(qcfg, plan, variables, seconds, info)


def _with_weights(fine_plan: quant.QuantPlan, plan: quant.QuantPlan) -> quant.QuantPlan:
    """The fine stage's plan without the rule that kept weights in full precision during the
    search (the final model quantizes weights as ``plan`` does)."""
    return dataclasses.replace(fine_plan, rules=fine_plan.rules[1:])


# the paper's PTQ table (docs/methods.md §2); registered in qtx.methods.registry
MINMAX = RangeMethod("minmax")
PERCENTILE = RangeMethod("percentile", "percentile")
OMSE = RangeMethod("omse", "omse")
MIGRATED_MINMAX = RangeMethod("gamma_migration", reparametrisation=GAMMA_MIGRATION)
TOKEN_WISE_CLIPPING = TokenWiseClipping("token_wise_clipping")
OUTLIER_SUPPRESSION = TokenWiseClipping("outlier_suppression", reparametrisation=GAMMA_MIGRATION)
