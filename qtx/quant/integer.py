"""Integer tensors and the integer matmul: what a quantized matmul becomes in an int8 model.

A :class:`QArray` is a tensor on an integer grid::

    value = scale * (codes - zero) + offset

``codes`` int8 (the full shape), ``scale`` float32 and ``zero`` int32 scalars or keepdims
arrays that broadcast against the codes (per tensor / channel / token / head), ``offset`` an
optional float (LSQ+'s learned offset). ``value`` is the float tensor it stands for,
computed exactly as fake quant computes it, so every consumer that is not a matmul reads
the same numbers in both models.

A grid ``qmin..qmax`` of up to 8 bits is held in int8: unsigned 8-bit grids (``0..255``) are
stored shifted by -128 (``codes = q - 128``, ``zero = z - 128``).

:func:`integer_einsum` contracts two QArrays with an int8 x int8 -> int32 ``dot_general`` and
one rescale. Zero points never touch the inputs: with ``a' = c_a - z_a`` (likewise ``b'``)
and ``K`` the contracted size::

    sum_k a'_k b'_k = sum_k c_a c_b - z_a sum_k c_b - z_b sum_k c_a + K z_a z_b

so the correction is an int32 bias built from the codes' sums over the contracted axes (a
weight's column sums, computed once at conversion and carried as ``QArray.sums``; a row sum
of an activation, computed per call where the weight has a zero point). Offsets add
``beta_a s_b sum_k b'`` (and symmetrically) in float. The result is
``s_a s_b (acc + correction)`` in float32.
A matmul has an integer form when both inputs are QArrays whose scale, zero point and
offset are constant along the contracted axes and the int32 accumulator cannot overflow;
otherwise it runs in float on the dequantized values (:func:`matmul`), and
:func:`record_matmuls` says which and why.
"""

from __future__ import annotations

import contextlib
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

INT32_LIMIT = 2**31 - 1
PACKED_BITS = 4  # grids of at most this many bits are stored two codes per byte


