"""The kinds of method a paper package defines, each a small typed record (docs/methods.md).

* :class:`PTQMethod`: a post-training calibration method (``config.eval.ptq_methods``): the
  activation estimator it gives a setup's rules (``minmax`` / ``percentile`` / ``omse``), the
  reparametrisation it applies first (or None), and ``calibrate``, which yields one or more
  calibrated candidates (:class:`Calibrated`);
* :class:`Reparametrisation`: an exact rewrite ``(config, variables) -> (config, variables)``
  of a trained model, e.g. gamma migration; a config says whether it is applied;
* :class:`QATInit`: how quantization-aware training starts its quantizers after the plan's
  own calibration (``config.train.qat_init``);
* :class:`QATTerm`: what a method adds to every QAT step (:class:`qtx.train.steps.StepHooks`)
  and the state it keeps in ``TrainState.extra``;
* the stages a composed PTQ method (:mod:`qtx.methods.pipeline`, ``smoothquant+gptq``) is
  made of: :class:`Transform` (a rewrite of the trained model, calibrated or not, before the
  quantizers are calibrated: gamma migration, SmoothQuant, OS+, rotations),
  :class:`WeightRounding` (weights rounded with calibration data, GPTQ) and
  :class:`Refinement` (a calibrated model improved on its output error, token-wise clipping).

:mod:`qtx.methods.registry` holds one name -> method table per kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from qtx import quant
from qtx.errors import UserError
from qtx.models import ModelConfig
from qtx.train.pretrained import source_model_field
from qtx.train.steps import StepHooks

ESTIMATORS = ("minmax", "percentile", "omse")  # activation estimators a PTQ method may pick


@dataclasses.dataclass
class Calibrated:
    """A calibrated model ready to evaluate: config, plan (mode quantize), variables."""

    cfg: ModelConfig
    plan: quant.QuantPlan
    variables: dict
    seconds: float
    info: dict
    # the full-precision parameters an output-error refinement compares with, when the
    # variables hold rounded weights (GPTQ); None: ``variables["params"]``
    reference_params: Any = None


@dataclasses.dataclass(frozen=True)
class Reparametrisation:
    """An exact rewrite of a trained model that its config records.

    * ``config_field``: the boolean :class:`~qtx.models.ModelConfig` field that says the
      parameters are rewritten (``config.model.<config_field>``);
    * ``apply(cfg, {"params": ...}) -> (cfg', variables')`` with ``applied(cfg')`` True; it
      refuses a config that is already reparametrised;
    * ``params_for(cfg, params)``: parameters of the original model made to fit ``cfg``, a
      config with ``applied(cfg)`` (an HF checkpoint evaluated under a reparametrised config);
    * ``log_line``: what a run prints when it applies it.
    """

    name: str
    paper: str
    config_field: str
    apply: Callable[[ModelConfig, dict], tuple[ModelConfig, dict]]
    params_for: Callable[[ModelConfig, Any], Any]
    log_line: str

    def applied(self, cfg: ModelConfig) -> bool:
        """Whether ``cfg`` is already reparametrised (a method must not apply it again)."""
        return bool(getattr(cfg, self.config_field))

    def source_applied(self, path: str) -> bool:
        """Whether the checkpoint at ``path`` (``config.init_from``) already holds
        reparametrised parameters: a qtx workdir trained with ``config_field`` True."""
        return bool(source_model_field(path, self.config_field))


class PTQMethod(Protocol):
    """A post-training calibration method (``config.eval.ptq_methods``)."""

    name: str
    paper: str
    estimator: str  # one of ESTIMATORS: the activation estimator of the setup's rules
    reparametrisation: Reparametrisation | None  # applied before calibration, or None

    def rules(
        self, setup: str, options: Mapping | None = None, percentile: float | None = None
    ) -> tuple:
        """The rules of ``setup`` (``qtx.quant.setup_rules``) with this method's estimator."""
        ...

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
        """The calibrated candidates of ``setup`` (one, or several such as percentile's)."""
        ...


@dataclasses.dataclass(frozen=True)
class QATInit:
    """A QAT initialisation (``config.train.qat_init``): ``refine(cfg, plan, variables,
    batches) -> (variables, log line)`` moves the quantizers of the calibrated QAT variables
    (params + ``quant_stats``); None keeps the plan's own calibration."""

    name: str
    paper: str
    refine: Callable[[ModelConfig, quant.QuantPlan, dict, Sequence[dict]], tuple[dict, str]] | None


@dataclasses.dataclass(frozen=True)
class QATTerm:
    """What a method adds to quantization-aware training.

    * ``hooks(config.train, total steps) -> StepHooks | None`` (None: off in this config);
    * ``state(config.train, apply_fn, variables, inputs) -> {collection: tree}``: the state
      it keeps in ``TrainState.extra`` (``{}`` when off); ``apply_fn`` is the QAT model's.
    """

    name: str
    paper: str
    hooks: Callable[[dict, int], StepHooks | None]
    state: Callable[[dict, Callable, dict, dict], dict]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A rewrite of a trained model before its quantizers are calibrated (stage 1 of a
    composed method).

    ``apply(cfg, params, calib, plan, options) -> (cfg', params', info)``: ``calib`` the
    calibration batches, ``plan`` the setup's quantization plan (what will be quantized and
    at which bits; a transform that searches on the quantized error reads it), ``options``
    ``config.eval.ptq_options`` (the transform reads its own fields, listed in
    ``option_fields``). ``exact``: the rewritten model equals the original in full precision
    (tested to 1e-5). ``excludes``: transforms it cannot be combined with. ``check(cfg)``
    raises UserError for a model it cannot transform (run before any compute);
    ``check_options(options)`` validates its ``option_fields``. ``reparametrisation``: the
    config-recorded rewrite it applies (so a config that already has it is refused).
    ``config_of(cfg)``: the config ``apply`` returns, known without computing (None: ``cfg``);
    drivers check what they can do with it (an export) before any compute."""

    name: str
    paper: str
    apply: Callable[..., tuple[ModelConfig, Any, dict]]
    exact: bool = True
    option_fields: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    check: Callable[[ModelConfig], None] | None = None
    check_options: Callable[[Mapping | None], None] | None = None
    reparametrisation: Reparametrisation | None = None
    config_of: Callable[[ModelConfig], ModelConfig] | None = None


@dataclasses.dataclass(frozen=True)
class WeightRounding:
    """Weights rounded with calibration data (stage 2, after the transforms; GPTQ).

    ``apply(cfg, plan, params, calib, options) -> (plan', params', pinned, info)``: the
    rounded weights (their dequantized values) in ``params'``, a plan whose weight points
    keep frozen ranges (``plan' = plan_of(plan)``), and ``pinned``: ``{point name: (lo,
    hi)}`` the ranges those points must quantize with (written into ``quant_stats`` after
    calibration, so the rounded weights are reproduced exactly). ``calibration_plan(plan',
    pinned)``: the plan the activations are calibrated with (the pinned points off, so that
    calibration sees the rounded weights as the final model does; None: ``plan'``)."""

    name: str
    paper: str
    apply: Callable[..., tuple[quant.QuantPlan, Any, dict, dict]]
    option_fields: tuple[str, ...] = ()
    check: Callable[[ModelConfig], None] | None = None
    check_options: Callable[[Mapping | None], None] | None = None
    plan_of: Callable[[quant.QuantPlan], quant.QuantPlan] | None = None
    calibration_plan: Callable[[quant.QuantPlan, Mapping], quant.QuantPlan] | None = None


@dataclasses.dataclass(frozen=True)
class Refinement:
    """A calibrated model improved on its output error (stage 4, last; token-wise clipping).

    ``apply(calibrated, calib, options) -> calibrated'`` (a :class:`Calibrated`; its
    ``seconds`` are added by the caller)."""

    name: str
    paper: str
    apply: Callable[[Calibrated, Sequence[dict], Mapping | None], Calibrated]


def estimator_rules(
    setup: str,
    method: str,
    estimator: str,
    options: Mapping | None = None,
    percentile: float | None = None,
) -> tuple:
    """The rules of ``setup`` with ``estimator`` for activations (``method`` names the PTQ
    method in the error of a preset that takes no activation estimator). A preset whose
    activations are all dynamic or in full precision (``w8a8_dynamic``, ``w4a8``, ``w4a16``)
    has nothing to calibrate: its own rules serve ``minmax`` (round-to-nearest weights)."""
    opts = {**dict(options or {}), "act_estimator": estimator}
    if percentile is not None:
        opts["percentile"] = percentile
    try:
        return quant.setup_rules(setup, **opts)
    except TypeError:
        own = quant.setup_rules(setup, **dict(options or {}))
        calibrated = [
            r for r in own if r.kind != "weight" and r.spec is not None and not r.spec.dynamic
        ]
        if estimator == "minmax" and percentile is None and not calibrated:
            return own
        raise UserError(
            f"post-training quantization method {method!r} needs a setup whose preset takes "
            f"an activation estimator; {setup!r} does not (allowed presets: w8a8_all, "
            "os_fastertransformer, w8a8_static, or a bit shortcut; methods with the default "
            "minmax estimator also take presets whose activations are dynamic or FP: "
            "w8a8_dynamic, w4a8, w4a16)."
        ) from None
