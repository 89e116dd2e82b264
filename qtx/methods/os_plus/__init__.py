"""Outlier Suppression+ (Wei et al., EMNLP 2023): channel-wise shifting and scaling of each
normalisation's output, migrated exactly into the layers that read it (docs/methods.md §5).

* :data:`OS_PLUS`: the :class:`qtx.methods.kinds.Transform` record (option ``os_plus_grid``,
  the number of ``t`` candidates of the scale search);
* :func:`os_plus`: the transform itself; :func:`shift_of`, :func:`scales_for`,
  :func:`thresholds`: its formulas.

The normalisation -> consumer map is :mod:`qtx.methods.consumers`.
"""

from qtx.methods.os_plus.os_plus import (
    DEFAULT_GRID,
    OS_PLUS,
    check_options,
    os_plus,
    scales_for,
    shift_of,
    thresholds,
)

__all__ = [
    "DEFAULT_GRID",
    "OS_PLUS",
    "check_options",
    "os_plus",
    "scales_for",
    "shift_of",
    "thresholds",
]
