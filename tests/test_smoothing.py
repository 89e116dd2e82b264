"""SmoothQuant and Outlier Suppression+: the smoothed / shifted models equal the originals in
float32 (post-LN with shortcut_affine, pre-LN, RMSNorm, attention gates), the scales follow
their formulas on the real tokens only, each method changes what the quantizers see, and bad
models or options fail before compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx import quant
from qtx.errors import UserError
from qtx.hf.export import export_problems
from qtx.methods import capture
from qtx.methods.consumers import consumer_matrix, flat_params, group_specs, norm_groups
from qtx.methods.os_plus import OS_PLUS, os_plus
from qtx.methods.os_plus import check_options as os_check_options
from qtx.methods.smoothquant import (
    SMOOTHQUANT,
    SMOOTHQUANT_SEARCH,
    check_options,
    smoothquant,
    smoothquant_scales,
)
from qtx.models import build, dummy_inputs, model_config
from qtx.nn.attention import AttentionConfig
from qtx.train.losses import model_inputs

SMALL = dict(num_layers=2, vocab_size=128, max_positions=32)
FAST = {"os_plus_grid": 12, "smoothquant_alphas": [0.3, 0.5, 0.8]}


def text_batch(seed, family, b=3, t=10, pad_from=7):
    """Random ids; rows 1.. are padded from ``pad_from``."""
    r = np.random.default_rng(seed)
    ids = r.integers(3, 128, size=(b, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1:, pad_from:] = 0
    out = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    if family == "bert":
        out["token_type_ids"] = jnp.zeros((b, t), jnp.int32)
    return out


def image_batch(seed, cfg, b=3):
    shape = dummy_inputs(cfg, b)["images"].shape
    return {"image": jax.random.normal(jax.random.key(seed), shape)}


def random_norms(params, seed=0):
    """Every normalisation gets a random gain (|g| in [0.2, 2], random sign) and bias ~ N(0, 1)
    with a few large channels, so there are outliers and asymmetry to move."""
    r = np.random.default_rng(seed)
    flat = dict(flatten_dict(params))
    for k, v in flat.items():
        if not k[-2].endswith("ln"):
            continue
        if k[-1] == "scale":
            g = r.uniform(0.2, 2, v.shape) * r.choice([-1, 1], v.shape)
            g[:3] *= 8.0
            flat[k] = jnp.asarray(g.astype(np.float32))
        elif k[-1] == "bias":
            beta = r.normal(0, 1, v.shape)
            beta[3:5] += 6.0
            flat[k] = jnp.asarray(beta.astype(np.float32))
    return unflatten_dict(flat)


def setup(name, **kw):
    cfg = model_config(name, **(SMALL if name != "vit-tiny" else {"num_layers": 2}), **kw)
    params = random_norms(build(cfg).init(jax.random.key(0), **dummy_inputs(cfg))["params"])
    if cfg.family == "vit":
        calib = [image_batch(i, cfg) for i in range(2)]
    else:
        calib = [text_batch(i, cfg.family) for i in range(2)]
    return cfg, params, calib


def outputs(cfg, params, batch):
    out = build(cfg).apply(
        {"params": params}, **model_inputs(cfg.family, batch), output_hidden_states=True
    )
    return np.asarray(out["logits"]), [np.asarray(h) for h in out["hidden_states"]]


def assert_same_model(cfg, params, cfg2, params2, batch):
    y0, h0 = outputs(cfg, params, batch)
    y1, h1 = outputs(cfg2, params2, batch)
    mask = np.asarray(batch.get("attention_mask", np.ones(y0.shape[:2])), bool)
    if y0.ndim == 3:
        y0, y1 = y0[mask], y1[mask]
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5 * np.abs(y0).max())
    for a, b in zip(h0, h1, strict=True):  # hidden states as the original model's
        m = mask if a.shape[:2] == mask.shape else np.ones(a.shape[:2], bool)
        np.testing.assert_allclose(b[m], a[m], rtol=1e-5, atol=1e-5 * np.abs(a[m]).max())


METHODS = {
    "smoothquant": lambda c, p, b, plan: smoothquant(c, p, b, plan, FAST),
    "smoothquant_search": lambda c, p, b, plan: smoothquant(c, p, b, plan, FAST, search=True),
    "os_plus": lambda c, p, b, plan: os_plus(c, p, b, plan, FAST),
}
CASES = {
    "bert": ("bert-tiny", {}),
    "opt": ("opt-tiny", {}),
    "opt_linear_gate": ("opt-tiny", {"attention": AttentionConfig(gate="linear")}),
    "opt_mlp_gate": ("opt-tiny", {"attention": AttentionConfig(gate="mlp")}),
    "vit_mlp_gate": ("vit-tiny", {"attention": AttentionConfig(gate="mlp")}),
    "llama": ("llama-tiny", {}),
    "llama_output_gate": ("llama-tiny", {"attention": AttentionConfig(gate="headwise")}),
    "qwen_zero_centred": ("llama-tiny", {"norm": "rmsnorm_zero_centered", "qkv_bias": True}),
}


FAST_PAIRS = {
    ("bert", "os_plus"),
    ("bert", "smoothquant_search"),
    ("opt_mlp_gate", "os_plus"),
    ("llama_output_gate", "smoothquant"),
    ("qwen_zero_centred", "os_plus"),
}
PAIRS = [
    pytest.param(c, m, marks=() if (c, m) in FAST_PAIRS else pytest.mark.slow)
    for c in CASES
    for m in METHODS
    if m != "smoothquant_search" or c in ("bert", "llama_output_gate")
]


@pytest.mark.parametrize("case, method", PAIRS)
def test_smoothed_model_equals_the_original(case, method):
    name, kw = CASES[case]
    cfg, params, calib = setup(name, **kw)
    plan = quant.QuantPlan(quant.setup_rules("w8a8_static"), mode="quantize")
    cfg2, params2, info = METHODS[method](cfg, params, calib, plan)
    assert cfg2.shortcut_affine == (not cfg.pre_ln)
    assert info["groups"] == len(norm_groups(cfg, params))
    batch = calib[0] if cfg.family == "vit" else text_batch(9, cfg.family)
    assert_same_model(cfg, params, cfg2, params2, batch)
    changed = [
        k
        for k, v in flatten_dict(params).items()
        if not np.array_equal(np.asarray(v), np.asarray(flatten_dict(params2)[k]))
    ]
    assert any(k[-2].endswith("ln") for k in changed) and any(k[-1] == "kernel" for k in changed)
    if method == "os_plus":  # LayerNorm groups with biased consumers take a shift
        assert bool(info["shifted"]) == (cfg.family != "llama")


def test_post_ln_shortcut_parameters_and_a_second_smoothing():
    """BERT: every LN that feeds a shortcut gets shortcut_scale = s, shortcut_shift = z; the
    last layer's FFN LN (the head's) is untouched; smoothing again stays exact."""
    cfg, params, calib = setup("bert-tiny")
    cfg2, p2, _ = os_plus(cfg, params, calib, None, FAST)
    flat = flatten_dict(p2)
    shortcut = sorted("/".join(k[:-1]) for k in flat if k[-1] == "shortcut_scale")
    assert shortcut == ["embed/ln", "layer_0/attn_ln", "layer_0/ffn_ln", "layer_1/attn_ln"]
    last = ("layer_1", "ffn_ln", "scale")
    np.testing.assert_array_equal(flat[last], flatten_dict(params)[last])
    cfg3, p3, _ = smoothquant(cfg2, p2, calib, None, {"smoothquant_alpha": 0.7})
    assert_same_model(cfg, params, cfg3, p3, text_batch(5, "bert"))
    assert "config.model.shortcut_affine=True" in export_problems(cfg3)


def real_rows(x, mask):
    return np.asarray(x)[np.asarray(mask, bool)]


def test_scales_follow_their_formulas():
    """SmoothQuant's s and OS+'s z on BERT's embedding LN against NumPy on the LN output
    (hidden_states[0] at the real tokens) and the fused q/k/v kernels."""
    cfg, params, calib = setup("bert-tiny")
    rows = np.concatenate(
        [real_rows(outputs(cfg, params, b)[1][0], b["attention_mask"]) for b in calib]
    )
    attn = params["layer_0"]["attn"]
    w = np.concatenate([np.asarray(attn[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj")], 1)
    gamma = np.asarray(params["embed"]["ln"]["scale"])
    for alpha in (0.5, 0.85):
        _, p2, _ = smoothquant(cfg, params, calib, None, {"smoothquant_alpha": alpha})
        want = np.maximum(
            np.abs(rows).max(0) ** alpha / np.maximum(np.abs(w).max(1), 1e-5) ** (1 - alpha), 1e-5
        )
        got = gamma / np.asarray(p2["embed"]["ln"]["scale"])
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(p2["embed"]["ln"]["shortcut_scale"]), want, rtol=1e-5)
        np.testing.assert_allclose(
            smoothquant_scales(np.abs(rows).max(0), np.abs(w).max(1), alpha), want, rtol=1e-6
        )
    _, p3, info = os_plus(cfg, params, calib, None, FAST)
    z = (rows.max(0) + rows.min(0)) / 2
    np.testing.assert_allclose(np.asarray(p3["embed"]["ln"]["shortcut_shift"]), z, atol=1e-5)
    s = np.asarray(p3["embed"]["ln"]["shortcut_scale"])
    t = info["t"]["embed/ln"]
    half = (rows.max(0) - rows.min(0)) / 2
    np.testing.assert_allclose(s, np.maximum(1.0, half / t), rtol=1e-5)


def test_methods_move_what_the_quantizers_see():
    """OS+ centres every shifted LN output channel and shrinks its largest |value|;
    SmoothQuant lowers the max / median ratio of the channels' maxima."""
    cfg, params, calib = setup("opt-tiny")
    readers = [g.reader for g in norm_groups(cfg, params)]

    def stat(c, p, which):
        return capture.dense_inputs(c, p, calib, which, paths=readers)

    lo, hi = stat(cfg, params, "min"), stat(cfg, params, "max")
    cfg2, p2, _ = os_plus(cfg, params, calib, None, FAST)
    lo2, hi2 = stat(cfg2, p2, "min"), stat(cfg2, p2, "max")
    for r in readers:
        assert np.abs(hi2[r] + lo2[r]).max() < 1e-4 * np.abs(hi[r] + lo[r]).max()
        assert max(hi2[r].max(), -lo2[r].min()) < max(hi[r].max(), -lo[r].min())
    a0 = stat(cfg, params, "absmax")
    cfg3, p3, _ = smoothquant(cfg, params, calib, None, {"smoothquant_alpha": 0.5})
    a1 = stat(cfg3, p3, "absmax")
    for r in readers:
        assert a1[r].max() / np.median(a1[r]) < a0[r].max() / np.median(a0[r])


