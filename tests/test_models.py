"""Models: softmax functions against NumPy, causal gates, point names vs the docs, outlier
metrics, every family under W8A8 (grids, error size, gradients) and the model options
(OPT left padding, dropout, drop path, remat, bfloat16)."""

import dataclasses
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import qtx.quant as q
from qtx.evaluate.outliers import OutlierAccumulator, track_patterns
from qtx.models import build, dummy_inputs, model_config
from qtx.models.opt import opt_position_ids
from qtx.nn import (
    ATTENTION,
    AttentionConfig,
    BlockConfig,
    Gate,
    TransformerLayer,
    clipped_softmax,
    off_by_one_softmax,
)
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


def test_kurtosis_of_gaussian_is_about_three():
    """Per-sequence kurtosis of Gaussian data is 3 within 5 standard errors of the sample
    kurtosis (``sqrt(24 / n)`` for n samples), and equals ``mean((x - mu)^4) / s^4`` with the
    unbiased ``s``."""
    x = jax.random.normal(jax.random.key(0), (8, 128, 64))
    k = np.asarray(kurtosis_per_sequence(x))
    assert np.all(np.abs(k - 3.0) < 5 * np.sqrt(24 / (128 * 64)))
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
    "swin": ("swin-tiny", {}),
    "llama": ("llama-tiny", {}),
    "qwen3-like": ("llama-tiny", {"qk_norm": True, "tie_embeddings": False, "head_dim": 16}),
}
# points of one layer: 22 in the shared layer; the decoder's SwiGLU has two more (gate, up
# and their projections instead of fc1, hidden, fc2), q/k norms two more
LAYER_POINTS = {"llama": 24, "qwen3-like": 26}


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
        key = re.sub(r"^(stage_\d+/)?layer_\d+/", "layer_{i}/", p)
        key = re.sub(r"^stage_\d+/merge/", "stage_{s}/merge/", key)
        assert key in doc, f"point {p} is not documented"
        assert doc[key] == kind
    first = "stage_0/layer_1/" if cfg.family == "swin" else "layer_1/"
    assert sum(p.startswith(first) for p in pts) == LAYER_POINTS.get(case, 22)


# Small text models: one layer, narrow, a short vocabulary (fast to compile).
SMALL_TEXT = dict(num_layers=1, vocab_size=512, hidden_size=32, intermediate_size=64)


def random_inputs(cfg, key, batch=2, seq_len=8):
    """Token ids in the vocabulary with a right-padded second row, or N(0, 1) images."""
    if cfg.family in ("vit", "swin"):
        shape = (batch, cfg.image_size, cfg.image_size, cfg.num_channels)
        return {"images": jax.random.normal(key, shape)}
    ids = jax.random.randint(key, (batch, seq_len), 3, cfg.vocab_size)
    mask = np.ones((batch, seq_len), np.int32)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": jnp.asarray(mask)}


