"""The quantization presets by name, setup strings and the config -> plan path.

Point names follow the model convention documented in ``docs/quantization_points.md``
(``embed/word/weight``, ``layer_3/attn/softmax``, ``layer_3/ffn/out``, ...). The presets are
defined in :mod:`qtx.quant.paper_presets` (the papers' setups: ``w8a8_all``,
``os_fastertransformer``, ``qv_lsq``, ``lsq``, ``binary``) and :mod:`qtx.quant.llm_presets`
(decoders: ``w8a8_static``, ``w8a8_dynamic``, ``w4a8``, ``w4a16``).

Setups are named by strings: a bit shortcut (``"W8A8"``, ``"W6A6E6"``, ``"W4A4"``), a preset
(``"qv_lsq"``) or both (``"os_fastertransformer:W4A4E4"``). A bare shortcut uses ``w8a8_all``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from qtx.errors import UserError
from qtx.quant.llm_presets import w4a8, w4a16, w8a8_dynamic, w8a8_static
from qtx.quant.paper_presets import binary, lsq, os_fastertransformer, qv_lsq, w8a8_all
from qtx.quant.rules import CALIBRATIONS, QuantPlan, rule_from_dict


def parse_bits(s: str) -> dict[str, int]:
    """``"W6A6E6"`` -> ``{"w": 6, "a": 6, "e": 6}``; without E, ``e`` is None (preset default)."""
    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)(?:[Ee](\d+))?", s.strip())
    if not m:
        raise UserError(
            f"quantization bits {s!r} are invalid; allowed: 'W<bits>A<bits>' or "
            "'W<bits>A<bits>E<bits>', e.g. 'W8A8', 'W6A6E6', 'W4A4'."
        )
    w, a = int(m.group(1)), int(m.group(2))
    return {"w": w, "a": a, "e": int(m.group(3)) if m.group(3) else None}


PRESETS = {
    "w8a8_all": w8a8_all,
    "os_fastertransformer": os_fastertransformer,
    "qv_lsq": qv_lsq,
    "lsq": lsq,
    "binary": binary,
    "w8a8_static": w8a8_static,
    "w8a8_dynamic": w8a8_dynamic,
    "w4a8": w4a8,
    "w4a16": w4a16,
}


def preset_rules(name: str, bits: str | Mapping | None = None, **options):
    """Rules of preset ``name`` at ``bits`` (a shortcut string or ``{"w", "a", "e"}``)."""
    if name not in PRESETS:
        raise UserError(f"quantization preset {name!r} is unknown; allowed: {', '.join(PRESETS)}.")
    b = parse_bits(bits) if isinstance(bits, str) else dict(bits or {})
    return PRESETS[name](**b, **options)


def setup_rules(setup: str, **options):
    """Rules for a setup string: ``"W8A8"``, ``"qv_lsq"``, ``"os_fastertransformer:W6A6E6"``."""
    name, _, bits = setup.partition(":")
    if name in PRESETS:
        return preset_rules(name, bits or None, **options)
    if bits:
        raise UserError(
            f"quantization setup {setup!r} is invalid; allowed: '<preset>[:<bits>]' with preset "
            f"in {', '.join(PRESETS)}, or a bit shortcut such as 'W8A8'."
        )
    return preset_rules("w8a8_all", name, **options)


def plan_from_config(cfg: Mapping | None, mode: str | None = None) -> QuantPlan:
    """A plan from a config block (``config.quant``)::

    preset: 'w8a8_all' | 'os_fastertransformer' | 'qv_lsq' | 'lsq' | 'binary' | 'none'
    bits: 'W8A8'            # shortcut; E defaults to W
    options: {...}          # keyword options of the preset
    rules: [{pattern, kind, off, <QuantSpec fields>}, ...]  # before the preset's rules
    mode: 'off' | 'calibrate' | 'quantize' | 'learn'
    calibration: 'sequential' | 'parallel'   # see QuantPlan (default: sequential)
    track: [patterns]       # points whose outlier statistics are sown
    """
    cfg = dict(cfg or {})
    known = {"preset", "bits", "options", "rules", "mode", "calibration", "track"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UserError(f"config.quant has unknown field(s) {unknown}; allowed: {sorted(known)}.")
    calibration = cfg.get("calibration") or "sequential"
    if calibration not in CALIBRATIONS:
        raise UserError(
            f"config.quant.calibration={calibration!r} is invalid; allowed: "
            f"{', '.join(CALIBRATIONS)}."
        )
    extra = tuple(rule_from_dict(r) for r in (cfg.get("rules") or ()))
    preset = cfg.get("preset") or "none"
    if cfg.get("bits"):
        parse_bits(cfg["bits"])
    base = ()
    if preset != "none":
        base = preset_rules(preset, cfg.get("bits") or None, **dict(cfg.get("options") or {}))
    return QuantPlan(
        rules=extra + tuple(base),
        mode=mode or cfg.get("mode") or "off",
        track=tuple(cfg.get("track") or ()),
        calibration=calibration,
    )
