"""The named quantization point: one Flax Linen module for weights and activations.

A :class:`QuantPoint` is placed wherever a paper quantizes. Its name is its module path
(``layer_3/attn/softmax``); the model's :class:`~qtx.quant.rules.QuantPlan` gives it a spec and
a mode:

* ``off``: identity;
* ``calibrate``: the batch range is accumulated into the ``quant_stats`` collection (``lo``,
  ``hi``, ``count``, ``nonfinite``; learnable points also store the ``learn_step`` /
  ``learn_offset`` their range implies). Use ``mutable=['quant_stats']``. The output is the
  input fake-quantized with the range accumulated so far (the plan's ``calibration`` is
  ``sequential``, the reference code's way) or the input unchanged (``parallel``);
* ``quantize``: fake quant with frozen ranges (from ``quant_stats``, or recomputed each call
  for dynamic estimators); learnable points use their parameters with stopped gradients;
* ``learn``: as ``quantize``, but LSQ/LSQ+ steps and offsets in ``params`` get gradients.

Learnable points always declare ``params/<name>/step`` (and ``offset`` for LSQ+), in every
mode but ``off``, so the variable tree does not depend on the mode.

With the ``quant_weights`` collection mutable, every uniform weight point in ``quantize`` /
``learn`` mode records what it quantizes (:func:`weight_records`): ``w`` (the weight in its
view, differentiable), ``step`` and ``offset`` (so ``code = clip(round((w - offset) / step),
qmin, qmax)``) and the grid's integer ``levels`` ``qmin, ..., qmax``. Weight regularisers
(bin regularisation) and oscillation tracking read them from the training forward pass.

A table lookup calls ``point(table, rows=ids)`` and gets ``take(Q(table), ids, axis=0)``; in
``quantize`` / ``learn`` mode it quantizes only the looked-up rows when that gives the same
values and gradients as the whole table (per-tensor or per-row ranges and steps).

In an integer plan (``plan.integer``), a point marked ``operand`` (its output feeds a matmul)
returns a :class:`~qtx.quant.integer.QArray`: int8 codes, scale and zero point, and the float
value fake quant would have returned. A weight point of a converted model reads its codes from
the ``quant_int`` collection (:meth:`QuantPoint.stored_weight`); with that collection mutable,
it writes them there (the conversion pass, see ``qtx.quant.convert``).

Points also answer three questions without touching the data: which points exist
(:func:`list_points`: a pass with the ``quant_points`` collection mutable records every point
and quantizes nothing); for the plan's tracked points, the per-sequence outlier statistics
(sown into ``intermediates``); and, with the ``quant_tokens`` collection mutable, each
quantized activation's token-wise max and min (:func:`token_extremes`, for token-wise
clipping), recorded on the point's input in any mode.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx.errors import UserError
from qtx.quant import estimators
from qtx.quant.integer import (
    PACKED_BITS,
    QArray,
    as_float,
    code_shift,
    dequantize,
    pack_nibbles,
    unpack_nibbles,
)
from qtx.quant.observe import broadcast_mask, inf_norm_per_sequence, kurtosis_per_sequence
from qtx.quant.primitives import binary_quant, grad_scale_value, grid_bounds, uniform_quant
from qtx.quant.ranges import (
    View,
    fake_quant_range,
    from_view,
    learnable_init,
    make_view,
    qparams_from_range,
    reduce,
    to_view,
)
from qtx.quant.rules import QuantPlan
from qtx.quant.spec import QuantSpec

STATS = "quant_stats"
POINTS = "quant_points"
OBSERVED = "intermediates"
TOKENS = "quant_tokens"
WEIGHTS = "quant_weights"
INT = "quant_int"
INTEGER_BITS = 8  # the widest grid the integer path holds (int8 codes)
# the parameters a learnable point declares: params/<point>/step (and .../offset for LSQ+)
QUANTIZER_PARAMS = ("step", "offset")
# the same as a regex on "/"-joined parameter paths (``merge_pretrained``'s rules)
QUANTIZER_PARAM_PATTERN = rf"/({'|'.join(QUANTIZER_PARAMS)})$"


def is_quantizer_param(path) -> bool:
    """Whether a parameter path (a key tuple, or a ``/``-joined string) is a learnable
    point's step or offset."""
    if isinstance(path, str):
        path = path.split("/")
    return path[-1] in QUANTIZER_PARAMS


