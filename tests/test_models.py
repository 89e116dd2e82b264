"""Models: attention variants against NumPy, gates, point names vs the docs, outlier metrics,
and forward/backward of every family under the W8A8 preset."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qtx.quant as q
from qtx.evaluate.outliers import OutlierAccumulator, track_patterns
from qtx.models import build, dummy_inputs, model_config
from qtx.nn import AttentionConfig, Gate, MultiHeadAttention, clipped_softmax, off_by_one_softmax
from qtx.quant.observe import kurtosis_per_sequence

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "quantization_points.md"


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_clipped_softmax_values_zeros_and_gradient():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 16)).astype(np.float32) * 4
    gamma, zeta = -0.03, 1.0
    y = np.asarray(clipped_softmax(jnp.asarray(x), gamma, zeta))
    want = np.clip((zeta - gamma) * np_softmax(x.astype(np.float64)) + gamma, 0, 1)
    np.testing.assert_allclose(y, want, atol=1e-6)
    clipped = want == 0
    assert clipped.sum() > 10 and np.all(y[clipped] == 0.0)  # exact zeros
    w = rng.normal(size=x.shape).astype(np.float32)
    g = np.asarray(jax.grad(lambda x: jnp.sum(w * clipped_softmax(x, gamma, zeta)))(x))
    # d/dx through the unclipped entries only: J^T (w * 1[unclipped]) * (zeta - gamma)
    p = np_softmax(x.astype(np.float64))
    u = w * (~clipped) * (zeta - gamma)
    want_g = p * (u - np.sum(u * p, -1, keepdims=True))
    np.testing.assert_allclose(g, want_g, atol=1e-5)
    # a row whose entries are all clipped except one passes no gradient to clipped logits
    x1 = jnp.asarray([[10.0, -10.0, -10.0]])
    g1 = jax.grad(lambda x: clipped_softmax(x, -0.1, 1.0)[0, 1])(x1)
    np.testing.assert_array_equal(np.asarray(g1), 0.0)


def test_clipped_softmax_alpha_parametrisation():
    cfg = AttentionConfig(softmax="clipped", alpha=12.0, softmax_T=512)
    assert cfg.clip_bounds(100) == pytest.approx((-12 / 512, 1.0))
    assert AttentionConfig(softmax="clipped", alpha=4.0).clip_bounds(128) == (-4 / 128, 1.0)


def test_off_by_one_softmax():
    x = np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32) * 5
    want = np.exp(x) / (1 + np.exp(x).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(off_by_one_softmax(jnp.asarray(x))), want, rtol=1e-5)


def _context(cfg, params, x):
    """Per-head context (B, T, H, Dh) captured by a listing of the context point's input."""
    plan = q.QuantPlan((q.rule(r"context$", bits=16, estimator="current_minmax"),), mode="quantize")

    class Capture(nn.Module):
        @nn.compact
        def __call__(self, x):
            return MultiHeadAttention(4, cfg, plan, name="attn")(x)

    m = Capture()
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.module.name == "context" and context.method_name == "__call__":
            captured["ctx"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        m.apply({"params": params}, x)
    return captured["ctx"]


@pytest.mark.parametrize("gate", ["linear", "mlp", "mlp_wide", "all_heads_linear"])
@pytest.mark.parametrize("condition", ["token", "head", "none"])
def test_gated_attention_is_vanilla_times_gate(gate, condition):
    rng = jax.random.key(0)
    x = jax.random.normal(rng, (2, 5, 16))
    gcfg = AttentionConfig(gate=gate, gate_condition=condition, pi_init=0.25, gate_init_std=0.3)
    vcfg = AttentionConfig()

    class M(nn.Module):
        cfg: AttentionConfig

        @nn.compact
        def __call__(self, x):
            return MultiHeadAttention(4, self.cfg, name="attn")(x)

    params = M(gcfg).init(rng, x)["params"]
    vparams = {"attn": {k: v for k, v in params["attn"].items() if k != "gate"}}
    ctx_g = _context(gcfg, params, x)
    ctx_v = _context(vcfg, vparams, x)
    pi = Gate(4, gcfg).apply({"params": params["attn"]["gate"]}, x)
    assert pi.shape == {"token": (2, 5, 4), "head": (2, 1, 4), "none": (1, 1, 4)}[condition]
    np.testing.assert_allclose(np.asarray(ctx_g), np.asarray(ctx_v * pi[..., None]), atol=1e-6)
    # gate forced to 1 (fine-tuning mode, zero weights, pi = pi_init): equals vanilla
    fcfg = AttentionConfig(
        gate=gate, gate_condition=condition, pi_init=0.25, gate_finetune=True, gate_init_std=0.0
    )
    p1 = M(fcfg).init(rng, x)["params"]  # zero weights, bias logit(pi_init): gate = 1
    p1 = {"attn": {**params["attn"], "gate": p1["attn"]["gate"]}}
    y1 = M(fcfg).apply({"params": p1}, x)
    yv = M(vcfg).apply({"params": vparams}, x)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(yv), atol=1e-5)


