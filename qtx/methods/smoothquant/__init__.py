"""SmoothQuant (Xiao et al., ICML 2023): per-channel scales that move activation outliers
from a normalisation's output into the weights that read it (docs/methods.md §5).

* :data:`SMOOTHQUANT`: fixed ``alpha`` (``config.eval.ptq_options.smoothquant_alpha``);
* :data:`SMOOTHQUANT_SEARCH`: ``alpha`` per layer group from a grid, on the quantized output
  error (``smoothquant_alphas``).

Both are :class:`qtx.methods.kinds.Transform` records (exact in full precision); the
normalisation -> consumer map is :mod:`qtx.methods.consumers`.
"""

from qtx.methods.smoothquant.smoothquant import (
    DEFAULT_ALPHA,
    DEFAULT_ALPHAS,
    SMOOTHQUANT,
    SMOOTHQUANT_SEARCH,
    check_options,
    smoothquant,
    smoothquant_scales,
)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_ALPHAS",
    "SMOOTHQUANT",
    "SMOOTHQUANT_SEARCH",
    "check_options",
    "smoothquant",
    "smoothquant_scales",
]
