"""Attention against NumPy float64 references written from the formulas: gates (every gate
and condition, fine-tuning mode), softmax variants (in MultiHeadAttention and in a model),
and the head axis of the attention quantization points."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import qtx.quant as q
from qtx.models import build, model_config
from qtx.nn import ATTENTION, AttentionConfig, MultiHeadAttention

B, T, D, H = 2, 5, 32, 4
DH = D // H
TOKEN_MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)  # second row: 2 pad tokens


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_probs(scores, allowed, cfg):
    """Attention probabilities of ``cfg.softmax`` over the last axis, masked keys excluded.

    vanilla: ``e_i / sum_j e_j``; clipped: ``clip((zeta - gamma) * softmax + gamma, 0, 1)``
    with ``gamma = -alpha / (softmax_T or S)``, ``zeta = 1`` in the alpha form;
    off_by_one: ``e_i / (1 + sum_j e_j)`` (``e = exp(scores)``, 0 at masked keys).
    """
    s = np.where(allowed, scores, -np.inf)
    if cfg.softmax == "off_by_one":
        e = np.exp(s)
        return e / (1.0 + e.sum(-1, keepdims=True))
    e = np.exp(s - s.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    if cfg.softmax == "vanilla":
        return p
    if cfg.alpha is not None:
        gamma, zeta = -cfg.alpha / (cfg.softmax_T or scores.shape[-1]), 1.0
    else:
        gamma, zeta = cfg.gamma, cfg.zeta
    return np.clip((zeta - gamma) * p + gamma, 0.0, 1.0)


def np_gate(gp, cfg, x, token_mask, causal):
    """``pi`` (B, T or 1, H) from the gate parameters ``gp``: ``sigmoid`` of the logits

    * linear: ``x_h @ w_h + b_h`` on head h's slice ``x_h`` of x;
    * mlp / mlp_wide: ``relu(x_h @ W1_h + b1_h) @ w2_h + b_h``;
    * all_heads_linear: ``x @ W + b`` on the full x (D -> H);
    * condition ``head``: logits averaged over the real tokens (running mean if causal);
      ``none``: one learned logit per head;

    divided by ``pi_init`` in fine-tuning mode.
    """
    b, t, _ = x.shape
    xh = x.reshape(b, t, H, DH)
    if cfg.gate_condition == "none":
        logits = gp["logit"][None, None, :]
    elif cfg.gate == "all_heads_linear":
        logits = x @ gp["dense"]["kernel"] + gp["dense"]["bias"]
    elif cfg.gate == "linear":
        logits = np.stack([xh[:, :, h] @ gp["kernel"][h] for h in range(H)], -1) + gp["bias"]
    else:
        per_head = []
        for h in range(H):
            z = np.maximum(xh[:, :, h] @ gp["hidden_kernel"][h] + gp["hidden_bias"][h], 0.0)
            per_head.append(z @ gp["out_kernel"][h])
        logits = np.stack(per_head, -1) + gp["bias"]
    if cfg.gate_condition == "head":
        m = token_mask[..., None].astype(np.float64)
        if causal:
            logits = np.stack(
                [
                    (logits[:, : i + 1] * m[:, : i + 1]).sum(1) / m[:, : i + 1].sum(1)
                    for i in range(t)
                ],
                1,
            )
        else:
            logits = (logits * m).sum(1, keepdims=True) / m.sum(1, keepdims=True)
    pi = sigmoid(logits)
    return pi / cfg.pi_init if cfg.gate_finetune else pi


def np_attention(p, cfg, x, allowed, pi=None):
    """``o_proj(pi * softmax_variant(q k^T / sqrt(Dh)) v)`` per head, from the parameters."""
    b, t, _ = x.shape
    proj = lambda n: (x @ p[n]["kernel"] + p[n]["bias"]).reshape(b, t, H, DH)  # noqa: E731
    qh, kh, vh = proj("q_proj"), proj("k_proj"), proj("v_proj")
    scores = np.einsum("bthd,bshd->bhts", qh, kh) / np.sqrt(DH)
    probs = np_probs(scores, allowed, cfg)
    ctx = np.einsum("bhts,bshd->bthd", probs, vh)
    if pi is not None:
        ctx = ctx * pi[..., None]
    return ctx.reshape(b, t, D) @ p["o_proj"]["kernel"] + p["o_proj"]["bias"], probs


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def inputs(causal=False):
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    allowed = TOKEN_MASK[:, None, None, :]
    if causal:
        allowed = allowed & np.tril(np.ones((T, T), bool))[None, None]
    return x, jnp.asarray(allowed), jnp.asarray(TOKEN_MASK)


@pytest.mark.parametrize("condition", ["token", "head", "none"])
@pytest.mark.parametrize("gate", ["linear", "mlp", "mlp_wide", "all_heads_linear"])
def test_gated_attention_matches_numpy(gate, condition):
    """MultiHeadAttention with a gate equals ``o_proj(pi * softmax(q k^T / sqrt(Dh)) v)`` in
    float64 with ``pi`` from the gate's parameters, in training and fine-tuning mode (with
    non-zero gate weights), and causally pooled for per-head gates in a decoder."""
    hidden = {"mlp": DH // 4, "mlp_wide": DH}.get(gate)
    variants = [dict(gate_finetune=False), dict(gate_finetune=True)]
    if condition == "head":
        variants.append(dict(gate_finetune=False, causal=True))
    for variant in variants:
        causal = variant.pop("causal", False)
        cfg = AttentionConfig(
            gate=gate, gate_condition=condition, pi_init=0.25, gate_init_std=0.3, **variant
        )
        mha = MultiHeadAttention(H, cfg, init_std=0.3, causal=causal)
        x, allowed, token_mask = inputs(causal)
        params = mha.init(jax.random.key(1), x, allowed, token_mask)["params"]
        gp = params["gate"]
        logit0 = np.log(0.25 / 0.75)
        if condition == "none":  # one logit per head: 0, or logit(pi_init) when fine-tuning
            np.testing.assert_allclose(gp["logit"], logit0 if cfg.gate_finetune else 0.0, 1e-6)
        else:
            bias = gp["dense"]["bias"] if gate == "all_heads_linear" else gp["bias"]
            np.testing.assert_allclose(bias, np.full(H, logit0), rtol=1e-6)
            if hidden is not None:
                assert gp["hidden_kernel"].shape == (H, DH, hidden)
                assert gp["out_kernel"].shape == (H, hidden)
            kernels = [a for k, a in flatten_dict(gp).items() if k[-1].endswith("kernel")]
            assert all(0.1 < float(jnp.std(w)) < 0.6 for w in kernels)  # gate_init_std = 0.3
        # distinct logits per head, so a gate applied to the wrong head shows
        leaves, tree = jax.tree.flatten(gp)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        noisy = [a + 0.5 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
        gp = jax.tree.unflatten(tree, noisy)
        params = {**params, "gate": gp}
        y = mha.apply({"params": params}, x, allowed, token_mask)
        p64 = f64(params)
        x64, allowed_np, tm = np.asarray(x, np.float64), np.asarray(allowed), np.asarray(token_mask)
        pi = np_gate(p64["gate"], cfg, x64, tm, causal)
        want, _ = np_attention(p64, cfg, x64, allowed_np, pi)
        np.testing.assert_allclose(
            np.asarray(y), want, rtol=1e-4, atol=1e-4, err_msg=f"{cfg} causal={causal}"
        )
        ungated, _ = np_attention(p64, cfg, x64, allowed_np)
        assert np.abs(want - ungated).max() > 0.1  # the gate matters for these inputs


def test_finetune_gate_starts_as_the_ungated_attention():
    """In fine-tuning mode with ``gate_init_std=0`` every gate starts at ``pi / pi_init = 1``,
    so the attention equals the ungated one (a pretrained model starts unchanged)."""
    x, allowed, token_mask = inputs()
    for gate in ("linear", "mlp", "mlp_wide", "all_heads_linear"):
        for condition in ("token", "head", "none"):
            cfg = AttentionConfig(
                gate=gate,
                gate_condition=condition,
                pi_init=0.25,
                gate_finetune=True,
                gate_init_std=0.0,
            )
            mha = MultiHeadAttention(H, cfg, init_std=0.3)
            params = mha.init(jax.random.key(1), x, allowed, token_mask)["params"]
            y = np.asarray(mha.apply({"params": params}, x, allowed, token_mask))
            p64 = f64({k: v for k, v in params.items() if k != "gate"})
            want, _ = np_attention(p64, cfg, np.asarray(x, np.float64), np.asarray(allowed))
            np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4, err_msg=str(cfg))


@pytest.mark.parametrize(
    "att",
    [
        dict(softmax="vanilla"),
        dict(softmax="clipped", gamma=-0.03, zeta=1.03),
        dict(softmax="clipped", alpha=2.0, softmax_T=32),
        dict(softmax="clipped", alpha=0.5),
        dict(softmax="off_by_one"),
    ],
    ids=["vanilla", "clipped-gamma-zeta", "clipped-alpha-T", "clipped-alpha-keylen", "off_by_one"],
)
def test_attention_softmax_variant_matches_numpy(att):
    """The sown probabilities and the output of MultiHeadAttention follow the variant's
    formula (see ``np_probs``); the clipped variants give exact zeros (and exact ones when
    ``zeta > 1``) on these large logits, so the variants cannot be confused."""
    cfg = AttentionConfig(**att)
    mha = MultiHeadAttention(H, cfg, init_std=0.5)
    x, allowed, token_mask = inputs()
    params = mha.init(jax.random.key(1), x, allowed, token_mask)["params"]
    y, sown = mha.apply({"params": params}, x, allowed, token_mask, mutable=[ATTENTION])
    probs = np.asarray(sown[ATTENTION]["probs"][0])
    want_y, want_p = np_attention(f64(params), cfg, np.asarray(x, np.float64), np.asarray(allowed))
    np.testing.assert_allclose(probs, want_p, atol=2e-5)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-4, atol=1e-4)
    real = np.broadcast_to(np.asarray(allowed), probs.shape)
    sums = want_p.sum(-1)
    if cfg.softmax == "clipped":
        assert (probs[real] == 0.0).sum() >= 10  # exact zeros at real keys
        if cfg.zeta > 1:
            assert (probs == 1.0).sum() >= 2
        assert np.abs(sums - 1).max() > 0.05  # rows no longer sum to 1
    elif cfg.softmax == "off_by_one":
        assert np.all(sums < 1) and (1 - sums).max() > 0.05
    else:
        np.testing.assert_allclose(sums, 1.0, atol=1e-12)


@pytest.mark.parametrize(
    "name,init_std,att",
    [
        ("opt-tiny", 0.5, dict(softmax="clipped", alpha=4.0, softmax_T=16)),
        ("bert-tiny", 0.02, dict(softmax="off_by_one")),
    ],
)
def test_model_attention_uses_the_configured_softmax(name, init_std, att):
    """In a model, every layer's sown probabilities are the configured variant of its
    masked scores (``scores`` point), so ``config.model.attention.softmax`` reaches the
    layers; here clipped entries are exact zeros (large logits) and off-by-one rows sum to
    about ``S / (S + 1)`` (small logits)."""
    cfg = model_config(name, num_layers=1, init_std=init_std, attention=att)
    m = build(cfg)
    ids = jax.random.randint(jax.random.key(3), (2, 8), 3, cfg.vocab_size)
    mask = jnp.array([[1] * 8, [1] * 6 + [0] * 2])
    v = m.init(jax.random.key(0), ids, mask)
    scores = {}

    def capture(next_fun, args, kwargs, context):
        if isinstance(context.module, q.QuantPoint) and context.module.name == "scores":
            scores["s"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        _, sown = m.apply(v, ids, mask, mutable=[ATTENTION])
    probs = np.asarray(sown[ATTENTION]["layer_0"]["attn"]["probs"][0])
    allowed = np.asarray(mask, bool)[:, None, None, :]
    if cfg.family == "opt":
        allowed = allowed & np.tril(np.ones((8, 8), bool))
    want = np_probs(np.asarray(scores["s"], np.float64), allowed, cfg.attention)
    np.testing.assert_allclose(probs, want, atol=2e-5)
    if cfg.attention.softmax == "clipped":
        assert (probs[np.broadcast_to(allowed, probs.shape)] == 0).sum() >= 10
    else:
        assert want.sum(-1).max() < 0.95


HEAD_POINTS = {"q": 2, "k": 2, "v": 2, "context": 2, "scores": 1, "softmax": 1}


def _head_plan(mode):
    return q.QuantPlan(
        (
            q.rule(
                r"(^|/)(q|k|v|scores|softmax|context)$",
                "act",
                granularity="head",
                estimator="minmax",
            ),
        ),
        mode=mode,
    )


def _calibrated_ranges(params, x):
    mha = MultiHeadAttention(H, plan=_head_plan("calibrate"), init_std=0.3)
    _, stats = mha.apply({"params": params}, x, mutable=[q.STATS])
    return {n: (np.asarray(s["lo"]), np.asarray(s["hi"])) for n, s in stats[q.STATS].items()}


def test_head_granularity_gives_one_range_per_head_on_the_head_axis():
    """``granularity='head'`` calibrates q, k, v, context (head axis 2) and scores, softmax
    (head axis 1) with one range per head; scaling head 1 of the queries by 3 and head 2 of
    the values by 2 moves exactly the ranges of those heads; in quantize mode each head of q
    lies on the grid of its own step ``(hi - lo) / 255``."""
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    mha = MultiHeadAttention(H, plan=_head_plan("calibrate"), init_std=0.3)
    params = mha.init(jax.random.key(1), x)["params"]
    base = _calibrated_ranges(params, x)
    assert set(base) == set(HEAD_POINTS)
    for name, axis in HEAD_POINTS.items():
        want = [1, 1, 1, 1]
        want[axis] = H
        assert base[name][0].shape == tuple(want), name
        width = (base[name][1] - base[name][0]).ravel()
        assert len(np.unique(width)) == H, name  # the heads really have their own ranges

    def scale_head(p, proj, head, c):
        cols = np.ones(D, np.float32)
        cols[head * DH : (head + 1) * DH] = c
        return {**p, proj: {"kernel": p[proj]["kernel"] * cols, "bias": p[proj]["bias"] * cols}}

    scaled = scale_head(scale_head(params, "q_proj", 1, 3.0), "v_proj", 2, 2.0)
    new = _calibrated_ranges(scaled, x)

    def heads_changed(name):
        lo0, hi0 = (a.ravel() for a in base[name])
        lo1, hi1 = (a.ravel() for a in new[name])
        return {
            h for h in range(H) if not (np.isclose(lo0[h], lo1[h]) and np.isclose(hi0[h], hi1[h]))
        }

    assert heads_changed("q") == {1} and heads_changed("scores") == {1}
    np.testing.assert_allclose(new["q"][1].ravel()[1], 3 * base["q"][1].ravel()[1], rtol=1e-5)
    np.testing.assert_allclose(
        new["scores"][0].ravel()[1], 3 * base["scores"][0].ravel()[1], rtol=1e-5
    )
    assert heads_changed("k") == set()
    assert heads_changed("v") == {2}
    np.testing.assert_allclose(new["v"][0].ravel()[2], 2 * base["v"][0].ravel()[2], rtol=1e-5)
    assert heads_changed("softmax") <= {1} and heads_changed("context") == {1, 2}

    # quantize mode: head h of q is a multiple of its own step s_h (asymmetric, 8 bits)
    quant = MultiHeadAttention(H, plan=_head_plan("quantize"), init_std=0.3)
    stats = {n: {"lo": jnp.asarray(lo), "hi": jnp.asarray(hi)} for n, (lo, hi) in base.items()}
    got = {}

    def capture(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if isinstance(context.module, q.QuantPoint) and context.module.name == "q":
            got["q"] = (args[0], y)
        return y

    with nn.intercept_methods(capture):
        quant.apply({"params": params, q.STATS: stats}, x)
    q_in, q_out = (np.asarray(a, np.float64) for a in got["q"])
    lo, hi = (a.ravel().astype(np.float64) for a in base["q"])
    steps = (np.maximum(hi, 0) - np.minimum(lo, 0)) / 255
    assert len(np.unique(steps)) == H
    for h in range(H):
        k = q_out[:, :, h] / steps[h]
        np.testing.assert_allclose(k, np.round(k), atol=1e-3, err_msg=f"head {h}")
        assert np.abs(q_out[:, :, h] - q_in[:, :, h]).max() <= steps[h] / 2 * 1.001


def test_qv_lsq_per_head_learns_one_step_per_head():
    """``qv_lsq(per_head=True)`` declares a learnable step with H entries on the head axis
    for q, k, v, softmax and context; without ``per_head`` the steps are scalars."""
    cfg = model_config("bert-tiny", num_layers=1)
    x = {"input_ids": jnp.ones((2, 8), jnp.int32)}
    for per_head in (True, False):
        plan = q.QuantPlan(q.preset_rules("qv_lsq", "W4A4", per_head=per_head), mode="learn")
        shapes = jax.eval_shape(build(cfg, plan).init, jax.random.key(0), **x)["params"]
        attn = shapes["layer_0"]["attn"]
        for name, axis in {"q": 2, "k": 2, "v": 2, "context": 2, "softmax": 1}.items():
            step = attn[name]["step"].shape
            if per_head:
                want = [1, 1, 1, 1]
                want[axis] = cfg.num_heads
                assert step == tuple(want), name
            else:
                assert step == (), name
        assert "step" not in attn.get("scores", {})