def capture_points(fn):
    """``fn()`` run with every QuantPoint call recorded: ``(result, {name: (input, output)})``;
    a table lookup (``rows``) records ``(looked-up rows, output, table)``."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if isinstance(context.module, q.QuantPoint) and context.method_name == "__call__":
            x, rows = args[0], kwargs.get("rows")
            seen["/".join(context.module.path)] = (
                (x, y) if rows is None else (jnp.take(x, rows, axis=0), y, x)
            )
        return y

    with nn.intercept_methods(record):
        return fn(), seen


W8A8_CASES = {
    "bert-mlm": ("bert-tiny", SMALL_TEXT, "linear"),
    "opt": ("opt-tiny", SMALL_TEXT, "all_heads_linear"),  # a gate with a weight point
    # init_std 0.2: the class token is not lost below one step of the embedding-sum grid
    "vit": ("vit-tiny", dict(num_layers=1, init_std=0.2), "mlp"),
    # a shifted-window block, patch merging and one padded window per stage
    "swin": (
        "swin-tiny",
        dict(
            hidden_size=16, intermediate_size=32, depths=(2, 1), stage_heads=(2, 2), image_size=20
        ),
        "linear",
    ),
}


@pytest.mark.parametrize("case", sorted(W8A8_CASES))
def test_forward_backward_under_w8a8(case):
    """W8A8 (``w8a8_all``) after calibration on two batches, on a third batch:

    * the points that change their input are exactly the points the preset turns on
      (``match_report`` over ``list_points``): all but gates, LM/MLM heads and logits;
    * every quantized tensor lies on its 8-bit grid: weights ``k * max|w| / 127`` with
      ``k in [-128, 127]``, activations ``k * s`` with ``s = (max(hi, 0) - min(lo, 0)) / 255``
      from the calibrated range and ``k + z in [0, 255]``, within ``s / 2`` of the input;
    * the logits differ from full precision by a rounding-noise-sized amount: more than a
      tenth of the root-sum-square of the points' own relative errors, less than their sum;
    * gradients (straight-through) are finite and reach every parameter the logits depend
      on (all but BERT's pooler).
    """
    name, over, gate = W8A8_CASES[case]
    cfg = model_config(name, over, attention={"gate": gate, "pi_init": 0.25})
    plan = q.QuantPlan(q.setup_rules("W8A8"), mode="calibrate")
    batches = [random_inputs(cfg, jax.random.key(i)) for i in range(3)]
    x = batches[2]
    fp_model, calib_model = build(cfg), build(cfg, plan)
    params = jax.jit(fp_model.init)(jax.random.key(0), **x)["params"]
    # LayerNorm scales off 1.0, so that no weight starts exactly on its grid
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a * (1 + 0.1 * np.cos(np.arange(a.size))) if path[-1].key == "scale" else a,
        params,
    )
    v = q.calibrate(
        lambda v, b: calib_model.apply(v, **b, mutable=[q.STATS]), {"params": params}, batches[:2]
    )
    stats = flatten_dict(v[q.STATS])
    quant_model = build(cfg, plan.with_mode("quantize"))

    fp_logits = jax.jit(fp_model.apply)({"params": params}, **x)["logits"]

    def loss(p):
        out, seen = capture_points(lambda: quant_model.apply({**v, "params": p}, **x))
        return jnp.mean(out["logits"] ** 2), (out["logits"], seen)

    (_, (q_logits, seen)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    seen = {k: [np.asarray(a, np.float64) for a in io] for k, io in seen.items()}

    points = q.list_points(fp_model.apply, {"params": params}, **x)
    report = q.match_report(plan, {k: kind for k, (kind, _) in points.items()})
    # FP: gates, heads, logits, and the fc1 output (the reference fuses fc1 with its activation)
    kept = {p for p in points if re.search(r"(^|/)(lm_head|mlm_head|gate)/|logits$|ffn/hidden$", p)}
    assert set(report.quantized) == set(points) - kept
    changed = {k for k, (a, b, *_) in seen.items() if not np.array_equal(a, b)}
    assert set(seen) == set(points) and changed == set(report.quantized)
    calibrated = {"/".join(k[:-1]) for k in stats if k[-1] == "lo"}
    assert calibrated == {p for p in report.quantized if points[p][0] == "act"}

    rel_errors = []
    for name_ in report.quantized:
        a, y, *table = seen[name_]  # an embedding's rows share the grid of its table
        if points[name_][0] == "weight":
            s, kmin, kmax = np.abs(table[0] if table else a).max() / 127, -128, 127
            inside = np.ones(a.shape, bool)
        else:
            lo = min(float(stats[(*name_.split("/"), "lo")]), 0.0)
            hi = max(float(stats[(*name_.split("/"), "hi")]), 0.0)
            s = (hi - lo) / 255
            z = np.round(-lo / s)
            kmin, kmax = -z, 255 - z
            inside = (a >= lo) & (a <= hi)
        k = y / s
        np.testing.assert_allclose(k, np.round(k), atol=2e-3, err_msg=name_)
        assert k.min() >= kmin - 1e-3 and k.max() <= kmax + 1e-3, name_
        assert np.abs(y - a)[inside].max() <= s / 2 * (1 + 1e-3), name_
        rel_errors.append(np.linalg.norm(y - a) / np.linalg.norm(a))
    rel_errors = np.array(rel_errors)
    fp_logits, q_logits = np.asarray(fp_logits), np.asarray(q_logits)
    err = np.linalg.norm(q_logits - fp_logits) / np.linalg.norm(fp_logits)
    assert 0.1 * np.sqrt(np.sum(rel_errors**2)) < err < min(np.sum(rel_errors), 0.2)

    grads = flatten_dict(grads)
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    unused = {k for k in grads if k[0] == "pooler"} if cfg.family == "bert" else set()
    assert {k for k, g in grads.items() if not np.any(g)} == unused


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


def test_opt_left_padding_leaves_real_tokens_unchanged():
    """The real tokens of a left-padded row get the logits of the same tokens right-padded
    (which, the model being causal, are those of the unpadded sequence): positions count real
    tokens only (``cumsum(mask) * mask - 1 + 2``, as HF OPT), padded keys are masked and
    per-head gates pool over real tokens only."""
    n, pad = 5, 3
    mask = jnp.array([[1] * n + [0] * pad, [0] * pad + [1] * n])
    np.testing.assert_array_equal(
        opt_position_ids(mask, 2), [[2, 3, 4, 5, 6, 1, 1, 1], [1, 1, 1, 2, 3, 4, 5, 6]]
    )
    cfg = model_config(
        "opt-tiny", SMALL_TEXT, attention={"gate": "linear", "gate_condition": "head"}
    )
    m = build(cfg)
    tokens = jax.random.randint(jax.random.key(0), (n,), 3, cfg.vocab_size)
    pads = jnp.full((pad,), cfg.pad_token_id)
    ids = jnp.stack([jnp.concatenate([tokens, pads]), jnp.concatenate([pads, tokens])])
    v = m.init(jax.random.key(1), ids, mask)
    logits = np.asarray(m.apply(v, ids, mask)["logits"])
    np.testing.assert_allclose(logits[1, pad:], logits[0, :n], atol=1e-5)


def test_dropout_and_drop_path_are_random_in_training_and_off_when_deterministic():
    """Hidden dropout, attention dropout and drop path each change the training output, with
    a new mask per rng and the same output for the same rng; deterministic runs ignore the
    rng."""
    cfg0 = model_config("bert-tiny", SMALL_TEXT, dropout=0.0, attention_dropout=0.0)
    x = random_inputs(cfg0, jax.random.key(0))
    for rates in (dict(dropout=0.3), dict(attention_dropout=0.3), dict(drop_path=0.5)):
        m = build(cfg0.replace(**rates))
        v = m.init(jax.random.key(1), **x)

        def run(deterministic, seed=None, m=m, v=v):
            rngs = None if seed is None else {"dropout": jax.random.key(seed)}
            out = m.apply(v, **x, deterministic=deterministic, rngs=rngs)
            return np.asarray(out["last_hidden_state"])

        det = run(True)
        np.testing.assert_array_equal(det, run(True, 5))
        train = run(False, 1)
        np.testing.assert_array_equal(train, run(False, 1))
        assert np.abs(train - det).max() > 1e-2, rates
        assert np.abs(train - run(False, 2)).max() > 1e-2, rates


def test_vit_drop_path_grows_linearly_over_the_layers():
    """DeiT's stochastic depth: layer i drops with rate drop_path * i / (L - 1)."""
    cfg = model_config("vit-tiny", dict(num_layers=3, drop_path=0.2))
    rates = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, TransformerLayer) and context.method_name == "__call__":
            rates[context.module.name] = context.module.cfg.drop_path
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), **dummy_inputs(cfg)))
    assert rates == pytest.approx({"layer_0": 0.0, "layer_1": 0.1, "layer_2": 0.2})