def test_kurtosis_of_gaussian_is_about_three():
    x = jax.random.normal(jax.random.key(0), (8, 128, 64))
    k = np.asarray(kurtosis_per_sequence(x))
    assert np.all(np.abs(k - 3.0) < 0.1)
    x = np.random.default_rng(0).normal(size=(2, 50, 4))
    flat = x.reshape(2, -1)
    s = flat.std(1, ddof=1)
    want = np.mean((flat - flat.mean(1, keepdims=True)) ** 4, 1) / (s**4 + 1e-6)
    np.testing.assert_allclose(np.asarray(kurtosis_per_sequence(jnp.asarray(x))), want, rtol=1e-4)


def documented_points():
    rows = re.findall(r"^\| `([^`]+)` \| (weight|act) \|", DOCS.read_text(), re.M)
    return dict(rows)


FAMILY_CASES = {
    "bert-mlm": ("bert-tiny", {"head": "mlm"}),
    "bert-cls": ("bert-tiny", {"head": "classification"}),
    "roberta": ("roberta-tiny", {"head": "mlm"}),
    "opt": ("opt-tiny", {}),
    "opt-350m-like": ("opt-tiny", {"word_embed_proj_dim": 64, "pre_ln": False, "final_ln": False}),
    "vit": ("vit-tiny", {}),
    "deit-distilled": ("vit-tiny", {"distillation_token": True}),
}


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_point_names_match_the_documentation(case):
    name, over = FAMILY_CASES[case]
    cfg = model_config(name, over)
    m = build(cfg)
    x = dummy_inputs(cfg)
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), **x))
    pts = q.list_points(m.apply, v, **x)
    doc = documented_points()
    for p, (kind, _) in pts.items():
        key = re.sub(r"^layer_\d+/", "layer_{i}/", p)
        assert key in doc, f"point {p} is not documented"
        assert doc[key] == kind
    assert sum(p.startswith("layer_1/") for p in pts) == 22


