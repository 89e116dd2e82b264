"""Quantization Variation's binary preset (which points are 1-bit, values, STE gradients) and
the variation analysis (module / head sensitivity against their definitions, the figure)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from tiny_runs import ONE_LAYER_BERT

from qtx import quant
from qtx.evaluate.ptq import calibrate_setup
from qtx.methods.quant_variation import analysis
from qtx.models import build, dummy_inputs, model_config
from qtx.train.losses import model_inputs

BERT = ONE_LAYER_BERT


def _text_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 99, (4, 12))
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((4, 12), jnp.int32)}


def test_binary_preset_points_values_and_gradients():
    cfg = model_config("bert-tiny", BERT)
    plan = quant.plan_from_config({"preset": "binary", "bits": "W1A1", "mode": "learn"})

    def bits(name, kind="act"):
        spec, mode = plan.resolve(name, kind)
        return None if spec is None or mode == "off" else (spec.bits, spec.scheme)

    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert bits(f"layer_0/attn/{p}/weight", "weight") == (1, "symmetric")
    for p in ("ffn/fc1/weight", "ffn/fc2/weight"):
        assert bits(f"layer_0/{p}", "weight") == (1, "symmetric"), p
    for p in ("attn_ln/out", "attn/q", "attn/k", "attn/v", "attn/context", "ffn_ln/out"):
        assert bits(f"layer_0/{p}") == (1, "symmetric"), p
    assert bits("layer_0/ffn/act") == (1, "unsigned")  # GELU output: {0, s} + offset
    assert bits("layer_0/attn/softmax") == (8, "unsigned")  # never sign(p) = +1
    assert bits("embed/word/weight", "weight") == (8, "symmetric")
    assert bits("classifier/in")[0] == bits("classifier/dense/weight", "weight")[0] == 8
    assert bits("layer_0/attn_ln/weight", "weight") is None
    assert bits("layer_0/residual_ffn") is None and bits("layer_0/ffn/out") is None

    # the 1-bit weight the model uses is sign(W) * mean|W|; W gets the STE gradient, zero
    # where |W| > 1
    batch = _text_batch()
    params = build(cfg).init(jax.random.key(0), **dummy_inputs(cfg))["params"]
    params["layer_0"]["attn"]["q_proj"]["kernel"] = (
        params["layer_0"]["attn"]["q_proj"]["kernel"].at[0, :3].set(2.0)
    )
    variables = calibrate_setup(cfg, plan, params, [batch])
    model = build(cfg, plan)

    def loss(p):
        out, inter = model.apply(
            {**variables, "params": p},
            **batch,
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        used = inter["intermediates"]["layer_0"]["attn"]["q_proj"]["weight"]["__call__"][0]
        return jnp.sum(out["logits"] ** 2), used

    (_, used), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    w = np.asarray(variables["params"]["layer_0"]["attn"]["q_proj"]["kernel"])
    want = np.where(w >= 0, 1.0, -1.0) * np.abs(w).mean()
    np.testing.assert_allclose(np.asarray(used), want, rtol=1e-6)
    g = np.asarray(grads["layer_0"]["attn"]["q_proj"]["kernel"])
    assert np.all(g[0, :3] == 0) and np.count_nonzero(g) > g.size // 2


def test_binary_preset_options_are_checked():
    with pytest.raises(ValueError, match="weight_granularity='row'"):
        quant.preset_rules("binary", "W1A1", weight_granularity="row")


def _vit():
    cfg = model_config(
        "vit-tiny", dict(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64)
    )
    params = build(cfg).init(jax.random.key(1), **dummy_inputs(cfg))["params"]
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.standard_normal((8, 16, 16, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, 8)),
    }
    return cfg, params, batch


def _run(cfg, batch):
    """Cross-entropy on ``batch``, the contract of the runner's ``run``."""

    def run(model, variables, outliers=None):
        cols = ("intermediates",) if outliers is not None else ()
        out, coll = model.apply(variables, **model_inputs(cfg.family, batch), mutable=list(cols))
        logp = jax.nn.log_softmax(out["logits"])
        loss = -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], 1))
        if outliers is not None:
            outliers.update(coll["intermediates"])
        return {"loss": float(loss)}

    return run