def token_extremes(x, head_axis: int | None = None):
    """Per-token ``(max, min)`` over the features of an activation, float32 (B, T) or (B,).

    A token is one (batch, position) pair: (B, T, ...) reduces the axes after T; attention
    maps (B, H, T, S) (``head_axis`` 1) reduce heads and keys; (B, D) gives one value per row.
    """
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    if x.ndim >= 3 and head_axis == 1:
        axes = (1,) + tuple(range(3, x.ndim))
    elif x.ndim >= 3:
        axes = tuple(range(2, x.ndim))
    else:
        axes = (x.ndim - 1,)
    return jnp.max(x, axis=axes), jnp.min(x, axis=axes)


class QuantPoint(nn.Module):
    """A named quantization point. ``x`` any shape -> same shape and dtype.

    Attributes:
      plan: the model's rules and mode.
      kind: ``act`` or ``weight``.
      channel_axis: default axis of per-channel granularity (weights: the output axis).
      head_axis: the head axis of attention tensors, for ``granularity='head'``.
      operand: the output feeds a matmul; in an integer plan it is returned as a QArray.
      table: a lookup table's weight (an embedding); in an integer plan its codes are stored
        at conversion like a matmul weight's (up to 8 bits), and the table reads its rows
        from them (:func:`~qtx.quant.integer.take_rows`).
    """

    plan: QuantPlan = QuantPlan()
    kind: str = "act"
    channel_axis: int | None = -1
    head_axis: int | None = None
    operand: bool = False
    table: bool = False

    @nn.compact
    def __call__(self, x, mask=None, rows=None):
        """``x`` any shape; ``mask``: bool, True at real tokens, broadcastable to ``x`` once
        trailing axes are added ((B, T) for (B, T, ...) activations; attention maps pass
        (B, 1, T, S)). Calibration statistics, LSQ inits and dynamic ranges then see only the
        real tokens; None (images, weights) = every element.

        ``rows``: integer ids (any shape) into axis 0 of a table ``x`` (V, ...): the call
        returns ``take(Q(x), rows, axis=0)`` (rows.shape + x.shape[1:]), quantizing only the
        looked-up rows where that is exact (:meth:`_lookup`)."""
        x = as_float(x)
        name = "/".join(self.path)
        if rows is None:
            return self._point(x, mask, name)
        spec, mode = self.plan.resolve(name, self.kind)
        if self.plan.integer and mode == "learn":
            mode = "quantize"
        if self._rows_exact(x, spec, mode, name):
            return self._lookup(x, rows, spec, mode, name)
        return jnp.take(as_float(self._point(x, mask, name)), rows, axis=0)

    def _rows_exact(self, x, spec: QuantSpec | None, mode: str, name: str) -> bool:
        """Whether rows of ``x`` can be quantized alone, bit-identically: a weight point in
        mode ``quantize`` / ``learn`` on a uniform grid with one range or step for the whole
        table (frozen, learned, or ``current_minmax`` over the whole table) or one per row
        (channel axis 0); not while initialising, listing points, tracking the point,
        recording ``quant_weights`` or handing a QArray to a matmul (these see the table)."""
        if spec is None or spec.binary or mode not in ("quantize", "learn"):
            return False
        integer = self.plan.integer and (self.operand or self.table)
        if self.kind != "weight" or self.is_initializing() or integer:
            return False
        if any(self.is_mutable_collection(c) for c in (POINTS, WEIGHTS)):
            return False
        if self.plan.track and self.plan.tracks(name):
            return False
        if spec.granularity == "tensor":
            return True
        axis = spec.axis if spec.axis is not None else self.channel_axis
        channel = spec.granularity == "channel" and axis is not None and x.ndim > 0
        return channel and axis % x.ndim == 0

    def _lookup(self, table, ids, spec: QuantSpec, mode: str, name: str):
        """``take(Q(table), ids, axis=0)`` from the looked-up rows only.

        Each row gets the whole-table point's range or step (per tensor, or its own row's:
        ranges, steps and per-row gradient scales are gathered at ``ids``); a dynamic range and
        the gradient scale ``g`` (LSQ's ``N`` = elements sharing a step) are computed on the
        whole table. The table gradient is the scatter-add of the rows' STE gradients and the
        step gradient sums over the looked-up rows, equal to the whole-table ones since the
        other rows get a zero cotangent (duplicate ids accumulate)."""
        view = make_view(table.shape, spec, self.channel_axis, self.head_axis, name)
        tv = table.astype(jnp.float32)  # a tensor or channel view is the table itself
        x = jnp.take(tv, ids, axis=0)

        def pick(a):  # per-row quantities (V, 1, ...) -> the looked-up rows' (ids..., 1, ...)
            return a if jnp.ndim(a) == 0 else jnp.take(a, ids, axis=0)

        if spec.learn == "none":
            lo, hi = self._frozen_range(tv, view, spec, name)
            return fake_quant_range(x, pick(lo), pick(hi), spec).astype(table.dtype)
        qmin, qmax = grid_bounds(spec.bits, spec.scheme)
        scale, offset = self._learnable_params(tv, view, spec)
        sg = jax.lax.stop_gradient  # the straight-through floor of _quantize
        scale = sg(jnp.maximum(scale, spec.min_scale)) + (scale - sg(scale))
        if mode != "learn":
            scale, offset = sg((scale, offset))
        g = grad_scale_value(spec.grad_scale, tv, jnp.size(scale), qmax, axes=view.axes)
        y = uniform_quant(x, pick(scale), pick(offset), qmin, qmax, pick(g))
        return y.astype(table.dtype)

    def _point(self, x, mask, name: str):
        """The point on ``x`` (float): see :meth:`__call__`."""
        if self.is_mutable_collection(POINTS) and not self.is_initializing():
            # A listing pass (see list_points): record the point, change nothing.
            self.put_variable(POINTS, self.kind, jnp.zeros(x.shape, jnp.bool_))
            return x
        if self.plan.track and self.plan.tracks(name) and x.ndim >= 2:
            self.sow(OBSERVED, "kurtosis", kurtosis_per_sequence(x, mask))
            self.sow(OBSERVED, "inf_norm", inf_norm_per_sequence(x, mask))
        spec, mode = self.plan.resolve(name, self.kind)
        record = self.kind == "act" and x.ndim >= 2 and self.is_mutable_collection(TOKENS)
        if spec is not None and record and not self.is_initializing():
            hi, lo = token_extremes(x, self.head_axis)
            self.put_variable(TOKENS, "max", hi)
            self.put_variable(TOKENS, "min", lo)
        if spec is None or mode == "off":
            return x
        if self.plan.integer and mode == "learn":
            mode = "quantize"
        return self._quantize(x, spec, mode, name, mask)

    def _integer(self, spec: QuantSpec, view, name: str) -> bool:
        """Whether this point hands a QArray to its matmul (or, for a table, stores codes)."""
        if not (self.plan.integer and (self.operand or self.table)):
            return False
        if self.table and not self.operand and spec.bits > INTEGER_BITS:
            return False  # a wider table stays float; only matmul inputs need int8 codes
        if spec.bits > INTEGER_BITS:
            raise UserError(
                f"quantization point '{name}' has bits={spec.bits}; the integer model holds "
                f"1..{INTEGER_BITS} bits at matmul inputs (int8 codes); quantize it with at "
                f"most {INTEGER_BITS} bits or evaluate it in fake quant."
            )
        return view.view_shape == view.shape  # a group view has no per-element scale layout

    def stored_weight(self, shape: tuple[int, ...]) -> QArray | None:
        """The converted weight (a QArray of ``shape``) when this point's codes are stored in
        ``quant_int``, else None (the caller quantizes its float weight)."""
        if not (self.plan.integer and self.kind == "weight") or self.is_initializing():
            return None
        if self.is_mutable_collection(INT) or not self.has_variable(INT, "codes"):
            return None
        name = "/".join(self.path)
        spec, _ = self.plan.resolve(name, self.kind)
        if spec is None:
            raise UserError(
                f"quantization point '{name}' has integer weights but no rule quantizes it; "
                "load the integer model with the quantization rules it was converted with."
            )
        get = lambda k: self.get_variable(INT, k) if self.has_variable(INT, k) else None  # noqa
        codes, lo = get("codes"), _code_min(spec)
        if spec.bits <= PACKED_BITS:
            codes = unpack_nibbles(codes, shape, lo)
        if tuple(codes.shape) != tuple(shape):
            raise UserError(
                f"integer weight '{name}' has shape {tuple(codes.shape)}; the model expects "
                f"{tuple(shape)}."
            )
        scale, zero, offset = get("scale"), get("zero"), get("offset")
        value = dequantize(codes, scale, zero, offset)
        sums = get("code_sums")  # absent in directories written before they were stored
        axes = tuple(range(len(shape) - 1)) if sums is not None else None
        return QArray(codes, scale, zero, offset, value, _grid_bits(spec), sums, axes)

    def _qarray(self, xv, out, spec: QuantSpec, q: dict) -> QArray:
        """The QArray of ``out`` (the fake-quant output) and, in the conversion pass, its
        stored form. ``q``: ``scale``, ``k`` (grid integers as floats), ``z`` (integer zero
        point or None), ``offset`` (or None), ``qmax``."""
        shift = code_shift(q["qmax"])
        codes = (q["k"] if q["z"] is None else q["k"] + q["z"]) - shift
        codes = codes.astype(jnp.int8)
        zero = None
        if q["z"] is not None:
            zero = (q["z"] - shift).astype(jnp.int32)
        elif shift:
            zero = jnp.asarray(-shift, jnp.int32)
        offset = q["offset"]
        scale = jnp.asarray(q["scale"], jnp.float32)
        if self.kind == "weight" and self.is_mutable_collection(INT) and not self.is_initializing():
            stored = pack_nibbles(codes, _code_min(spec)) if spec.bits <= PACKED_BITS else codes
            self.put_variable(INT, "codes", stored)
            if self.operand:
                # the column sums of the contraction (every axis but the last, as Dense reads
                # its kernel) for the activation's zero-point term, once instead of per call
                axes = tuple(range(codes.ndim - 1))
                sums = jnp.sum(codes, axes, jnp.int32, keepdims=True)
                self.put_variable(INT, "code_sums", sums)
            self.put_variable(INT, "scale", scale)
            if zero is not None:
                self.put_variable(INT, "zero", zero)
            if offset is not None:
                self.put_variable(INT, "offset", jnp.asarray(offset, jnp.float32))
        return QArray(codes, scale, zero, offset, out, _grid_bits(spec))

    def _quantize(self, x, spec: QuantSpec, mode: str, name: str, mask=None):
        view = make_view(x.shape, spec, self.channel_axis, self.head_axis, name)
        xv = to_view(x, view).astype(jnp.float32)
        mv = None  # the real tokens, in the view
        if mask is not None and self.kind == "act":
            mv = to_view(broadcast_mask(mask, x.shape), view)
        sequential = self.plan.calibration == "sequential"
        if spec.binary:  # sign(x) mean|x|; the unsigned 1-bit grid {0, 1} is uniform below
            if mode == "calibrate":
                self._count_nonfinite(xv)
                if not sequential or self.is_initializing():
                    return x
            if self.kind == "act" and spec.granularity == "tensor":
                view = _token_view(x.shape, self.head_axis)  # sign(x) mean|x| per token
            alpha = jax.lax.stop_gradient(reduce(jnp.mean, jnp.abs(xv), view))
            out = from_view(binary_quant(xv, alpha), view).astype(x.dtype)
            if mode != "calibrate" and self._integer(spec, view, name):
                k = jnp.where(xv >= 0, 1.0, -1.0)
                q = dict(scale=alpha, k=k, z=None, offset=None, qmax=1)
                return self._qarray(xv, out, spec, q)
            return out

        qmin, qmax = grid_bounds(spec.bits, spec.scheme)
        learn = spec.learn != "none"
        if learn:
            scale, offset = self._learnable_params(xv, view, spec, mv)
        if mode == "calibrate":
            lo, hi = self._calibrate(xv, view, spec, mv)
            if not sequential or lo is None:
                return x
            y = fake_quant_range(xv, *jax.lax.stop_gradient((lo, hi)), spec)
            return from_view(y, view).astype(x.dtype)

        if learn:
            # The floor is straight-through: a step pushed below min_scale is used at the
            # floor and keeps its gradient (a plain maximum would freeze it at 0 gradient).
            sg = jax.lax.stop_gradient
            scale = sg(jnp.maximum(scale, spec.min_scale)) + (scale - sg(scale))
            if mode != "learn":
                scale, offset = jax.lax.stop_gradient((scale, offset))
            g = grad_scale_value(spec.grad_scale, xv, jnp.size(scale), qmax, axes=view.axes)
            y = uniform_quant(xv, scale, offset, qmin, qmax, g)
        else:
            lo, hi = self._frozen_range(xv, view, spec, name, mv)
            y = fake_quant_range(xv, lo, hi, spec)
        if self.kind == "weight" and self.is_mutable_collection(WEIGHTS):
            if not learn:
                scale, zero = jax.lax.stop_gradient(qparams_from_range(lo, hi, spec))
                offset = -zero * scale
            self._record_weight(xv, scale, offset, qmin, qmax)
        out = from_view(y, view).astype(x.dtype)
        if not self._integer(spec, view, name):
            return out
        if learn:  # the grid integers of uniform_quant, and LSQ+'s offset
            k = jnp.clip(jnp.round((xv - offset) / scale), qmin, qmax)
            q = dict(scale=scale, k=k, z=None, offset=offset if spec.learn == "lsq+" else None)
        else:  # fake_quant_range's shifted grid qmin - z .. qmax - z, z = 0 unless asymmetric
            s, z = jax.lax.stop_gradient(qparams_from_range(lo, hi, spec))
            k = jnp.clip(jnp.round(xv / s), qmin - z, qmax - z)
            q = dict(scale=s, k=k, z=z if spec.scheme == "asymmetric" else None, offset=None)
        return self._qarray(xv, out, spec, {**q, "qmax": qmax})

    def _record_weight(self, wv, scale, offset, qmin, qmax):
        if self.is_initializing():
            return
        self.put_variable(WEIGHTS, "w", wv)
        self.put_variable(WEIGHTS, "step", jnp.asarray(scale, jnp.float32))
        self.put_variable(WEIGHTS, "offset", jnp.asarray(offset, jnp.float32))
        self.put_variable(WEIGHTS, "levels", jnp.arange(qmin, qmax + 1, dtype=jnp.float32))

    def _learnable_params(self, xv, view, spec, mask=None):
        def init(which):
            lo, hi = estimators.estimate(xv, view, spec, mask)
            return learnable_init(lo, hi, spec)[which]

        if not self.is_initializing() and not self.has_variable("params", "step"):
            raise UserError(
                f"learnable quantization point '{'/'.join(self.path)}' has no parameter 'step'; "
                "calibrate the model with this plan first (or load its QAT checkpoint)."
            )
        scale = self.param("step", lambda _: init(0))
        offset = self.param("offset", lambda _: init(1)) if spec.learn == "lsq+" else 0.0
        return scale, offset

    def _frozen_range(self, xv, view, spec, name, mask=None):
        if spec.dynamic or self.is_initializing():
            return estimators.estimate(xv, view, spec, mask)
        if not (self.has_variable(STATS, "lo") and self.has_variable(STATS, "hi")):
            raise UserError(
                f"quantization point '{name}' has no calibration statistics in '{STATS}'; "
                "run the model in mode 'calibrate' first, or give it a dynamic estimator "
                "(current_minmax)."
            )
        return self.get_variable(STATS, "lo"), self.get_variable(STATS, "hi")

    def _count_nonfinite(self, xv):
        if self.is_initializing():
            return
        bad = self.variable(STATS, "nonfinite", lambda: jnp.zeros((), jnp.int32))
        bad.value = bad.value + jnp.any(~jnp.isfinite(xv)).astype(jnp.int32)

    def _calibrate(self, xv, view, spec, mask=None):
        """Accumulates the batch range of the real elements; returns the range so far (None
        while initialising)."""
        self._count_nonfinite(xv)
        if self.is_initializing():
            return None, None
        if spec.dynamic:
            return estimators.estimate(xv, view, spec, mask)
        lo_b, hi_b = estimators.estimate(xv, view, spec, mask)
        count = self.variable(STATS, "count", lambda: jnp.zeros((), jnp.int32))
        lo = self.variable(STATS, "lo", lambda: jnp.zeros(lo_b.shape, jnp.float32))
        hi = self.variable(STATS, "hi", lambda: jnp.zeros(hi_b.shape, jnp.float32))
        kind, m = spec.accumulator, spec.momentum
        lo.value = estimators.accumulate(kind, count.value, lo.value, lo_b, m, lower=True)
        hi.value = estimators.accumulate(kind, count.value, hi.value, hi_b, m, lower=False)
        count.value = count.value + 1
        if spec.learn != "none":
            s, off = learnable_init(lo.value, hi.value, spec)
            self.put_variable(STATS, "learn_step", s)
            if spec.learn == "lsq+":
                self.put_variable(STATS, "learn_offset", off)
        return lo.value, hi.value