def test_residual_dropout_and_drop_path_in_a_layer():
    """A pre-LN layer whose FFN branch is zero, so ``out = x + drop(attn)``; with the
    deterministic branch ``a = attn``, in training:

    * dropout (rate p): each element of ``out - x`` is 0 or ``a / (1 - p)``, about half 0;
    * drop path (rate p): per example ``out - x`` is 0 (branch dropped) or ``a / (1 - p)``
      (kept), both occur.
    """
    x = jax.random.normal(jax.random.key(0), (16, 5, 32))
    xn = np.asarray(x)
    for rates in (dict(dropout=0.5), dict(drop_path=0.5)):
        block = BlockConfig(hidden_size=32, num_heads=4, intermediate_size=64, pre_ln=True)
        layer = TransformerLayer(dataclasses.replace(block, **rates))
        params = layer.init(jax.random.key(1), x)["params"]
        params["ffn"]["fc2"] = jax.tree.map(jnp.zeros_like, params["ffn"]["fc2"])
        branch = np.asarray(layer.apply({"params": params}, x)) - xn
        assert np.abs(branch).max(axis=(1, 2)).min() > 1e-3  # no example has a zero branch
        out = layer.apply(
            {"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(2)}
        )
        delta = np.asarray(out) - xn
        scaled = branch / 0.5
        if "dropout" in rates:
            ok = np.where(delta == 0, True, np.isclose(delta, scaled, rtol=1e-4, atol=1e-5))
            assert ok.all() and 0.3 < (delta != 0).mean() < 0.7
        else:
            dropped = np.all(delta == 0, axis=(1, 2))
            kept = np.array([np.allclose(delta[i], scaled[i], atol=1e-5) for i in range(16)])
            assert np.all(dropped | kept) and 2 <= kept.sum() <= 14


def test_remat_gives_the_same_outputs_and_gradients():
    """``remat=True`` wraps every layer in ``jax.checkpoint`` (one remat call per layer in
    the jaxpr) and changes neither the parameters, the loss nor the gradients, in training
    mode with dropout and drop path (the same rng gives the same masks)."""
    cfg = model_config("opt-tiny", SMALL_TEXT, num_layers=2, dropout=0.2, drop_path=0.3)
    x = random_inputs(cfg, jax.random.key(0))
    rng = jax.random.key(2)
    params = build(cfg).init(jax.random.key(1), **x)["params"]
    results = []
    for remat in (False, True):
        m = build(cfg.replace(remat=remat))
        shapes = jax.eval_shape(m.init, jax.random.key(1), **x)["params"]
        assert jax.tree.structure(shapes) == jax.tree.structure(params)

        def loss(p, m=m):  # training mode: dropout masks must not change under remat
            out = m.apply({"params": p}, **x, deterministic=False, rngs={"dropout": rng})
            return jnp.mean(out["logits"] ** 2)

        eqns = jax.make_jaxpr(loss)(params).jaxpr.eqns
        names = [e.primitive.name for e in eqns]
        assert sum("remat" in n or "checkpoint" in n for n in names) == (2 if remat else 0)
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), g1, g0)