def test_variation_analysis_against_its_definition(tmp_path):
    cfg, params, batch = _vit()
    run = _run(cfg, batch)
    result = analysis.analyse(cfg, params, [batch], run, bits=2, log=lambda s: None)
    assert list(result["modules"]) == ["layer_0"]
    assert set(result["modules"]["layer_0"]) == set(analysis.MODULES)
    assert [len(v) for v in result["heads"].values()] == [2]

    # a module's sensitivity: its points at 2 bits, every other module point at 8, each range
    # calibrated on the FP model (so two calibrations serve every configuration)
    rules = analysis.module_rules("layer_0", "fc1", 2)
    plan = quant.QuantPlan(rules, mode="quantize", calibration="parallel")
    assert plan.resolve("layer_0/ffn/fc1/weight", "weight")[0].bits == 2
    assert plan.resolve("layer_0/ffn_ln/out", "act")[0].bits == 2
    assert plan.resolve("layer_0/ffn/act", "act")[0].scheme == "asymmetric"
    assert plan.resolve("layer_10/ffn/fc1/weight", "weight")[0].bits == 8
    assert plan.resolve("layer_0/ffn/fc2/weight", "weight")[0].bits == 8
    assert plan.resolve("layer_0/residual_ffn", "act")[0] is None

    def direct(plan):
        return run(build(cfg, plan), calibrate_setup(cfg, plan, params, [batch]))["loss"]

    base = direct(quant.QuantPlan(analysis.baseline_rules(), "quantize", calibration="parallel"))
    assert result["baseline"]["loss"] == pytest.approx(base, abs=1e-6)
    assert result["modules"]["layer_0"]["fc1"] == pytest.approx(direct(plan) - base, abs=1e-6)
    assert result["modules"]["layer_0"]["fc1"] != 0

    # a head's sensitivity: only its slices of q, k, v (columns) and o (rows) at 2 bits
    hp = flatten_dict(analysis.head_params(params, "layer_0", 1, 2, 2, False))
    q = np.asarray(hp[("layer_0", "attn", "q_proj", "kernel")])
    assert len(np.unique(q[:, 16:])) <= 4 and len(np.unique(q[:, :16])) > 4
    o = np.asarray(hp[("layer_0", "attn", "o_proj", "kernel")])
    assert len(np.unique(o[16:])) <= 4 and len(np.unique(o[:16])) > 4
    np.testing.assert_array_equal(
        hp[("layer_0", "ffn", "fc1", "kernel")], params["layer_0"]["ffn"]["fc1"]["kernel"]
    )

    assert "layer_0/attn/softmax" in result["outliers"]
    analysis.plot(result, str(tmp_path / "variation.png"))
    assert (tmp_path / "variation.png").stat().st_size > 1000


def test_blocks_of_swin_in_order():
    cfg = model_config("swin-tiny")
    params = jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), **dummy_inputs(cfg)))
    blocks = analysis.blocks_of(params["params"])
    assert blocks == [f"stage_{s}/layer_{j}" for s in range(3) for j in range(2)]


def test_fake_quant_np_is_the_best_clipped_grid():
    w = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    q = analysis.fake_quant_np(w, 3)
    assert len(np.unique(q)) <= 8
    full = np.clip(np.round(w / (np.abs(w).max() / 3)), -4, 3) * (np.abs(w).max() / 3)
    assert np.sum((q - w) ** 2) < np.sum((full - w) ** 2)


@pytest.mark.parametrize(
    "field, value", [("variation_bits", 1), ("variation_bits", 9), ("variation", "yes")]
)
def test_bad_variation_settings_name_the_field(field, value):
    from configs import common
    from qtx.run.experiment import load

    c = common.vit_image("vanilla", "tiny")
    with c.eval.ignore_type():
        setattr(c.eval, field, value)
    with pytest.raises(ValueError, match=rf"config.eval.{field}={value!r} is invalid"):
        load(c)
