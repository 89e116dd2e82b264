"""The optimizer recipe: which parameters decay, and the learning rate at every step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from qtx import quant
from qtx.models import build, dummy_inputs, model_config
from qtx.train.optim import decay_mask, learning_rate, make_optimizer, optim_settings

DECAYED = ("kernel", "embedding", "hidden_kernel", "out_kernel")
NEVER = ("bias", "hidden_bias", "step", "offset")


def gated_lsq_params():
    """The parameter tree (shapes) of a one-layer OPT with MLP gates and LSQ quantizers."""
    cfg = model_config(
        "opt-tiny",
        dict(
            num_layers=1,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            attention={"gate": "mlp", "pi_init": 0.25},
        ),
    )
    plan = quant.QuantPlan(quant.setup_rules("qv_lsq:W4A4"), mode="learn")
    v = jax.eval_shape(lambda: build(cfg, plan).init(jax.random.key(0), **dummy_inputs(cfg)))
    return v["params"]


def decayed_keys(params, **settings):
    mask = flatten_dict(decay_mask(params, optim_settings(settings)))
    assert set(mask) == set(flatten_dict(params))
    return {"/".join(k) for k, v in mask.items() if v}


def test_decay_mask_kernels_and_embeddings_only():
    params = gated_lsq_params()
    keys = {"/".join(k): k[-1] for k in flatten_dict(params)}
    assert {"scale", "step", "offset", "hidden_kernel", "out_kernel"} <= set(keys.values())
    assert set(keys.values()) <= {*DECAYED, *NEVER, "scale"}, "an unclassified parameter"
    expected = {k for k, leaf in keys.items() if leaf in DECAYED}
    assert decayed_keys(params) == expected
    assert {"embed/word/embedding", "embed/position/embedding"} <= expected
    assert {"layer_0/attn/q_proj/kernel", "layer_0/attn/gate/out_kernel"} <= expected
    # LayerNorm gamma on request only; LN beta, biases and quantizer steps/offsets never
    scales = {k for k, leaf in keys.items() if leaf == "scale"}
    assert decayed_keys(params, decay_ln_gamma=True) == expected | scales
    # no_decay regexes win over everything
    got = decayed_keys(params, decay_ln_gamma=True, no_decay=(r"embed/position", r"gate/"))
    dropped = {k for k in expected | scales if "embed/position" in k or "gate/" in k}
    assert dropped and got == (expected | scales) - dropped


def test_weight_decay_reaches_only_the_masked_parameters():
    """With zero gradients AdamW's update is the decay alone: ``p <- p (1 - lr wd)``."""
    params = {
        "dense": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 2.0)},
        "ln": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)},
        "word": {"embedding": jnp.full((4, 3), 2.0)},
        "fc1": {"weight": {"step": jnp.full((), 2.0)}},
    }
    lr, wd = 0.1, 0.5
    tx, _ = make_optimizer(
        dict(lr=lr, weight_decay=wd, schedule="constant", clip_norm=0.0), total_steps=10
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = flatten_dict(optax.apply_updates(params, updates))
    for k, v in new.items():
        want = 2.0 * (1 - lr * wd) if k[-1] in ("kernel", "embedding") else 2.0
        np.testing.assert_allclose(np.asarray(v), want, rtol=1e-6, err_msg="/".join(k))


def expected_lr(kind, step, lr, warm, total):
    if step < warm:
        return lr * step / warm
    t = min((step - warm) / max(total - warm, 1), 1.0)
    if kind == "linear":
        return lr * (1.0 - t)
    if kind == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return lr


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warm", [0, 4])
def test_learning_rate_schedule_values(kind, warm):
    lr, total = 0.3, 20
    s = optim_settings(dict(lr=lr, schedule=kind, warmup_steps=warm))
    fn = learning_rate(s, total)
    _, from_optimizer = make_optimizer(dict(lr=lr, schedule=kind, warmup_steps=warm), total)
    for step in (0, 1, 2, 3, 4, 5, 7, 12, 19, 20):
        want = expected_lr(kind, step, lr, warm, total)
        assert float(fn(step)) == pytest.approx(want, rel=1e-5, abs=1e-7), step
        assert float(from_optimizer(step)) == pytest.approx(want, rel=1e-5, abs=1e-7), step
    if warm:
        assert float(fn(0)) == 0.0 and float(fn(warm)) == pytest.approx(lr)


def test_optimizer_steps_by_the_scheduled_learning_rate():
    """A constant gradient makes each Adam step ``-lr(t)`` (no decay, no clipping)."""
    lr, warm, total = 0.2, 3, 8
    tx, schedule = make_optimizer(
        dict(lr=lr, warmup_steps=warm, schedule="linear", weight_decay=0.0, clip_norm=0.0), total
    )
    params = {"w": {"kernel": jnp.zeros((2,))}}
    grads = {"w": {"kernel": jnp.ones((2,))}}
    state = tx.init(params)
    for step in range(total):
        updates, state = tx.update(grads, state, params)
        delta = np.asarray(updates["w"]["kernel"])
        want = expected_lr("linear", step, lr, warm, total)
        np.testing.assert_allclose(delta, -want, rtol=1e-5, atol=1e-8, err_msg=str(step))
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-8)
        params = optax.apply_updates(params, updates)
