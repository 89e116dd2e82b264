"""Embedding lookups quantize only the looked-up rows, bit-identically to the whole table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qtx.quant as q
from qtx.nn.layers import Embed
from qtx.quant import STATS, WEIGHTS, QuantPlan
from qtx.quant.integer import as_float

V, D = 13, 6  # V appears in no other shape of the lookup
IDS = jnp.array([[0, 3, 3, 12], [3, 0, 9, 9]])  # duplicate ids
R = jax.random.normal(jax.random.key(1), (2, 4, D))
W4 = dict(bits=4, estimator="minmax")
ROW = dict(granularity="channel")

CASES = {  # name: (rules, mode, calibrate first)
    "frozen_w8a8": (q.setup_rules("W8A8", weight_estimator="minmax"), "quantize", True),
    "current_minmax_w8a8": (q.setup_rules("W8A8"), "quantize", False),
    "lsq_learn": ((q.rule(".", bits=4, scheme="symmetric", learn="lsq"),), "learn", False),
    "lsq_quantize": ((q.rule(".", bits=4, scheme="symmetric", learn="lsq"),), "quantize", False),
    "lsq+_weight_l1": (
        (q.rule(".", **W4, scheme="asymmetric", learn="lsq+", grad_scale="weight_l1"),),
        "learn",
        False,
    ),
    "row_frozen": ((q.rule(".", **W4, **ROW, scheme="asymmetric"),), "quantize", True),
    "row_current_minmax": (
        (q.rule(".", bits=4, estimator="current_minmax", **ROW),),
        "quantize",
        False,
    ),
    "row_lsq_weight_l1": (
        (q.rule(".", **W4, **ROW, scheme="symmetric", learn="lsq", grad_scale="weight_l1"),),
        "learn",
        False,
    ),
}


def prepare(rules, mode, calibrate=False, **plan):
    """The Embed in ``mode`` and its variables; learned steps are shrunk so that some rows
    clip (the step and offset gradients then see both branches)."""
    m = Embed(V, D, QuantPlan(rules, mode="calibrate" if calibrate else mode))
    v = m.init(jax.random.key(0), IDS)
    if calibrate:
        _, stats = m.apply(v, IDS, mutable=[STATS])
        v = {**v, **stats}
    params = dict(v["params"])
    if "weight" in params:
        params["weight"] = {k: a * 0.6 for k, a in params["weight"].items()}
    return Embed(V, D, QuantPlan(rules, mode=mode, **plan)), {**v, "params": params}


def whole(mod, ids):
    """The whole-table path: quantize the table, then look up."""
    return jnp.take(as_float(mod.weight(mod.embedding)), ids, axis=0)


def outputs_and_grads(m, v, method=None):
    """A jitted training step's output and parameter gradients (the variables are arguments,
    as in training: constants would be folded at compile time)."""

    def loss(params, v, ids):
        out = m.apply({**v, "params": params}, ids, method=method)
        return jnp.sum(out * R), out

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, out), grads = step(v["params"], v, IDS)
    return out, grads


def rounded_shapes(jaxpr):
    """The shapes that ``round`` equations (the grid of every fake quant) produce,
    sub-jaxprs included. Reductions over the table (a dynamic range, ``weight_l1``) may stay."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "round":
            out += [tuple(o.aval.shape) for o in eqn.outvars]
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    out += rounded_shapes(sub)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_equal_the_whole_table_and_skip_it(case):
    m, v = prepare(*CASES[case])
    out, grads = outputs_and_grads(m, v)
    ref, ref_grads = outputs_and_grads(m, v, whole)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(m.apply(v, IDS), m.apply(v, IDS, method=whole))  # eager
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)
    if CASES[case][1] == "learn":  # the step does learn from the looked-up rows
        assert float(jnp.abs(grads["weight"]["step"]).sum()) > 0
    # the forward pass rounds the looked-up rows, not the table
    jaxpr = jax.make_jaxpr(lambda v: m.apply(v, IDS))(v).jaxpr
    assert IDS.shape + (D,) in rounded_shapes(jaxpr) and (V, D) not in rounded_shapes(jaxpr)
    ref = jax.make_jaxpr(lambda v: m.apply(v, IDS, method=whole))(v).jaxpr
    assert (V, D) in rounded_shapes(ref)


@pytest.mark.parametrize(
    "settings",
    [
        dict(bits=1, scheme="symmetric", estimator="current_minmax"),  # sign binarisation
        dict(bits=4, granularity="group", axis=1, group_size=3, estimator="current_minmax"),
        dict(bits=4, granularity="channel", axis=1, estimator="current_minmax"),  # per column
    ],
)
def test_other_granularities_and_binary_quantize_the_table(settings):
    m, v = prepare((q.rule(".", **settings),), "quantize")
    np.testing.assert_array_equal(m.apply(v, IDS), m.apply(v, IDS, method=whole))


def test_integer_plan_looks_up_rows_as_in_fake_quant():
    rules = q.setup_rules("W8A8", weight_estimator="minmax")
    m, v = prepare(rules, "quantize", True, integer=True)
    np.testing.assert_array_equal(m.apply(v, IDS), m.apply(v, IDS, method=whole))


def test_calibration_records_and_listing_see_the_whole_table():
    rules = q.setup_rules("W8A8", weight_estimator="minmax")
    m, v = prepare(rules, "calibrate")
    _, stats = m.apply(v, IDS, mutable=[STATS])
    table = v["params"]["embedding"]
    assert float(stats[STATS]["weight"]["hi"]) == float(table.max())
    assert float(stats[STATS]["weight"]["lo"]) == float(table.min())
    m, v = prepare(rules, "quantize", True)
    out, rec = m.apply(v, IDS, mutable=[WEIGHTS])
    np.testing.assert_array_equal(out, m.apply(v, IDS, method=whole))
    assert q.weight_records(rec[WEIGHTS])["weight"]["w"].shape == (V, D)
    assert q.list_points(m.apply, v, IDS) == {"weight": ("weight", (V, D))}
