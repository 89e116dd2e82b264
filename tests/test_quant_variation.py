"""Quantization Variation: OBR against its formula, the oscillation counter on a constructed
sequence, the weight records of quantization points, soft-cross-entropy distillation with a
frozen teacher, and a QAT run with OBR and tracking that resumes exactly."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from qtx import quant
from qtx.methods.quant_variation import (
    bin_regularizer,
    init_tracker,
    obr_lambda,
    oscillating_fractions,
    update_tracker,
)
from qtx.models import build, dummy_inputs, model_config
from qtx.run.train import train
from qtx.train.steps import distillation_loss

RNG = np.random.default_rng(0)


def np_obr(w, alpha, qn, qp):
    """OBR from the paper's definition, bin by bin (float64): value and gradient in w."""
    w = np.asarray(w, np.float64)
    v = np.clip(w / alpha, qn, qp)
    w_tilde, k = v * alpha, np.round(v)
    w_hat = k * alpha
    value = np.mean((w_hat - w_tilde) ** 2)
    grad_tilde = -2.0 * (w_hat - w_tilde) / w.size
    for b in np.unique(k):
        members = k == b
        if members.sum() > 1:
            x = w_tilde[members]
            value += np.var(x, ddof=1)
            grad_tilde[members] += 2.0 * (x - x.mean()) / (members.sum() - 1)
    inside = (w / alpha >= qn) & (w / alpha <= qp)
    return value, grad_tilde * inside


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_obr_value_and_gradient_match_the_formula(bits):
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = RNG.normal(size=(24, 16)).astype(np.float32) * 0.05
    alpha = 0.02  # some weights clip at every width
    value, grad = jax.value_and_grad(bin_regularizer)(jnp.asarray(w), alpha, 0.0, qn, qp)
    ref_value, ref_grad = np_obr(w, alpha, qn, qp)
    np.testing.assert_allclose(float(value), ref_value, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-7)
    assert np.abs(w / alpha).max() > qp  # the clipped weights get no gradient above
    # per-channel steps: every channel has its own bins
    steps = np.array([[0.01, 0.02, 0.04, 0.03] * 4], np.float32)
    got = float(bin_regularizer(jnp.asarray(w), jnp.asarray(steps), 0.0, qn, qp))
    dist = np.mean(
        (np.round(np.clip(w / steps, qn, qp)) * steps - np.clip(w / steps, qn, qp) * steps) ** 2
    )
    var = 0.0
    for c in range(16):
        v = np.clip(w[:, c] / steps[0, c], qn, qp)
        for b in np.unique(np.round(v)):
            x = v[np.round(v) == b] * steps[0, c]
            var += np.var(x, ddof=1) if x.size > 1 else 0.0
    np.testing.assert_allclose(got, dist + var, rtol=1e-5)


def test_obr_lambda_is_the_papers_cosine_ramp():
    e = 1000
    got = [float(obr_lambda(t, e)) for t in (0, 249, 250, 625, 1000)]
    np.testing.assert_allclose(got, [0.0, 0.0, 0.0, 0.005, 0.01], atol=1e-7)
    t = 400
    want = 0.005 * (1 - math.cos(math.pi * (t - 250) / 750))
    assert float(obr_lambda(t, e)) == pytest.approx(want, rel=1e-5)


def test_oscillation_counter_on_a_constructed_sequence():
    """Weight 0 goes 0 1 0 1 1 2 1 (events at steps 2, 3, 6); weight 1 climbs 0..6 (none);
    weight 2 goes 3 3 2 2 3 3 3 (one event, at step 4)."""
    seq = np.array([[0, 0, 3], [1, 1, 3], [0, 2, 2], [1, 3, 2], [1, 4, 3], [2, 5, 3], [1, 6, 3]])
    events = np.zeros(seq.shape, bool)
    events[[2, 3, 6], 0] = True
    events[4, 2] = True
    m = 0.1
    tracker = init_tracker({"w": jax.ShapeDtypeStruct((3,), jnp.int16)})
    ema = np.zeros(3)
    for t, codes in enumerate(seq):
        tracker = update_tracker(tracker, {"w": jnp.asarray(codes, jnp.int16)}, momentum=m)
        if t > 0:
            ema = m * events[t] + (1 - m) * ema
        np.testing.assert_allclose(np.asarray(tracker["points"]["w"]["ema"]), ema, rtol=1e-6)
    np.testing.assert_array_equal(tracker["points"]["w"]["code"], seq[-1])
    frac = oscillating_fractions(tracker, threshold=0.1)
    assert float(frac["oscillating"]) == pytest.approx(np.mean(ema > 0.1))
    assert float(frac["oscillating/w"]) == float(frac["oscillating"])
    assert float(frac["oscillation_rate"]) == pytest.approx(np.mean(ema), rel=1e-6)


