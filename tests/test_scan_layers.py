"""Scanned layers (``config.model.scan_layers``): the same variables, values and gradients
as the layer loop, the same checkpoints, and clear errors where scan cannot apply."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from test_train import read_params, tiny_opt, tree

import qtx.quant as q
from qtx.errors import UserError
from qtx.evaluate.integer import check_same_model
from qtx.models import build, dummy_inputs, model_config
from qtx.models.scan import STACKED, ScannedModel, stack_layers, unstack_layers
from qtx.run import experiment
from qtx.run.train import train


def _shapes(tree):
    return {k: v.shape for k, v in flatten_dict(tree, sep="/").items()}


@pytest.mark.parametrize(
    "name,over",
    [
        ("opt-tiny", {"remat": True}),
        ("bert-tiny", {}),
        ("vit-tiny", {"remat": True, "remat_policy": "dots"}),
        pytest.param(
            "llama-tiny",
            {"remat": True, "qk_norm": True, "attention": {"gate": "elementwise"}},
            marks=pytest.mark.slow,
        ),
    ],
)
def test_scanned_layers_have_the_loops_variables_values_and_gradients(name, over):
    loop_cfg = model_config(name, over)
    scan_cfg = model_config(name, {**over, "scan_layers": True})
    loop, scan = build(loop_cfg), build(scan_cfg)
    inp = dummy_inputs(loop_cfg, 2, 16)
    if "input_ids" in inp:
        inp["input_ids"] = jax.random.randint(jax.random.key(1), inp["input_ids"].shape, 3, 90)
    else:
        inp["images"] = jax.random.normal(jax.random.key(1), inp["images"].shape)
    variables = loop.init(jax.random.key(0), **inp)
    assert _shapes(scan.init(jax.random.key(0), **inp)) == _shapes(variables)
    a = loop.apply(variables, **inp, output_hidden_states=True)
    b = scan.apply(variables, **inp, output_hidden_states=True)
    assert len(b["hidden_states"]) == loop_cfg.num_layers + 1
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(y, x, atol=2e-5 * max(1.0, float(jnp.abs(x).max())))

    def grads(model):
        f = lambda p: jnp.sum(model.apply({"params": p}, **inp)["logits"] ** 2)  # noqa: E731
        return jax.grad(f)(variables["params"])

    ga, gb = grads(loop), grads(scan)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ga))
    for (k, x), y in zip(flatten_dict(ga, sep="/").items(), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(y, x, atol=1e-5 * scale, err_msg=k)


def test_scanned_calibration_and_fake_quant_match_the_loop():
    """W8A8 calibration statistics come back per layer and equal the loop's; fake quant
    with them gives the loop's logits (up to rare rounding ties)."""
    loop_cfg = model_config("opt-tiny")
    scan_cfg = model_config("opt-tiny", {"scan_layers": True})
    plan = q.QuantPlan(q.setup_rules("W8A8"), "quantize")
    inp = dummy_inputs(loop_cfg, 2, 16)
    inp["input_ids"] = jax.random.randint(jax.random.key(1), inp["input_ids"].shape, 3, 90)
    variables = build(loop_cfg).init(jax.random.key(0), **inp)
    stats = {}
    for key, cfg in (("loop", loop_cfg), ("scan", scan_cfg)):
        cal = build(cfg, plan.with_mode("calibrate"))
        fwd = lambda v, b, cal=cal: cal.apply(v, **b, mutable=[q.STATS])  # noqa: E731
        stats[key] = q.calibrate(fwd, variables, [inp])
    assert _shapes(stats["scan"]) == _shapes(stats["loop"])
    for x, y in zip(jax.tree.leaves(stats["loop"]), jax.tree.leaves(stats["scan"]), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    ya = build(loop_cfg, plan).apply(stats["loop"], **inp)["logits"]
    yb = build(scan_cfg, plan).apply(stats["loop"], **inp)["logits"]
    # Float rounding differs in the last bit between the two programs and may flip a rare
    # rounding tie of a quantizer, which attention spreads over later tokens: the scanned
    # model must be far closer to the loop than fake quant is to full precision.
    fp = build(loop_cfg).apply(variables, **inp)["logits"]
    assert np.abs(yb - ya).mean() < 0.1 * np.abs(ya - fp).mean()


def test_stack_and_unstack_are_inverse():
    tree = {
        "params": {f"layer_{i}": {"w": np.full((2, 3), i, np.float32)} for i in range(3)},
        "other": {"embed": {"w": np.ones(4)}},
    }
    tree["params"]["head"] = {"b": np.zeros(2)}
    stacked = stack_layers(tree, 3)
    assert stacked["params"][STACKED]["layer"]["w"].shape == (3, 2, 3)
    back = unstack_layers(stacked, 3)
    assert _shapes(back) == _shapes(tree)
    np.testing.assert_array_equal(back["params"]["layer_2"]["w"], tree["params"]["layer_2"]["w"])


def test_scanned_training_writes_the_loops_checkpoint(tmp_path):
    """train.py with scan_layers saves the parameter names and shapes of the layer loop, and
    the loop model reads that checkpoint back to the scanned model's outputs."""
    params, cfgs = {}, {}
    for scan in (False, True):
        c = tiny_opt(steps=3)
        c.model.update(num_layers=2, scan_layers=scan)
        workdir = str(tmp_path / f"scan_{scan}")
        last = train(c, workdir, devices=jax.devices()[:1])
        assert np.isfinite(last["train"]["loss"])
        params[scan] = read_params(workdir, 3)
        cfgs[scan] = experiment.load(c).model
    shapes = {scan: {k: v.shape for k, v in p.items()} for scan, p in params.items()}
    assert shapes[True] == shapes[False]
    assert any(k.startswith("layer_1/") for k in params[True])
    variables = {"params": tree(params[True])}
    inp = dummy_inputs(cfgs[True], 2, 16)
    a = build(cfgs[False]).apply(variables, **inp)["logits"]
    b = build(cfgs[True]).apply(variables, **inp)["logits"]
    np.testing.assert_allclose(b, a, atol=1e-5)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"scan_layers": True, "family": "swin"}, "scan_layers"),
        ({"remat_policy": "some"}, "remat_policy"),
        ({"attention_kernel": "flash"}, "attention_kernel"),
    ],
)
def test_bad_scan_settings_are_rejected(over, match):
    name = "swin-tiny" if over.get("family") == "swin" else "opt-tiny"
    over = {k: v for k, v in over.items() if k != "family"}
    with pytest.raises(UserError, match=match):
        model_config(name, over)


