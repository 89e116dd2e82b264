"""Outlier Suppression+: a per-channel shift and scale of each normalisation's output.

For every normalisation whose output ``X`` (tokens, D) feeds linear layers
(:func:`qtx.methods.consumers.norm_groups`), with ``min_j`` / ``max_j`` over the calibration
set's real tokens:

* shift ``z_j = (max_j + min_j) / 2`` (the channel's range centred on 0), folded into the
  normalisation's bias (``beta - z``) and every consumer's bias (``b + z W``);
* scale ``s_j = max(1, (max_j - z_j) / t, -(min_j - z_j) / t)``: channels whose shifted range
  exceeds ``[-t, t]`` are scaled into it, the scale moving into the consumers' rows
  (``diag(s) W``) and out of the normalisation (``gamma / s``, ``(beta - z) / s``).

``t`` is found by a 1-D grid: ``os_plus_grid`` candidates (default 100) evenly spaced from
``T = max_j max(max_j - z_j, z_j - min_j)`` (no scaling) down to ``T / os_plus_grid``, picking
the one that minimises the group's quantized output error on up to 2048 real calibration rows
``sum_c ||Q_a((X - z) / s) Q_w(diag(s) W_c) - (X - z) W_c||^2`` with the setup's own
quantizers (the plan's spec at the normalisation's ``out`` point and each consumer's
``weight`` point; :func:`qtx.methods.consumers.group_errors`). The reference searches the same
``t`` from the activation maximum down to 1.0 on the attention / FFN output; the consumers'
output error is the cheaper layer-local form of that objective.

A group whose normalisation has no bias (RMSNorm: the llama family) or that has a consumer
without bias (an output gate without ``pi_init``) cannot absorb a shift: it gets the scale
only (``z = 0``, ``s_j = max(1, max_j / t, -min_j / t)``), as the authors do for LLaMA.

Post-LN models (BERT, RoBERTa) get ``shortcut_affine=True``: the shortcut reads
``y' * shortcut_scale + shortcut_shift`` with ``shortcut_scale = s``, ``shortcut_shift = z``,
which is ``y`` again (``qtx.nn.transformer``); the last layer's FFN LayerNorm is left alone.
Exact in full precision.
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
)
from qtx.methods.kinds import Transform
from qtx.models import ModelConfig

PAPER = "Outlier Suppression+ (Wei et al., EMNLP 2023; docs/methods.md §5)"
DEFAULT_GRID = 100
SEARCH_ROWS = 2048  # real calibration rows per group in the t search


def shift_of(lo, hi) -> np.ndarray:
    """(D,) float32 ``z = (max + min) / 2`` of the per-channel extremes."""
    return ((np.asarray(hi, np.float64) + np.asarray(lo, np.float64)) / 2).astype(np.float32)


def scales_for(lo, hi, z, ts) -> np.ndarray:
    """(K, D) float32 ``max(1, (max - z) / t, -(min - z) / t)`` for the K thresholds ``ts``."""
    up = np.asarray(hi, np.float64) - z
    down = np.asarray(z, np.float64) - np.asarray(lo, np.float64)
    t = np.asarray(ts, np.float64)[:, None]
    return np.maximum(1.0, np.maximum(up[None] / t, down[None] / t)).astype(np.float32)


def thresholds(lo, hi, z, n: int) -> np.ndarray:
    """(n,) candidates ``t`` from ``T`` (the largest shifted extreme) down to ``T / n``."""
    top = float(max(np.max(np.asarray(hi) - z), np.max(z - np.asarray(lo)), 0.0))
    if top <= 0.0:
        return np.ones((1,), np.float64)
    return top * np.linspace(1.0, 1.0 / n, n)


def check_options(options: Mapping | None) -> None:
    """Validates ``os_plus_grid`` (UserError)."""
    n = (options or {}).get("os_plus_grid", DEFAULT_GRID)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(
            f"config.eval.ptq_options.os_plus_grid={n!r} is invalid; allowed: a positive "
            "integer (the number of t candidates)."
        )


def _check(cfg: ModelConfig) -> None:
    check_supported(cfg, "Outlier Suppression+")


def os_plus(
    cfg: ModelConfig,
    params,
    calib: Sequence[dict],
    plan: quant.QuantPlan | None = None,
    options: Mapping | None = None,
):
    """``(cfg', params', info)``: the shifted and scaled model (see the module docstring).
    ``info``: ``t`` ({norm: chosen t}), ``shifted`` (the norms that took a shift),
    ``groups``, ``max_scale``, ``max_shift`` (max ``|z|``), ``shortcut_affine``."""
    check_options(options)
    n = int((options or {}).get("os_plus_grid", DEFAULT_GRID))
    new_cfg, flat, groups = prepare(cfg, params, "Outlier Suppression+")
    readers = sorted({g.reader for g in groups})
    mins = capture.dense_inputs(cfg, params, calib, "min", paths=readers)
    maxs = capture.dense_inputs(cfg, params, calib, "max", paths=readers)
    rows = capture.dense_inputs(cfg, params, calib, "rows", readers, SEARCH_ROWS)
    chosen, shifted, max_scale, max_shift = {}, [], 1.0, 0.0
    for g in groups:
        lo, hi = real_stats(mins, g), real_stats(maxs, g)
        z = shift_of(lo, hi) if g.shiftable else np.zeros_like(lo)
        ts = thresholds(lo, hi, z, n)
        cands = scales_for(lo, hi, z, ts)
        mats = [consumer_matrix(flat, c) for c in g.consumers]
        zs = z if g.shiftable else None
        errs = group_errors(real_stats(rows, g), mats, group_specs(plan, g), cands, zs)
        best = int(np.argmin(errs))
        smooth_group(flat, g, cands[best], zs)
        chosen[g.name] = float(ts[best])
        if g.shiftable:
            shifted.append(g.name)
        max_scale = max(max_scale, float(cands[best].max()))
        max_shift = max(max_shift, float(np.abs(z).max()))
    info = {
        "t": chosen,
        "shifted": shifted,
        "groups": len(groups),
        "max_scale": max_scale,
        "max_shift": max_shift,
        "shortcut_affine": new_cfg.shortcut_affine,
    }
    return new_cfg, nested_params(flat), info


OS_PLUS = Transform(
    name="os_plus",
    paper=PAPER,
    apply=os_plus,
    option_fields=("os_plus_grid",),
    excludes=("gamma_migration",),
    check=_check,
    check_options=check_options,
    config_of=smoothed_config,
)