def test_weight_records_give_the_quantized_weights():
    """Each weight point records its weight, step and grid; the codes times the step are the
    fake-quantized weight the layer used."""
    cfg = model_config("vit-tiny", dict(num_layers=1, image_size=28, patch_size=7, num_channels=1))
    plan = quant.QuantPlan(quant.setup_rules("qv_lsq:W3A3"), mode="learn")
    model = build(cfg, plan)
    inputs = dummy_inputs(cfg, batch=2)
    variables = model.init(jax.random.key(0), **inputs)
    _, coll = model.apply(variables, **inputs, mutable=[quant.WEIGHTS, "intermediates"])
    records = quant.weight_records(coll[quant.WEIGHTS])
    assert "layer_0/ffn/fc1/weight" in records and "embed/patch/weight" in records
    r = records["layer_0/attn/q_proj/weight"]
    np.testing.assert_array_equal(r["levels"], np.arange(-4, 4))
    w = np.asarray(variables["params"]["layer_0"]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(np.asarray(r["w"]).reshape(w.shape), w)
    from qtx.methods.quant_variation import weight_codes

    codes = np.asarray(weight_codes(r))
    assert codes.min() >= -4 and codes.max() <= 3 and len(np.unique(codes)) > 2


def test_soft_cross_entropy_distillation_and_no_teacher_gradient():
    s = jnp.asarray(RNG.normal(size=(4, 5)), jnp.float32)
    t = jnp.asarray(RNG.normal(size=(4, 5)), jnp.float32)
    got = distillation_loss(s, t, {}, 1.0, "soft_ce")
    p = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
    log_q = np.asarray(jax.nn.log_softmax(s))
    assert float(got) == pytest.approx(-(p * log_q).sum(-1).mean(), rel=1e-5)
    kl = distillation_loss(s, t, {}, 1.0, "kl")
    assert float(got - kl) == pytest.approx(-(p * np.log(p)).sum(-1).mean(), rel=1e-5)
    g_teacher = jax.grad(lambda t: distillation_loss(s, t, {}, 1.0, "soft_ce"))(t)
    assert float(jnp.abs(g_teacher).max()) == 0.0


def tiny_vit_qat(steps, **train_over):
    c = common.vit_image("vanilla", "tiny")
    c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64)
    c.data.update(batch_size=16, max_eval_batches=1)
    c.train.update(
        steps=steps,
        log_every=1,
        checkpoint_every=2,
        max_eval_batches=1,
        calib_batches=1,
        tensorboard=False,
        obr=0.01,
        obr_start=0.0,
        track_oscillation=True,
        oscillation_momentum=0.2,
        oscillation_threshold=0.01,
        distill=1.0,
        distill_loss="soft_ce",
        task_loss_weight=0.0,
        **train_over,
    )
    c.optim.update(warmup_steps=0, lr=3e-3)
    c.quant = {"preset": "qv_lsq", "bits": "W2A2", "mode": "learn"}
    return c


@pytest.mark.slow
def test_qat_with_obr_and_tracking_resumes_exactly(tmp_path, monkeypatch):
    """4 steps in one go equal 2 steps, a stop (as on SIGTERM), and 2 more: the same losses,
    OBR values and oscillation fractions (the tracker is in the checkpoint)."""
    from test_train import read_metrics

    from qtx.train.preemption import StopOnSignal

    whole, split = tmp_path / "whole", tmp_path / "split"
    train(tiny_vit_qat(4), str(whole))
    with monkeypatch.context() as m:
        m.setattr(StopOnSignal, "requested", lambda self, step, manager: step == 2)
        assert train(tiny_vit_qat(4), str(split))["stopped_at"] == 2
    train(tiny_vit_qat(4), str(split))
    a, b = read_metrics(whole), read_metrics(split)
    for step in (1, 2, 3, 4):
        for key in ("loss", "distill", "obr", "obr_lambda", "oscillating"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert a[4]["obr"] > 0 and a[4]["obr_lambda"] > 0
    assert a[4]["oscillating"] > 0  # W2 with lr 3e-3 oscillates within a few steps
    assert any(k.startswith("oscillating/layer_0/ffn/fc1") for k in a[4])


def test_teacher_from_another_workdir_and_a_mismatched_one(tmp_path):
    """A wider FP model (another qtx workdir) teaches a QAT student; a teacher whose logits
    have another shape is refused before any compute, naming config.train.teacher."""
    import json
    import shutil

    from qtx.errors import UserError

    t = common.vit_image("vanilla", "tiny")
    t.model.update(num_layers=1, hidden_size=48, num_heads=2, intermediate_size=96)
    t.data.update(batch_size=16, max_eval_batches=1)
    t.train.update(steps=1, checkpoint_every=1, max_eval_batches=1, tensorboard=False)
    train(t, str(tmp_path / "teacher"))
    c = tiny_vit_qat(2, teacher=str(tmp_path / "teacher"))
    c.train.update(obr=0.0, track_oscillation=False)
    out = train(c, str(tmp_path / "student"))
    assert out["train"]["distill"] > 0.0 and math.isfinite(out["train"]["loss"])

    shutil.copytree(tmp_path / "teacher", tmp_path / "five")
    meta = json.loads((tmp_path / "five" / "config.json").read_text())
    meta["model"]["num_labels"] = 5
    (tmp_path / "five" / "config.json").write_text(json.dumps(meta))
    c.train.teacher = str(tmp_path / "five")
    with pytest.raises(UserError, match=r"config.train.teacher=.*logits of shape \(1, 5\)"):
        train(c, str(tmp_path / "student5"))
