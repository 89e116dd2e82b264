"""Range estimators against NumPy definitions, per tensor and per channel / group / head."""

import jax.numpy as jnp
import numpy as np
import pytest

from qtx.quant import QuantSpec
from qtx.quant.estimators import accumulate, estimate
from qtx.quant.ranges import fake_quant_range, make_view, to_view

RNG = np.random.default_rng(0)
X = (RNG.standard_t(df=3, size=(16, 24)) * 0.7).astype(np.float32)


def run(spec, x=X, channel_axis=-1, head_axis=None):
    view = make_view(x.shape, spec, channel_axis, head_axis, "t")
    lo, hi = estimate(to_view(jnp.asarray(x), view), view, spec)
    return np.asarray(lo), np.asarray(hi)


def test_minmax_per_tensor_and_per_channel():
    lo, hi = run(QuantSpec(estimator="minmax"))
    assert lo.shape == () and lo == X.min() and hi == X.max()
    lo, hi = run(QuantSpec(estimator="minmax", granularity="channel"))
    np.testing.assert_array_equal(lo[0], X.min(0))
    np.testing.assert_array_equal(hi[0], X.max(0))
    lo, hi = run(QuantSpec(estimator="minmax", granularity="channel", axis=0))
    np.testing.assert_array_equal(hi[:, 0], X.max(1))


def test_group_and_token_granularity():
    lo, hi = run(QuantSpec(estimator="minmax", granularity="group", group_size=6))
    want = X.reshape(16, 4, 6).max(axis=(0, 2))
    np.testing.assert_array_equal(hi.reshape(-1), want)
    lo, hi = run(QuantSpec(estimator="current_minmax", granularity="token"))
    np.testing.assert_array_equal(hi[:, 0], X.max(1))


def test_head_granularity_uses_point_head_axis():
    x = RNG.normal(size=(2, 5, 3, 4)).astype(np.float32)  # (B, T, H, Dh)
    lo, hi = run(QuantSpec(estimator="minmax", granularity="head"), x, head_axis=2)
    np.testing.assert_array_equal(hi.reshape(-1), x.max(axis=(0, 1, 3)))


def test_percentile_matches_numpy():
    spec = QuantSpec(estimator="percentile", percentile=99.0)
    lo, hi = run(spec)
    np.testing.assert_allclose(lo, np.percentile(X, 1.0), rtol=1e-5)
    np.testing.assert_allclose(hi, np.percentile(X, 99.0), rtol=1e-5)
    lo, hi = run(spec.replace(granularity="channel"))
    np.testing.assert_allclose(hi[0], np.percentile(X, 99.0, axis=0), rtol=1e-5)


@pytest.mark.parametrize("q", [0.0, 0.001, 12.5, 50.0, 99.9, 99.999, 100.0])
def test_percentile_selection_is_exact(q):
    """The radix-select percentile equals numpy's, with ties, signed zeros and negatives, and
    with an index that float32 cannot hold (n - 1 = 2^24 + 2)."""
    from qtx.quant.estimators import _percentile_last

    rng = np.random.default_rng(3)
    ties = np.round(rng.normal(size=(3, 1001)) * 3).astype(np.float32)
    ties[0, :5] = -0.0
    got = np.asarray(_percentile_last(jnp.asarray(ties), q))
    np.testing.assert_allclose(got, np.percentile(ties, q, axis=-1), rtol=1e-6, atol=1e-6)
    if q in (99.9, 50.0):
        big = rng.standard_t(3, size=(2**24 + 3,)).astype(np.float32)
        got = float(_percentile_last(jnp.asarray(big), q))
        assert got == pytest.approx(float(np.percentile(big.astype(np.float64), q)), rel=1e-6)


def test_mean_std():
    lo, hi = run(QuantSpec(estimator="mean_std", k_sigma=2.5))
    np.testing.assert_allclose(hi, X.mean() + 2.5 * X.std(), rtol=1e-5)
    np.testing.assert_allclose(lo, X.mean() - 2.5 * X.std(), rtol=1e-5)


def np_err(x, lo, hi, spec):
    return float(
        np.sum(np.abs(np.asarray(fake_quant_range(jnp.asarray(x), lo, hi, spec)) - x) ** spec.lp)
    )


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_mse_grid_matches_brute_force(scheme):
    spec = QuantSpec(bits=4, scheme=scheme, estimator="mse", num_candidates=50)
    lo, hi = run(spec)
    errs = [np_err(X, X.min() * a, X.max() * a, spec) for a in np.arange(1, 51) / 50]
    best = (np.argmin(errs) + 1) / 50
    np.testing.assert_allclose(hi, X.max() * best, rtol=1e-5)
    np.testing.assert_allclose(lo, X.min() * best, rtol=1e-5)


