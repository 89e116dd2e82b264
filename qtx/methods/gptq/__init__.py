"""GPTQ (Frantar et al., ICLR 2023): weights rounded with second-order information.

* :mod:`.algorithm`: GPTQ's rounding of one kernel (NumPy float64): blocked lazy updates with
  the upper Cholesky factor of the damped inverse Hessian, optional act-order, a quantizer
  grid fixed from the original weight (per output channel, or per input group: static groups).
* :mod:`.stage`: the weight-rounding stage of composed PTQ methods (``GPTQ``, a
  :class:`~qtx.methods.kinds.WeightRounding`): layer by layer on the Hessians of the
  partly rounded model, with the ranges that make fake quant reproduce the rounded kernels.
"""

from qtx.methods.gptq.algorithm import (
    Grid,
    gptq_round,
    inverse_cholesky,
    output_error,
    weight_grid,
    weight_range,
)
from qtx.methods.gptq.stage import (
    OPTION_FIELDS,
    PAPER,
    GPTQSettings,
    calibration_plan,
    check_options,
    frozen_weight_plan,
    gptq_settings,
    gptq_weights,
    rounded_spec,
)
from qtx.methods.kinds import WeightRounding

GPTQ = WeightRounding(
    "gptq",
    PAPER,
    gptq_weights,
    option_fields=OPTION_FIELDS,
    check_options=check_options,
    plan_of=frozen_weight_plan,
    calibration_plan=calibration_plan,
)

__all__ = [
    "GPTQ",
    "OPTION_FIELDS",
    "PAPER",
    "GPTQSettings",
    "Grid",
    "calibration_plan",
    "check_options",
    "frozen_weight_plan",
    "gptq_round",
    "gptq_settings",
    "gptq_weights",
    "inverse_cholesky",
    "output_error",
    "rounded_spec",
    "weight_grid",
    "weight_range",
]
