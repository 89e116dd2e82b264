"""The quantization sidecar of a Hugging Face export: every quantized point's parameters.

``quantization.json`` + ``quantization.safetensors`` (format in
``qtx/hf/remote/quantization_qtx.py``, which applies them to the PyTorch model) describe the
fake quantization qtx evaluates: per point its bits, scheme, grid ``[qmin, qmax]``,
granularity and, unless dynamic, ``scale`` / ``zero_point`` / ``offset`` such that::

    y = (clip(round((x - offset) / scale) + zero_point, qmin, qmax) - zero_point) * scale
        + offset

Frozen ranges (calibrated ``quant_stats``) give ``(scale, zero_point)`` by the scheme's rule
(offset 0); learned LSQ / LSQ+ points give ``scale = max(step, min_scale)`` and ``offset``
(zero point 0); weights with a dynamic estimator are evaluated on the exported weights.
Weight tensors are in the checkpoint's torch layout; activation tensors in qtx's (the
attention points q, k, v, context (B, T, H, Dh); scores, softmax (B, H, T, S)), leading
singleton axes dropped. A zero-centred RMSNorm stores ``w`` and scales by ``1 + w``, which its
weight point quantizes: such points carry ``"gain_offset": 1.0`` (``w -> q(w + 1) - 1``).

A rotated model (``ModelConfig.rotated``, docs/methods.md §5) states its rotations under
``"rotation"``: ``{"online_hadamard": ["o_proj", "down_proj"], "residual": "random_hadamard",
"seed": s, "blocks": {"residual": b, "o_proj": b, "down_proj": b}}`` (the Hadamard block
orders); the residual rotation is in the weights, the online transforms are applied by the
remote code (``hadamard_qtx.py``, enabled by ``config.json``'s ``qtx_online_hadamard``) before
the ``attn/context`` and ``ffn/act`` points.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from qtx import quant
from qtx.errors import UserError
from qtx.hf import io
from qtx.hf.common import to_hf
from qtx.hf.converter import converter
from qtx.hf.load import full_layout
from qtx.models import ModelConfig, build, dummy_inputs
from qtx.nn.hadamard import hadamard_order
from qtx.quant.estimators import estimate
from qtx.quant.ranges import make_view, reduce, to_view

SIDECAR_JSON = "quantization.json"
SIDECAR_TENSORS = "quantization.safetensors"
WEIGHT_LEAVES = ("kernel", "embedding", "scale")
HEAD_AXES = {"q": -2, "k": -2, "v": -2, "context": -2, "scores": -3, "softmax": -3}


def _trim(x: np.ndarray) -> np.ndarray:
    """Drops leading singleton axes (scales broadcast from the right)."""
    x = np.asarray(x, np.float32)
    while x.ndim and x.shape[0] == 1:
        x = x[0]
    return np.ascontiguousarray(x)


def _weight_entry(cfg: ModelConfig, name: str, flat_params: Mapping):
    """``(layout entry, weight array)`` of the weight point ``name``."""
    module = tuple(name.split("/")[:-1])
    for e in full_layout(cfg):
        if e.ours[:-1] == module and e.ours[-1] in WEIGHT_LEAVES:
            return e, np.asarray(flat_params[e.ours], np.float32)
    raise UserError(f"quantization point {name!r} quantizes no exportable weight.")


def _point_axis(name: str, kind: str, spec: quant.QuantSpec, ndim: int, channel_axis: int):
    if spec.granularity == "head":
        return HEAD_AXES[name.rsplit("/", 1)[-1]]
    if spec.granularity == "channel":
        axis = spec.axis if spec.axis is not None else channel_axis
        return axis - ndim if axis >= 0 else axis
    if spec.granularity == "token" and spec.axis is not None:  # rows reduce from axis on
        return spec.axis - ndim if spec.axis >= 0 else spec.axis
    return None


def build_sidecar(
    cfg: ModelConfig, plan: quant.QuantPlan, variables: Mapping
) -> tuple[dict, dict[str, np.ndarray]]:
    """``(quantization.json dict, tensors)`` of ``plan`` with frozen ``variables`` (params
    with quantizer steps, ``quant_stats`` for calibrated points)."""
    model = build(cfg, plan.with_mode("quantize"))
    inputs = dummy_inputs(cfg, batch=1, seq_len=4)
    points = quant.list_points(model.apply, variables, **inputs)
    flat_params = flatten_dict(dict(variables["params"]))
    flat_stats = flatten_dict(dict(variables.get(quant.STATS, {})))
    prefix = converter(cfg.family).base_prefix(cfg)
    entries, tensors = {}, {}
    for name, (kind, shape) in points.items():
        spec, mode = plan.resolve(name, kind)
        if spec is None or mode == "off":
            continue
        path = tuple(name.split("/"))
        qmin, qmax = (-1, 1) if spec.binary else quant.grid_bounds(spec.bits, spec.scheme)
        p = {
            "kind": kind,
            "bits": spec.bits,
            "scheme": spec.scheme,
            "qmin": qmin,
            "qmax": qmax,
            "granularity": spec.granularity,
            "estimator": spec.estimator,
            "learn": spec.learn,
            "min_scale": spec.min_scale,
        }
        if kind == "weight":
            entry, w = _weight_entry(cfg, name, flat_params)
            if entry.ours[-1] == "scale" and cfg.norm == "rmsnorm_zero_centered":
                w = w + 1.0  # the point sees the gain 1 + w (qtx.nn.norms)
                p.update(gain_offset=1.0)
            channel_axis = 0 if entry.ours[-1] == "embedding" and w.ndim == 2 else -1
            view = make_view(w.shape, spec, channel_axis, None, name)
            p.update(tensor=("" if entry.head else prefix) + entry.hf)
            p.update(shape=list(to_hf(entry.kind, w).shape), dynamic=False, axis=None)
        else:
            if spec.granularity == "group":
                raise UserError(
                    f"quantization point {name!r}: granularity='group' activations have no "
                    "sidecar form; allowed: tensor, channel, head, token."
                )
            ndim = len(shape)
            axis = _point_axis(name, kind, spec, ndim, -1)
            p.update(dynamic=bool(spec.dynamic or spec.binary or spec.granularity == "token"))
            p.update(axis=axis)
        entries[name] = p
        if p["dynamic"]:
            continue
        if spec.learn != "none":
            scale = jnp.maximum(flat_params[path + ("step",)], spec.min_scale)
            offset = flat_params.get(path + ("offset",), jnp.zeros_like(scale))
            zero = jnp.zeros_like(scale)
        elif spec.binary:  # weights only (binary activations are dynamic)
            wv = to_view(jnp.asarray(w), view)
            scale, zero, offset = reduce(jnp.mean, jnp.abs(wv), view), 0.0, 0.0
        else:
            if spec.dynamic:
                lo, hi = estimate(to_view(jnp.asarray(w), view), view, spec)
            elif path + ("lo",) in flat_stats:
                lo, hi = flat_stats[path + ("lo",)], flat_stats[path + ("hi",)]
            else:
                raise UserError(
                    f"quantization point {name!r} has no calibration statistics; calibrate "
                    "the setup first (export.py --quantize=SETUP)."
                )
            scale, zero = quant.qparams_from_range(lo, hi, spec)
            offset = jnp.zeros_like(scale)
        arrays = {"scale": scale, "zero_point": zero, "offset": offset}
        for what, a in arrays.items():
            a = np.asarray(jnp.broadcast_to(jnp.asarray(a, jnp.float32), jnp.shape(scale)))
            if kind == "weight":
                if view.view_shape != view.shape:  # groups: one value per weight element
                    a = np.broadcast_to(a, view.view_shape).reshape(view.shape)
                a = to_hf(entry.kind, a.reshape(a.shape + (1,) * (w.ndim - a.ndim)))
            tensors[f"{name}.{what}"] = _trim(a)
    sidecar = {
        "format": "qtx-fake-quant",
        "version": 1,
        "model_type": converter(cfg.family).hf_config(cfg).model_type,
        "pre_ln": bool(cfg.pre_ln),
        "points": entries,
    }
    if cfg.rotated:
        sidecar["rotation"] = rotation_entry(cfg)
    return sidecar, tensors


def rotation_entry(cfg: ModelConfig) -> dict:
    """The sidecar's ``"rotation"`` statement of a rotated model."""
    return {
        "online_hadamard": ["o_proj", "down_proj"],
        "residual": "random_hadamard",
        "seed": int(cfg.rotation_seed),
        "blocks": {
            "residual": hadamard_order(cfg.hidden_size),
            "o_proj": hadamard_order(cfg.num_heads * cfg.attention_head_dim),
            "down_proj": hadamard_order(cfg.intermediate_size),
        },
    }


def write_sidecar(path: str, cfg: ModelConfig, plan: quant.QuantPlan, variables) -> int:
    """Writes ``quantization.json`` / ``.safetensors`` into ``path``; returns the point count."""
    sidecar, tensors = build_sidecar(cfg, plan, variables)
    with open(os.path.join(path, SIDECAR_JSON), "w") as f:
        json.dump(sidecar, f, indent=1, sort_keys=True)
        f.write("\n")
    if tensors:
        io.write_safetensors(os.path.join(path, SIDECAR_TENSORS), tensors)
    return len(sidecar["points"])
