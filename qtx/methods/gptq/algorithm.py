"""GPTQ's rounding of one kernel (Frantar et al., ICLR 2023; docs/methods.md §5), NumPy float64.

Our kernels are (in, out), so GPTQ's weight *columns* (one per input) are our kernel *rows*.
With the layer-input Hessian ``H = 2 X^T X / n`` (in, in) of the calibration rows ``X``
(n, in), GPTQ minimises ``||X W - X Q||^2`` one input row at a time:

* dead inputs (``H_ii = 0``) get ``H_ii = 1`` and a zero weight row;
* optional act-order: rows are visited by descending ``H_ii`` (undone at the end);
* damping ``H += lambda I``, ``lambda = damp * mean(diag H)``;
* ``U`` = the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``);
* for each row ``i`` in order: ``q_i = Q(w_i)``, ``e_i = (w_i - q_i) / U_ii`` and every later
  row ``w_j -= U_ij e_i``. Rows are processed in blocks of ``block_size``: inside a block the
  update is applied row by row, the rows after the block get the block's errors in one
  product ``W[i2:] -= U[i1:i2, i2:]^T E`` (the lazy batch update; the same result).

``Q`` is a :class:`Grid`: the quantizer of the *original* weight, fixed per element (per
output channel, or per input group and output channel: "static groups", ranges are never
recomputed from the updated weight), ``Q(w) = clip(round(w / s), kmin, kmax) * s``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from qtx.quant import estimators
from qtx.quant.primitives import grid_bounds
from qtx.quant.ranges import from_view, make_view, qparams_from_range, to_view
from qtx.quant.spec import QuantSpec

DAMP_RETRIES = 4  # a Cholesky factorisation that fails is retried with 10x the damping


@dataclasses.dataclass(frozen=True)
class Grid:
    """A fixed quantizer per kernel element: ``scale``, ``kmin``, ``kmax`` float64 (in, out),
    ``Q(w) = clip(round(w / scale), kmin, kmax) * scale`` (``kmin = qmin - z``, ``kmax =
    qmax - z``: the shifted grid of :func:`qtx.quant.ranges.fake_quant_range`)."""

    scale: np.ndarray
    kmin: np.ndarray
    kmax: np.ndarray

    def quantize(self, w: np.ndarray, rows=slice(None)) -> np.ndarray:
        """``Q(w)`` for ``w`` holding the kernel rows ``rows`` (any index of axis 0)."""
        s = self.scale[rows]
        return np.clip(np.round(w / s), self.kmin[rows], self.kmax[rows]) * s

    def permuted(self, perm: np.ndarray) -> Grid:
        return Grid(self.scale[perm], self.kmin[perm], self.kmax[perm])


def weight_range(kernel, spec: QuantSpec, where: str = "?"):
    """``(lo, hi)`` of the weight point of ``spec`` for ``kernel`` (in, out), float32, in the
    point's view shape (what its ``quant_stats`` hold): ``(1, out)`` per channel, ``(in / g,
    1, out)`` per group of ``g`` input rows, scalars per tensor."""
    x = jnp.asarray(kernel, jnp.float32)
    view = make_view(x.shape, spec, channel_axis=-1, where=where)
    return estimators.estimate(to_view(x, view), view, spec)


def weight_grid(kernel, spec: QuantSpec, lo, hi, where: str = "?") -> Grid:
    """The :class:`Grid` a weight point with range ``(lo, hi)`` (from :func:`weight_range`)
    quantizes ``kernel`` (in, out) with; the scale is the point's own float32 value."""
    shape = tuple(np.shape(kernel))
    view = make_view(shape, spec, channel_axis=-1, where=where)
    s, z = qparams_from_range(lo, hi, spec)
    qmin, qmax = grid_bounds(spec.bits, spec.scheme)

    def full(a):
        a = jnp.broadcast_to(jnp.asarray(a, jnp.float32), view.view_shape)
        return np.asarray(from_view(a, view), np.float64)

    z = full(z)
    return Grid(full(s), qmin - z, qmax - z)


def inverse_cholesky(h: np.ndarray, damp: float) -> tuple[np.ndarray, float]:
    """``(U, damp used)``: the upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``
    (float64), without forming the inverse: with ``J`` the reversal permutation and ``J H J
    = L L^T``, ``H = (J L J)(J L J)^T`` with ``J L J`` upper triangular, so ``H^-1 = U^T U``
    for ``U = (J L J)^-1 = J L^-1 J`` (upper, positive diagonal). A factorisation that fails
    (not positive definite) is retried with 10x the damping, at most :data:`DAMP_RETRIES`
    times."""
    n = h.shape[0]
    mean_diag = float(np.mean(np.diag(h)))
    for _ in range(DAMP_RETRIES + 1):
        reversed_h = h[::-1, ::-1] + damp * mean_diag * np.eye(n)
        lower, bad = lapack.dpotrf(reversed_h, lower=True)
        if not bad:
            inv_lower, bad = lapack.dtrtri(lower, lower=True)
            if not bad:
                return np.ascontiguousarray(inv_lower[::-1, ::-1]), damp
        damp *= 10.0
    raise np.linalg.LinAlgError(f"the Hessian is not positive definite even with damping {damp}")


def gptq_round(
    w,
    h,
    grid: Grid,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> tuple[np.ndarray, dict]:
    """GPTQ-rounded kernel (in, out) float64 (on ``grid``) and ``{"damp": damping used,
    "dead": dead inputs}``. ``w`` (in, out), ``h`` (in, in) the Hessian ``2 X^T X / n``.

    BLAS runs on one thread here: next to XLA's busy thread pool a multi-threaded OpenBLAS
    factorisation is ~20x slower on CPU (measured on MiniLM's 384 / 1536-wide kernels)."""
    with threadpool_limits(1, user_api="blas"):
        return _gptq_round(w, h, grid, block_size, damp, act_order)


def _gptq_round(w, h, grid: Grid, block_size: int, damp: float, act_order: bool):
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    n = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, h, grid = w[perm], h[perm][:, perm], grid.permuted(perm)
    u, used = inverse_cholesky(h, damp)
    q = np.zeros_like(w)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        block = w[i1:i2].copy()
        errs = np.zeros_like(block)
        ub = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            qi = grid.quantize(block[i], i1 + i)
            q[i1 + i] = qi
            errs[i] = (block[i] - qi) / ub[i, i]
            block[i + 1 :] -= np.outer(ub[i, i + 1 :], errs[i])
        w[i2:] -= u[i1:i2, i2:].T @ errs
    q = q[np.argsort(perm)]
    return q, {"damp": used, "dead": int(dead.sum())}


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """``tr((W - Q)^T H (W - Q))`` = ``2/n ||X W - X Q||^2`` for ``H = 2 X^T X / n``."""
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.sum(d * (np.asarray(h, np.float64) @ d)))
