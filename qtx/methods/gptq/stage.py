"""GPTQ as a weight-rounding stage of a composed PTQ method (docs/methods.md §5).

:func:`gptq_weights` rounds the model's quantized Dense kernels layer by layer, as GPTQ does:
the Hessians of layer ``i``'s Dense inputs come from the full-precision model whose layers
``< i`` already hold their rounded (dequantized) kernels; Dense layers outside the
``layer_<i>`` blocks (pooler, classifier, projections) are rounded last, on the Hessians of
the model with every layer rounded. A point is rounded when the plan quantizes its weight
(``<dense path>/weight``) on a uniform grid with a fixed range (not binary, not learnable).

Each point's grid is the one its quantizer gives the *original* kernel (the spec's estimator
and granularity, per output channel or per input group and output channel); the stage
returns those ranges (``pinned``) and a plan whose weight rules calibrate (``minmax``
instead of the dynamic ``current_minmax``), so that once the ranges are written into
``quant_stats`` fake quant reproduces the rounded kernels exactly.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from threadpoolctl import threadpool_limits

from qtx import quant
from qtx.errors import UserError
from qtx.methods import capture
from qtx.methods.gptq.algorithm import gptq_round, output_error, weight_grid, weight_range
from qtx.models import ModelConfig

PAPER = "GPTQ (Frantar et al., ICLR 2023; docs/methods.md §5)"
OPTION_FIELDS = ("gptq_damp", "gptq_block_size", "gptq_act_order")
_LAYER = re.compile(r"^layer_(\d+)/")


@dataclasses.dataclass(frozen=True)
class GPTQSettings:
    """``damp``: damping as a fraction of ``mean(diag H)``; ``block_size``: rows per lazy
    batch update; ``act_order``: visit inputs by descending ``H_ii``."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False


def gptq_settings(options: Mapping | None = None) -> GPTQSettings:
    """The GPTQ fields of ``config.eval.ptq_options`` (others are ignored), validated."""
    opts = dict(options or {})
    damp = opts.get("gptq_damp", GPTQSettings.damp)
    block = opts.get("gptq_block_size", GPTQSettings.block_size)
    act_order = opts.get("gptq_act_order", GPTQSettings.act_order)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < np.inf:
        raise UserError(
            f"config.eval.ptq_options.gptq_damp={damp!r} is invalid; allowed: a number > 0 "
            "(the damping as a fraction of the mean Hessian diagonal, 0.01 by default)."
        )
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise UserError(
            f"config.eval.ptq_options.gptq_block_size={block!r} is invalid; allowed: an "
            "integer >= 1 (128 by default)."
        )
    if not isinstance(act_order, bool):
        raise UserError(
            f"config.eval.ptq_options.gptq_act_order={act_order!r} is invalid; allowed: True, "
            "False."
        )
    return GPTQSettings(float(damp), block, act_order)


def check_options(options: Mapping | None = None) -> None:
    """Raises UserError for invalid GPTQ options (before any compute)."""
    gptq_settings(options)


def rounded_spec(plan: quant.QuantPlan, dense_path: str) -> quant.QuantSpec | None:
    """The spec GPTQ rounds the kernel of ``dense_path`` to, or None: the weight point is
    off, binary or learnable."""
    spec, mode = plan.resolve(f"{dense_path}/weight", "weight")
    if spec is None or mode == "off" or spec.binary or spec.learn != "none":
        return None
    return spec


def frozen_weight_plan(plan: quant.QuantPlan) -> quant.QuantPlan:
    """``plan`` with every weight rule's dynamic ``current_minmax`` replaced by ``minmax``
    (the range is calibrated into ``quant_stats`` and read from there). A rule of kind
    ``any`` keeps its activations: a weight-only copy with ``minmax`` goes before it."""
    rules = []
    for r in plan.rules:
        s = r.spec
        if s is None or s.estimator != "current_minmax" or s.binary or r.kind == "act":
            rules.append(r)
            continue
        frozen = dataclasses.replace(r, spec=s.replace(estimator="minmax"), kind="weight")
        rules.append(frozen)
        if r.kind == "any":
            rules.append(r)
    return dataclasses.replace(plan, rules=tuple(rules))


def calibration_plan(plan: quant.QuantPlan, pinned: Mapping[str, tuple]) -> quant.QuantPlan:
    """``plan`` (``plan'``) with the pinned weight points off, for calibrating the activations:
    they then see the rounded kernels exactly as the points give them once the pinned ranges
    are in ``quant_stats`` (in ``calibrate`` mode a point re-quantizes the rounded kernel with
    the kernel's own, different, min-max range). Those points get no ``quant_stats`` entries
    from such a calibration: the pinned ranges are written in afterwards."""
    if not pinned:
        return plan
    names = "|".join(re.escape(name) for name in sorted(pinned))
    label = "GPTQ-rounded weights: their pinned ranges are written after calibration"
    return plan.prepend((quant.rule(f"^({names})$", "weight", label, off=True, optional=True),))


