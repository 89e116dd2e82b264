"""Range estimators: a tensor (in its granularity view) -> a range ``(lo, hi)``.

Every estimator is a pure, jit-safe function ``f(x, view, spec) -> (lo, hi)`` whose outputs
have the view's reduced shape (a scalar for per-tensor). Estimators that produce a step
(``lsq_init``, ``iterative``) return the range that step spans, so that
:func:`qtx.quant.ranges.qparams_from_range` gives the step back exactly.

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


def minmax(x, view: View, spec: QuantSpec):
    """``(min x, max x)`` over the view's reduce axes."""
    return reduce(jnp.min, x, view), reduce(jnp.max, x, view)


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


def _order_statistics(flat, k: int):
    """``(x_(k), x_(k+1))``, the k-th and next smallest along the last axis (0-indexed).

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


def percentile(x, view: View, spec: QuantSpec):
    """``(P_{100-p}(x), P_p(x))``, or with ``percentile_of='abs'`` ``t = P_p(|x|)`` and
    ``(max(min x, -t), min(max x, t))``; linear interpolation, as ``numpy.percentile``."""
    flat = _flatten_reduced(x, view)
    if spec.percentile_of == "abs":
        t = _percentile_last(jnp.abs(flat), spec.percentile)
        lo = jnp.maximum(jnp.min(flat, axis=-1), -t)
        hi = jnp.minimum(jnp.max(flat, axis=-1), t)
    else:
        lo = _percentile_last(flat, 100.0 - spec.percentile)
        hi = _percentile_last(flat, spec.percentile)
    return _restore(lo, x, view), _restore(hi, x, view)


def mean_std(x, view: View, spec: QuantSpec):
    """``mean -/+ k_sigma * std`` (population std)."""
    mu = reduce(jnp.mean, x, view)
    sd = reduce(jnp.std, x, view)
    return mu - spec.k_sigma * sd, mu + spec.k_sigma * sd


def _lp_error(x, lo, hi, view: View, spec: QuantSpec):
    """``sum |x - Q(x; lo, hi)|^p`` over the reduce axes (keepdims or scalar)."""
    err = jnp.abs(fake_quant_range(x, lo, hi, spec) - x) ** spec.lp
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


def mse(x, view: View, spec: QuantSpec):
    """Shrinks the min-max range by a factor ``a`` minimising the Lp quantization error.

    ``search='grid'`` tries ``a = i / num_candidates`` for ``i = 1..num_candidates``;
    ``search='golden'`` runs golden-section search on ``a`` in ``[1/num_candidates, 1]``.
    Per-channel views search one factor per channel.
    """
    lo0, hi0 = minmax(x, view, spec)

    def err(a):
        return _lp_error(x, lo0 * a, hi0 * a, view, spec)

    if spec.search == "golden":
        lo_a = jnp.full(jnp.shape(lo0), 1.0 / spec.num_candidates, jnp.float32)
        a = _golden_search(err, lo_a, jnp.ones_like(lo_a), spec.search_iters)
        return lo0 * a, hi0 * a
    n = spec.num_candidates
    cands = jnp.arange(1, n + 1, dtype=jnp.float32) / n
    errs = jax.lax.map(err, cands)  # (n, *range_shape), one candidate at a time
    best = cands[jnp.argmin(errs, axis=0)]
    return lo0 * best, hi0 * best


def omse(x, view: View, spec: QuantSpec):
    """Golden-section search on the L2 error (OMSE), then each bound refined separately.

    The shared shrink factor is found first; for asymmetric grids the upper and then the
    lower bound are refined with the other held fixed.
    """
    l2 = spec.replace(lp=2.0, search="golden")
    lo, hi = mse(x, view, l2)
    if spec.scheme != "asymmetric":
        return lo, hi
    lo_a = jnp.full(jnp.shape(lo), 1.0 / spec.num_candidates, jnp.float32)
    one = jnp.ones_like(lo_a)
    _, hi_max = minmax(x, view, spec)
    a_hi = _golden_search(
        lambda a: _lp_error(x, lo, hi_max * a, view, l2), lo_a, one, spec.search_iters
    )
    hi = hi_max * a_hi
    lo_min, _ = minmax(x, view, spec)
    a_lo = _golden_search(
        lambda a: _lp_error(x, lo_min * a, hi, view, l2), lo_a, one, spec.search_iters
    )
    return lo_min * a_lo, hi


def _range_of_step(x, s, view: View, spec: QuantSpec):
    """The range a step ``s`` spans on the spec's grid (inverse of qparams_from_range)."""
    qmin, qmax = grid_bounds(spec.bits, spec.scheme)
    if spec.scheme == "symmetric":
        return -s * qmax, s * qmax
    if spec.scheme == "unsigned":
        return jnp.zeros_like(s), s * qmax
    width = s * (qmax - qmin)
    lo = jnp.clip(reduce(jnp.min, x, view), -width, 0.0)
    return lo, lo + width


def lsq_init(x, view: View, spec: QuantSpec):
    """LSQ activation init: ``s = 2 * mean|x| / sqrt(Qp)``."""
    _, qmax = grid_bounds(spec.bits, spec.scheme)
    s = 2.0 * reduce(jnp.mean, jnp.abs(x), view) / math.sqrt(qmax)
    return _range_of_step(x, jnp.maximum(s, spec.min_scale), view, spec)


def iterative(x, view: View, spec: QuantSpec, iters: int = 30):
    """Weight step init: start at ``max|w| / Qp``, then ``s <- <w, q> / <q, q>``.

    ``q = clip(round(w / s), Qn, Qp)``; a fixed-point iteration of least squares in ``s``.
    """
    qmin, qmax = grid_bounds(spec.bits, spec.scheme)
    s0 = jnp.maximum(reduce(jnp.max, jnp.abs(x), view) / qmax, spec.min_scale)

    def body(_, s):
        q = jnp.clip(jnp.round(x / s), qmin, qmax)
        num = reduce(jnp.sum, x * q, view)
        den = reduce(jnp.sum, q * q, view)
        return jnp.where(den > 0, jnp.maximum(num / jnp.maximum(den, 1e-30), spec.min_scale), s)

    s = jax.lax.fori_loop(0, iters, body, s0)
    return _range_of_step(x, s, view, spec)


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


def estimate(x, view: View, spec: QuantSpec):
    """The batch range of ``x`` (float32, view-shaped) under ``spec.estimator``."""
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    lo, hi = ESTIMATOR_FNS[spec.estimator](x, view, spec)
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
