"""Settings of one quantization point (:class:`QuantSpec`) and their validation.

A spec is frozen and hashable so that models can carry it as static configuration.
Every invalid value is rejected at construction with one sentence that names the field and
lists the allowed values, before any compute starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qtx.errors import UserError

SCHEMES = ("symmetric", "asymmetric", "unsigned")
GRANULARITIES = ("tensor", "channel", "token", "head", "group")
ESTIMATORS = (
    "current_minmax",  # range of the current tensor, recomputed at every call (dynamic)
    "minmax",  # per-batch min/max, accumulated over calibration batches
    "running_minmax",  # per-batch min/max, EMA with `momentum`
    "percentile",  # per-batch percentiles (`percentile_of`: of x, or of |x|)
    "mse",  # Lp-error search over shrunk ranges: grid or golden-section (`search`)
    "omse",  # golden-section search on the L2 error, lower and upper bound separately
    "mean_std",  # mean +- k_sigma * std
    "lsq_init",  # LSQ activation init: step = 2 mean|x| / sqrt(Qp)
    "iterative",  # weight init: step <- <w, q> / <q, q> until it stops changing
)
DYNAMIC_ESTIMATORS = ("current_minmax",)
ACCUMULATORS = ("ema", "mean", "extreme", "last")
DEFAULT_ACCUMULATE = {
    "minmax": "extreme",
    "running_minmax": "ema",
    "percentile": "ema",
    "mse": "mean",
    "omse": "mean",
    "mean_std": "mean",
    "lsq_init": "last",
    "iterative": "last",
}
LEARN = ("none", "lsq", "lsq+")
GRAD_SCALES = ("lsq", "weight_l1", "act_qv", "none")
SEARCHES = ("grid", "golden")
PERCENTILE_OF = ("x", "abs")
MODES = ("off", "calibrate", "quantize", "learn")
KINDS = ("weight", "act")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise UserError(f"quantization setting '{field}'={value!r} is invalid; allowed: {allowed}.")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one point is quantized.

    Attributes:
      bits: 1 or 2..16 (uniform grid). At 1 bit, ``symmetric`` is the sign binarisation
        ``sign(x) * mean|x|`` (:attr:`binary`; a per-tensor activation takes ``mean|x|`` per
        token, over its features, as the paper's ``sign(x) mean|x|`` per example) and
        ``unsigned`` the uniform grid ``{0, 1}``: ``s * clip(round((x - b) / s), 0, 1) + b``
        (``b = 0`` unless LSQ+), for non-negative inputs such as GELU outputs.
      scheme: ``symmetric`` (signed grid ``[-2^(b-1), 2^(b-1)-1]``), ``asymmetric`` (grid
        ``[0, 2^b-1]`` with integer zero point, range forced to contain 0; 2..16 bits) or
        ``unsigned`` (grid ``[0, 2^b-1]``, zero point 0; for post-softmax / post-GELU outputs).
      granularity: ``tensor``; ``channel`` (along ``axis``, default the point's channel axis);
        ``token`` (one range per row, reduced over the axes from ``axis`` on, default the
        last one; dynamic only); ``head`` (the
        point's head axis); ``group`` (``axis`` split into groups of ``group_size``, at most
        the axis size; per channel too when ``axis`` is not the point's channel axis).
      estimator: how ranges are found, see :data:`ESTIMATORS`.
      accumulate: how per-batch ranges combine over calibration batches (``ema`` with
        ``momentum``, ``mean``, ``extreme`` min/max, ``last``); ``None`` = estimator default.
      momentum: EMA weight of the old value: ``new = m * old + (1 - m) * batch``.
      percentile: upper percentile ``p`` in (0, 100] for the ``percentile`` estimator.
      percentile_of: ``x``: the range is ``(P_{100-p}(x), P_p(x))``; ``abs``: ``t = P_p(|x|)``
        and the range is ``(max(min x, -t), min(max x, t))`` (Outlier Suppression's
        "99.999 % of |x|").
      num_candidates: ranges tried by the grid search; golden-section uses ``search_iters``.
      lp: exponent of the error the ``mse`` search minimises (2 = MSE).
      k_sigma: width of the ``mean_std`` range.
      learn: ``none`` (fixed range), ``lsq`` (learnable step) or ``lsq+`` (step and offset).
      grad_scale: gradient scale of learnable parameters (``lsq``, ``weight_l1``, ``act_qv``,
        ``none`` or a float).
      min_scale: lower clamp of the step (QV clamps LSQ steps at 1e-4); for learnable steps
        the clamp is straight-through, so a step below it still gets its gradient.
      mode: overrides the plan's mode for this point (``off``/``calibrate``/``quantize``/``learn``).
    """

    bits: int = 8
    scheme: str = "asymmetric"
    granularity: str = "tensor"
    axis: int | None = None
    group_size: int | None = None
    estimator: str = "running_minmax"
    accumulate: str | None = None
    momentum: float = 0.9
    percentile: float = 99.999
    percentile_of: str = "x"
    num_candidates: int = 100
    search: str = "grid"
    search_iters: int = 30
    lp: float = 2.0
    k_sigma: float = 3.0
    learn: str = "none"
    grad_scale: Any = "lsq"
    min_scale: float = 1e-8
    mode: str | None = None

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            _fail("bits", self.bits, "an integer: 1 (binary) or 2..16")
        if not (self.bits == 1 or 2 <= self.bits <= 16):
            _fail("bits", self.bits, "1 (binary) or 2..16")
        if self.scheme not in SCHEMES:
            _fail("scheme", self.scheme, ", ".join(SCHEMES))
        if self.granularity not in GRANULARITIES:
            _fail("granularity", self.granularity, ", ".join(GRANULARITIES))
        if self.estimator not in ESTIMATORS:
            _fail("estimator", self.estimator, ", ".join(ESTIMATORS))
        if self.accumulate is not None and self.accumulate not in ACCUMULATORS:
            _fail("accumulate", self.accumulate, ", ".join(ACCUMULATORS) + " or None")
        if not 0.0 <= self.momentum < 1.0:
            _fail("momentum", self.momentum, "a number in [0, 1)")
        if not 0.0 < self.percentile <= 100.0:
            _fail("percentile", self.percentile, "a number in (0, 100]")
        if self.percentile_of not in PERCENTILE_OF:
            _fail("percentile_of", self.percentile_of, ", ".join(PERCENTILE_OF))
        if self.num_candidates < 1:
            _fail("num_candidates", self.num_candidates, "an integer >= 1")
        if self.search not in SEARCHES:
            _fail("search", self.search, ", ".join(SEARCHES))
        if self.search_iters < 1:
            _fail("search_iters", self.search_iters, "an integer >= 1")
        if self.lp <= 0:
            _fail("lp", self.lp, "a positive number")
        if self.k_sigma <= 0:
            _fail("k_sigma", self.k_sigma, "a positive number")
        if self.learn not in LEARN:
            _fail("learn", self.learn, ", ".join(LEARN))
        if not isinstance(self.grad_scale, (int, float)) and self.grad_scale not in GRAD_SCALES:
            _fail("grad_scale", self.grad_scale, ", ".join(GRAD_SCALES) + " or a number")
        if self.mode is not None and self.mode not in MODES:
            _fail("mode", self.mode, ", ".join(MODES) + " or None")
        if self.min_scale <= 0:
            _fail("min_scale", self.min_scale, "a positive number")
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            _fail("group_size", self.group_size, "an integer >= 1 when granularity='group'")
        if self.granularity == "token" and self.estimator not in DYNAMIC_ESTIMATORS:
            _fail("estimator", self.estimator, "current_minmax when granularity='token'")
        if self.learn != "none":
            if self.estimator in DYNAMIC_ESTIMATORS:
                _fail("estimator", self.estimator, "a calibrating estimator when learn!='none'")
            if self.binary:
                _fail("learn", self.learn, "'none' when bits=1 and scheme='symmetric' (sign)")
            if self.granularity == "token":
                _fail("granularity", self.granularity, "not 'token' when learn!='none'")
            if self.learn == "lsq" and self.scheme == "asymmetric":
                _fail("scheme", self.scheme, "symmetric or unsigned with learn='lsq' (use 'lsq+')")
        if self.estimator == "iterative" and self.scheme == "asymmetric":
            _fail("scheme", self.scheme, "symmetric or unsigned with estimator='iterative'")
        if self.bits == 1 and self.scheme == "asymmetric":
            _fail("scheme", self.scheme, "symmetric (sign) or unsigned ({0, s}) when bits=1")

    @property
    def binary(self) -> bool:
        """True for the sign binarisation ``sign(x) * mean|x|`` (1 bit, symmetric); the
        unsigned 1-bit grid ``{0, 1}`` is a uniform grid like any other."""
        return self.bits == 1 and self.scheme == "symmetric"

    @property
    def dynamic(self) -> bool:
        """True when the range is recomputed from every tensor (no calibration state)."""
        return self.binary or self.estimator in DYNAMIC_ESTIMATORS

    @property
    def accumulator(self) -> str:
        return self.accumulate or DEFAULT_ACCUMULATE.get(self.estimator, "last")

    def replace(self, **changes) -> QuantSpec:
        return dataclasses.replace(self, **changes)


def spec_from_dict(d: dict, where: str = "rule") -> QuantSpec:
    """Builds a spec from a plain mapping, rejecting unknown keys with the allowed ones."""
    names = {f.name for f in dataclasses.fields(QuantSpec)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(
            f"{where}: unknown quantization setting(s) {unknown}; allowed: {sorted(names)}."
        )
    return QuantSpec(**d)