def _group_by_layer(paths) -> tuple[list[tuple[int, list[str]]], list[str]]:
    """``([(i, paths of layer_i)], other paths)``, layers in increasing order."""
    layers: dict[int, list[str]] = {}
    other = []
    for p in sorted(paths):
        m = _LAYER.match(p)
        if m:
            layers.setdefault(int(m.group(1)), []).append(p)
        else:
            other.append(p)
    return sorted(layers.items()), other


def gptq_weights(
    cfg: ModelConfig,
    plan: quant.QuantPlan,
    params,
    calib: Sequence[dict],
    options: Mapping | None = None,
):
    """GPTQ-rounded kernels: ``(plan', params', pinned, info)``.

    ``params'``: ``params`` with every rounded kernel (in, out) replaced by its dequantized
    values; ``plan'``: :func:`frozen_weight_plan`; ``pinned``: ``{"<dense path>/weight":
    (lo, hi)}``, the original kernel's range in the point's view shape (``quant_stats``);
    ``info``: ``points`` (how many kernels), ``layer_seconds`` (``layer_<i>``, ``head``:
    capture and rounding), ``error_vs_rtn`` (mean over kernels of ``||X (W - Q_gptq)||^2 /
    ||X (W - Q_rtn)||^2`` on the calibration inputs), ``damp_raised`` (kernels whose damping
    had to grow)."""
    settings = gptq_settings(options)
    calib = list(calib)
    if not calib:
        raise UserError("GPTQ got no calibration batches; give at least one calibration batch.")
    flat = dict(flatten_dict(params))

    kernels = ("/".join(k[:-1]) for k in flat if k[-1] == "kernel")
    layers, heads = _group_by_layer(p for p in kernels if rounded_spec(plan, p) is not None)
    pinned: dict = {}
    info: dict = {"points": 0, "layer_seconds": {}, "error_vs_rtn": None, "damp_raised": []}
    ratios = []
    groups = [(f"layer_{i}", paths) for i, paths in layers] + [("head", heads)] * bool(heads)
    for name, paths in groups:
        # the Hessians of this layer's inputs only, on the model whose earlier layers hold
        # their rounded kernels (one pass per layer; kernels reading one input share it)
        t0 = time.perf_counter()
        forward = capture.compiled_pass(cfg, "hessian", frozenset(paths))
        stats = capture.dense_inputs(cfg, unflatten_dict(flat), calib, "hessian", forward=forward)
        with threadpool_limits(1, user_api="blas"):  # see gptq_round
            for path in paths:
                if path in stats:  # a Dense layer (per-head gate kernels are not)
                    stat = stats[path]
                    ratios.append(_round_point(plan, flat, path, stat, settings, pinned, info))
        info["layer_seconds"][name] = time.perf_counter() - t0
    info["points"] = len(ratios)
    finite = [r for r in ratios if np.isfinite(r)]
    info["error_vs_rtn"] = float(np.mean(finite)) if finite else None
    return frozen_weight_plan(plan), unflatten_dict(flat), pinned, info


def _round_point(plan, flat, path, stat, settings: GPTQSettings, pinned, info) -> float:
    """Rounds the kernel of ``path`` in ``flat`` (in place), records its pinned range;
    returns its output error relative to round-to-nearest."""
    spec = rounded_spec(plan, path)
    key = (*path.split("/"), "kernel")
    kernel = np.asarray(flat[key], np.float32)
    where = f"{path}/weight"
    lo, hi = weight_range(kernel, spec, where)
    grid = weight_grid(kernel, spec, lo, hi, where)
    count = float(stat["count"])
    h = 2.0 * np.asarray(stat["hessian"], np.float64) / max(count, 1.0)
    if count == 0:  # no real token reached the layer: round to nearest
        h = np.eye(kernel.shape[0])
    q, got = gptq_round(kernel, h, grid, settings.block_size, settings.damp, settings.act_order)
    if got["damp"] != settings.damp:
        info["damp_raised"].append(path)
    rtn = output_error(kernel, grid.quantize(np.asarray(kernel, np.float64)), h)
    ratio = output_error(kernel, q, h) / rtn if rtn > 0 else float("nan")
    flat[key] = jnp.asarray(q.astype(np.float32))
    pinned[where] = (np.asarray(lo, np.float32), np.asarray(hi, np.float32))
    return ratio