def test_padding_does_not_change_the_scales():
    """Other ids at the padded positions (real tokens unchanged) give the same model."""
    cfg, params, calib = setup("bert-tiny")
    noisy = []
    for i, b in enumerate(calib):
        pad = ~np.asarray(b["attention_mask"], bool)
        ids = np.where(
            pad, np.random.default_rng(100 + i).integers(3, 128, pad.shape), b["input_ids"]
        )
        noisy.append({**b, "input_ids": jnp.asarray(ids, jnp.int32)})
    assert any(
        not np.array_equal(a["input_ids"], b["input_ids"])
        for a, b in zip(calib, noisy, strict=True)
    )
    _, pa, _ = os_plus(cfg, params, calib, None, FAST)  # min, max and rows
    _, pb, _ = os_plus(cfg, params, noisy, None, FAST)
    for k, v in flatten_dict(pa).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flatten_dict(pb)[k]))


def test_search_picks_the_least_quantized_error():
    """SmoothQuant's searched alpha of a group has the least error of the grid, with the
    plan's own quantizers (W8A8 static) on the group's rows."""
    from qtx.methods.consumers import group_errors, weight_absmax

    cfg, params, calib = setup("llama-tiny")
    plan = quant.QuantPlan(quant.setup_rules("w8a8_static"), mode="quantize")
    opts = {"smoothquant_alphas": [0.0, 0.25, 0.5, 0.75, 1.0]}
    _, _, info = smoothquant(cfg, params, calib, plan, opts, search=True)
    g = norm_groups(cfg, params)[0]
    flat = flat_params(params)
    act = capture.dense_inputs(cfg, params, calib, "absmax", paths=[g.reader])[g.reader]
    rows = capture.dense_inputs(cfg, params, calib, "rows", paths=[g.reader])[g.reader]
    grid = opts["smoothquant_alphas"]
    cands = np.stack([smoothquant_scales(act, weight_absmax(flat, g), a) for a in grid])
    mats = [consumer_matrix(flat, c) for c in g.consumers]
    errs = group_errors(rows, mats, group_specs(plan, g), cands)
    assert info["alphas"][g.name] == grid[int(np.argmin(errs))]
    assert group_specs(plan, g)[0].bits == 8
    for setup_name in ("w8a8_dynamic", "w4a8"):  # per-token acts, grouped 4-bit weights
        other = quant.QuantPlan(quant.setup_rules(setup_name), mode="quantize")
        specs = group_specs(other, g)
        assert specs[0].granularity == "token" and specs[1][0].bits in (4, 8)
        assert np.all(np.isfinite(group_errors(rows, mats, specs, cands)))


