"""The quantization core: fake-quant primitives, range estimators, named quantization points,
rules and presets. It knows nothing about transformers."""

from qtx.quant.calibration import calibrate, init_learnable
from qtx.quant.presets import (
    PRESETS,
    parse_bits,
    plan_from_config,
    preset_rules,
    setup_rules,
)
from qtx.quant.primitives import binary_quant, grid_bounds, round_ste, uniform_quant
from qtx.quant.quantizer import (
    OBSERVED,
    POINTS,
    QUANTIZER_PARAM_PATTERN,
    QUANTIZER_PARAMS,
    STATS,
    TOKENS,
    WEIGHTS,
    QuantPoint,
    find_nonfinite,
    is_quantizer_param,
    list_points,
    load_learnable_from_stats,
    token_extremes,
    weight_records,
)
from qtx.quant.ranges import learnable_init, qparams_from_range
from qtx.quant.rules import MatchReport, QuantPlan, QuantRule, match_report, rule, rule_from_dict
from qtx.quant.spec import QuantSpec

__all__ = [
    "OBSERVED",
    "POINTS",
    "PRESETS",
    "QUANTIZER_PARAMS",
    "QUANTIZER_PARAM_PATTERN",
    "STATS",
    "TOKENS",
    "WEIGHTS",
    "MatchReport",
    "QuantPlan",
    "QuantPoint",
    "QuantRule",
    "QuantSpec",
    "binary_quant",
    "calibrate",
    "find_nonfinite",
    "grid_bounds",
    "init_learnable",
    "is_quantizer_param",
    "learnable_init",
    "list_points",
    "load_learnable_from_stats",
    "match_report",
    "parse_bits",
    "plan_from_config",
    "preset_rules",
    "qparams_from_range",
    "round_ste",
    "rule",
    "rule_from_dict",
    "setup_rules",
    "token_extremes",
    "uniform_quant",
    "weight_records",
]
