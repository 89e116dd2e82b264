"""Quantization points: modes, jitted calibration, presets and match reports, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qtx.quant as q
from qtx.quant import QuantPlan, QuantPoint, QuantSpec


def P(plan, name, **kw):
    return QuantPoint(plan, name=name, **kw)


class Dense(nn.Module):
    features: int
    plan: QuantPlan

    @nn.compact
    def __call__(self, h):
        w = self.param("kernel", nn.initializers.normal(0.5), (h.shape[-1], self.features))
        return h @ QuantPoint(self.plan, "weight", name="weight")(w)


class LN(nn.Module):
    plan: QuantPlan

    @nn.compact
    def __call__(self, h):
        g = QuantPoint(self.plan, "weight", name="weight")(
            self.param("scale", nn.initializers.ones, (h.shape[-1],))
        )
        h = (h - h.mean(-1, keepdims=True)) / (h.std(-1, keepdims=True) + 1e-5) * g
        return P(self.plan, "out")(h)


class Attn(nn.Module):
    plan: QuantPlan

    @nn.compact
    def __call__(self, h):
        p, heads = self.plan, h.shape[:2] + (2, 4)
        qq = P(p, "q", head_axis=2)(Dense(8, p, name="q_proj")(h).reshape(heads))
        kk = P(p, "k", head_axis=2)(Dense(8, p, name="k_proj")(h).reshape(heads))
        vv = P(p, "v", head_axis=2)(Dense(8, p, name="v_proj")(h).reshape(heads))
        s = P(p, "scores", head_axis=1)(jnp.einsum("bthd,bshd->bhts", qq, kk) / 2.0)
        pr = P(p, "softmax", head_axis=1)(jax.nn.softmax(s, -1))
        gate = jax.nn.sigmoid(Dense(1, p, name="gate")(h))
        ctx = jnp.einsum("bhts,bshd->bthd", pr, vv) * gate[..., None]
        ctx = P(p, "context", head_axis=2)(ctx).reshape(h.shape[:2] + (8,))
        return P(p, "out")(Dense(8, p, name="o_proj")(ctx))


class FFN(nn.Module):
    plan: QuantPlan

    @nn.compact
    def __call__(self, h):
        p = self.plan
        z = P(p, "hidden")(Dense(16, p, name="fc1")(h))
        a = nn.gelu(z)
        self.sow("probe", "act_in", a)  # the act point's input, when 'probe' is mutable
        a = self.perturb("act_out", P(p, "act")(a))  # its output cotangent, for gradients
        return P(p, "out")(Dense(8, p, name="fc2")(a))


class Layer(nn.Module):
    plan: QuantPlan

    @nn.compact
    def __call__(self, h):
        p = self.plan
        h = LN(p, name="attn_ln")(P(p, "residual_attn")(h + Attn(p, name="attn")(h)))
        return LN(p, name="ffn_ln")(P(p, "residual_ffn")(h + FFN(p, name="ffn")(h)))


class Toy(nn.Module):
    """A one-layer post-LN stand-in using the point names of the model convention."""

    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, ids):
        p = self.plan
        emb = self.param("embedding", nn.initializers.normal(1.0), (11, 8))
        h = QuantPoint(p, "weight", channel_axis=0, name="embed_word_weight")(emb)[ids]
        h = Layer(p, name="layer_0")(P(p, "embed_sum")(h))
        return P(p, "logits")(h @ emb.T)


X = jnp.asarray(np.random.default_rng(0).integers(0, 11, size=(3, 5)))


def points_of(model, variables):
    return {k: v[0] for k, v in q.list_points(model.apply, variables, X).items()}


def init(plan):
    m = Toy(plan)
    return m, m.init(jax.random.key(0), X)


def test_points_are_listed_with_kinds():
    m, v = init(QuantPlan())
    pts = points_of(m, v)
    assert pts["layer_0/attn/softmax"] == "act"
    assert pts["layer_0/ffn/fc1/weight"] == "weight"
    assert "layer_0/attn_ln/out" in pts and "layer_0/residual_ffn" in pts
    assert len(pts) == 26


def test_w8a8_all_turns_on_exactly_the_expected_points():
    plan = QuantPlan(q.setup_rules("W8A8"), mode="quantize")
    m, v = init(plan)
    rep = q.match_report(plan, points_of(m, v))
    off = set(rep.matched) - set(rep.quantized)
    assert off == {"layer_0/attn/gate/weight", "logits", "layer_0/ffn/hidden"}
    assert "layer_0/attn/scores" in rep.quantized and "layer_0/residual_attn" in rep.quantized
    # the toy has no `embed/` prefix, so the embedding-weight rule is reported as unused
    assert rep.unused_rules == ["embedding weights"]
    assert "matched no point: embedding weights" in str(rep)


def test_os_placement_and_qv_presets_select_their_points():
    plan = QuantPlan(q.setup_rules("os_fastertransformer:W6A6E6"), mode="quantize")
    m, v = init(plan)
    rep = q.match_report(plan, points_of(m, v))
    acts = {n for n in rep.quantized if not n.endswith("weight")}
    assert acts == {
        f"layer_0/{n}"
        for n in (
            "attn/q",
            "attn/k",
            "attn/v",
            "attn/softmax",
            "attn/context",
            "attn_ln/out",
            "ffn/act",
            "ffn_ln/out",
        )
    }
    assert "layer_0/attn_ln/weight" not in rep.quantized
    plan = QuantPlan(q.setup_rules("qv_lsq:W4A4"), mode="learn")
    m, v = init(plan)
    rep = q.match_report(plan, points_of(m, v))
    assert "layer_0/ffn/out" not in rep.quantized and "layer_0/ffn/act" in rep.quantized
    spec, _ = plan.resolve("layer_0/ffn/act", "act")
    assert spec.learn == "lsq+" and spec.scheme == "unsigned" and spec.bits == 4
    spec, _ = plan.resolve("layer_0/attn/q_proj/weight", "weight")
    assert spec.learn == "lsq" and spec.grad_scale == "weight_l1"


def test_unmatched_points_and_rules_are_reported():
    plan = QuantPlan(
        (q.rule(r"attn/softmax$", "act", bits=8), q.rule(r"no_such_point", bits=4)), mode="quantize"
    )
    m, v = init(plan)
    rep = q.match_report(plan, points_of(m, v))
    assert rep.quantized == ["layer_0/attn/softmax"]
    assert "layer_0/ffn/out" in rep.unmatched_points
    assert rep.unused_rules == ["any:no_such_point"]


def np_running_minmax(batches, momentum=0.9):
    lo, hi = None, None
    for b in batches:
        if lo is None:
            lo, hi = b.min(), b.max()
        else:
            lo = momentum * lo + (1 - momentum) * b.min()
            hi = momentum * hi + (1 - momentum) * b.max()
    return lo, hi


class Identity(nn.Module):
    plan: QuantPlan

    @nn.compact
    def __call__(self, x):
        return QuantPoint(self.plan, name="x")(x)


def test_jitted_calibration_matches_numpy_running_minmax():
    plan = QuantPlan(
        (q.rule(".", bits=8, estimator="running_minmax", momentum=0.9),), mode="calibrate"
    )
    m = Identity(plan)
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(4, 7)).astype(np.float32) * (1 + i) for i in range(6)]
    v = m.init(jax.random.key(0), batches[0])
    v = q.calibrate(lambda v, b: m.apply(v, b, mutable=[q.STATS]), v, batches)
    lo, hi = np_running_minmax(batches)
    st = v[q.STATS]["x"]
    np.testing.assert_allclose(float(st["lo"]), lo, rtol=1e-6)
    np.testing.assert_allclose(float(st["hi"]), hi, rtol=1e-6)
    assert int(st["count"]) == 6
    # frozen: quantize mode uses exactly these ranges
    y = Identity(plan.with_mode("quantize")).apply(v, batches[0])
    spec = QuantSpec()
    want = q.ranges.fake_quant_range(jnp.asarray(batches[0]), lo, hi, spec)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-6)


def test_calibrate_mode_output_and_quantize_needs_stats():
    """Parallel calibration passes x on unchanged; sequential passes it on fake-quantized with
    the range so far (here one batch: the batch's min/max on a 4-bit asymmetric grid)."""
    plan = QuantPlan((q.rule(".", bits=4),), mode="calibrate", calibration="parallel")
    x = jnp.linspace(-1, 1, 12).reshape(3, 4)
    v = Identity(plan).init(jax.random.key(0), x)
    y, _ = Identity(plan).apply(v, x, mutable=[q.STATS])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    y, _ = Identity(plan.with_calibration("sequential")).apply(v, x, mutable=[q.STATS])
    s = 2.0 / 15
    z = np.round(1.0 / s)
    want = (np.clip(np.round(np.asarray(x) / s) + z, 0, 15) - z) * s
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-6)
    with pytest.raises(ValueError, match="'x' has no calibration statistics"):
        Identity(plan.with_mode("quantize")).apply(v, x)


