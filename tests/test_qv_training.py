"""Quantization Variation training against closed forms: the OBR term's gradient in a jitted
train step, the soft-cross-entropy distillation gradient against a given teacher, the per-
channel ``weight_l1`` step-gradient scale; the scale-free kurtosis; the preset rules report."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qtx import quant
from qtx.errors import UserError
from qtx.methods.quant_variation import train_hooks
from qtx.models import build, dummy_inputs, model_config
from qtx.quant.observe import kurtosis_per_sequence
from qtx.quant.primitives import grad_scale_value, grid_bounds, uniform_quant
from qtx.quant.ranges import make_view
from qtx.quant.spec import spec_from_dict
from qtx.train.steps import TEACHER, Distillation, TrainState, make_train_step

TINY_VIT = dict(
    num_layers=1,
    image_size=28,
    patch_size=7,
    num_channels=1,
    hidden_size=32,
    num_heads=2,
    intermediate_size=64,
)
LR = 1.0


def tiny_vit(key, plan=None, batch=4):
    """A 1-layer ViT, its variables and an image batch (random images and labels)."""
    cfg = model_config("vit-tiny", TINY_VIT)
    model = build(cfg, plan)
    k_img, k_lab, k_init = jax.random.split(key, 3)
    images = jax.random.normal(k_img, dummy_inputs(cfg, batch)["images"].shape)
    batch = {"image": images, "label": jax.random.randint(k_lab, (batch,), 0, cfg.num_labels)}
    variables = jax.jit(model.init)(k_init, images=images)
    return model, variables, batch


def make_sgd_step(model, hooks=None, distill=None):
    """The project's ``train_step`` with plain SGD at ``LR``."""
    return make_train_step(
        model,
        "vit",
        "image",
        optax.sgd(LR),
        lambda s: LR,
        jax.random.key(7),
        hooks=hooks,
        distill=distill,
    )


def run_step(step_fn, params, extra, batch, step=0):
    """``(new params, metrics)`` of one step from ``params`` at ``step``."""
    state = TrainState(jnp.asarray(step, jnp.int32), params, optax.sgd(LR).init(params), extra)
    new, metrics = step_fn(state, batch)
    return new.params, metrics


def np_obr_grads(w, alpha, qn, qp):
    """dL_OBR/dw and dL_OBR/dalpha from the formula (docs/methods.md §3 (c)), float64.

    ``v = clip(w / alpha, Qn, Qp)``, ``w_tilde = v alpha``, ``w_hat = round(v) alpha`` (no
    gradient); ``L = mean (w_hat - w_tilde)^2 + sum_k Var_unbiased(w_tilde in bin k)``, so
    ``dL/dw_tilde = -2 (w_hat - w_tilde) / N + 2 (w_tilde - mean_k) / (n_k - 1)`` and
    ``dw_tilde/dw = 1`` inside the clip, else 0; ``dw_tilde/dalpha = 0`` inside, ``Qn``/``Qp``
    at the clip.
    """
    r = np.asarray(w, np.float32) / np.float32(alpha)  # the bins exactly as in float32
    v = np.clip(r, qn, qp).astype(np.float64)
    k = np.round(v)
    w_tilde, w_hat = v * alpha, k * alpha
    g = -2.0 * (w_hat - w_tilde) / w.size
    for b in np.unique(k):
        members = k == b
        if members.sum() > 1:
            x = w_tilde[members]
            g[members] += 2.0 * (x - x.mean()) / (members.sum() - 1)
    inside = (r >= qn) & (r <= qp)
    return np.where(inside, g, 0.0), float(np.sum(np.where(inside, 0.0, g * v)))


