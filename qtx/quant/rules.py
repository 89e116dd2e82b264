"""Rules: patterns over quantization-point names -> settings, collected in a plan.

A model carries one :class:`QuantPlan`. Each point asks the plan for its settings with its
own name (its Flax module path, e.g. ``layer_3/attn/softmax``) and kind (``weight`` or
``act``); the first rule whose regular expression matches (``re.search``) wins. A rule
without a spec keeps matching points in full precision, which lets presets say explicitly
what they leave alone. The plan's ``mode`` applies to every point whose spec sets none.

After a model is set up, :func:`match_report` lists the points no rule matched and the rules
that matched nothing (except ``optional`` ones: preset rules for points only some model
families or variants have).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from qtx.errors import UserError
from qtx.quant.spec import KINDS, MODES, QuantSpec, spec_from_dict


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """``pattern`` (regex, searched in the point name) and ``kind`` select; ``spec`` sets.

    ``spec=None`` keeps the matched points in full precision. ``optional``: matching no point
    is expected (a point some models lack), so :func:`match_report` does not list it.
    """

    pattern: str
    spec: QuantSpec | None = None
    kind: str = "any"
    label: str = ""
    optional: bool = False

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            msg = f"quant rule pattern {self.pattern!r} is not a valid regex: {e}."
            raise UserError(msg) from None
        if self.kind not in KINDS + ("any",):
            raise UserError(
                f"quant rule {self.pattern!r}: kind={self.kind!r} is invalid; allowed: "
                "weight, act, any."
            )

    @property
    def name(self) -> str:
        return self.label or f"{self.kind}:{self.pattern}"

    def matches(self, point: str, kind: str) -> bool:
        return (self.kind in ("any", kind)) and re.search(self.pattern, point) is not None


CALIBRATIONS = ("sequential", "parallel")


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """The ordered rules of a model, its default mode and the points whose statistics are
    tracked (patterns; tracked points sow outlier statistics into ``intermediates``).

    ``calibration``: in ``calibrate`` mode, ``sequential`` points pass on their input fake-
    quantized with the range accumulated so far, so later points calibrate on the outputs of
    quantized earlier ones (the reference code's range estimation); ``parallel`` points pass
    it on unchanged, so every range is estimated on the full-precision model.

    ``integer``: the integer model (mode ``quantize`` only). Points marked as matmul
    operands hand integer tensors to their matmul, which runs as an int8 ``dot_general``
    (see :mod:`qtx.quant.integer`); every other point quantizes exactly as in fake quant.
    ``float_matmuls``: an integer model whose matmuls run in float on the dequantized inputs:
    its fake-quant twin (the same matmul inputs as fake quant, for a converted model whose
    float weights are gone).
    """

    rules: tuple[QuantRule, ...] = ()
    mode: str = "off"
    track: tuple[str, ...] = ()
    calibration: str = "sequential"
    integer: bool = False
    float_matmuls: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"quant plan mode={self.mode!r} is invalid; allowed: {MODES}.")
        if self.calibration not in CALIBRATIONS:
            raise UserError(
                f"quantization calibration={self.calibration!r} is invalid; allowed: "
                f"{', '.join(CALIBRATIONS)}."
            )
        if self.integer and self.mode != "quantize":
            raise UserError(
                f"quant plan integer=True needs mode='quantize' (frozen quantizers); got "
                f"mode={self.mode!r}."
            )
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "track", tuple(self.track))

    @property
    def needs_calibration(self) -> bool:
        """Whether any point quantizes (the plan's mode, or a rule's own mode, is not off):
        such a model has quantizer state to calibrate, train or restore."""
        return self.mode != "off" or any(
            r.spec is not None and r.spec.mode not in (None, "off") for r in self.rules
        )

    def rule_for(self, point: str, kind: str) -> int | None:
        """Index of the first rule matching ``point``, or None."""
        for i, rule in enumerate(self.rules):
            if rule.matches(point, kind):
                return i
        return None

    def resolve(self, point: str, kind: str) -> tuple[QuantSpec | None, str]:
        """``(spec, mode)`` for a point; ``(None, 'off')`` when it stays in full precision."""
        i = self.rule_for(point, kind)
        spec = None if i is None else self.rules[i].spec
        if spec is None:
            return None, "off"
        return spec, spec.mode or self.mode

    def tracks(self, point: str) -> bool:
        return any(re.search(p, point) for p in self.track)

    def with_mode(self, mode: str) -> QuantPlan:
        """The plan in ``mode`` (an integer plan stays integer only in ``quantize``)."""
        return dataclasses.replace(self, mode=mode, integer=self.integer and mode == "quantize")

    def with_integer(self, integer: bool = True, float_matmuls: bool = False) -> QuantPlan:
        return dataclasses.replace(self, integer=integer, float_matmuls=float_matmuls)

    def with_calibration(self, calibration: str) -> QuantPlan:
        return dataclasses.replace(self, calibration=calibration)

    def with_track(self, patterns) -> QuantPlan:
        return dataclasses.replace(self, track=tuple(patterns))

    def prepend(self, rules) -> QuantPlan:
        return dataclasses.replace(self, rules=tuple(rules) + self.rules)


def rule(
    pattern: str,
    kind: str = "any",
    label: str = "",
    off: bool = False,
    optional: bool = False,
    **settings,
):
    """Shorthand: ``rule('attn/softmax$', 'act', bits=8, scheme='unsigned')``."""
    spec = None if off else spec_from_dict(settings, where=f"rule {pattern!r}")
    return QuantRule(pattern=pattern, spec=spec, kind=kind, label=label, optional=optional)


def rule_from_dict(d: Mapping) -> QuantRule:
    """A rule from a config mapping: ``pattern``, optional ``kind``/``label``/``off``, settings.

    Never ``optional``: a config's rule that matches no point is always reported."""
    d = dict(d)
    if "pattern" not in d:
        raise UserError(f"quant rule {d} has no 'pattern'; every rule needs a regex pattern.")
    pattern, kind, label = d.pop("pattern"), d.pop("kind", "any"), d.pop("label", "")
    off = bool(d.pop("off", False))
    spec = None if off else spec_from_dict(d, where=f"rule {pattern!r}")
    return QuantRule(pattern=pattern, spec=spec, kind=kind, label=label)


@dataclasses.dataclass
class MatchReport:
    """Which rule each point matched; the unmatched points; the unused rules (optional rules
    that matched nothing are not listed)."""

    matched: dict[str, str]
    unmatched_points: list[str]
    unused_rules: list[str]
    quantized: list[str]

    def __str__(self) -> str:
        lines = [f"{len(self.quantized)} of {len(self.matched)} quantization points are on."]
        if self.unmatched_points:
            lines.append(
                f"{len(self.unmatched_points)} point(s) matched no rule (kept in full precision): "
                + ", ".join(self.unmatched_points)
            )
        if self.unused_rules:
            lines.append("rule(s) that matched no point: " + ", ".join(self.unused_rules))
        return "\n".join(lines)


def match_report(plan: QuantPlan, points: Mapping[str, str]) -> MatchReport:
    """``points`` maps each point name to its kind (see ``qtx.quant.list_points``)."""
    used = set()
    matched, unmatched, on = {}, [], []
    for name, kind in points.items():
        i = plan.rule_for(name, kind)
        if i is None:
            unmatched.append(name)
            matched[name] = ""
            continue
        used.add(i)
        matched[name] = plan.rules[i].name
        if plan.rules[i].spec is not None and (plan.rules[i].spec.mode or plan.mode) != "off":
            on.append(name)
    unused = [r.name for i, r in enumerate(plan.rules) if i not in used and not r.optional]
    return MatchReport(matched, unmatched, unused, on)