def test_nan_during_calibration_names_the_point():
    plan = QuantPlan((q.rule(".", bits=8),), mode="calibrate")
    m = Identity(plan)
    x = np.ones((2, 3), np.float32)
    v = m.init(jax.random.key(0), x)
    bad = x.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="batch 1 .*NaN/Inf at quantization point.*x"):
        q.calibrate(lambda v, b: m.apply(v, b, mutable=[q.STATS]), v, [x, bad])


def test_mixed_modes_weights_frozen_activations_learn():
    """Weights frozen by their rule's mode while activation steps learn. LSQ+ at ``ffn/act``
    starts at ``s = (hi - lo) / 15``, ``beta = lo``; with a grid that clips at both ends its
    gradients are, per element with ``v = (x - beta) / s`` and ``g = 1 / sqrt(N * Qp)``:
    ``d/ds = g * (round(v) - v)`` inside, ``g * qmin`` / ``g * qmax`` clipped;
    ``d/dbeta = 0`` inside, ``g`` clipped."""
    rules = (
        q.rule(
            r"weight$",
            "weight",
            bits=4,
            scheme="symmetric",
            estimator="current_minmax",
            mode="quantize",
        ),
        q.rule(r"ffn/act$", "act", bits=4, scheme="unsigned", learn="lsq+", estimator="minmax"),
        q.rule(r".", "act", bits=4, scheme="symmetric", learn="lsq", estimator="lsq_init"),
    )
    plan = QuantPlan(rules, mode="calibrate")
    assert plan.resolve("layer_0/ffn/fc1/weight", "weight")[1] == "quantize"
    assert plan.resolve("layer_0/ffn/act", "act")[1] == "calibrate"
    m = Toy(plan)
    v = jax.jit(m.init)(jax.random.key(0), X)
    v.pop("probe")
    assert "offset" in v["params"]["layer_0"]["ffn"]["act"]
    assert "weight" not in v["params"]["layer_0"]["ffn"]["fc1"]  # frozen weights: no step
    v = q.calibrate(lambda v, b: m.apply(v, b, mutable=[q.STATS]), v, [X])
    v = q.init_learnable(v)
    st = v[q.STATS]["layer_0"]["ffn"]["act"]
    s0 = (st["hi"] - st["lo"]) / 15
    np.testing.assert_allclose(v["params"]["layer_0"]["ffn"]["act"]["step"], s0, rtol=1e-6)
    np.testing.assert_allclose(v["params"]["layer_0"]["ffn"]["act"]["offset"], st["lo"], rtol=1e-6)

    # shrink the grid and shift it up so that the calibrated data clips at both ends
    s, beta = np.float32(0.5 * s0), np.float32(st["lo"] + 2 * s0)
    params = jax.tree.map(lambda a: a, v["params"])
    params["layer_0"]["ffn"]["act"] = {"step": jnp.asarray(s), "offset": jnp.asarray(beta)}
    learn = Toy(plan.with_mode("learn"))

    def loss(params, pert):
        y, probe = learn.apply({**v, "params": params, "perturbations": pert}, X, mutable=["probe"])
        return jnp.sum(y**2), probe["probe"]["layer_0"]["ffn"]["act_in"]

    (g, g_pert), (x,) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(
        params, v["perturbations"]
    )
    ct = np.asarray(g_pert["layer_0"]["ffn"]["act_out"], np.float64)
    x = np.asarray(x)
    vv = (x - beta) / s
    below, above = vv < 0, vv > 15
    assert below.any() and above.any()
    gs = 1 / np.sqrt(x.size * 15)
    ds = np.where(below, 0.0, np.where(above, 15.0, np.round(vv) - vv))
    want_s = gs * np.sum(ct * ds)
    want_b = gs * np.sum(ct * (below | above))
    ga = g["layer_0"]["ffn"]["act"]
    assert abs(want_b) > 1e-3 * gs * np.abs(ct).sum()
    np.testing.assert_allclose(float(ga["step"]), want_s, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(ga["offset"]), want_b, rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(g["layer_0"]["attn"]["softmax"]["step"])) > 0
    assert float(jnp.abs(g["layer_0"]["ffn"]["fc1"]["kernel"]).sum()) > 0
    # quantize mode: the same learnable points, but their steps get no gradient
    frozen = Toy(plan.with_mode("quantize"))
    g2 = jax.jit(jax.grad(lambda p: jnp.sum(frozen.apply({**v, "params": p}, X) ** 2)))(params)
    assert float(jnp.abs(g2["layer_0"]["attn"]["softmax"]["step"])) == 0
    assert float(jnp.abs(g2["layer_0"]["ffn"]["act"]["offset"])) == 0
    assert float(jnp.abs(g2["layer_0"]["ffn"]["fc1"]["kernel"]).sum()) > 0