def test_obr_changes_the_sgd_update_by_its_closed_form_gradient():
    """One jitted SGD step of a W2A2 ``qv_lsq`` ViT from the same parameters, OBR off
    (``lambda(0) = 0``) and on (``lambda(1) = 1``): the new parameters differ by
    ``lr * lambda * dL_OBR/dtheta``, in every quantized kernel and weight step, and nowhere
    else."""
    plan = quant.QuantPlan(quant.setup_rules("qv_lsq:W2A2"), mode="learn")
    model, variables, batch = tiny_vit(jax.random.key(0), plan)
    params = variables["params"]
    train = dict(
        obr=1.0,
        obr_start=0.0,
        track_oscillation=False,
        oscillation_momentum=0.001,
        oscillation_threshold=0.005,
    )
    hooks = train_hooks(train, total_steps=1)  # lambda(0) = 0, lambda(1) = its peak
    step = jax.jit(make_sgd_step(model, hooks=hooks))  # one compiled step for both
    on, metrics = run_step(step, params, {}, batch, step=1)
    off, metrics_off = run_step(step, params, {}, batch, step=0)
    lam = float(metrics["obr_lambda"])
    assert lam == pytest.approx(1.0) and float(metrics_off["obr_lambda"]) == 0.0
    assert float(metrics["obr"]) > 0

    apply = jax.jit(lambda v, x: model.apply(v, images=x, mutable=[quant.WEIGHTS]))
    _, coll = apply(variables, batch["image"])
    records = quant.weight_records(coll[quant.WEIGHTS])
    assert len(records) == 8  # q, k, v, o, fc1, fc2, patch embedding, classifier
    want = jax.tree.map(lambda p: np.zeros(p.shape), params)
    clipped = 0
    for name, r in records.items():
        node = params_at(want, name)
        kernel = np.asarray(params_at(params, name)["kernel"])
        alpha = float(params_at(params, name)["weight"]["step"])
        np.testing.assert_array_equal(np.asarray(r["w"]).reshape(kernel.shape), kernel)
        levels = np.asarray(r["levels"])
        dw, dalpha = np_obr_grads(kernel, alpha, levels[0], levels[-1])
        node["kernel"] = lam * dw
        node["weight"]["step"] = np.asarray(lam * dalpha)
        clipped += int(dalpha != 0.0)
    assert clipped >= 6  # the 2-bit grids clip, so the steps get an OBR gradient too

    got = jax.tree.map(lambda a, b: (np.asarray(a) - np.asarray(b)) / LR, off, on)
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        w = get_path(want, path)
        scale = max(np.abs(w).max(), 1e-3)
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-3 * scale, err_msg=str(path))
    big = max(np.abs(x).max() for x in jax.tree.leaves(want))
    assert big > 1e-4  # the OBR term moves the weights well above float32 rounding


def params_at(params, record_name):
    node = params
    for part in record_name.split("/")[:-1]:
        node = node[part]
    return node


