"""Fake-quant forward values against NumPy, and STE / LSQ / LSQ+ gradients against their
closed forms, including the clip boundaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx.quant import QuantSpec, binary_quant, grid_bounds, qparams_from_range, uniform_quant
from qtx.quant.ranges import fake_quant_range


def np_fake_quant(x, lo, hi, bits, scheme):
    """Definition of the three uniform schemes (REFERENCE.md §1-3)."""
    if scheme == "symmetric":
        qp = 2 ** (bits - 1) - 1
        s = max(abs(lo), abs(hi)) / qp
        return np.clip(np.round(x / s), -(2 ** (bits - 1)), qp) * s
    if scheme == "unsigned":
        s = max(hi, 0.0) / (2**bits - 1)
        return np.clip(np.round(x / s), 0, 2**bits - 1) * s
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / (2**bits - 1)
    z = np.clip(np.round(-lo / s), 0, 2**bits - 1)
    return (np.clip(np.round(x / s) + z, 0, 2**bits - 1) - z) * s


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 16])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric", "unsigned"])
def test_uniform_forward_matches_numpy(bits, scheme):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(64, 33)).astype(np.float32) * 3 + (1.0 if scheme == "unsigned" else 0)
    lo, hi = -2.5, 3.7
    spec = QuantSpec(bits=bits, scheme=scheme)
    got = np.asarray(fake_quant_range(jnp.asarray(x), lo, hi, spec))
    want = np_fake_quant(x.astype(np.float64), lo, hi, bits, scheme)
    s = float(qparams_from_range(lo, hi, spec)[0])
    err = np.abs(got - want)
    # float32 arithmetic may flip a rounding that lies within an ulp of .5: one step at most,
    # and only at high bit widths where x/s has few fractional bits left.
    assert err.max() <= s * 1.001 + 1e-6
    assert np.mean(err > 1e-5) <= (1e-3 if bits >= 12 else 0.0)


def test_grid_bounds():
    assert grid_bounds(8, "symmetric") == (-128, 127)
    assert grid_bounds(8, "asymmetric") == (0, 255)
    assert grid_bounds(4, "unsigned") == (0, 15)
    assert grid_bounds(2, "symmetric") == (-2, 1)


def test_asymmetric_range_contains_zero_and_zero_is_exact():
    spec = QuantSpec(bits=8, scheme="asymmetric")
    x = jnp.array([0.0, 1.0, 2.0, 3.0])
    y = fake_quant_range(x, 1.0, 3.0, spec)  # range widened to [0, 3]
    assert float(y[0]) == 0.0
    s, z = qparams_from_range(1.0, 3.0, spec)
    np.testing.assert_allclose(float(s), 3.0 / 255, rtol=1e-6)
    assert float(z) == 0.0
    s, z = qparams_from_range(-1.0, 3.0, spec)
    assert float(z) == round(float(z)) == 64  # integer zero point: round(1 / (4/255))
    y = fake_quant_range(jnp.array([-1.0, 0.0, 3.0]), -1.0, 3.0, spec)
    assert float(y[1]) == 0.0


def _closed_form(x, s, beta, qmin, qmax, g, ct):
    v = (x - beta) / s
    inside = (v >= qmin) & (v <= qmax)
    q = np.clip(np.round(v), qmin, qmax)
    dx = np.where(inside, ct, 0.0)
    ds = np.sum(ct * np.where(inside, q - v, q)) * g
    dbeta = np.sum(ct * np.where(inside, 0.0, 1.0)) * g
    return dx, ds, dbeta


@pytest.mark.parametrize("qmin,qmax", [(-8, 7), (0, 15), (-128, 127)])
def test_lsq_and_lsq_plus_gradients_closed_form(qmin, qmax):
    s, beta, g = 0.25, -0.3, 0.37
    rng = np.random.default_rng(0)
    x = rng.normal(size=200).astype(np.float64) * 3
    # exact clip boundaries and points just outside / inside them
    edges = np.array([qmin, qmax, qmin - 1e-3, qmax + 1e-3, qmin + 1e-3, qmax - 1e-3])
    x = np.concatenate([x, edges * s + beta]).astype(np.float32)
    ct = rng.normal(size=x.shape).astype(np.float32)

    def f(x, s, beta):
        return jnp.sum(jnp.asarray(ct) * uniform_quant(x, s, beta, qmin, qmax, jnp.float32(g)))

    dx, ds, dbeta = jax.grad(f, argnums=(0, 1, 2))(
        jnp.asarray(x), jnp.float32(s), jnp.float32(beta)
    )
    # closed form evaluated on the same float32 v the op sees
    v32 = ((x - np.float32(beta)) / np.float32(s)).astype(np.float64)
    want_dx, want_ds, want_db = _closed_form(v32 * s + beta, s, beta, qmin, qmax, g, ct)
    inside32 = (v32 >= qmin) & (v32 <= qmax)
    np.testing.assert_array_equal(np.asarray(dx) != 0, inside32 & (ct != 0))
    np.testing.assert_allclose(np.asarray(dx), want_dx, atol=1e-6)
    np.testing.assert_allclose(float(ds), want_ds, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(dbeta), want_db, rtol=1e-4, atol=1e-5)
    # the boundary values themselves are inside: d/dx = 1, d/ds = round(v) - v = 0
    for k in (-6, -5):
        assert float(dx[k]) == pytest.approx(float(ct[k]))


def test_ste_plain_clip_gradient():
    """Frozen quantizer: gradient 1 inside the range, 0 outside; no step gradient."""
    spec = QuantSpec(bits=4, scheme="symmetric")
    x = jnp.linspace(-3, 3, 61)
    dx = jax.grad(lambda x: jnp.sum(fake_quant_range(x, -1.4, 1.4, spec)))(x)
    s = 1.4 / 7
    inside = (np.asarray(x) / s >= -8) & (np.asarray(x) / s <= 7)
    np.testing.assert_array_equal(np.asarray(dx), inside.astype(np.float32))


def test_per_channel_scale_gradient_sums_per_channel():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(5, 3)).astype(np.float32))
    s = jnp.asarray([[0.1, 0.2, 0.5]], jnp.float32)
    g = jnp.float32(1.0)
    ds = jax.grad(lambda s: jnp.sum(uniform_quant(x, s, 0.0, -8, 7, g)))(s)
    for c in range(3):
        v = np.asarray(x[:, c]) / float(s[0, c])
        q = np.clip(np.round(v), -8, 7)
        want = np.sum(np.where((v >= -8) & (v <= 7), q - v, q))
        np.testing.assert_allclose(float(ds[0, c]), want, rtol=1e-5, atol=1e-6)


def test_binary_forward_and_ste():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6)).astype(np.float32) * 1.5
    alpha = np.mean(np.abs(x))
    y = binary_quant(jnp.asarray(x), jnp.float32(alpha))
    np.testing.assert_allclose(np.asarray(y), np.where(x >= 0, 1.0, -1.0) * alpha, rtol=1e-6)
    dx = jax.grad(lambda x: jnp.sum(binary_quant(x, jnp.float32(alpha))))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(dx), (np.abs(x) <= 1).astype(np.float32))


def test_uniform_quant_is_jit_safe_and_idempotent():
    f = jax.jit(lambda x: uniform_quant(x, 0.1, 0.0, -128, 127, jnp.float32(0)))
    x = jnp.linspace(-20, 20, 101)
    y = f(x)
    np.testing.assert_allclose(np.asarray(f(y)), np.asarray(y), atol=1e-6)