def _token_view(shape: tuple[int, ...], head_axis: int | None):
    """The view that reduces each token's features: per-head tensors (B, T, H, Dh) (``head_axis``
    2) over (H, Dh), attention maps (B, H, T, S) (``head_axis`` 1) over (H, S) per query
    token, anything else over its last axis ((B, D), (B, T, D), Swin's (B, H, W, C))."""
    ndim = len(shape)
    if ndim >= 3 and head_axis == 1:
        axes = (1,) + tuple(range(3, ndim))
    elif ndim >= 3 and head_axis == 2:
        axes = tuple(range(2, ndim))
    else:
        axes = (ndim - 1,)
    return View(shape, shape, axes, False)


def _code_min(spec: QuantSpec) -> int:
    """The smallest int8 code of a spec's grid (sign binarisation: -1)."""
    if spec.binary:
        return -1
    qmin, qmax = grid_bounds(spec.bits, spec.scheme)
    return qmin - code_shift(qmax)


def _grid_bits(spec: QuantSpec) -> int:
    """Bound on ``|codes - zero|`` as bits: sign-binary codes are +-1, asymmetric zero points
    lie on the grid."""
    return 1 if spec.binary else spec.bits


def list_points(apply_fn, variables, *args, **kwargs) -> dict[str, tuple[str, tuple]]:
    """All points a model call touches: ``{name: (kind, shape)}``, without running compute.

    ``apply_fn`` is ``model.apply``; ``variables`` may be arrays or ``ShapeDtypeStruct``s.
    """

    def run(v):
        _, mutated = apply_fn(v, *args, mutable=[POINTS], **kwargs)
        return mutated[POINTS]

    tree = jax.eval_shape(run, variables)
    out = {}
    for path, leaf in flatten_dict(tree).items():
        out["/".join(path[:-1])] = (path[-1], tuple(leaf.shape))
    return dict(sorted(out.items()))


