"""Outlier Suppression (Wei et al., NeurIPS 2022), the whole paper in one place.

* :mod:`.gamma_migration`: the LayerNorm gamma moves into the weights that read the LN (and
  the post-LN shortcut); an exact reparametrisation that removes gamma's amplification of
  outliers from what the activation quantizers see.
* :mod:`.token_wise_clipping`: activation ranges chosen on the model's output error, a coarse
  quantile search over token-wise extremes, then LSQ+ fine-tuning of the ranges.
* :mod:`.ptq`: the paper's post-training methods and baselines (MinMax, Percentile, OMSE,
  gamma migration, token-wise clipping, both; ``PAPER_TABLE`` names them), registered in
  :mod:`qtx.methods.registry` and used by ``eval.py`` through ``config.eval.ptq_methods``.
  Gamma migration is also a reparametrisation (``GAMMA_MIGRATION``) and token-wise clipping
  a QAT initialisation (``QAT_INIT``, ``config.train.qat_init``).

The quantizer placement is the ``os_fastertransformer`` preset (``qtx.quant.presets``).
"""

from qtx.methods.outlier_suppression.gamma_migration import (
    GAMMA_MIGRATION,
    migrate_gamma,
    migrate_params_for,
    migration_map,
    zero_gamma_channels,
)
from qtx.methods.outlier_suppression.ptq import (
    GAMMA_MIGRATION_TRANSFORM,
    MIGRATED_MINMAX,
    MINMAX,
    OMSE,
    OUTLIER_SUPPRESSION,
    PERCENTILE,
    TOKEN_WISE_CLIPPING,
    TOKEN_WISE_REFINE,
    Calibrated,
    method_settings,
    percentiles_of,
    refine_token_wise,
)
from qtx.methods.outlier_suppression.token_wise_clipping import (
    QAT_INIT,
    TWCSettings,
    alpha_grid,
    clip_range,
    coarse_search,
    fine_tune,
)

# the methods of the paper's PTQ table (docs/methods.md §2), in its column order
PAPER_TABLE = (
    "minmax",
    "percentile",
    "omse",
    "gamma_migration",
    "token_wise_clipping",
    "outlier_suppression",
)

__all__ = [
    "GAMMA_MIGRATION",
    "GAMMA_MIGRATION_TRANSFORM",
    "MIGRATED_MINMAX",
    "MINMAX",
    "OMSE",
    "OUTLIER_SUPPRESSION",
    "PAPER_TABLE",
    "PERCENTILE",
    "QAT_INIT",
    "TOKEN_WISE_CLIPPING",
    "TOKEN_WISE_REFINE",
    "Calibrated",
    "TWCSettings",
    "alpha_grid",
    "clip_range",
    "coarse_search",
    "fine_tune",
    "method_settings",
    "percentiles_of",
    "refine_token_wise",
    "migrate_gamma",
    "migrate_params_for",
    "migration_map",
    "zero_gamma_channels",
]
