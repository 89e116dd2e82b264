"""Range estimators: a tensor (in its granularity view) -> a range ``(lo, hi)``.

Every estimator is a pure, jit-safe function ``f(x, view, spec, mask=None) -> (lo, hi)``
whose outputs have the view's reduced shape (a scalar for per-tensor). Estimators that produce
a step (``lsq_init``, ``iterative``) return the range that step spans, so that
:func:`qtx.quant.ranges.qparams_from_range` gives the step back exactly.

``mask`` (bool, broadcastable to ``x``; True = a real token) restricts every statistic to the
real elements, as if the padding were cut out first (the reference code's
``is_remove_padding``): min/max, means, percentiles (their interpolation index counts only
real elements) and search errors. A reduce group without a real element gets the range
``(0, 0)``. ``mask=None`` is the whole tensor.

Accumulation over calibration batches is separate (:func:`accumulate`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qtx.quant.primitives import grid_bounds
from qtx.quant.ranges import View, fake_quant_range, reduce
from qtx.quant.spec import QuantSpec

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _valid(x, mask):
    """The mask broadcast to ``x`` (None stays None)."""
    return None if mask is None else jnp.broadcast_to(mask, x.shape)


def _mean(x, view: View, mask):
    """Mean over the real elements of each group (0 for an empty group)."""
    if mask is None:
        return reduce(jnp.mean, x, view)
    total = reduce(jnp.sum, jnp.where(mask, x, 0.0), view)
    return total / jnp.maximum(reduce(jnp.sum, mask.astype(jnp.float32), view), 1.0)


def minmax(x, view: View, spec: QuantSpec, mask=None):
    """``(min x, max x)`` over the view's reduce axes (real elements only)."""
    if mask is None:
        return reduce(jnp.min, x, view), reduce(jnp.max, x, view)
    lo = reduce(jnp.min, jnp.where(mask, x, jnp.inf), view)
    hi = reduce(jnp.max, jnp.where(mask, x, -jnp.inf), view)
    empty = lo > hi
    return jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)


def _flatten_reduced(x, view: View):
    """Moves the reduce axes last and flattens them: ``kept_shape + (n,)``."""
    kept = [i for i in range(x.ndim) if i not in view.axes]
    xt = jnp.transpose(x, kept + list(view.axes))
    return xt.reshape(tuple(x.shape[i] for i in kept) + (-1,))


def _restore(r, x, view: View):
    """Inverse of :func:`_flatten_reduced` for a reduced result of shape ``kept_shape``."""
    if view.scalar:
        return r.reshape(())
    shape = tuple(1 if i in view.axes else x.shape[i] for i in range(x.ndim))
    return r.reshape(shape)


