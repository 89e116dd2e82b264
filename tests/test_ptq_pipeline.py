"""Composed PTQ methods: names parse into stages in a fixed order, a composition equals the
registered method it spells out, and every bad name or option fails before compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from test_outlier_suppression import SETUP4, TWC_CFG, inputs_of, text_batch, twc_model  # noqa

from qtx import quant
from qtx.errors import UserError
from qtx.methods import registry
from qtx.methods.pipeline import Pipeline, pin_ranges
from qtx.models import build
from qtx.run.ptq import evaluate_setup

OPTS = {"num_alphas": 3, "alpha_step": 0.1, "fine_epochs": 0}


def _mse_run(params, ev):
    fp = build(TWC_CFG).apply({"params": params}, **inputs_of(TWC_CFG, ev))["logits"]

    def run(model, variables):
        out = model.apply(variables, **inputs_of(TWC_CFG, ev))["logits"]
        return {"accuracy": -float(jnp.mean((out - fp) ** 2)), "loss": 0.0}

    return run


@pytest.mark.slow
def test_a_composition_equals_the_method_it_spells_out(twc_model):  # noqa: F811
    """``token_wise_clipping+gamma_migration`` (any order) is Outlier Suppression: the same
    stages give the same quantized model; ``gamma_migration+minmax`` is gamma_migration."""
    params, calib, _ = twc_model
    run = _mse_run(params, text_batch(20))
    got = {}
    for m in ("outlier_suppression", "token_wise_clipping+gamma_migration", "gamma_migration",
              "gamma_migration+minmax"):  # fmt: skip
        got[m] = evaluate_setup(TWC_CFG, SETUP4, params, calib, run, method=m, ptq_options=OPTS)
    a, b = got["outlier_suppression"], got["token_wise_clipping+gamma_migration"]
    assert a[0]["accuracy"] == pytest.approx(b[0]["accuracy"], rel=1e-6)
    assert {"coarse", "fine", "gamma_migration"} <= set(b[3])
    assert got["gamma_migration"][0]["accuracy"] == pytest.approx(
        got["gamma_migration+minmax"][0]["accuracy"], rel=1e-6
    )
    assert b[3]["coarse"]["alpha"] == a[3]["coarse"]["alpha"]  # the refinement ran


def test_names_parse_into_ordered_stages():
    m = registry.ptq_method("token_wise_clipping+omse+gamma_migration")
    assert isinstance(m, Pipeline)
    assert [t.name for t in m.transforms] == ["gamma_migration"]
    assert m.estimator == "omse" and m.refine.name == "token_wise_clipping"
    assert m.reparametrisation is registry.REPARAMETRISATIONS["gamma_migration"]
    assert registry.ptq_method("minmax") is registry.PTQ["minmax"]
    assert registry.ptq_method("outlier_suppression") is registry.PTQ["outlier_suppression"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("kmeans", "method 'kmeans' is unknown; allowed: minmax"),
        ("minmax+kmeans", "unknown part 'kmeans'"),
        ("minmax+omse", "more than one activation estimator"),
        ("gamma_migration+gamma_migration", "names a transform twice"),
        ("outlier_suppression+token_wise_clipping", "more than one refinement"),
    ],
)
def test_bad_names_fail_with_the_allowed_parts(name, message):
    with pytest.raises(UserError, match=message):
        registry.ptq_method(name)


def test_bad_names_and_options_fail_before_compute():
    from configs import common
    from qtx.run import experiment

    c = common.bert_glue("tiny")
    c.eval.ptq_methods = ("minmax+kmeans",)
    with pytest.raises(UserError, match="unknown part 'kmeans'"):
        experiment.load(c)
    c = common.bert_glue("tiny")
    c.eval.ptq_methods = ("gamma_migration+token_wise_clipping",)
    c.model.gamma_migrated = True
    with pytest.raises(UserError, match="gamma_migrated=True cannot take gamma_migration"):
        experiment.load(c)
    c = common.bert_glue("tiny")
    c.eval.ptq_options = {"alpha": 0.5}
    with pytest.raises(UserError, match="unknown field"):
        experiment.load(c)


def test_pinned_ranges_replace_the_calibrated_ones(twc_model):  # noqa: F811
    params, calib, plan = twc_model
    from qtx.evaluate.ptq import calibrate_setup

    variables = calibrate_setup(TWC_CFG, plan, params, calib[:1])
    flat = flatten_dict(variables[quant.STATS])
    key = ("layer_0", "ffn", "fc1", "out")
    name = next("/".join(k[:-1]) for k in flat if k[-1] == "lo")
    lo = np.asarray(flat[tuple(name.split("/")) + ("lo",)])
    pinned = pin_ranges(variables, {name: (lo - 1.0, lo + 1.0)})
    got = flatten_dict(pinned[quant.STATS])
    np.testing.assert_allclose(got[tuple(name.split("/")) + ("hi",)], lo + 1.0)
    # a point calibration left out (GPTQ's rounded weights) gets its range
    new = pin_ranges(variables, {"/".join(key) + "_new": (np.zeros((1, 4)), np.ones((1, 4)))})
    got = flatten_dict(new[quant.STATS])
    np.testing.assert_array_equal(got[key[:-1] + (key[-1] + "_new", "hi")], np.ones((1, 4)))
    jax.block_until_ready(pinned)


@pytest.mark.slow
def test_percentile_candidates_keep_their_own_rules_after_gptq(twc_model):  # noqa: F811
    """GPTQ rounds once; every percentile candidate is calibrated with its own rules, and its
    rounded kernels come back exactly through the pinned ranges."""
    params, calib, _ = twc_model
    method = registry.ptq_method("percentile+gptq")
    got = list(method.calibrate(TWC_CFG, SETUP4, params, calib[:1],
                                ptq_options={"percentiles": (99.0, 99.9)}))  # fmt: skip
    assert [c.info["percentile"] for c in got] == [99.0, 99.9]
    for c in got:
        spec, _ = c.plan.resolve("layer_0/ffn/act", "act")
        assert spec.percentile == c.info["percentile"] and c.reference_params is not None
        assert c.info["gptq"]["points"] > 0
    w = flatten_dict(got[1].variables["params"])[("layer_0", "ffn", "fc1", "kernel")]
    model = build(TWC_CFG, got[1].plan)
    _, seen = model.apply(got[1].variables, **inputs_of(TWC_CFG, calib[0]),
                          mutable=[quant.quantizer.WEIGHTS])  # fmt: skip
    rec = flatten_dict(seen[quant.quantizer.WEIGHTS])
    step = rec[("layer_0", "ffn", "fc1", "weight", "step")]
    offset = rec[("layer_0", "ffn", "fc1", "weight", "offset")]
    codes = (np.asarray(w) - np.asarray(offset)) / np.asarray(step)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)  # on the pinned grid


def test_stages_are_checked_on_the_config_before_them():
    from qtx.models import model_config

    llama = model_config("llama-tiny")
    with pytest.raises(UserError, match="gamma_migrated"):
        registry.ptq_method("gamma_migration+gptq").check(llama)
    with pytest.raises(UserError, match="rotation needs a pre-RMSNorm decoder"):
        registry.ptq_method("rotation").check(TWC_CFG)
    registry.ptq_method("rotation+smoothquant+gptq").check(llama)