def test_mse_lp_and_per_channel():
    spec = QuantSpec(
        bits=3,
        scheme="symmetric",
        estimator="mse",
        num_candidates=20,
        lp=2.4,
        granularity="channel",
    )
    lo, hi = run(spec)
    for c in (0, 5, 23):
        col = X[:, c : c + 1]
        s1 = spec.replace(granularity="tensor")
        errs = [np_err(col, col.min() * a, col.max() * a, s1) for a in np.arange(1, 21) / 20]
        np.testing.assert_allclose(hi[0, c], col.max() * (np.argmin(errs) + 1) / 20, rtol=1e-5)


def test_golden_and_omse_not_worse_than_grid():
    grid = QuantSpec(bits=4, scheme="asymmetric", estimator="mse", num_candidates=100)
    g_lo, g_hi = run(grid)
    e_grid = np_err(X, g_lo, g_hi, grid)
    lo, hi = run(grid.replace(search="golden", search_iters=40))
    assert np_err(X, lo, hi, grid) <= e_grid * 1.02
    lo, hi = run(grid.replace(estimator="omse", search_iters=40))
    assert np_err(X, lo, hi, grid) <= e_grid * 1.02
    assert np_err(X, lo, hi, grid) < np_err(X, X.min(), X.max(), grid)


def test_lsq_init_step():
    spec = QuantSpec(bits=4, scheme="symmetric", estimator="lsq_init")
    lo, hi = run(spec)
    s = 2 * np.mean(np.abs(X)) / np.sqrt(7)
    np.testing.assert_allclose(hi, s * 7, rtol=1e-5)
    np.testing.assert_allclose(lo, -s * 7, rtol=1e-5)


def lsq_error(w, s, qmin, qmax):
    """``||w - s * clip(round(w / s), qmin, qmax)||^2`` for each step in ``s``."""
    s = np.asarray(s, np.float64)[..., None]
    return np.sum((w - s * np.clip(np.round(w / s), qmin, qmax)) ** 2, axis=-1)


def least_squares_step(w, s, qmin, qmax):
    """The step that best fits ``w`` with the integers ``q = clip(round(w / s))`` held fixed:
    ``argmin_t ||w - t q||^2 = <w, q> / <q, q>``."""
    qq = np.clip(np.round(w / s), qmin, qmax)
    return np.dot(w, qq) / np.dot(qq, qq)


@pytest.mark.parametrize("bits", [2, 3])
def test_iterative_per_tensor_is_the_least_squares_step(bits):
    """The step is a fixed point ``s = <w, q(s)> / <q(s), q(s)>`` and, on this tensor, the
    minimiser of ``||w - s q(s)||^2`` found by brute force over 20k steps."""
    spec = QuantSpec(bits=bits, scheme="symmetric", estimator="iterative")
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = run(spec)
    s = float(hi) / qmax
    np.testing.assert_allclose(lo, -hi, rtol=1e-6)
    w = X.astype(np.float64).reshape(-1)
    np.testing.assert_allclose(least_squares_step(w, s, qmin, qmax), s, rtol=1e-5)
    s0 = np.abs(w).max() / qmax
    grid = np.linspace(s0 / 50, 1.2 * s0, 20_000)
    errs = lsq_error(w, grid, qmin, qmax)
    best = grid[np.argmin(errs)]
    assert float(lsq_error(w, s, qmin, qmax)) <= errs.min() * (1 + 1e-6)
    np.testing.assert_allclose(s, best, rtol=2 * (grid[1] - grid[0]) / best)


@pytest.mark.parametrize("scheme", ["symmetric", "unsigned"])
def test_iterative_per_channel_steps_are_fixed_points(scheme):
    """Per channel: every step satisfies ``s = <w, q(s)> / <q(s), q(s)>`` on its own column
    and has no larger error than the start ``max|w| / Qp``."""
    x = np.abs(X) if scheme == "unsigned" else X
    spec = QuantSpec(bits=3, scheme=scheme, estimator="iterative", granularity="channel")
    qmin, qmax = (-4, 3) if scheme == "symmetric" else (0, 7)
    lo, hi = run(spec, x)
    assert hi.shape == (1, 24)
    steps = hi[0].astype(np.float64) / qmax
    np.testing.assert_allclose(lo[0], -hi[0] if scheme == "symmetric" else 0.0, rtol=1e-6)
    for c in range(24):
        w = x[:, c].astype(np.float64)
        s = steps[c]
        np.testing.assert_allclose(least_squares_step(w, s, qmin, qmax), s, rtol=1e-5)
        assert lsq_error(w, s, qmin, qmax) <= lsq_error(w, np.abs(w).max() / qmax, qmin, qmax)


def test_accumulators():
    old, new = jnp.float32(2.0), jnp.float32(4.0)
    assert float(accumulate("ema", jnp.int32(0), old, new, 0.9, False)) == 4.0
    assert float(accumulate("ema", jnp.int32(3), old, new, 0.9, False)) == pytest.approx(2.2)
    assert float(accumulate("mean", jnp.int32(1), old, new, 0.9, False)) == pytest.approx(3.0)
    assert float(accumulate("extreme", jnp.int32(1), old, new, 0.9, True)) == 2.0
    assert float(accumulate("last", jnp.int32(1), old, new, 0.9, True)) == 4.0