def get_path(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_distillation_gradient_is_the_soft_cross_entropy_against_the_teacher():
    """A jitted SGD step with soft-CE distillation (``task_weight=0``) from a teacher with other
    weights moves the student by ``-lr * J^T (softmax(z) - p) / B``: ``z`` the student's
    logits, ``p = softmax(teacher logits)``. The classifier bias gets ``sum_i (softmax(z_i) -
    p_i) / B`` exactly; every parameter the vector-Jacobian product of that cotangent."""
    model, variables, batch = tiny_vit(jax.random.key(1))
    _, teacher_vars, _ = tiny_vit(jax.random.key(2))
    params, t_params = variables["params"], teacher_vars["params"]
    distill = Distillation(teacher=model, weight=1.0, loss="soft_ce", task_weight=0.0)
    step = jax.jit(make_sgd_step(model, distill=distill))
    new, metrics = run_step(step, params, {TEACHER: t_params}, batch)

    images = batch["image"]
    logits = jax.jit(lambda p: model.apply({"params": p}, images=images)["logits"])
    z, vjp = jax.vjp(logits, params)
    t = logits(t_params)
    z64, t64 = np.asarray(z, np.float64), np.asarray(t, np.float64)
    p = np.exp(t64 - t64.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(z64 - z64.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    assert np.abs(q - p).max() > 0.01  # the teacher disagrees with the student
    b = z64.shape[0]
    dz = (q - p) / b

    got = jax.tree.map(lambda a, c: (np.asarray(a) - np.asarray(c)) / LR, params, new)
    np.testing.assert_allclose(got["classifier"]["dense"]["bias"], dz.sum(0), rtol=1e-3, atol=1e-6)
    (want,) = vjp(jnp.asarray(dz, jnp.float32))
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        w = np.asarray(get_path(want, path))
        scale = max(np.abs(w).max(), 1e-6)
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-3 * scale, err_msg=str(path))
    assert float(metrics["distill"]) == pytest.approx(-(p * np.log(q)).sum() / b, rel=1e-4)


@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_weight_l1_step_gradient_is_per_channel(granularity):
    """Per-channel (or per-group) steps with ``weight_l1``: ``dL/ds_c`` is channel c's LSQ step
    gradient ``sum_i ct_i (round(v_i) - v_i or the clip level)`` times its own
    ``1 / sqrt(Qp ||W_c||_1)``."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(12, 8)).astype(np.float32) * np.linspace(0.1, 3.0, 8, dtype=np.float32)
    spec = spec_from_dict(
        dict(bits=3, scheme="symmetric", learn="lsq", granularity=granularity, group_size=4),
        where="test",
    )
    view = make_view(w.shape, spec, channel_axis=-1)
    xv = jnp.asarray(w).reshape(view.view_shape)
    qmin, qmax = grid_bounds(3, "symmetric")
    step = jnp.max(jnp.abs(xv), axis=view.axes, keepdims=True) / 5.0  # some values clip
    ct = jnp.asarray(rng.normal(size=view.view_shape), jnp.float32)
    g = grad_scale_value("weight_l1", xv, step.size, qmax, axes=view.axes)
    assert g.shape == step.shape
    loss = lambda s: jnp.sum(ct * uniform_quant(xv, s, 0.0, qmin, qmax, g))  # noqa: E731
    got = np.asarray(jax.grad(loss)(step))

    x64, s64, c64 = (np.asarray(a, np.float64) for a in (xv, step, ct))
    v = x64 / s64
    q = np.clip(np.round(v), qmin, qmax)
    inside = (v >= qmin) & (v <= qmax)
    lsq = np.sum(c64 * np.where(inside, q - v, q), axis=view.axes, keepdims=True)
    own = 1.0 / np.sqrt(qmax * np.sum(np.abs(x64), axis=view.axes, keepdims=True))
    np.testing.assert_allclose(got, lsq * own, rtol=1e-4, atol=1e-6)
    assert np.ptp(own) / own.mean() > 0.5  # channels of different L1 get different scales

    # one step for the whole tensor: the scalar 1 / sqrt(Qp ||W||_1), with or without axes
    whole = grad_scale_value("weight_l1", jnp.asarray(w), 1, qmax, axes=(0, 1))
    assert whole.shape == () and float(whole) == pytest.approx(
        1.0 / np.sqrt(qmax * np.abs(w.astype(np.float64)).sum()), rel=1e-5
    )


@pytest.mark.parametrize("scale", [1.0, 0.03, 0.01])
def test_kurtosis_is_scale_free(scale):
    """A Gaussian gives about 3 at any scale (within 5 standard errors ``sqrt(24 / n)``); a
    constant sequence gives a finite 0."""
    x = jax.random.normal(jax.random.key(0), (4, 128, 64)) * scale
    k = np.asarray(kurtosis_per_sequence(x))
    assert np.all(np.abs(k - 3.0) < 5 * np.sqrt(24 / (128 * 64))), k
    const = np.asarray(kurtosis_per_sequence(jnp.full((2, 16, 4), scale, jnp.float32)))
    assert np.all(np.isfinite(const)) and np.all(np.abs(const) < 2.0)
    np.testing.assert_array_equal(np.asarray(kurtosis_per_sequence(jnp.zeros((2, 8)))), 0.0)


@pytest.mark.parametrize("setup", ["qv_lsq:W4A4", "lsq:W4A4", "binary"])
def test_preset_rules_for_points_a_vit_lacks_are_not_reported(setup):
    """A ViT has no patch merging, gates or MLM head: the presets' rules for those are optional
    and not reported as unused; a rule from the config that matches nothing still is."""
    cfg = model_config("vit-tiny", TINY_VIT)
    plan = quant.plan_from_config(
        {"preset": setup.split(":")[0], "bits": setup.partition(":")[2] or None}
    )
    inputs = dummy_inputs(cfg, batch=1)
    model = build(cfg, plan)
    variables = model.init(jax.random.key(0), **inputs)
    kinds = {k: v[0] for k, v in quant.list_points(model.apply, variables, **inputs).items()}
    report = quant.match_report(plan, kinds)
    assert report.unused_rules == [] and report.unmatched_points == []
    assert "matched no point" not in str(report)

    user = quant.plan_from_config(
        {
            "preset": setup.split(":")[0],
            "rules": [{"pattern": "merge/ln/out$", "kind": "act", "bits": 8}],
        }
    )
    report = quant.match_report(user, kinds)
    assert report.unused_rules == ["act:merge/ln/out$"]
    assert "matched no point: act:merge/ln/out$" in str(report)
    with pytest.raises(UserError, match="optional"):
        quant.plan_from_config({"rules": [{"pattern": "x", "bits": 8, "optional": True}]})