def test_integer_models_of_a_scanned_config_run_the_layer_loop():
    """An int8 model of a ``scan_layers`` config is built with the layer loop (scan is a
    training option; the variables are the same), and int8 directories ignore the field."""
    cfg = model_config("opt-tiny", {"scan_layers": True})
    plan = q.QuantPlan(q.setup_rules("W8A8"), "quantize", integer=True)
    model = build(cfg, plan)
    assert not isinstance(model, ScannedModel)
    assert model.cfg == cfg.replace(scan_layers=False)
    check_same_model(cfg, cfg.replace(scan_layers=False, attention_kernel="einsum"), "here")
    with pytest.raises(UserError, match="num_layers"):
        check_same_model(cfg, cfg.replace(num_layers=3), "here")


def test_scan_refuses_a_pooled_head_layernorm_left_in_full_precision():
    """os_fastertransformer keeps the last post-LN ffn_ln/out a pooler reads in full precision,
    which one scanned layer cannot express: a one-sentence error, and 'all' works."""
    cfg = model_config("bert-tiny", head="classification", num_labels=2, scan_layers=True)
    plan = q.QuantPlan(q.setup_rules("os_fastertransformer:W8A8"), mode="calibrate")
    with pytest.raises(UserError, match="scan_layers=True .* head_points='all'"):
        build(cfg, plan).init(jax.random.key(0), **dummy_inputs(cfg))
    plan = q.QuantPlan(
        q.setup_rules("os_fastertransformer:W8A8", head_points="all"), mode="calibrate"
    )
    build(cfg, plan).init(jax.random.key(0), **dummy_inputs(cfg))