def _order_keys(x):
    """uint32 keys whose unsigned order is the float order of ``x`` (sign-magnitude flip)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31).astype(bool)
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _order_statistics(flat, k):
    """``(x_(k), x_(k+1))``, the k-th and next smallest along the last axis (0-indexed; ``k``
    an int or an int array of the leading shape).

    Exact radix select: 32 counting passes find the largest key ``K`` with
    ``#{key < K} <= k``, which is the k-th smallest key. Each pass is one fused compare-and-sum,
    so it costs O(32 n) with no sort (a sort of the 3M values of a BERT FFN activation is ~15x
    slower on CPU).
    """
    key = _order_keys(flat)

    def bit(i, kth):
        trial = kth | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        below = jnp.sum(key < trial[..., None], axis=-1)
        return jnp.where(below <= k, trial, kth)

    kth = jax.lax.fori_loop(0, 32, bit, jnp.zeros(flat.shape[:-1], jnp.uint32))[..., None]
    inf = jnp.asarray(jnp.inf, flat.dtype)
    x_k = jnp.min(jnp.where(key >= kth, flat, inf), axis=-1)
    after = jnp.min(jnp.where(key > kth, flat, inf), axis=-1)
    tied = jnp.sum(key <= kth, axis=-1) >= k + 2
    return x_k, jnp.where(tied, x_k, after)


def _percentile_last(flat, q: float):
    """``numpy.percentile(flat, q, axis=-1)`` with linear interpolation. The index
    ``q/100 (n-1)`` is placed in float64 (``n`` and ``q`` are static), so it stays exact for
    millions of values."""
    n = flat.shape[-1]
    index = q / 100.0 * (n - 1)
    k = min(int(math.floor(index)), n - 1)
    x_k, x_next = _order_statistics(flat, k)
    if k == n - 1:
        return x_k
    return x_k + (x_next - x_k) * jnp.asarray(index - k, flat.dtype)


def _index_parts(m, fraction: float):
    """``(floor(m * fraction), frac(m * fraction))`` for an int32 array ``m`` in [0, 2^31)
    and a static ``fraction`` in [0, 1], exact to ``m * 2^-49`` (float64's precision).

    ``fraction`` is held as the integer ``P = round(fraction * 2^48)``; ``m * P`` is computed
    in 12-bit limbs (every partial product fits int32), so the interpolation index of a
    masked percentile keeps float64's precision without 64-bit types.
    """
    big = round(fraction * 2**48)
    b = [(big >> (12 * j)) & 0xFFF for j in range(4)] + [big >> 48]  # b[4] is 0 or 1
    a = [(m >> (12 * i)) & 0xFFF for i in range(3)]
    digits, carry = [], jnp.zeros_like(m)
    for s in range(7):
        col = carry
        for i in range(3):
            if 0 <= s - i < len(b) and b[s - i]:
                col = col + a[i] * b[s - i]
        digits.append(col & 0xFFF)
        carry = col >> 12
    k = digits[4] + (digits[5] << 12) + (digits[6] << 24)  # m * P < 2^79: no carry is left
    frac = sum(digits[j].astype(jnp.float32) * jnp.float32(2.0 ** (12 * j - 48)) for j in range(4))
    # a decimal fraction (0.99999) is not a binary one: snap an index within 2^-24 below an
    # integer to it, as float64 rounds it
    up = frac >= 1.0 - 2.0**-24
    return jnp.where(up, k + 1, k), jnp.where(up, 0.0, frac)


def _masked_percentile_last(flat, valid, q: float):
    """:func:`_percentile_last` over the elements where ``valid`` (per leading index)."""
    n = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    k, frac = _index_parts(jnp.maximum(n - 1, 0), q / 100.0)
    x_k, x_next = _order_statistics(jnp.where(valid, flat, jnp.inf), k)
    last = (k >= n - 1) | (frac == 0)
    out = jnp.where(last, x_k, x_k + (x_next - x_k) * frac)
    return jnp.where(n > 0, out, 0.0)


def percentile(x, view: View, spec: QuantSpec, mask=None):
    """``(P_{100-p}(x), P_p(x))``, or with ``percentile_of='abs'`` ``t = P_p(|x|)`` and
    ``(max(min x, -t), min(max x, t))``; linear interpolation, as ``numpy.percentile`` of the
    real elements."""
    flat = _flatten_reduced(x, view)
    valid = None if mask is None else _flatten_reduced(mask, view)

    def pct(v, q):
        return _percentile_last(v, q) if valid is None else _masked_percentile_last(v, valid, q)

    last = View(flat.shape, flat.shape, (flat.ndim - 1,), False)
    lo_x, hi_x = (r[..., 0] for r in minmax(flat, last, spec, valid))
    if spec.percentile_of == "abs":
        t = pct(jnp.abs(flat), spec.percentile)
        lo = jnp.maximum(lo_x, -t)
        hi = jnp.minimum(hi_x, t)
    else:
        lo = pct(flat, 100.0 - spec.percentile)
        hi = pct(flat, spec.percentile)
    return _restore(lo, x, view), _restore(hi, x, view)


def mean_std(x, view: View, spec: QuantSpec, mask=None):
    """``mean -/+ k_sigma * std`` (population std)."""
    mu = _mean(x, view, mask)
    sd = jnp.sqrt(_mean(jnp.square(x - mu), view, mask))
    return mu - spec.k_sigma * sd, mu + spec.k_sigma * sd


def _lp_error(x, lo, hi, view: View, spec: QuantSpec, mask=None):
    """``sum |x - Q(x; lo, hi)|^p`` over the reduce axes (keepdims or scalar)."""
    err = jnp.abs(fake_quant_range(x, lo, hi, spec) - x) ** spec.lp
    if mask is not None:
        err = jnp.where(mask, err, 0.0)
    return reduce(jnp.sum, err, view)


def _golden_search(f, a, b, iters: int):
    """Minimises ``f`` over ``[a, b]`` elementwise (vectorised golden-section search)."""
    c = b - _GOLDEN * (b - a)
    d = a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)

    def body(_, st):
        a, b, c, d, fc, fd = st
        left = fc < fd  # the minimum lies in [a, d]
        a2 = jnp.where(left, a, c)
        b2 = jnp.where(left, d, b)
        new = jnp.where(left, b2 - _GOLDEN * (b2 - a2), a2 + _GOLDEN * (b2 - a2))
        fnew = f(new)
        c2 = jnp.where(left, new, d)
        d2 = jnp.where(left, c, new)
        fc2 = jnp.where(left, fnew, fd)
        fd2 = jnp.where(left, fc, fnew)
        return a2, b2, c2, d2, fc2, fd2

    a, b, c, d, fc, fd = jax.lax.fori_loop(0, iters, body, (a, b, c, d, fc, fd))
    return jnp.where(fc < fd, c, d)


def mse(x, view: View, spec: QuantSpec, mask=None):
    """Shrinks the min-max range by a factor ``a`` minimising the Lp quantization error.

    ``search='grid'`` tries ``a = i / num_candidates`` for ``i = 1..num_candidates``;
    ``search='golden'`` runs golden-section search on ``a`` in ``[1/num_candidates, 1]``.
    Per-channel views search one factor per channel.
    """
    lo0, hi0 = minmax(x, view, spec, mask)

    def err(a):
        return _lp_error(x, lo0 * a, hi0 * a, view, spec, mask)

    if spec.search == "golden":
        lo_a = jnp.full(jnp.shape(lo0), 1.0 / spec.num_candidates, jnp.float32)
        a = _golden_search(err, lo_a, jnp.ones_like(lo_a), spec.search_iters)
        return lo0 * a, hi0 * a
    n = spec.num_candidates
    cands = jnp.arange(1, n + 1, dtype=jnp.float32) / n
    errs = jax.lax.map(err, cands)  # (n, *range_shape), one candidate at a time
    best = cands[jnp.argmin(errs, axis=0)]
    return lo0 * best, hi0 * best


def omse(x, view: View, spec: QuantSpec, mask=None):
    """Golden-section search on the L2 error (OMSE), then each bound refined separately.

    The shared shrink factor is found first; for asymmetric grids the upper and then the
    lower bound are refined with the other held fixed.
    """
    l2 = spec.replace(lp=2.0, search="golden")
    lo, hi = mse(x, view, l2, mask)
    if spec.scheme != "asymmetric":
        return lo, hi
    lo_a = jnp.full(jnp.shape(lo), 1.0 / spec.num_candidates, jnp.float32)
    one = jnp.ones_like(lo_a)
    lo_min, hi_max = minmax(x, view, spec, mask)
    a_hi = _golden_search(
        lambda a: _lp_error(x, lo, hi_max * a, view, l2, mask), lo_a, one, spec.search_iters
    )
    hi = hi_max * a_hi
    a_lo = _golden_search(
        lambda a: _lp_error(x, lo_min * a, hi, view, l2, mask), lo_a, one, spec.search_iters
    )
    return lo_min * a_lo, hi


def _range_of_step(x, s, view: View, spec: QuantSpec, mask=None):
    """The range a step ``s`` spans on the spec's grid (inverse of qparams_from_range)."""
    qmin, qmax = grid_bounds(spec.bits, spec.scheme)
    if spec.scheme == "symmetric":
        return -s * qmax, s * qmax
    if spec.scheme == "unsigned":
        return jnp.zeros_like(s), s * qmax
    width = s * (qmax - qmin)
    lo = jnp.clip(minmax(x, view, spec, mask)[0], -width, 0.0)
    return lo, lo + width


def lsq_init(x, view: View, spec: QuantSpec, mask=None):
    """LSQ activation init: ``s = 2 * mean|x| / sqrt(Qp)`` with the signed grid's
    ``Qp = 2^(b-1) - 1`` for every scheme, as the reference code (LSQ's init assumes a signed
    grid; on an unsigned grid ``2^b - 1`` would start the step ``sqrt(2^b - 1) /
    sqrt(2^(b-1) - 1)`` times smaller, 1.46x at 4 bits)."""
    qp = max(2 ** (spec.bits - 1) - 1, 1)
    s = 2.0 * _mean(jnp.abs(x), view, mask) / math.sqrt(qp)
    return _range_of_step(x, jnp.maximum(s, spec.min_scale), view, spec, mask)


def iterative(x, view: View, spec: QuantSpec, mask=None, iters: int = 30):
    """Weight step init: start at ``max|w| / Qp``, then ``s <- <w, q> / <q, q>``.

    ``q = clip(round(w / s), Qn, Qp)``; a fixed-point iteration of least squares in ``s``.
    """
    qmin, qmax = grid_bounds(spec.bits, spec.scheme)
    if mask is not None:  # a padded element is 0: it adds nothing to <w, q> or <q, q>
        x = jnp.where(mask, x, 0.0)
    s0 = jnp.maximum(reduce(jnp.max, jnp.abs(x), view) / qmax, spec.min_scale)

    def body(_, s):
        q = jnp.clip(jnp.round(x / s), qmin, qmax)
        num = reduce(jnp.sum, x * q, view)
        den = reduce(jnp.sum, q * q, view)
        return jnp.where(den > 0, jnp.maximum(num / jnp.maximum(den, 1e-30), spec.min_scale), s)

    s = jax.lax.fori_loop(0, iters, body, s0)
    return _range_of_step(x, s, view, spec, mask)


ESTIMATOR_FNS = {
    "current_minmax": minmax,
    "minmax": minmax,
    "running_minmax": minmax,
    "percentile": percentile,
    "mse": mse,
    "omse": omse,
    "mean_std": mean_std,
    "lsq_init": lsq_init,
    "iterative": iterative,
}


def estimate(x, view: View, spec: QuantSpec, mask=None):
    """The batch range of ``x`` (float32, view-shaped) under ``spec.estimator``, over the
    elements where ``mask`` (bool, broadcastable to ``x``; None = all). Per-token ranges
    ignore the mask: each token is its own group."""
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    if spec.granularity == "token":
        mask = None
    lo, hi = ESTIMATOR_FNS[spec.estimator](x, view, spec, _valid(x, mask))
    return lo.astype(jnp.float32), hi.astype(jnp.float32)


def accumulate(kind: str, count, old, new, momentum: float, lower: bool):
    """Combines a running range with a batch range; ``count`` = batches seen before this one.

    ``ema``: ``m * old + (1 - m) * new``; ``mean``: running average; ``extreme``: running
    min (``lower``) or max; ``last``: the batch value. The first batch initialises.
    """
    if kind == "ema":
        upd = momentum * old + (1.0 - momentum) * new
    elif kind == "mean":
        upd = old + (new - old) / (count + 1).astype(jnp.float32)
    elif kind == "extreme":
        upd = jnp.minimum(old, new) if lower else jnp.maximum(old, new)
    else:
        upd = new
    return jnp.where(count == 0, new, upd)
