"""The hand-written backward passes (dense_dot, softmax_last) against their closed forms,
the dot_product_attention kernel against the written-out attention, and the CLM loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

import qtx.quant as q
from qtx.models import build, dummy_inputs, model_config
from qtx.nn.kernels import dense_dot, softmax_last
from qtx.train.losses import task_loss


def test_dense_dot_gradients_are_the_closed_forms():
    """y = x W: dL/dx = g W^T, dL/dW = sum over rows of x^T g (NumPy float64)."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 5, 6))
    w = jax.random.normal(kw, (6, 3))
    g = jax.random.normal(kg, (2, 5, 3))
    y, vjp = jax.vjp(dense_dot, x, w)
    dx, dw = vjp(g)
    xn, wn, gn = (np.asarray(a, np.float64) for a in (x, w, g))
    np.testing.assert_allclose(y, xn @ wn, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, gn @ wn.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, xn.reshape(-1, 6).T @ gn.reshape(-1, 3), rtol=1e-5, atol=1e-5)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype


def test_softmax_last_gradient_is_the_closed_form():
    """p = softmax(s): dL/ds = p * (g - sum(g p)) (NumPy float64), masked entries included."""
    s = jax.random.normal(jax.random.key(1), (3, 4, 7)) * 3
    s = s.at[:, :, -2:].set(jnp.finfo(jnp.float32).min)  # masked keys
    g = jax.random.normal(jax.random.key(2), s.shape)
    p, vjp = jax.vjp(softmax_last, s)
    (ds,) = vjp(g)
    sn, gn = np.asarray(s, np.float64), np.asarray(g, np.float64)
    e = np.exp(sn - sn.max(-1, keepdims=True))
    pn = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(p, pn, atol=1e-6)
    np.testing.assert_allclose(ds, pn * (gn - (gn * pn).sum(-1, keepdims=True)), atol=1e-6)
    np.testing.assert_allclose(p, jax.nn.softmax(s, -1), atol=1e-7)


def _inputs(cfg):
    inp = dummy_inputs(cfg, 2, 16)
    if "input_ids" in inp:
        inp["input_ids"] = jax.random.randint(jax.random.key(5), inp["input_ids"].shape, 3, 50)
        inp["attention_mask"] = inp["attention_mask"].at[1, -5:].set(0)  # padding
    else:
        inp["images"] = jax.random.normal(jax.random.key(5), inp["images"].shape)
    return inp


def _logits_and_grads(model, variables, inp):
    def loss(params):
        return jnp.sum(model.apply({**variables, "params": params}, **inp)["logits"] ** 2)

    return model.apply(variables, **inp)["logits"], jax.grad(loss)(variables["params"])


@pytest.mark.parametrize(
    "name,over",
    [
        ("opt-tiny", {"attention": {"gate": "linear"}}),  # causal mask, padding and a gate
        ("bert-tiny", {}),  # padding mask
        # relative position bias and shifted-window masks (slow: Swin's compile)
        pytest.param("swin-tiny", {}, marks=pytest.mark.slow),
    ],
)
def test_dot_product_attention_kernel_matches_the_einsum_kernel(name, over):
    """``attention_kernel='dot_product_attention'`` (jax.nn.dot_product_attention) gives the
    logits and parameter gradients of the written-out attention."""
    over = {**over, "dropout": 0.0, "attention_dropout": 0.0}
    ref = model_config(name, {**over, "attention_kernel": "einsum"})
    fused = model_config(name, {**over, "attention_kernel": "dot_product_attention"})
    inp = _inputs(ref)
    variables = build(ref).init(jax.random.key(0), **inp)
    ya, ga = _logits_and_grads(build(ref), variables, inp)
    yb, gb = _logits_and_grads(build(fused), variables, inp)
    np.testing.assert_allclose(yb, ya, atol=2e-5 * float(jnp.abs(ya).max()))
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ga))
    for (k, a), b in zip(flatten_dict(ga, sep="/").items(), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5 * scale, err_msg=k)


def test_dot_product_attention_kernel_steps_aside_where_probabilities_are_needed():
    """A rule at ``softmax``, a clipped softmax or a collection of probabilities keeps the
    written-out attention, so results equal the einsum kernel's exactly."""
    base = {"dropout": 0.0, "attention_dropout": 0.0}
    inp = _inputs(model_config("opt-tiny"))
    plan = q.QuantPlan((q.rule(r"attn/softmax$", "act", bits=4, scheme="unsigned"),), "quantize")
    cases = [
        ({}, plan),
        ({"attention": {"softmax": "clipped", "gamma": -0.03}}, q.QuantPlan()),
    ]
    for over, p in cases:
        ref = model_config("opt-tiny", {**base, **over, "attention_kernel": "einsum"})
        fused = model_config(
            "opt-tiny", {**base, **over, "attention_kernel": "dot_product_attention"}
        )
        variables = build(ref).init(jax.random.key(0), **inp)
        if p.mode == "quantize":
            cal = build(ref, p.with_mode("calibrate"))
            fwd = lambda v, b, cal=cal: cal.apply(v, **b, mutable=[q.STATS])  # noqa: E731
            variables = q.calibrate(fwd, variables, [inp])
        ya = build(ref, p).apply(variables, **inp)["logits"]
        yb = build(fused, p).apply(variables, **inp)["logits"]
        np.testing.assert_array_equal(yb, ya)
    fused = build(model_config("opt-tiny", {**base, "attention_kernel": "dot_product_attention"}))
    variables = fused.init(jax.random.key(0), **inp)
    _, col = fused.apply(variables, **inp, mutable=["attention"])
    assert flatten_dict(col["attention"], sep="/")["layer_0/attn/probs"][0].shape[-2:] == (16, 16)


def test_clm_loss_shifts_labels_not_logits():
    """The CLM loss equals next-token cross-entropy on ``logits[:, :-1]`` vs ``ids[:, 1:]``
    where both tokens are real."""
    logits = jax.random.normal(jax.random.key(3), (3, 6, 11))
    ids = jax.random.randint(jax.random.key(4), (3, 6), 0, 11)
    mask = jnp.ones_like(ids).at[1, 4:].set(0).at[2, 0].set(0)
    loss, n, _ = task_loss("clm", logits, {"input_ids": ids, "attention_mask": mask})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    np.testing.assert_allclose(loss, jnp.sum(ce * w), rtol=1e-6)
    assert float(n) == float(w.sum())


def test_exact_gelu_is_the_erf_form():
    """``gelu`` is ``x/2 (1 + erf(x/sqrt 2))`` to float32 rounding, computed through ``erf``
    (XLA:CPU's ``erfc``, which ``jax.nn.gelu`` uses, is about 5x slower)."""
    import math

    from qtx.nn.transformer import ACTIVATIONS

    x = np.linspace(-10, 10, 2001, dtype=np.float32)
    want = np.array([v / 2 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    got = np.asarray(ACTIVATIONS["gelu"](jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    prims = {e.primitive.name for e in jax.make_jaxpr(ACTIVATIONS["gelu"])(x).jaxpr.eqns}
    assert "erf" in prims and "erfc" not in prims, prims