def test_binary_point():
    plan = QuantPlan(
        (q.rule(".", bits=1, scheme="symmetric", estimator="current_minmax"),), mode="quantize"
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    y = Identity(plan).apply({}, x)
    # sign(x) mean|x| per example: each row's own mean, whatever else is in the batch
    want = np.sign(np.asarray(x)) * np.abs(np.asarray(x)).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6)
    # sequences: per token (b, t), over its features; padding and batch-mates change nothing
    seq = rng.normal(size=(3, 6, 8)).astype(np.float32) * rng.uniform(0.1, 5, (3, 6, 1))
    y = np.asarray(Identity(plan).apply({}, jnp.asarray(seq)))
    want = np.sign(seq) * np.abs(seq).mean(axis=2, keepdims=True)
    np.testing.assert_allclose(y, want, rtol=1e-6)
    alone = np.asarray(Identity(plan).apply({}, jnp.asarray(seq[:1, :4])))
    np.testing.assert_allclose(alone, y[:1, :4], rtol=1e-6)
    # per-head q / k / v / context (B, T, H, Dh), head axis 2: per token = over (H, Dh)
    heads = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)

    class Heads(nn.Module):
        @nn.compact
        def __call__(self, x):
            return QuantPoint(plan, head_axis=2, name="q")(x)

    y = np.asarray(Heads().apply({}, jnp.asarray(heads)))
    want = np.sign(heads) * np.abs(heads).mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(y, want, rtol=1e-6)
    # a (B, H, W, C) feature map (Swin) without a head axis: per token = over C only
    grid = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    y = np.asarray(Identity(plan).apply({}, jnp.asarray(grid)))
    np.testing.assert_allclose(y, np.sign(grid) * np.abs(grid).mean(-1, keepdims=True), rtol=1e-6)


