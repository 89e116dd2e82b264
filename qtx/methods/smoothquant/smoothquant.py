"""SmoothQuant: move activation outliers into the weights with a per-channel scale.

For every normalisation whose output ``X`` (tokens, D) feeds linear layers
(:func:`qtx.methods.consumers.norm_groups`), with ``max|X_j|`` over the calibration set's real
tokens and ``max_k |W_{j,k}|`` over ALL the layers reading ``X`` (the fused q/k/v(/gate), or
fc1, or gate_proj + up_proj)::

    s_j = max( max|X_j|^alpha / max(max_k |W_{j,k}|, 1e-5)^(1 - alpha), 1e-5 )

and the model is rewritten exactly: ``X' = X / s`` (the normalisation's gamma and beta, or
RMSNorm weight, divided by ``s``) and ``W' = diag(s) W`` in every consumer.

Two methods:

* ``smoothquant`` (:data:`SMOOTHQUANT`): one fixed ``alpha`` (option ``smoothquant_alpha``,
  default 0.5, the paper's OPT value);
* ``smoothquant_search`` (:data:`SMOOTHQUANT_SEARCH`): ``alpha`` chosen per normalisation
  (per layer group) from the grid ``smoothquant_alphas`` (default 0.0, 0.05, ..., 1.0),
  minimising the group's quantized output error on up to 2048 real calibration rows
  ``sum_c ||Q_a(X / s) Q_w(diag(s) W_c) - X W_c||^2`` with the setup's own quantizers (the
  plan's spec at the normalisation's ``out`` point and at each consumer's ``weight`` point;
  :func:`qtx.methods.consumers.group_errors`). The reference's auto-search picks one alpha
  per model on the model's loss; a per-group error is cheaper (no model pass per candidate)
  and lets layers with different outlier levels pick differently.

Post-LN models (BERT, RoBERTa): a LayerNorm's output also feeds the residual shortcut. The
model gets ``shortcut_affine=True`` (``qtx.nn.transformer``): each such LayerNorm holds a
``shortcut_scale`` that the shortcut multiplies by, set to ``s`` here, so the shortcut still
sees ``X`` while the consumers see ``X / s``. The last layer's FFN LayerNorm feeds the head
and is left alone. A model smoothed before (SmoothQuant or OS+) can be smoothed again: the
new scale composes with the shortcut parameters it has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from qtx import quant
from qtx.errors import UserError
from qtx.methods import capture
from qtx.methods.consumers import (
    check_supported,
    consumer_matrix,
    group_errors,
    group_specs,
    nested_params,
    prepare,
    real_stats,
    smooth_group,
    smoothed_config,
    weight_absmax,
)
from qtx.methods.kinds import Transform
from qtx.models import ModelConfig

PAPER = "SmoothQuant (Xiao et al., ICML 2023; docs/methods.md §5)"
DEFAULT_ALPHA = 0.5
DEFAULT_ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0, 0.05, ..., 1.0
SEARCH_ROWS = 2048  # real calibration rows per group in the alpha search
MIN_SCALE = 1e-5


def smoothquant_scales(act_absmax, weight_absmax, alpha: float) -> np.ndarray:
    """(D,) float32 ``max(a^alpha / max(w, 1e-5)^(1 - alpha), 1e-5)`` of the per-channel
    activation maxima ``a`` and weight row maxima ``w`` (D,)."""
    a = np.asarray(act_absmax, np.float64)
    w = np.maximum(np.asarray(weight_absmax, np.float64), MIN_SCALE)
    return np.maximum(a**alpha / w ** (1.0 - alpha), MIN_SCALE).astype(np.float32)


def _alpha(value, field: str) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not 0.0 <= float(value) <= 1.0:
        raise UserError(
            f"config.eval.ptq_options.{field}={value!r} is invalid; allowed: a number in [0, 1]."
        )
    return float(value)


def check_options(options: Mapping | None) -> None:
    """Validates ``smoothquant_alpha`` and ``smoothquant_alphas`` (UserError)."""
    options = options or {}
    if "smoothquant_alpha" in options:
        _alpha(options["smoothquant_alpha"], "smoothquant_alpha")
    if "smoothquant_alphas" in options:
        alphas = options["smoothquant_alphas"]
        if isinstance(alphas, str) or not isinstance(alphas, Sequence) or not alphas:
            raise UserError(
                f"config.eval.ptq_options.smoothquant_alphas={alphas!r} is invalid; allowed: "
                "a non-empty list of numbers in [0, 1]."
            )
        for a in alphas:
            _alpha(a, "smoothquant_alphas")


def _check(cfg: ModelConfig) -> None:
    check_supported(cfg, "SmoothQuant")


def smoothquant(
    cfg: ModelConfig,
    params,
    calib: Sequence[dict],
    plan: quant.QuantPlan | None = None,
    options: Mapping | None = None,
    search: bool = False,
):
    """``(cfg', params', info)``: the smoothed model (see the module docstring). ``search``:
    choose alpha per group (``smoothquant_alphas``) instead of the fixed
    ``smoothquant_alpha``. ``info``: ``alpha`` (fixed) or ``alphas`` ({norm: alpha}),
    ``groups``, ``max_scale`` / ``min_scale`` over all channels, ``shortcut_affine``."""
    check_options(options)
    options = options or {}
    new_cfg, flat, groups = prepare(cfg, params, "SmoothQuant")
    readers = sorted({g.reader for g in groups})
    absmax = capture.dense_inputs(cfg, params, calib, "absmax", paths=readers)
    rows = None
    if search:
        rows = capture.dense_inputs(cfg, params, calib, "rows", readers, SEARCH_ROWS)
        grid = tuple(float(a) for a in options.get("smoothquant_alphas", DEFAULT_ALPHAS))
    alpha = float(options.get("smoothquant_alpha", DEFAULT_ALPHA))
    chosen, scales = {}, []
    for g in groups:
        act, wmax = real_stats(absmax, g), weight_absmax(flat, g)
        if search:
            cands = np.stack([smoothquant_scales(act, wmax, a) for a in grid])
            mats = [consumer_matrix(flat, c) for c in g.consumers]
            errs = group_errors(real_stats(rows, g), mats, group_specs(plan, g), cands)
            best = int(np.argmin(errs))
            chosen[g.name], s = grid[best], cands[best]
        else:
            s = smoothquant_scales(act, wmax, alpha)
        smooth_group(flat, g, s)
        scales.append(s)
    allscales = np.concatenate(scales)
    info = {
        "groups": len(groups),
        "max_scale": float(allscales.max()),
        "min_scale": float(allscales.min()),
        "shortcut_affine": new_cfg.shortcut_affine,
    }
    info.update({"alphas": chosen} if search else {"alpha": alpha})
    return new_cfg, nested_params(flat), info


def _fixed(cfg, params, calib, plan, options=None):
    return smoothquant(cfg, params, calib, plan, options, search=False)


def _search(cfg, params, calib, plan, options=None):
    return smoothquant(cfg, params, calib, plan, options, search=True)


SMOOTHQUANT = Transform(
    name="smoothquant",
    paper=PAPER,
    apply=_fixed,
    option_fields=("smoothquant_alpha",),
    excludes=("gamma_migration",),
    check=_check,
    check_options=check_options,
    config_of=smoothed_config,
)
SMOOTHQUANT_SEARCH = Transform(
    name="smoothquant_search",
    paper=PAPER,
    apply=_search,
    option_fields=("smoothquant_alphas",),
    excludes=("gamma_migration",),
    check=_check,
    check_options=check_options,
    config_of=smoothed_config,
)