@flax.struct.dataclass
class QArray:
    """``value = scale * (codes - zero) + offset`` (see the module docstring).

    ``zero`` / ``offset`` are None when they are 0 by construction; ``bits`` is the grid's
    width (``|codes - zero| <= 2**bits - 1``), used to bound the int32 accumulator.
    ``sums``: optional int32 ``sum(codes, sums_axes, keepdims=True)`` (a converted weight's
    column sums), read by :func:`integer_einsum` when it contracts exactly ``sums_axes``;
    every relayout drops it.
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    offset: jax.Array | None
    value: jax.Array
    bits: int = flax.struct.field(pytree_node=False, default=8)
    sums: jax.Array | None = None
    sums_axes: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    @property
    def per_tensor(self) -> bool:
        return all(p is None or jnp.ndim(p) == 0 for p in (self.scale, self.zero, self.offset))

    def relayout(self, fn):
        """``fn`` (a reshape, slice or transpose) applied to codes and value; per-tensor
        parameters only (a per-channel scale would not follow the new layout), else the
        float ``fn(value)``."""
        if not self.per_tensor:
            return fn(self.value)
        return self.replace(codes=fn(self.codes), value=fn(self.value), sums=None, sums_axes=None)

    def repeat(self, repeats: int, axis: int):
        """Every slice along ``axis`` repeated ``repeats`` times (a GQA key / value serving
        several query heads). Parameters kept with every axis follow: repeated where they
        vary along ``axis``, broadcast where they have size 1 there (a per-token scale
        over heads); others leave the float value."""
        axis = axis % self.ndim

        def param(p):
            if p is None or jnp.ndim(p) == 0:
                return p
            if jnp.ndim(p) != self.ndim:
                return False
            return p if p.shape[axis] == 1 else jnp.repeat(p, repeats, axis=axis)

        params = [param(p) for p in (self.scale, self.zero, self.offset)]
        if any(p is False for p in params):
            return jnp.repeat(self.value, repeats, axis=axis)
        scale, zero, offset = params
        return self.replace(
            codes=jnp.repeat(self.codes, repeats, axis=axis),
            value=jnp.repeat(self.value, repeats, axis=axis),
            scale=scale,
            zero=zero,
            offset=offset,
            sums=None,
            sums_axes=None,
        )

    def merge_trailing(self, n: int):
        """The last ``n`` axes merged into one. Parameters constant along them (per tensor,
        or size 1 there: a per-token scale of a (B, T, H, Dh) context) follow; others
        (a per-head scale) leave the float value."""
        shape = self.shape[: self.ndim - n] + (math.prod(self.shape[self.ndim - n :]),)

        def param(p):
            if p is None or jnp.ndim(p) == 0:
                return p
            if jnp.ndim(p) != self.ndim or any(d != 1 for d in p.shape[self.ndim - n :]):
                return False
            return p.reshape(p.shape[: self.ndim - n] + (1,))

        params = [param(p) for p in (self.scale, self.zero, self.offset)]
        if any(p is False for p in params):
            return self.value.reshape(shape)
        scale, zero, offset = params
        return self.replace(
            codes=self.codes.reshape(shape),
            value=self.value.reshape(shape),
            scale=scale,
            zero=zero,
            offset=offset,
            sums=None,
            sums_axes=None,
        )


def as_float(x):
    """The float tensor ``x`` stands for (``x.value`` for a QArray, else ``x``)."""
    return x.value if isinstance(x, QArray) else x


def relayout(x, fn):
    """``fn`` (a reshape / slice / transpose) applied to an array or a QArray."""
    return x.relayout(fn) if isinstance(x, QArray) else fn(x)


def repeat(x, repeats: int, axis: int):
    """``jnp.repeat`` of an array or a QArray (see :meth:`QArray.repeat`)."""
    return x.repeat(repeats, axis) if isinstance(x, QArray) else jnp.repeat(x, repeats, axis)


def merge_trailing(x, n: int):
    """The last ``n`` axes of an array or a QArray merged into one (see
    :meth:`QArray.merge_trailing`)."""
    if isinstance(x, QArray):
        return x.merge_trailing(n)
    return x.reshape(x.shape[: x.ndim - n] + (math.prod(x.shape[x.ndim - n :]),))


def take_rows(x: QArray, ids) -> jax.Array:
    """``take(x.value, ids, axis=0)`` from the looked-up rows' codes: float32
    ``ids.shape + x.shape[1:]``, bit for bit the rows of ``x.value`` (a per-tensor or per-row
    scale / zero point / offset; other layouts dequantize the whole table first)."""

    def rows(p):
        if p is None or jnp.ndim(p) == 0:
            return p
        if jnp.ndim(p) != x.ndim or any(d != 1 for d in p.shape[1:]):
            return False
        return jnp.take(p, ids, axis=0)

    params = [rows(p) for p in (x.scale, x.zero, x.offset)]
    if any(p is False for p in params):
        return jnp.take(x.value, ids, axis=0)
    return dequantize(jnp.take(x.codes, ids, axis=0), *params)


def code_shift(qmax: int) -> int:
    """What is subtracted from grid integers to hold them in int8 (128 for 0..255)."""
    return 128 if qmax > 127 else 0


def dequantize(codes, scale, zero=None, offset=None):
    """``scale * (codes - zero) + offset`` in float32; ``codes - zero`` is exact in int32."""
    k = codes.astype(jnp.int32)
    if zero is not None:
        k = k - zero
    y = k.astype(jnp.float32) * scale
    return y if offset is None else y + offset


# ----------------------------------------------------------------------------- packing


def pack_nibbles(codes, qmin: int):
    """int8 codes on a grid of <= 4 bits -> uint8 (ceil(n / 2),): code ``c`` is stored as
    the nibble ``c - qmin``, element ``2i`` in the low half of byte ``i``."""
    n = codes.reshape(-1).astype(jnp.int32) - qmin
    if n.shape[0] % 2:
        n = jnp.concatenate([n, jnp.zeros((1,), jnp.int32)])
    pairs = n.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).astype(jnp.uint8)


def unpack_nibbles(packed, shape: tuple[int, ...], qmin: int):
    """Inverse of :func:`pack_nibbles`: int8 codes of ``shape``."""
    p = packed.astype(jnp.int32)
    n = jnp.stack([p & 15, p >> 4], axis=-1).reshape(-1)[: math.prod(shape)]
    return (n + qmin).astype(jnp.int8).reshape(shape)


# ------------------------------------------------------------------------- the matmul

_LOG: list | None = None


@contextlib.contextmanager
def record_matmuls():
    """Collects ``(name, reason)`` for every matmul traced inside (reason None = integer)."""
    global _LOG
    previous, _LOG = _LOG, []
    try:
        yield _LOG
    finally:
        _LOG = previous


def _record(name: str, reason: str | None) -> None:
    if _LOG is not None:
        _LOG.append((name, reason))


def _parse(subscripts: str) -> tuple[str, str, str]:
    inputs, out = subscripts.replace(" ", "").split("->")
    a, b = inputs.split(",")
    return a, b, out


def _constant_along(x, axes) -> bool:
    return x is None or jnp.ndim(x) == 0 or all(x.shape[i] == 1 for i in axes)


def integer_form(subscripts: str, a, b) -> str | None:
    """Why ``einsum(subscripts, a, b)`` has no integer form, or None when it has one."""
    if not isinstance(a, QArray) or not isinstance(b, QArray):
        which = [n for n, x in (("left", a), ("right", b)) if not isinstance(x, QArray)]
        return f"{' and '.join(which)} input not on an integer grid"
    la, lb, out = _parse(subscripts)
    contracted = [c for c in la if c in lb and c not in out]
    for labels, x in ((la, a), (lb, b)):
        axes = [labels.index(c) for c in contracted]
        if not all(_constant_along(p, axes) for p in (x.scale, x.zero, x.offset)):
            return "a scale or zero point varies along the contracted axis"
    k = math.prod(a.shape[la.index(c)] for c in contracted)
    if k * (2**a.bits - 1) * (2**b.bits - 1) > INT32_LIMIT:
        return f"an int32 accumulator could overflow (contraction of {k})"
    return None


def _to_out(x, labels: str, out: str):
    """A keepdims array over ``labels`` (size 1 on contracted axes) in the layout of
    ``out`` (size 1 where ``labels`` lacks a label); scalars stay scalars."""
    if x is None or jnp.ndim(x) == 0:
        return x
    kept = [c for c in labels if c in out]
    x = x.reshape([x.shape[labels.index(c)] for c in kept])  # drops the contracted axes
    order = sorted(kept, key=out.index)
    x = jnp.transpose(x, [kept.index(c) for c in order])
    return x.reshape([x.shape[order.index(c)] if c in order else 1 for c in out])


def code_sums(x: QArray, axes: tuple[int, ...]):
    """``sum(x.codes, axes, keepdims=True)`` in int32: the stored ``x.sums`` where they
    span exactly ``axes``, else computed."""
    if x.sums is not None and tuple(sorted(x.sums_axes)) == tuple(sorted(axes)):
        return x.sums
    return jnp.sum(x.codes, axes, jnp.int32, keepdims=True)


def integer_einsum(subscripts: str, a: QArray, b: QArray):
    """``einsum(subscripts, a.value, b.value)`` as an int8 ``dot_general`` with int32
    accumulation, the zero-point bias and one rescale; float32 of the output shape."""
    la, lb, out = _parse(subscripts)
    contracted = [c for c in la if c in lb and c not in out]
    axes_a = tuple(la.index(c) for c in contracted)
    axes_b = tuple(lb.index(c) for c in contracted)
    k = math.prod(a.shape[i] for i in axes_a)
    acc = jnp.einsum(subscripts, a.codes, b.codes, preferred_element_type=jnp.int32)
    sum_a = sum_b = None
    if b.zero is not None or b.offset is not None or a.offset is not None:
        sum_a = _to_out(code_sums(a, axes_a), la, out)
    if a.zero is not None or a.offset is not None or b.offset is not None:
        sum_b = _to_out(code_sums(b, axes_b), lb, out)
    za, zb = _to_out(a.zero, la, out), _to_out(b.zero, lb, out)
    if za is not None:
        acc = acc - za * sum_b
    if zb is not None:
        acc = acc - zb * sum_a
    if za is not None and zb is not None:
        acc = acc + k * za * zb
    sa, sb = _to_out(a.scale, la, out), _to_out(b.scale, lb, out)
    y = acc.astype(jnp.float32) * (sa * sb)
    if a.offset is not None or b.offset is not None:
        # sum_k a' and sum_k b' (codes minus zero points), for the offset terms
        da = sum_a if za is None else sum_a - k * za
        db = sum_b if zb is None else sum_b - k * zb
        oa, ob = _to_out(a.offset, la, out), _to_out(b.offset, lb, out)
        if oa is not None:
            y = y + oa * sb * db.astype(jnp.float32)
        if ob is not None:
            y = y + ob * sa * da.astype(jnp.float32)
        if oa is not None and ob is not None:
            y = y + k * oa * ob
    return y


def matmul(subscripts: str, a, b, float_fn, name: str = "?", integer: bool = True, lhs_scale=None):
    """The integer form of ``einsum(subscripts, lhs_scale * a, b)`` when it has one (and
    ``integer``), else ``float_fn(lhs_scale * as_float(a), as_float(b))`` (the model's own
    float op); records which. ``lhs_scale`` (a Python float or None) scales the smaller
    operand in float (attention's ``1/sqrt(d)`` on q rather than on the scores) and the
    integer result after its rescale."""
    reason = integer_form(subscripts, a, b) if integer else "float matmuls requested"
    _record(name, reason)
    if reason is None:
        y = integer_einsum(subscripts, a, b)
        return y if lhs_scale is None else y * lhs_scale
    fa = as_float(a)
    if lhs_scale is not None:
        fa = fa * jnp.asarray(lhs_scale, fa.dtype)
    return float_fn(fa, as_float(b))


def dense_subscripts(ndim: int) -> str:
    """``x (..., K) @ W (K, N)`` as einsum subscripts for an ``ndim``-dimensional ``x``."""
    batch = "abcdefgh"[: ndim - 1]
    return f"{batch}k,kn->{batch}n"


def reference_einsum(subscripts: str, a: QArray, b: QArray) -> np.ndarray:
    """NumPy float64 ``einsum`` of the exact dequantized inputs (for tests)."""

    def exact(x):
        k = np.asarray(x.codes, np.int64)
        if x.zero is not None:
            k = k - np.asarray(x.zero, np.int64)
        y = k * np.asarray(x.scale, np.float64)
        return y if x.offset is None else y + np.asarray(x.offset, np.float64)

    return np.einsum(subscripts, exact(a), exact(b))