def test_per_head_point_and_bad_axis():
    plan = QuantPlan(
        (
            q.rule(r"softmax$", bits=8, scheme="unsigned", granularity="head"),
            q.rule(r"attn/q$", bits=8, granularity="channel", axis=7),
        ),
        mode="calibrate",
    )
    with pytest.raises(ValueError, match="'layer_0/attn/q': channel axis 7 is out of range"):
        Toy(plan).init(jax.random.key(0), X)
    plan = QuantPlan(plan.rules[:1], mode="calibrate")
    m = Toy(plan)
    v = m.init(jax.random.key(0), X)
    v = q.calibrate(lambda v, b: m.apply(v, b, mutable=[q.STATS]), v, [X])
    assert v[q.STATS]["layer_0"]["attn"]["softmax"]["hi"].shape == (1, 2, 1, 1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=20), "'bits'=20 is invalid; allowed: 1 \\(binary\\) or 2..16"),
        (dict(bits=0), "'bits'=0"),
        (dict(estimator="kl"), "'estimator'='kl' is invalid; allowed: current_minmax"),
        (dict(granularity="row"), "'granularity'='row' is invalid; allowed: tensor"),
        (dict(percentile=0.0), "'percentile'=0.0 is invalid; allowed: a number in \\(0, 100\\]"),
        (dict(percentile=101), "'percentile'=101"),
        (dict(scheme="signed"), "'scheme'='signed'"),
        (dict(learn="lsq", estimator="current_minmax"), "calibrating estimator"),
        (dict(granularity="group"), "'group_size'=None"),
    ],
)
def test_bad_specs_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_bad_rules_and_shortcuts():
    with pytest.raises(ValueError, match="unknown quantization setting"):
        q.rule_from_dict({"pattern": "x", "bitz": 8})
    with pytest.raises(ValueError, match="no 'pattern'"):
        q.rule_from_dict({"bits": 8})
    with pytest.raises(ValueError, match="bits 'W8' are invalid"):
        q.setup_rules("W8")
    with pytest.raises(ValueError, match="preset 'nope' is unknown"):
        q.preset_rules("nope")
    with pytest.raises(ValueError, match="config.quant has unknown field"):
        q.plan_from_config({"presett": "w8a8_all"})
    assert q.parse_bits("W6A6E6") == {"w": 6, "a": 6, "e": 6}
    assert q.parse_bits("w4a8") == {"w": 4, "a": 8, "e": None}


