"""Fake-quant forward values against NumPy, STE / LSQ / LSQ+ gradients against their
closed forms (including the clip boundaries), and the gradient scales of learnable steps."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qtx.quant as q
from qtx.quant import QuantSpec, binary_quant, grid_bounds, qparams_from_range, uniform_quant
from qtx.quant.primitives import grad_scale_value
from qtx.quant.ranges import fake_quant_range


def np_fake_quant(x, lo, hi, bits, scheme):
    """Definition of the three uniform schemes (docs/methods.md §0)."""
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
    # XLA:CPU computes v = x / s as x * (1/s) in float32 (the reciprocal of the float32
    # step), the reference x / s in float64: the two v differ by about an ulp, which flips a
    # rounding that lies that close to .5 by one step; only at high bit widths is v large
    # enough (few fractional bits left) for that to happen to random inputs.
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
    # closed form evaluated on the same float32 v the op sees: XLA:CPU's (x - beta) * (1/s)
    v32 = ((x - np.float32(beta)) * (np.float32(1) / np.float32(s))).astype(np.float64)
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


def test_grid_integers_use_the_reciprocal_of_the_step():
    """XLA:CPU computes ``v = x / s`` as ``x * (1/s)`` with the float32 reciprocal: on inputs
    within a few ulps of the ``.5`` boundaries, where the two disagree, the op follows the
    reciprocal (the numerics the NumPy references and the integer codes assume on CPU)."""
    s = np.float32(0.3)
    mids = ((np.arange(-8, 8) + 0.5) * s).astype(np.float32)
    x = np.concatenate([mids + np.float32(d) * np.spacing(mids) for d in range(-4, 5)])
    by_recip = np.clip(np.round(x * (np.float32(1) / s)), -128, 127)
    by_div = np.clip(np.round(x / s), -128, 127)
    assert np.any(by_recip != by_div)  # the inputs do tell the two apart
    y = uniform_quant(jnp.asarray(x), jnp.float32(s), 0.0, -128, 127, jnp.float32(0))
    np.testing.assert_array_equal(np.asarray(y), (by_recip * s).astype(np.float32))


@pytest.mark.parametrize(
    "x_shape,s_shape,o_shape",
    [
        ((40,), (), ()),  # 1-D, per tensor
        ((4, 6, 8), (4, 6, 1), (4, 6, 1)),  # per token
        ((2, 3, 4, 5), (1, 3, 1, 1), (1, 3, 1, 1)),  # per head
        ((4, 6, 8), (4, 6, 1), ()),  # per-token step, per-tensor offset
        ((6, 8), (1, 8), (1, 8)),  # per channel of the last axis (column sums)
    ],
)
def test_step_and_offset_gradients_per_granularity(x_shape, s_shape, o_shape):
    """``d/ds`` and ``d/dbeta`` summed to the step's and the offset's own shapes."""
    qmin, qmax, g = -4, 3, 0.37
    rng = np.random.default_rng(11)
    x = (rng.normal(size=x_shape) * 2).astype(np.float32)
    ct = rng.normal(size=x_shape).astype(np.float32)
    s = rng.uniform(0.2, 0.5, size=s_shape).astype(np.float32)
    beta = rng.uniform(-0.3, 0.3, size=o_shape).astype(np.float32)

    def f(s, beta):
        y = uniform_quant(jnp.asarray(x), s, beta, qmin, qmax, jnp.float32(g))
        return jnp.sum(jnp.asarray(ct) * y)

    ds, db = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(s), jnp.asarray(beta))
    v = ((x - beta) * (np.float32(1) / s)).astype(np.float64)
    inside = (v >= qmin) & (v <= qmax)
    assert not inside.all()
    q = np.clip(np.round(v), qmin, qmax)
    want_s = ct * np.where(inside, q - v, q) * g
    want_b = ct * np.where(inside, 0.0, 1.0) * g
    for got, want, shape in ((ds, want_s, s_shape), (db, want_b, o_shape)):
        lead = len(x_shape) - len(shape)
        axes = (*range(lead), *(lead + i for i, n in enumerate(shape) if n == 1))
        want = want.sum(axis=axes).reshape(shape)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU buffer assignment")
@pytest.mark.parametrize("s_shape", [(), (256, 1)])
def test_lsq_backward_keeps_no_full_size_temporary(s_shape):
    """Forward + backward of a learnable step and offset (per tensor or per row) read ``x``
    and the cotangent and write ``y`` and ``dx``: ``v``, the clip mask and the per-element
    step gradient fuse into those loops and into the sums, so XLA keeps no temporary of
    ``x``'s size (a plain reduce's operand would be materialised)."""
    x = jnp.ones((256, 256), jnp.float32)
    s, beta = jnp.full(s_shape, 0.3), jnp.full(s_shape, 0.1)

    def fwd_bwd(x, ct, s, beta):
        f = lambda x, s, b: uniform_quant(x, s, b, -8, 7, jnp.float32(0.1))  # noqa: E731
        y, pull = jax.vjp(f, x, s, beta)
        return y, *pull(ct)

    mem = jax.jit(fwd_bwd).lower(x, x, s, beta).compile().memory_analysis()
    assert mem is not None  # XLA:CPU reports it
    assert mem.temp_size_in_bytes < x.nbytes // 8


W = np.random.default_rng(5).normal(size=(6, 10)).astype(np.float32)


@pytest.mark.parametrize(
    "kind,num_scales,qmax,want",
    [
        # LSQ: 1 / sqrt(N * Qp), N = elements per step
        ("lsq", 1, 7, 1 / math.sqrt(60 * 7)),
        ("lsq", 10, 7, 1 / math.sqrt(6 * 7)),
        ("lsq", 6, 255, 1 / math.sqrt(10 * 255)),
        # Quantization Variation, activations: 1 / (Qp * sqrt(N))
        ("act_qv", 1, 15, 1 / (15 * math.sqrt(60))),
        ("act_qv", 10, 7, 1 / (7 * math.sqrt(6))),
        # Quantization Variation, weights: 1 / sqrt(Qp * ||W||_1)
        ("weight_l1", 1, 7, 1 / math.sqrt(7 * float(np.abs(W.astype(np.float64)).sum()))),
        ("weight_l1", 1, 1, 1 / math.sqrt(float(np.abs(W.astype(np.float64)).sum()))),
        ("none", 1, 7, 1.0),
        ("none", 10, 127, 1.0),
        (0.125, 1, 7, 0.125),
        (3, 10, 7, 3.0),
    ],
)
def test_grad_scale_value_formulas(kind, num_scales, qmax, want):
    got = grad_scale_value(kind, jnp.asarray(W), num_scales, qmax)
    assert got.shape == ()
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


class Point(nn.Module):
    plan: q.QuantPlan
    kind: str = "act"

    @nn.compact
    def __call__(self, x):
        return q.QuantPoint(self.plan, self.kind, name="x")(x)


def np_grad_scale(kind, x, num_scales, qp):
    """The gradient scales written out: N = x.size / num_scales elements share a step."""
    n = x.size / num_scales
    if kind == "lsq":
        return 1 / math.sqrt(n * qp)
    if kind == "act_qv":
        return 1 / (qp * math.sqrt(n))
    if kind == "weight_l1":
        return 1 / math.sqrt(qp * np.abs(x.astype(np.float64)).sum())
    return 1.0 if kind == "none" else float(kind)


@pytest.mark.parametrize(
    "kind,scheme,learn,granularity,grad_scale",
    [
        ("act", "symmetric", "lsq", "tensor", "lsq"),
        ("act", "unsigned", "lsq+", "tensor", "act_qv"),
        ("weight", "symmetric", "lsq", "tensor", "weight_l1"),
        ("weight", "symmetric", "lsq", "channel", "lsq"),
        ("act", "asymmetric", "lsq+", "channel", "none"),
        ("act", "symmetric", "lsq+", "tensor", 0.3),
    ],
)
def test_point_step_and_offset_gradients_are_closed_form_times_g(
    kind, scheme, learn, granularity, grad_scale
):
    """Through a QuantPoint in ``learn`` mode, per element with ``v = (x - beta) / s``:
    ``dx_hat/ds = round(v) - v`` inside, ``qmin`` below, ``qmax`` above;
    ``dx_hat/dbeta = 0`` inside, ``1`` clipped; both summed per step and multiplied by g."""
    spec = dict(bits=4, scheme=scheme, learn=learn, granularity=granularity)
    rule = q.rule(".", kind, estimator="minmax", grad_scale=grad_scale, **spec)
    plan = q.QuantPlan((rule,), mode="learn")
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(12, 5)) * 2).astype(np.float32)
    ct = rng.normal(size=x.shape).astype(np.float32)
    qmin, qmax = grid_bounds(4, scheme)
    m = Point(plan, kind)
    params = m.init(jax.random.key(0), jnp.asarray(x))["params"]
    assert ("offset" in params["x"]) == (learn == "lsq+")
    # steps (one per column when per channel) small enough that both ends of the grid clip
    s = np.float32(0.23)
    if granularity == "channel":
        s = (0.21 + 0.02 * np.arange(5, dtype=np.float32)).reshape(1, 5)
    params = {"x": {"step": jnp.asarray(s)}}
    beta = np.float32(0.0)
    if learn == "lsq+":
        beta = np.asarray(-0.5 * (qmin + qmax) * s + 0.1, np.float32)
        params["x"]["offset"] = jnp.asarray(beta)

    def loss(p):
        return jnp.sum(jnp.asarray(ct) * m.apply({"params": p}, jnp.asarray(x)))

    grads = jax.jit(jax.grad(loss))(params)["x"]
    v = (x - beta) * (np.float32(1) / s)  # float32, as the op computes it
    below, above = v < qmin, v > qmax
    assert below.any() and above.any() and (~below & ~above).any()
    ds_el = np.where(below, qmin, np.where(above, qmax, np.round(v) - v)).astype(np.float64)
    db_el = (below | above).astype(np.float64)
    axis = 0 if granularity == "channel" else None
    n_scales = 5 if granularity == "channel" else 1
    g = np_grad_scale(grad_scale, x, n_scales, qmax)
    want_s = g * np.sum(ct * ds_el, axis=axis)
    np.testing.assert_allclose(
        np.asarray(grads["step"]).reshape(-1), np.reshape(want_s, -1), rtol=1e-4, atol=1e-6
    )
    if learn == "lsq+":
        want_b = g * np.sum(ct * db_el, axis=axis)
        assert np.all(np.abs(want_b) > 1e-3)
        np.testing.assert_allclose(
            np.asarray(grads["offset"]).reshape(-1), np.reshape(want_b, -1), rtol=1e-4, atol=1e-6
        )
