"""Composed post-training methods: ``smoothquant+gptq``, ``os_plus+token_wise_clipping``.

A composed method runs its stages (:mod:`qtx.methods.kinds`) in a fixed order, whatever the
order of the names (docs/methods.md §5):

1. the transforms (:class:`~qtx.methods.kinds.Transform`), in the order named: rewrites of the
   trained model, exact in full precision (gamma migration, SmoothQuant, OS+, rotations);
2. the setup's rules with the method's activation estimator (``minmax`` unless ``percentile``
   or ``omse`` is named);
3. the weight rounding (:class:`~qtx.methods.kinds.WeightRounding`, GPTQ) on the transformed
   model: its rounded weights, and the ranges pinned for their points;
4. calibration of every quantizer (:func:`qtx.evaluate.ptq.calibrate_setup`), then the pinned
   weight ranges written into ``quant_stats``;
5. the refinement (:class:`~qtx.methods.kinds.Refinement`, token-wise clipping).

The calibration seconds cover every stage (compilation included).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx import quant
from qtx.errors import UserError
from qtx.evaluate.ptq import calibrate_setup
from qtx.methods.kinds import (
    ESTIMATORS,
    Calibrated,
    Refinement,
    Reparametrisation,
    Transform,
    WeightRounding,
    estimator_rules,
)
from qtx.models import ModelConfig

PAPER = "composed post-training methods (docs/methods.md §5)"


def pin_ranges(variables: dict, pinned: Mapping[str, tuple]) -> dict:
    """``variables`` with ``quant_stats/<point>/{lo, hi}`` set to ``pinned[point]`` (given
    in the shapes the point stores; a point calibration left out gets them)."""
    if not pinned:
        return variables
    flat = dict(flatten_dict(variables.get(quant.STATS, {})))
    for name, (lo, hi) in pinned.items():
        key = tuple(name.split("/"))
        for which, value in (("lo", lo), ("hi", hi)):
            value = jnp.asarray(value, jnp.float32)
            old = flat.get(key + (which,))
            flat[key + (which,)] = value if old is None else value.reshape(old.shape)
    return {**variables, quant.STATS: unflatten_dict(flat)}


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A :class:`~qtx.methods.kinds.PTQMethod` made of stages (module docstring)."""

    name: str
    transforms: tuple[Transform, ...] = ()
    estimator: str = "minmax"
    weights: WeightRounding | None = None
    refine: Refinement | None = None
    paper: str = PAPER
    # ``config.eval.ptq_options`` -> the percentiles a ``percentile`` estimator tries
    percentiles: Callable[[Mapping | None], tuple[float, ...]] | None = None

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise UserError(
                f"PTQ method {self.name!r}: estimator {self.estimator!r} is invalid; allowed: "
                f"{', '.join(ESTIMATORS)}."
            )
        names = [t.name for t in self.transforms]
        for t in self.transforms:
            clash = sorted(set(t.excludes) & set(names))
            if clash:
                raise UserError(
                    f"config.eval.ptq_methods: {self.name!r} combines {t.name} with "
                    f"{', '.join(clash)}, which it cannot follow or precede; allowed: one of them."
                )
        if len(set(names)) != len(names):
            raise UserError(
                f"config.eval.ptq_methods: {self.name!r} names a transform twice; allowed: "
                "each at most once."
            )

    @property
    def reparametrisations(self) -> tuple[Reparametrisation, ...]:
        return tuple(t.reparametrisation for t in self.transforms if t.reparametrisation)

    @property
    def reparametrisation(self) -> Reparametrisation | None:
        """The first config-recorded rewrite among the transforms (None: none)."""
        reps = self.reparametrisations
        return reps[0] if reps else None

    @property
    def option_fields(self) -> tuple[str, ...]:
        stages = (*self.transforms, self.weights)
        return tuple(f for s in stages if s is not None for f in s.option_fields)

    def check(self, cfg: ModelConfig, options: Mapping | None = None) -> None:
        """Raises UserError, before any compute, for a model or options a stage refuses
        (each stage sees the config the transforms before it give)."""
        staged = cfg  # the config each stage receives
        for stage in (*self.transforms, self.weights):
            if stage is None:
                continue
            if stage.check is not None:
                stage.check(staged)
            if stage.check_options is not None:
                stage.check_options(options)
            if getattr(stage, "config_of", None) is not None:
                staged = stage.config_of(staged)
        for r in self.reparametrisations:
            if r.applied(cfg):
                raise UserError(
                    f"config.model.{r.config_field}=True cannot take {r.name} again from the "
                    f"PTQ method {self.name!r}; allowed: {r.config_field}=False."
                )

    def out_config(self, cfg: ModelConfig) -> ModelConfig:
        """The model config the transforms give ``cfg`` (no compute)."""
        for t in self.transforms:
            cfg = cfg if t.config_of is None else t.config_of(cfg)
        return cfg

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
        """Yields the calibrated candidates (one per percentile for ``percentile``)."""
        self.check(cfg, ptq_options)
        percentiles = (None,)
        if self.estimator == "percentile":
            percentiles = self.percentiles(ptq_options)
        t0 = time.perf_counter()
        plan0 = quant.QuantPlan(self.rules(setup, options), mode="quantize")
        info: dict = {}
        for t in self.transforms:
            t1 = time.perf_counter()
            cfg, params, info[t.name] = t.apply(cfg, params, calib, plan0, ptq_options)
            info[t.name] = {**info[t.name], "seconds": time.perf_counter() - t1}
        base_seconds = time.perf_counter() - t0
        rounded = None
        for p in percentiles:
            t0 = time.perf_counter()
            plan = quant.QuantPlan(
                self.rules(setup, options, p), mode="quantize", calibration=calibration
            )
            step_params, pinned, cand, calib_plan, reference = params, {}, dict(info), plan, None
            if self.weights is not None:
                w = self.weights
                if rounded is None:  # the weights' grid does not depend on the percentile
                    t1 = time.perf_counter()
                    _, new, pins, w_info = w.apply(cfg, plan, params, calib, ptq_options)
                    rounded = new, pins, {**w_info, "seconds": time.perf_counter() - t1}
                step_params, pinned, cand[w.name] = rounded
                plan = plan if w.plan_of is None else w.plan_of(plan)
                if w.calibration_plan is not None:
                    calib_plan = w.calibration_plan(plan, pinned)
                else:
                    calib_plan = plan
                reference = params  # the refinement compares with the unrounded model
            variables = calibrate_setup(cfg, calib_plan, step_params, calib)
            variables = jax.block_until_ready(pin_ranges(variables, pinned))
            if p is not None:
                cand["percentile"] = p
            seconds = base_seconds + time.perf_counter() - t0
            base_seconds = 0.0  # the transforms' time counts once
            c = Calibrated(cfg, plan, variables, seconds, cand, reference)
            if self.refine is not None:
                c = self.refine.apply(c, calib, ptq_options)
            yield c
