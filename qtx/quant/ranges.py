"""Granularity views and the pure map from ranges to quantization parameters.

A *view* reshapes a tensor so that every granularity becomes "reduce over some axes with
keepdims": per-tensor reduces everything, per-channel all axes but one, per-token the last
axis, per-group / per-head splits one axis into ``(groups, group_size)`` first. Ranges and
steps then have the keepdims shape of the view (a scalar for per-tensor) and broadcast
against it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qtx.errors import UserError
from qtx.quant.primitives import grid_bounds, ste_quant
from qtx.quant.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class View:
    """How a tensor of ``shape`` is reshaped (``view_shape``) and reduced (``axes``)."""

    shape: tuple[int, ...]
    view_shape: tuple[int, ...]
    axes: tuple[int, ...]
    scalar: bool  # per-tensor: ranges are stored as scalars


def _norm_axis(axis: int, ndim: int, where: str) -> int:
    if not -ndim <= axis < ndim:
        raise UserError(
            f"quantization point '{where}': channel axis {axis} is out of range for a tensor "
            f"with {ndim} dims; allowed: {-ndim}..{ndim - 1}."
        )
    return axis % ndim


def make_view(
    shape: tuple[int, ...],
    spec: QuantSpec,
    channel_axis: int | None = -1,
    head_axis: int | None = None,
    where: str = "?",
) -> View:
    """Builds the view of ``spec.granularity`` for a tensor of ``shape``."""
    shape = tuple(shape)
    ndim = len(shape)
    g = spec.granularity
    if g == "tensor" or ndim == 0:
        return View(shape, shape, tuple(range(ndim)), True)
    if g == "token":  # one range per row: the axes from ``axis`` (default: the last) reduce
        first = ndim - 1 if spec.axis is None else _norm_axis(spec.axis, ndim, where)
        return View(shape, shape, tuple(range(first, ndim)), False)
    if g == "head":
        if head_axis is None:
            raise UserError(
                f"quantization point '{where}' has no head axis; granularity='head' is allowed "
                "only at attention points (q, k, v, scores, softmax, context)."
            )
        ax = _norm_axis(head_axis, ndim, where)
        return View(shape, shape, tuple(i for i in range(ndim) if i != ax), False)
    axis = spec.axis if spec.axis is not None else channel_axis
    if axis is None:
        raise UserError(
            f"quantization point '{where}' has no default channel axis; set 'axis' in its rule."
        )
    ax = _norm_axis(axis, ndim, where)
    if g == "channel":
        return View(shape, shape, tuple(i for i in range(ndim) if i != ax), False)
    # group: split axis `ax` into (n_groups, group_size) (a group_size above the axis size is
    # one group) and keep the group axis, and also the point's channel axis when `axis` is
    # another one: a kernel (in, out) grouped along in (axis 0) has one range per (group, out).
    gs = min(spec.group_size, shape[ax])
    if shape[ax] % gs:
        raise UserError(
            f"quantization point '{where}': group_size={gs} does not divide axis {ax} of size "
            f"{shape[ax]}; allowed: a divisor of {shape[ax]}."
        )
    view_shape = shape[:ax] + (shape[ax] // gs, gs) + shape[ax + 1 :]
    keep = {ax}
    if channel_axis is not None and _norm_axis(channel_axis, ndim, where) != ax:
        c = _norm_axis(channel_axis, ndim, where)
        keep.add(c if c < ax else c + 1)
    return View(shape, view_shape, tuple(i for i in range(ndim + 1) if i not in keep), False)


def to_view(x: jax.Array, view: View) -> jax.Array:
    return x.reshape(view.view_shape) if view.view_shape != view.shape else x


def from_view(x: jax.Array, view: View) -> jax.Array:
    return x.reshape(view.shape) if view.view_shape != view.shape else x


def reduce(fn, x: jax.Array, view: View) -> jax.Array:
    """``fn(x, axis=view.axes, keepdims=True)``, squeezed to a scalar for per-tensor views."""
    r = fn(x, axis=view.axes, keepdims=True)
    return r.reshape(()) if view.scalar else r


def qparams_from_range(lo, hi, spec: QuantSpec):
    """Range ``[lo, hi]`` -> ``(scale, zero_point)`` of a frozen quantizer (pure).

    * symmetric: ``s = max(|lo|, |hi|) / Qp``, ``z = 0`` (grid ``[-2^(b-1), 2^(b-1)-1]``);
    * unsigned: ``s = max(hi, 0) / (2^b - 1)``, ``z = 0``;
    * asymmetric: the range is widened to contain 0, ``s = (hi - lo) / (2^b - 1)`` and the
      integer zero point ``z = round(-lo / s)``, so that 0 is exactly representable.
    """
    qmin, qmax = grid_bounds(spec.bits, spec.scheme)
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    if spec.scheme == "symmetric":
        s = jnp.maximum(jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / qmax, spec.min_scale)
        return s, jnp.zeros_like(s)
    if spec.scheme == "unsigned":
        s = jnp.maximum(jnp.maximum(hi, 0.0) / qmax, spec.min_scale)
        return s, jnp.zeros_like(s)
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    s = jnp.maximum((hi - lo) / (qmax - qmin), spec.min_scale)
    return s, jnp.clip(jnp.round(-lo / s), qmin, qmax)


def learnable_init(lo, hi, spec: QuantSpec):
    """Range -> initial ``(scale, offset)`` of a learnable (LSQ / LSQ+) quantizer.

    LSQ (symmetric or unsigned grids) keeps the frozen step (offset 0). LSQ+ places the grid
    exactly on the range: ``s = (hi - lo) / (qmax - qmin)``, ``offset = lo - qmin * s``.
    """
    if spec.learn != "lsq+":
        return qparams_from_range(lo, hi, spec)[0], jnp.zeros((), jnp.float32)
    qmin, qmax = grid_bounds(spec.bits, spec.scheme)
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    s = jnp.maximum((hi - lo) / (qmax - qmin), spec.min_scale)
    return s, lo - qmin * s


def fake_quant_range(x: jax.Array, lo, hi, spec: QuantSpec) -> jax.Array:
    """Fake-quantizes ``x`` (view-shaped) with the frozen range ``[lo, hi]``.

    ``(clip(round(x/s) + z, qmin, qmax) - z) * s``, i.e. the grid shifted by ``-z``; the
    gradient is the clipped STE in ``x`` only.
    """
    qmin, qmax = grid_bounds(spec.bits, spec.scheme)
    s, z = jax.lax.stop_gradient(qparams_from_range(lo, hi, spec))
    return ste_quant(x, s, qmin - z, qmax - z)
