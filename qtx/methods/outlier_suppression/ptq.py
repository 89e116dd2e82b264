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

Each is a :class:`qtx.methods.pipeline.Pipeline` of this paper's stages (gamma migration, a
transform; token-wise clipping, a refinement: :data:`GAMMA_MIGRATION_TRANSFORM`,
:data:`TOKEN_WISE_REFINE`), which the composed methods of docs/methods.md §5 reuse. Each
yields one or more calibrated candidates (:class:`Calibrated`) with the seconds its
calibration took (compilation included); the caller evaluates them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

import jax

from qtx import quant
from qtx.errors import UserError
from qtx.methods.kinds import Calibrated, Refinement, Transform
from qtx.methods.outlier_suppression.gamma_migration import GAMMA_MIGRATION, PAPER
from qtx.methods.outlier_suppression.token_wise_clipping import (
    Reference,
    TWCSettings,
    activation_bits,
    coarse_search,
    fine_tune,
    length_buckets,
)
from qtx.methods.pipeline import Pipeline
from qtx.models import ModelConfig

PERCENTILES = (99.9, 99.99, 99.999)


OPTION_FIELDS = ("percentiles", *(f.name for f in dataclasses.fields(TWCSettings)))


def method_settings(
    options: Mapping | None, other_fields: Sequence[str] | None = None
) -> tuple[TWCSettings, tuple[float, ...]]:
    """``(token-wise clipping settings, percentiles)`` from ``config.eval.ptq_options``;
    ``other_fields``: the option fields of other methods' stages, skipped here while any
    other unknown field is refused (None: every field not of this paper is skipped, as when
    a calibration reads options the registry has validated)."""
    opts = dict(options or {})
    if other_fields is None:
        other_fields = set(opts) - set(OPTION_FIELDS)
    opts = {k: v for k, v in opts.items() if k not in set(other_fields)}
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
            f"{sorted(names | {'percentiles'} | set(other_fields))}."
        )
    return TWCSettings(**opts), pcts


def _ready(tree):
    jax.block_until_ready(tree)
    return tree


def refine_token_wise(
    c: Calibrated, calib: Sequence[dict], ptq_options: Mapping | None = None
) -> Calibrated:
    """Token-wise clipping's coarse and fine stages on a calibrated model ``c`` (its ranges
    are the start), on the output MSE; ``seconds`` grow by the time taken."""
    settings, _ = method_settings(ptq_options)
    t0 = time.perf_counter()
    qcfg, plan, variables, info = c.cfg, c.plan, c.variables, dict(c.info)
    search_plan = plan
    if not settings.quantize_weights:
        search_plan = plan.prepend((quant.rule(".", "weight", off=True),))
    search = length_buckets(calib)
    fp = variables["params"] if c.reference_params is None else c.reference_params
    ref = Reference(qcfg, fp, search, settings.output)
    bits = activation_bits(plan)
    variables, info["coarse"] = coarse_search(
        qcfg, search_plan, variables, search, ref, bits, settings
    )
    fine_plan, fine_vars, info["fine"] = fine_tune(
        qcfg, search_plan, variables, search, ref, settings
    )
    # The learnable quantizers start equal to the coarse ones up to float rounding
    # (x + z s)/s vs x/s + z, which flips a few elements at rounding boundaries; keep the
    # coarse stage when the fine one ends no better (as at 8 bits, where the objective is
    # that noisy).
    fine_mse = info["fine"].get("output_mse_after", math.inf)
    info["fine"]["kept"] = fine_mse < info["coarse"]["output_mse"]
    if info["fine"]["kept"]:
        variables = fine_vars
        plan = fine_plan if settings.quantize_weights else _with_weights(fine_plan, plan)
    _ready(variables)
    seconds = c.seconds + time.perf_counter() - t0
    return Calibrated(qcfg, plan, variables, seconds, info, c.reference_params)


def _with_weights(fine_plan: quant.QuantPlan, plan: quant.QuantPlan) -> quant.QuantPlan:
    """The fine stage's plan without the rule that kept weights in full precision during the
    search (the final model quantizes weights as ``plan`` does)."""
    return dataclasses.replace(fine_plan, rules=fine_plan.rules[1:])


# the paper's PTQ table (docs/methods.md §2); registered in qtx.methods.registry
TOKEN_WISE_REFINE = Refinement("token_wise_clipping", PAPER, refine_token_wise)


def _migrate(cfg: ModelConfig, params, calib, plan, options):
    """Gamma migration as a composed method's transform (no calibration data needed)."""
    cfg, variables = GAMMA_MIGRATION.apply(cfg, {"params": params})
    return cfg, variables["params"], {}


GAMMA_MIGRATION_TRANSFORM = Transform(
    "gamma_migration",
    PAPER,
    _migrate,
    reparametrisation=GAMMA_MIGRATION,
    config_of=lambda cfg: cfg.replace(gamma_migrated=True),
    check=lambda cfg: cfg.replace(gamma_migrated=True),  # the family's own check refuses it
)


def percentiles_of(options: Mapping | None) -> tuple[float, ...]:
    """The percentiles ``config.eval.ptq_options`` gives the ``percentile`` estimator."""
    return method_settings(options)[1]


def _method(name, transforms=(), estimator="minmax", refine=None) -> Pipeline:
    return Pipeline(name, transforms, estimator, None, refine, PAPER, percentiles_of)


MINMAX = _method("minmax")
PERCENTILE = _method("percentile", estimator="percentile")
OMSE = _method("omse", estimator="omse")
MIGRATED_MINMAX = _method("gamma_migration", (GAMMA_MIGRATION_TRANSFORM,))
TOKEN_WISE_CLIPPING = _method("token_wise_clipping", refine=TOKEN_WISE_REFINE)
OUTLIER_SUPPRESSION = _method(
    "outlier_suppression", (GAMMA_MIGRATION_TRANSFORM,), refine=TOKEN_WISE_REFINE
)