def test_bfloat16_computes_in_bfloat16_close_to_float32():
    """``dtype='bfloat16'`` keeps float32 parameters, computes the matmuls in bfloat16 (the
    queries, the attention probabilities, the FFN output) with a float32 residual stream, and
    gives float32 logits within bfloat16 rounding of the float32 model's (relative error
    1e-4 .. 3e-2)."""
    cfg = model_config("opt-tiny", SMALL_TEXT)
    x = random_inputs(cfg, jax.random.key(0))
    fp32, bf16 = build(cfg), build(cfg.replace(dtype="bfloat16"))
    params = fp32.init(jax.random.key(1), **x)["params"]
    bf16_params = jax.eval_shape(bf16.init, jax.random.key(1), **x)["params"]
    assert {a.dtype for a in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.float32)}
    want = np.asarray(fp32.apply({"params": params}, **x)["logits"])
    (out, sown), seen = capture_points(
        lambda: bf16.apply({"params": params}, **x, mutable=[ATTENTION])
    )
    assert seen["layer_0/attn/q"][0].dtype == jnp.bfloat16
    assert sown[ATTENTION]["layer_0"]["attn"]["probs"][0].dtype == jnp.bfloat16
    assert seen["layer_0/ffn/out"][0].dtype == jnp.bfloat16
    # the residual stream and LayerNorm outputs stay float32, as under PyTorch AMP
    assert seen["layer_0/residual_ffn"][0].dtype == jnp.float32
    assert out["last_hidden_state"].dtype == jnp.float32
    assert out["logits"].dtype == jnp.float32
    err = np.linalg.norm(np.asarray(out["logits"]) - want) / np.linalg.norm(want)
    assert 1e-4 < err < 3e-2


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
