"""Quantizer fidelity: padding never enters a range, learnable steps below their floor keep
their gradient, and the LSQ activation init uses the signed grid's Qp (the reference's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from qtx import quant as q
from qtx.evaluate.ptq import calibrate_setup
from qtx.models import build, dummy_inputs, model_config
from qtx.quant.estimators import _index_parts, estimate
from qtx.quant.primitives import grid_bounds
from qtx.quant.ranges import make_view
from qtx.quant.spec import QuantSpec

ESTIMATORS = [
    dict(estimator="minmax"),
    dict(estimator="percentile", percentile=99.0),
    dict(estimator="percentile", percentile=99.0, percentile_of="abs"),
    dict(estimator="mse", num_candidates=40),
    dict(estimator="omse"),
    dict(estimator="mean_std"),
    dict(estimator="lsq_init", scheme="symmetric"),
    dict(estimator="lsq_init", scheme="unsigned"),
    dict(estimator="iterative", scheme="symmetric"),
]


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("settings", ESTIMATORS, ids=lambda d: "-".join(map(str, d.values())))
def test_masked_estimate_is_the_estimate_of_the_real_tokens(settings, granularity):
    """Every estimator over (B, T, D) with a token mask equals it over the real tokens cut
    out first (the reference's padding removal)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 8)).astype(np.float32)
    x *= rng.uniform(0.5, 3.0, (4, 16, 1)).astype(np.float32)
    mask = rng.random((4, 16)) < 0.6
    x[~mask] *= 40.0  # padding far outside the real range
    spec = QuantSpec(bits=4, granularity=granularity, **{"scheme": "asymmetric", **settings})
    lo, hi = estimate(jnp.asarray(x), make_view(x.shape, spec), spec, jnp.asarray(mask)[..., None])
    real = x[mask][None]  # (1, n, D)
    lo2, hi2 = estimate(jnp.asarray(real), make_view(real.shape, spec), spec)
    tol = 2e-3 if "mse" in settings["estimator"] else 1e-5  # searches sum in another order
    np.testing.assert_allclose(np.ravel(lo), np.ravel(lo2), rtol=tol, atol=1e-6)
    np.testing.assert_allclose(np.ravel(hi), np.ravel(hi2), rtol=tol, atol=1e-6)


def test_masked_percentile_matches_numpy_and_empty_groups_are_zero():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 50)).astype(np.float32)
    mask = rng.random((3, 50)) < 0.5
    mask[2] = False
    spec = QuantSpec(estimator="percentile", percentile=90.0, granularity="channel", axis=0)
    lo, hi = estimate(jnp.asarray(x), make_view(x.shape, spec), spec, jnp.asarray(mask))
    for r in range(2):
        np.testing.assert_allclose(float(hi[r, 0]), np.percentile(x[r][mask[r]], 90.0), rtol=1e-6)
        np.testing.assert_allclose(float(lo[r, 0]), np.percentile(x[r][mask[r]], 10.0), rtol=1e-6)
    assert float(lo[2, 0]) == 0.0 and float(hi[2, 0]) == 0.0
    # the interpolation index (n - 1) p of a traced count keeps float64's precision
    for m in (0, 7, 3_000_000, 12_345_678, 2**31 - 1):
        for p in (0.99999, 0.00001, 0.5, 1.0, 0.9999):
            k, frac = _index_parts(jnp.asarray(m, jnp.int32), p)
            assert abs(int(k) + float(frac) - m * p) < 1e-6, (m, p)


_SIZE = dict(
    vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
    max_positions=40,
)  # fmt: skip
TEXT = {"bert": dict(_SIZE, head="mlm"), "opt": dict(_SIZE, init_std=0.1)}


def _padded(ids, lengths, width, pad_id):
    """``ids`` (B, T) cut to ``lengths`` and padded with ``pad_id`` to ``width``."""
    out = np.full((ids.shape[0], width), pad_id, np.int32)
    mask = np.zeros((ids.shape[0], width), np.int32)
    for b, n in enumerate(lengths):
        out[b, :n], mask[b, :n] = ids[b, :n], 1
    return {"input_ids": jnp.asarray(out), "attention_mask": jnp.asarray(mask)}