def test_plan_from_config_rules_override_preset():
    plan = q.plan_from_config(
        {
            "preset": "w8a8_all",
            "bits": "W8A8",
            "rules": [{"pattern": "softmax$", "kind": "act", "bits": 6, "scheme": "unsigned"}],
            "mode": "quantize",
        }
    )
    spec, mode = plan.resolve("layer_0/attn/softmax", "act")
    assert (spec.bits, spec.scheme, mode) == (6, "unsigned", "quantize")
    spec, _ = plan.resolve("layer_0/ffn/out", "act")
    assert spec.bits == 8


def test_plan_needs_calibration_from_its_mode_or_a_rule_mode():
    rule = q.QuantRule("dense", QuantSpec(bits=8))
    assert not QuantPlan().needs_calibration
    assert not QuantPlan((rule,)).needs_calibration  # rules, but every point is off
    assert QuantPlan((rule,), mode="calibrate").needs_calibration
    learn = q.QuantRule("dense", QuantSpec(bits=4, mode="learn"))
    assert QuantPlan((learn,)).needs_calibration  # a rule's own mode
    assert not QuantPlan((q.QuantRule("dense", QuantSpec(mode="off")),)).needs_calibration


def test_quantizer_params_are_the_learnable_points_step_and_offset():
    """The names a learnable LSQ+ point declares, as key tuples, strings and the regex."""
    import re

    from flax.traverse_util import flatten_dict

    rules = (q.rule(r"weight$", bits=4, scheme="unsigned", learn="lsq+", estimator="minmax"),)
    plan = QuantPlan(rules, mode="calibrate")
    x = jnp.ones((2, 3))
    params = jax.jit(Dense(4, plan).init)(jax.random.key(0), x)["params"]
    keys = set(flatten_dict(params))
    assert {k for k in keys if q.is_quantizer_param(k)} == {
        ("weight", "step"),
        ("weight", "offset"),
    }
    assert q.QUANTIZER_PARAMS == ("step", "offset")
    assert q.is_quantizer_param("layer_0/fc1/weight/offset")
    assert not q.is_quantizer_param("layer_0/fc1/kernel")
    assert re.search(q.QUANTIZER_PARAM_PATTERN, "layer_0/fc1/weight/step")
    assert not re.search(q.QUANTIZER_PARAM_PATTERN, "layer_0/fc1/stepper")
