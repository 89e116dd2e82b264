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


def np_iterative(w, qmin, qmax, iters=30):
    s = np.abs(w).max() / qmax
    for _ in range(iters):
        q = np.clip(np.round(w / s), qmin, qmax)
        s = np.sum(w * q) / np.sum(q * q)
    return s


def test_iterative_weight_init():
    spec = QuantSpec(bits=3, scheme="symmetric", estimator="iterative")
    lo, hi = run(spec)
    np.testing.assert_allclose(hi / 3, np_iterative(X.astype(np.float64), -4, 3), rtol=1e-4)
    spec = spec.replace(granularity="channel")
    lo, hi = run(spec)
    np.testing.assert_allclose(
        hi[0, 7] / 3, np_iterative(X[:, 7].astype(np.float64), -4, 3), rtol=1e-4
    )


def test_accumulators():
    old, new = jnp.float32(2.0), jnp.float32(4.0)
    assert float(accumulate("ema", jnp.int32(0), old, new, 0.9, False)) == 4.0
    assert float(accumulate("ema", jnp.int32(3), old, new, 0.9, False)) == pytest.approx(2.2)
    assert float(accumulate("mean", jnp.int32(1), old, new, 0.9, False)) == pytest.approx(3.0)
    assert float(accumulate("extreme", jnp.int32(1), old, new, 0.9, True)) == 2.0
    assert float(accumulate("last", jnp.int32(1), old, new, 0.9, True)) == 4.0