@pytest.mark.parametrize("case", ["bert-mlm", "opt", "vit"])
@pytest.mark.parametrize("mode", ["calibrate", "learn"])
def test_forward_backward_under_w8a8(case, mode):
    name, over = FAMILY_CASES[case]
    cfg = model_config(name, over, attention={"gate": "linear", "pi_init": 0.25})
    plan = q.QuantPlan(q.setup_rules("W8A8"), mode="calibrate")
    x = dummy_inputs(cfg)
    x = jax.tree.map(lambda a: a + jnp.arange(a.shape[-1], dtype=a.dtype) % 5, x)
    m = build(cfg, plan)
    v = m.init(jax.random.key(0), **x)
    v = q.calibrate(lambda v, b: m.apply(v, **b, mutable=[q.STATS]), v, [x])
    model = build(cfg, plan.with_mode(mode))

    def loss(params):
        out = model.apply({**v, "params": params}, **x, mutable=[q.STATS])[0]
        return jnp.mean(out["logits"] ** 2)

    val, g = jax.jit(jax.value_and_grad(loss))(v["params"])
    assert np.isfinite(float(val))
    norms = [float(jnp.abs(t).sum()) for t in jax.tree.leaves(g)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2


def test_outlier_statistics_are_collected_in_one_pass():
    cfg = model_config("bert-tiny")
    plan = q.QuantPlan(track=track_patterns("bert"))
    m = build(cfg, plan)
    x = dummy_inputs(cfg, batch=3)
    v = m.init(jax.random.key(0), **x)
    _, inter = jax.jit(lambda v, x: m.apply(v, **x, mutable=["intermediates"]))(v, x)
    acc = OutlierAccumulator("bert")
    acc.update(inter["intermediates"])
    s = acc.summary()
    assert set(s["per_layer"]) == {
        f"layer_{i}/{t}" for i in (0, 1) for t in ("ffn/out", "ffn_ln/out", "residual_ffn")
    }
    assert np.isfinite(s["max_inf_norm"]) and np.isfinite(s["avg_kurtosis"])


def test_opt_is_causal():
    cfg = model_config("opt-tiny")
    m = build(cfg)
    ids = jnp.arange(1, 9)[None] % 50
    v = m.init(jax.random.key(0), ids)
    a = m.apply(v, ids)["logits"]
    b = m.apply(v, ids.at[0, 6].set(3))["logits"]
    np.testing.assert_allclose(np.asarray(a[0, :6]), np.asarray(b[0, :6]), atol=1e-6)
    assert not np.allclose(np.asarray(a[0, 6:]), np.asarray(b[0, 6:]))


@pytest.mark.parametrize("condition", ["token", "head", "none"])
@pytest.mark.parametrize("gate", ["linear", "mlp", "mlp_wide", "all_heads_linear"])
def test_opt_gates_never_see_a_later_token(gate, condition):
    """Per-head gates pool causally in OPT: changing token 6 leaves logits 0..5 unchanged,
    with and without left padding."""
    cfg = model_config(
        "opt-tiny", num_layers=1, attention={"gate": gate, "gate_condition": condition}
    )
    m = build(cfg)
    ids = jnp.arange(1, 9)[None] % 50
    v = m.init(jax.random.key(0), ids)
    for first, mask in ((0, None), (2, jnp.array([[0, 0, 1, 1, 1, 1, 1, 1]]))):
        a = m.apply(v, ids, attention_mask=mask)["logits"]
        b = m.apply(v, ids.at[0, 6].set(3), attention_mask=mask)["logits"]
        real = slice(first, 6)  # padded rows attend to everything masked, as in HF
        np.testing.assert_allclose(np.asarray(a[0, real]), np.asarray(b[0, real]), atol=1e-6)
        assert not np.allclose(np.asarray(a[0, 6:]), np.asarray(b[0, 6:]))


def test_causal_head_gate_is_a_running_mean_of_the_token_logits():
    cfg = AttentionConfig(gate="linear", gate_condition="head")
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    mask = jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], bool)
    token = Gate(2, AttentionConfig(gate="linear"))
    v = token.init(jax.random.key(2), x)
    logits = np.log(np.asarray(token.apply(v, x)) / (1 - np.asarray(token.apply(v, x))))
    m = np.asarray(mask, np.float64)[..., None]
    running = np.cumsum(logits * m, 1) / np.maximum(np.cumsum(m, 1), 1)
    pooled = (logits * m).sum(1, keepdims=True) / m.sum(1, keepdims=True)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    got = Gate(2, cfg, causal=True).apply(v, x, mask)
    np.testing.assert_allclose(np.asarray(got), sig(running), atol=1e-6)
    got = Gate(2, cfg).apply(v, x, mask)
    np.testing.assert_allclose(np.asarray(got), sig(pooled), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(family="gpt"), "config.model.family='gpt' is invalid; allowed: bert, roberta"),
        (dict(head="clm"), "config.model.head='clm' is invalid"),
        (dict(num_heads=5), "config.model.num_heads=5 is invalid; allowed: a divisor"),
        (dict(dtype="fp8"), "config.model.dtype='fp8'"),
        (dict(attention={"softmax": "sparsemax"}), "attention.softmax='sparsemax'"),
        (dict(attention={"gate": "conv"}), "attention.gate='conv'"),
        (dict(attention={"pi_init": 1.5}), "attention.pi_init=1.5"),
        (dict(hidden_sise=3), "config.model has unknown field"),
    ],
)
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        model_config("bert-tiny", kwargs)
    with pytest.raises(ValueError, match="config.model.name='bert-huge' is unknown"):
        model_config("bert-huge")