def weight_records(collected) -> dict[str, dict]:
    """``{point name: {"w", "step", "offset", "levels"}}`` from the ``quant_weights``
    collection of a forward pass (``mutable=[WEIGHTS]``)."""
    out: dict[str, dict] = {}
    for path, leaf in flatten_dict(collected).items():
        out.setdefault("/".join(path[:-1]), {})[path[-1]] = leaf
    return dict(sorted(out.items()))


def find_nonfinite(stats) -> list[str]:
    """Names of points whose calibration saw NaN/Inf (``nonfinite > 0``)."""
    bad = []
    for path, leaf in flatten_dict(stats).items():
        if path[-1] == "nonfinite" and int(leaf) > 0:
            bad.append("/".join(path[:-1]))
    return bad


def load_learnable_from_stats(params, stats):
    """Copies the calibrated ``learn_step``/``learn_offset`` of learnable points into
    ``params/<point>/step`` / ``offset`` (pure: returns a new params tree)."""
    flat = flatten_dict(params)
    for path, leaf in flatten_dict(stats).items():
        target = {"learn_step": "step", "learn_offset": "offset"}.get(path[-1])
        if target is None:
            continue
        key = path[:-1] + (target,)
        if key not in flat:
            raise UserError(
                f"calibration statistics of point '{'/'.join(path[:-1])}' have no matching "
                f"parameter '{target}'; initialise the model with the same quantization plan."
            )
        flat[key] = jnp.asarray(leaf, flat[key].dtype).reshape(flat[key].shape)
    return unflatten_dict(flat)