def test_refusals():
    cfg, params, _ = setup("bert-tiny")
    with pytest.raises(UserError, match=r"gamma_migrated=True\); allowed: gamma_migrated=False"):
        SMOOTHQUANT.check(cfg.replace(gamma_migrated=True))
    with pytest.raises(UserError, match=r"allowed: config.model.scan_layers=False"):
        OS_PLUS.check(cfg.replace(scan_layers=True))
    OS_PLUS.check(model_config("opt-tiny", scan_layers=True))  # pre-LN: no shortcut
    with pytest.raises(UserError, match=r"family='swin' is not supported"):
        SMOOTHQUANT_SEARCH.check(model_config("swin-tiny"))
    with pytest.raises(UserError, match=r"smoothquant_alpha=1.5 is invalid; allowed: a number"):
        check_options({"smoothquant_alpha": 1.5})
    with pytest.raises(UserError, match=r"smoothquant_alphas=\[\] is invalid"):
        check_options({"smoothquant_alphas": []})
    with pytest.raises(UserError, match=r"os_plus_grid=0 is invalid; allowed: a positive"):
        os_check_options({"os_plus_grid": 0})
    # the config itself refuses both, before any model is built
    with pytest.raises(UserError, match=r"shortcut_affine=True is invalid; allowed: False with"):
        cfg.replace(shortcut_affine=True, gamma_migrated=True)
    with pytest.raises(UserError, match=r"scan_layers=True is invalid; allowed: False with"):
        cfg.replace(shortcut_affine=True, scan_layers=True)


@pytest.mark.slow
def test_smoothed_bert_runs_as_an_integer_model():
    """A smoothed post-LN model (shortcut parameters read from QArray LN outputs) converts
    to an integer model that matches its fake-quant twin."""
    from qtx.evaluate import integer as int_models
    from qtx.evaluate.ptq import calibrate_setup

    cfg, params, calib = setup("bert-tiny")
    plan = quant.QuantPlan(quant.setup_rules("W8A8"), mode="quantize")
    cfg2, p2, _ = os_plus(cfg, params, calib, plan, FAST)
    variables = calibrate_setup(cfg2, plan, p2, calib)
    iplan, int_vars, report = int_models.to_integer(cfg2, plan, variables)
    assert report.integer_matmuls
    x = model_inputs(cfg2.family, calib[0])
    fq = build(cfg2, plan).apply(variables, **x)
    twin = build(cfg2, int_models.fake_twin(iplan)).apply(int_vars, **x)
    out = build(cfg2, iplan).apply(int_vars, **x)
    # up to the MLM head: the tied head of the converted models reads the int8 table
    hidden = "last_hidden_state"
    np.testing.assert_allclose(twin[hidden], fq[hidden], rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(out["logits"])))