@pytest.mark.parametrize("family", ["bert", "opt"])
@pytest.mark.parametrize("setup", ["W8A8", "qv_lsq:W4A4"])
def test_padding_does_not_change_calibration(family, setup):
    """The same sentences padded to 12 or to 32 positions calibrate to the same statistics
    (running min-max, percentile, LSQ inits, the attention maps' pairs of real tokens)."""
    name = "bert-tiny" if family == "bert" else "opt-tiny"
    cfg = model_config(name, **TEXT[family])
    model = build(cfg)
    params = jax.jit(model.init)(jax.random.key(0), **dummy_inputs(cfg))["params"]
    rng = np.random.default_rng(2)
    ids = rng.integers(5, cfg.vocab_size, size=(3, 12), dtype=np.int32)
    lengths = [12, 5, 8]
    rules = q.setup_rules(setup)
    if setup == "W8A8":  # a percentile at the softmax too: its zeros at padded keys count
        rules = (q.rule(r"softmax$|ffn/act$", "act", bits=8, estimator="percentile"),) + rules
    plan = q.QuantPlan(rules, mode="quantize")
    stats = []
    for width in (12, 32):
        b = _padded(ids, lengths, width, pad_id=1)
        variables = calibrate_setup(cfg, plan, params, [b])
        stats.append(flatten_dict(variables[q.STATS]))
    keys = [k for k in stats[0] if k[-1] in ("lo", "hi", "learn_step", "learn_offset")]
    assert len(keys) >= 20
    changed = [
        "/".join(k) for k in keys if not np.allclose(stats[0][k], stats[1][k], rtol=1e-5, atol=1e-6)
    ]
    assert changed == []


def test_learnable_step_below_min_scale_keeps_its_gradient():
    """The step floor is straight-through: at 9e-5 < min_scale = 1e-4 the step's gradient is
    the gradient at the floor, not 0 (a frozen quantizer)."""
    spec = dict(bits=4, scheme="symmetric", learn="lsq", estimator="lsq_init", min_scale=1e-4)
    plan = q.QuantPlan((q.rule(".", "act", **spec),), mode="learn")

    class Point(__import__("flax").linen.Module):
        @__import__("flax").linen.compact
        def __call__(self, x):
            return q.QuantPoint(plan, name="x")(x)

    x = jnp.linspace(-1e-3, 1e-3, 64).reshape(8, 8)
    target = jnp.sin(37.0 * x) * 1e-3
    loss = lambda s: jnp.sum((Point().apply({"params": {"x": {"step": s}}}, x) - target) ** 2)  # noqa: E731
    g_floor = float(jax.grad(loss)(jnp.asarray(1e-4)))
    g_below = float(jax.grad(loss)(jnp.asarray(9e-5)))
    assert g_floor != 0.0
    assert g_below == pytest.approx(g_floor, rel=1e-6)
    assert float(loss(jnp.asarray(9e-5))) == pytest.approx(float(loss(jnp.asarray(1e-4))))


@pytest.mark.parametrize("scheme", ["symmetric", "unsigned"])
def test_lsq_init_uses_the_signed_qp(scheme):
    """``s = 2 mean|x| / sqrt(2^(b-1) - 1)`` on every grid (the reference's init)."""
    x = jnp.asarray(np.random.default_rng(3).random((6, 10)), jnp.float32)
    spec = QuantSpec(bits=4, scheme=scheme, estimator="lsq_init", learn="lsq")
    lo, hi = estimate(x, make_view(x.shape, spec), spec)
    step = q.qparams_from_range(lo, hi, spec)[0]
    want = 2 * float(jnp.mean(jnp.abs(x))) / np.sqrt(7)
    assert float(step) == pytest.approx(want, rel=1e-5)
    assert grid_bounds(4, scheme)[1] in (7, 15)


def test_outlier_statistics_see_real_tokens_only():
    """Per-sequence kurtosis and inf norm of tracked points are the same whatever padding
    follows the sentence."""
    cfg = model_config("bert-tiny", **TEXT["bert"])
    plan = q.QuantPlan(track=(r"ffn/out$|residual_ffn$|attn/softmax$",))
    model = build(cfg, plan)
    params = jax.jit(build(cfg).init)(jax.random.key(0), **dummy_inputs(cfg))["params"]
    ids = np.random.default_rng(4).integers(5, cfg.vocab_size, size=(2, 10), dtype=np.int32)
    seen = []
    for width in (10, 24):
        b = _padded(ids, [10, 6], width, pad_id=1)
        _, st = model.apply({"params": params}, **b, mutable=["intermediates"])
        seen.append({k: np.asarray(v[0]) for k, v in flatten_dict(st["intermediates"]).items()})
    assert len(seen[0]) == 3 * 2 * 2
    for k in seen[0]:
        np.testing.assert_allclose(seen[0][k], seen[1][k], rtol=1e-4, err_msg="/".join(k))
