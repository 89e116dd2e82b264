"""LLM presets (w8a8_static, w8a8_dynamic, w4a8, w4a16) on the tiny decoders: the specs at
representative points and the match report, group-wise weights and per-token dynamic
activations against NumPy, bit shortcuts and options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qtx.quant as q
from qtx.errors import UserError
from qtx.models import build, dummy_inputs, model_config

FAMILIES = ["opt-tiny", "llama-tiny"]
LLM = ("w8a8_static", "w8a8_dynamic", "w4a8", "w4a16")


def points(cfg, plan):
    model = build(cfg, plan)
    v = jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), **dummy_inputs(cfg)))
    return {k: kind for k, (kind, _) in q.list_points(model.apply, v, **dummy_inputs(cfg)).items()}


def spec(plan, name, kind="act"):
    return plan.resolve(name, kind)[0]


def ffn_names(cfg):
    """(kernels, FFN outputs a fused kernel keeps) of the family."""
    if cfg.family == "llama":
        return ("gate_proj", "up_proj", "down_proj"), ("gate", "up")
    return ("fc1", "fc2"), ("hidden",)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("setup", LLM)
def test_presets_match_every_point_and_use_every_rule(name, setup):
    cfg = model_config(name)
    plan = q.QuantPlan(q.setup_rules(setup), mode="quantize")
    rep = q.match_report(plan, points(cfg, plan))
    assert rep.unmatched_points == [] and rep.unused_rules == []
    kernels, fused = ffn_names(cfg)
    weights = [f"layer_0/attn/{p}_proj/weight" for p in "qkvo"]
    weights += [f"layer_1/ffn/{k}/weight" for k in kernels]
    for w in weights:
        assert w in rep.quantized, w
    for fp in ("lm_head/logits", *(f"layer_0/ffn/{f}" for f in fused)):
        assert fp not in rep.quantized, fp
    if setup != "w8a8_static":  # LLM practice: norms and embeddings stay FP
        for fp in ("embed/word/weight", "layer_0/attn_ln/weight", "final_ln/weight"):
            assert fp not in rep.quantized, fp
        assert not any(k.startswith("embed/") for k in rep.quantized)


@pytest.mark.parametrize("name", FAMILIES)
def test_specs_at_representative_points(name):
    cfg = model_config(name)
    kernels, fused = ffn_names(cfg)
    down = f"layer_0/ffn/{kernels[-1]}/weight"

    static = q.QuantPlan(q.setup_rules("w8a8_static"))
    s = spec(static, down, "weight")
    assert (s.bits, s.scheme, s.granularity) == (8, "symmetric", "tensor")
    for point in ("layer_0/attn/softmax", "layer_0/ffn/act", "layer_1/residual_ffn"):
        s = spec(static, point)
        assert (s.bits, s.scheme, s.granularity, s.estimator) == (
            8,
            "asymmetric",
            "tensor",
            "running_minmax",
        )
    assert spec(static, f"layer_0/ffn/{fused[0]}") is None
    assert spec(static, "embed/word/weight", "weight").bits == 8  # the papers quantize it
    channel = q.QuantPlan(q.setup_rules("w8a8_static", weight_granularity="channel"))
    assert spec(channel, down, "weight").granularity == "channel"
    assert spec(channel, "layer_0/attn_ln/weight", "weight").granularity == "tensor"

    dyn = q.QuantPlan(q.setup_rules("w8a8_dynamic"))
    s = spec(dyn, down, "weight")
    assert (s.bits, s.scheme, s.granularity) == (8, "symmetric", "channel")
    for point in ("attn_ln/out", "ffn_ln/out", "attn/context", "ffn/act", "attn/q", "attn/v"):
        s = spec(dyn, f"layer_1/{point}")
        assert (s.bits, s.scheme, s.granularity, s.estimator) == (
            8,
            "symmetric",
            "token",
            "current_minmax",
        ), point
    assert spec(dyn, "layer_0/attn/softmax").scheme == "unsigned"
    for point in ("attn/scores", "attn/out", "ffn/out", "residual_ffn", "embed/sum"):
        assert spec(dyn, point if point.startswith("embed") else f"layer_0/{point}") is None
    assert spec(dyn, "final_ln/out") is None  # the LM head's input: the head stays FP
    no_attn = q.QuantPlan(q.setup_rules("w8a8_dynamic", attention=False))
    assert spec(no_attn, "layer_0/attn/q") is None and spec(no_attn, "layer_0/attn/softmax") is None

    w4a8 = q.QuantPlan(q.setup_rules("w4a8"))
    s = spec(w4a8, down, "weight")
    assert (s.bits, s.scheme, s.granularity, s.group_size, s.axis) == (
        4,
        "symmetric",
        "group",
        128,
        -2,
    )
    assert spec(w4a8, "layer_0/ffn_ln/out").granularity == "token"

    w4a16 = q.QuantPlan(q.setup_rules("w4a16"))
    s = spec(w4a16, down, "weight")
    assert (s.bits, s.scheme, s.granularity) == (4, "asymmetric", "group")
    assert all(spec(w4a16, f"layer_0/{p}") is None for p in ("attn_ln/out", "attn/q", "ffn/act"))


def group_quant(w, bits, gs, scheme):
    """NumPy group quantization of a kernel (in, out): groups of ``gs`` input rows, one
    range per (group, output column), as ``fake_quant_range``."""
    n_in, n_out = w.shape
    g = w.astype(np.float64).reshape(n_in // gs, gs, n_out)
    lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
    if scheme == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        s = np.maximum(np.maximum(-lo, hi) / qmax, 1e-8)
        out = np.clip(np.round(g / s), -qmax - 1, qmax) * s
    else:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        s = np.maximum((hi - lo) / (2**bits - 1), 1e-8)
        z = np.clip(np.round(-lo / s), 0, 2**bits - 1)
        out = (np.clip(np.round(g / s) + z, 0, 2**bits - 1) - z) * s
    return out.reshape(n_in, n_out)


def captured(cfg, plan, variables, ids, mask, names):
    """The outputs of the points ``names`` (module paths) in a forward pass."""
    model = build(cfg, plan)

    def run(v, ids, mask):
        return model.apply(
            v,
            ids,
            mask,
            mutable=["intermediates"],
            capture_intermediates=lambda mdl, method: (
                method == "__call__" and "/".join(mdl.path) in names
            ),
        )[1]

    coll = jax.jit(run)(variables, ids, mask)
    flat = jax.tree_util.tree_flatten_with_path(coll["intermediates"])[0]
    out = {}
    for path, leaf in flat:
        keys = [p.key for p in path if hasattr(p, "key")]
        if keys[-1] == "__call__":
            out["/".join(keys[:-1])] = np.asarray(leaf)
    return out


def inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, (3, 10))
    mask = np.ones((3, 10), np.int32)
    mask[0, :4] = 0  # left padding
    mask[2, :9] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(
    "setup,options,scheme,bits",
    [
        ("w4a8", {"group_size": 32}, "symmetric", 4),
        ("w4a16:W3A16", {"group_size": 64}, "asymmetric", 3),
        ("w4a16", {"weight_scheme": "symmetric"}, "symmetric", 4),  # 128: clipped to D
    ],
)
def test_group_weights_match_numpy(name, setup, options, scheme, bits):
    cfg = model_config(name, hidden_size=64) if "group_size" not in options else model_config(name)
    variables = build(cfg).init(jax.random.key(1), **dummy_inputs(cfg))
    plan = q.QuantPlan(q.setup_rules(setup, **options), mode="quantize")
    kernels, _ = ffn_names(cfg)
    names = {f"layer_0/ffn/{k}/weight" for k in kernels} | {"layer_1/attn/k_proj/weight"}
    got = captured(cfg, plan, variables, *inputs(cfg), names)
    assert set(got) == names
    gs = options.get("group_size", 128)
    for point, w_q in got.items():
        module = point.rsplit("/", 1)[0].split("/")
        w = np.asarray(variables["params"][module[0]][module[1]][module[2]]["kernel"])
        want = group_quant(w, bits, min(gs, w.shape[0]), scheme)
        np.testing.assert_allclose(w_q, want, rtol=1e-5, atol=1e-6, err_msg=point)
        assert len(np.unique(w_q[: min(gs, w.shape[0]), 0])) <= 2**bits


def token_quant(x, mask, bits=8):
    """NumPy per-token symmetric dynamic quantization over the last axis, real tokens."""
    x = np.asarray(x, np.float64)
    qmax = 2 ** (bits - 1) - 1
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / qmax, 1e-8)
    out = np.clip(np.round(x / s), -qmax - 1, qmax) * s
    return out, mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)).astype(bool)


@pytest.mark.parametrize("name", FAMILIES)
def test_per_token_dynamic_activations_match_numpy(name):
    """``layer_0/attn_ln/out`` and ``layer_0/attn/q`` see the same input in FP and under
    w8a8_dynamic (embeddings and norms stay FP): the quantized output is NumPy's per-token
    (per token and head for q) symmetric 8-bit quantization of the FP output."""
    cfg = model_config(name)
    variables = build(cfg).init(jax.random.key(2), **dummy_inputs(cfg))
    ids, mask = inputs(cfg)
    names = {"layer_0/attn_ln/out"}
    fp = captured(cfg, q.QuantPlan(), variables, ids, mask, names)
    plan = q.QuantPlan(q.setup_rules("w8a8_dynamic"), mode="quantize")
    got = captured(cfg, plan, variables, ids, mask, names)
    want, real = token_quant(fp["layer_0/attn_ln/out"], np.asarray(mask))
    real = np.broadcast_to(real, want.shape)
    np.testing.assert_allclose(got["layer_0/attn_ln/out"][real], want[real], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got["layer_0/attn_ln/out"], fp["layer_0/attn_ln/out"])
    # q (B, T, H, Dh): per token and head; the preset's own q rule alone, so that q sees
    # the FP model's input
    rule = next(r for r in plan.rules if r.matches("layer_0/attn/q", "act"))
    only_q = q.QuantPlan((rule, q.rule(".", off=True)), mode="quantize")
    q_fp = captured(cfg, q.QuantPlan(), variables, ids, mask, {"layer_0/attn/q"})
    q_got = captured(cfg, only_q, variables, ids, mask, {"layer_0/attn/q"})["layer_0/attn/q"]
    want, real = token_quant(q_fp["layer_0/attn/q"], np.asarray(mask))
    real = np.broadcast_to(real, want.shape)
    np.testing.assert_allclose(q_got[real], want[real], rtol=1e-5, atol=1e-6)


def test_bit_shortcuts_and_options():
    s = q.QuantPlan(q.setup_rules("w4a8:W3A6")).resolve("layer_0/ffn/fc2/weight", "weight")[0]
    assert (s.bits, s.granularity) == (3, "group")
    assert q.QuantPlan(q.setup_rules("w4a8:W3A6")).resolve("layer_0/ffn/act", "act")[0].bits == 6
    e8 = q.QuantPlan(q.setup_rules("w8a8_dynamic:W8A8E8"))
    s = e8.resolve("embed/word/weight", "weight")[0]
    assert (s.bits, s.granularity) == (8, "channel")
    s = q.QuantPlan(q.setup_rules("w4a16:W4A16E4")).resolve("embed/word/weight", "weight")[0]
    assert (s.bits, s.granularity, s.axis) == (4, "group", -1)
    s = q.QuantPlan(q.setup_rules("w8a8_static:W6A6")).resolve("layer_0/attn/q", "act")[0]
    assert s.bits == 6
    with pytest.raises(UserError, match="A16"):
        q.setup_rules("w4a16:W4A8")
    with pytest.raises(UserError, match="group_size"):
        q.setup_rules("w4a8", group_size=0)
    with pytest.raises(UserError, match="weight_scheme"):
        q.setup_rules("w4a16", weight_scheme="unsigned")
    with pytest.raises(UserError, match="weight_granularity"):
        q.setup_rules("w8a8_static", weight_granularity="group")
    # one config.eval.options for every LLM setup (eval passes them to each)
    shared = {"group_size": 64, "weight_estimator": "mse"}
    for setup in LLM:
        rules = q.setup_rules(setup, **shared)
        weights = [r.spec for r in rules if r.kind == "weight" and r.spec is not None]
        assert weights and all(w.estimator == "mse" for w in weights)


def test_group_view_keeps_output_columns():
    """granularity='group' along the input axis of a kernel: one range per (group, column);
    along the channel axis itself (the default axis): one range per group, as before."""
    from qtx.quant.ranges import make_view

    view = make_view((256, 8), q.QuantSpec(granularity="group", group_size=64, axis=0), -1)
    assert view.view_shape == (4, 64, 8) and view.axes == (1,)
    view = make_view((256, 8), q.QuantSpec(granularity="group", group_size=4), -1)
    assert view.view_shape == (256, 2, 4) and view.axes == (0, 2)
    view = make_view((48, 8), q.QuantSpec(granularity="group", group_size=128, axis=0), -1)
    assert view.view_shape == (1, 48, 8) and view.axes == (1,)


@pytest.mark.slow
def test_per_token_activations_run_as_integer_matmuls():
    """w8a8_dynamic's per-token scales reach the integer path: the o_proj input is one row
    per token across its heads (``axis=2``), a GQA key / value repeat carries its per-token
    scales, so every linear layer and q·k run in int8; only probs·v (a value scale varies
    along the keys it sums over) stays float. The integer model equals its fake quant."""
    from qtx.evaluate import integer as int_models
    from qtx.evaluate.ptq import calibrate_setup

    cfg = model_config("llama-tiny")
    variables = build(cfg).init(jax.random.key(0), **dummy_inputs(cfg))
    plan = q.QuantPlan(q.setup_rules("w8a8_dynamic"), mode="quantize")
    ids, mask = inputs(cfg)
    batch = {"input_ids": ids, "attention_mask": mask}
    variables = calibrate_setup(cfg, plan, variables["params"], [batch])
    iplan, int_vars, report = int_models.to_integer(cfg, plan, variables)
    assert set(report.float_matmuls) == {f"layer_{i}/attn/pv" for i in range(cfg.num_layers)}
    assert {"layer_0/attn/o_proj", "layer_0/attn/qk"} <= set(report.integer_matmuls)
    fq = build(cfg, plan).apply(variables, **batch)["logits"]
    out = build(cfg, iplan).apply(int_vars, **batch)["logits"]
    np.testing.assert_allclose(out, fq, rtol=1e-4, atol=1e-4)
    # the context's range: one per token over all heads
    rule = next(r for r in plan.rules if r.matches("layer_0/attn/context", "act"))
    view = q.ranges.make_view((3, 10, 4, 32), rule.spec, -1, 2, "layer_0/attn/context")
    assert view.axes == (2, 3)
