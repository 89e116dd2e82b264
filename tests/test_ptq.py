"""Post-training quantization (qtx.evaluate.ptq) in process on a one-layer OPT: calibration
on the given batches, frozen ranges on their grids, and quantization error that grows as bits
shrink."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from qtx import quant as q
from qtx.evaluate.ptq import calibrate_setup
from qtx.models import build, dummy_inputs, model_config
from qtx.run.ptq import evaluate_setup

CFG = model_config(
    "opt-tiny",
    vocab_size=256,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    max_positions=32,
    init_std=0.1,
    attention={"gate": "all_heads_linear"},
)
# points W8A8 / W4A4 keep in full precision: the logits, the gate and the fc1 output
FP_POINTS = {"lm_head/logits", "layer_0/attn/gate/dense/weight", "layer_0/ffn/hidden"}


def batch(seed):
    ids = np.random.default_rng(seed).integers(3, CFG.vocab_size, size=(4, 16), dtype=np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones(ids.shape, jnp.int32)}


CALIB = [batch(1), batch(2)]
EVAL = batch(3)


def is_point(module, _):
    return isinstance(module, q.QuantPoint)


def run(model, variables):
    """The ``run`` callback of evaluate_setup: EVAL's logits, the variables it was given and
    every quantization point's output ``{name: array}``."""
    out, state = jax.jit(
        lambda v: model.apply(v, **EVAL, capture_intermediates=is_point, mutable=["intermediates"])
    )(variables)
    outputs = {
        "/".join(k[:-1]): np.asarray(v[0]) for k, v in flatten_dict(state["intermediates"]).items()
    }
    return out["logits"], variables, outputs


def rel_err(a, b):
    """``||a - b|| / ||b||`` over all logits."""
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def fp():
    """Random parameters (``init_std=0.1``) and their full-precision logits on EVAL."""
    model = build(CFG)
    params = jax.jit(model.init)(jax.random.key(0), **dummy_inputs(CFG))["params"]
    return params, np.asarray(run(model, {"params": params})[0])


def test_w8a8_is_close_to_fp_and_w4a4_is_further(fp):
    params, ref = fp
    (y8, v8, out8), rep8, _, _ = evaluate_setup(CFG, "W8A8", params, CALIB, run)
    (y4, _, out4), rep4, _, _ = evaluate_setup(CFG, "W4A4", params, CALIB, run)
    e8, e4 = rel_err(y8, ref), rel_err(y4, ref)
    assert 1e-4 < e8 < 0.1, e8  # quantized, and close
    assert e4 > 5 * e8, (e4, e8)
    for rep in (rep8, rep4):
        # every point matched a rule and every rule a point; all but the FP ones are on
        assert rep.unmatched_points == [] and rep.unused_rules == []
        assert set(rep.matched) - set(rep.quantized) == FP_POINTS
        assert len(rep.quantized) >= 20
    # per-tensor grids: a quantized point's output takes at most 2^bits distinct values; the
    # residual stream stays at 8 bits in W4A4
    for name in rep8.quantized:
        stream = name == "embed/sum" or "/residual_" in name
        assert len(np.unique(out8[name])) <= 256, name
        assert len(np.unique(out4[name])) <= (256 if stream else 16), name
    assert len(np.unique(out4["lm_head/logits"])) > 256  # left in full precision
    # the evaluated variables hold ranges accumulated over both calibration batches
    stats = flatten_dict(v8[q.STATS])
    counts = [int(c) for k, c in stats.items() if k[-1] == "count"]
    assert len(counts) >= 10 and set(counts) == {len(CALIB)}
    assert not any(k[0] == "lm_head" for k in stats)


def test_calibration_accumulates_the_given_batches_in_order(fp):
    """W8A8 activations use running min-max with momentum 0.9; calibrated in parallel (on the
    full-precision model) every range over batches (A, B) is ``0.9 range(A) + 0.1 range(B)``."""
    params, _ = fp
    plan = q.QuantPlan(q.setup_rules("W8A8"), mode="quantize", calibration="parallel")
    a, b, ab = (
        flatten_dict(calibrate_setup(CFG, plan, params, bs)[q.STATS])
        for bs in ([CALIB[0]], [CALIB[1]], CALIB)
    )
    bounds = [k for k in ab if k[-1] in ("lo", "hi")]
    assert len(bounds) >= 20
    for k in bounds:
        np.testing.assert_allclose(ab[k], 0.9 * a[k] + 0.1 * b[k], rtol=1e-5, atol=1e-6)
    assert any(abs(float(a[k]) - float(b[k])) > 1e-3 for k in bounds)


def test_learnable_setup_starts_from_calibrated_steps(fp):
    """qv_lsq: LSQ steps and the GELU point's LSQ+ offset are declared by the setup and
    initialised from calibration (``step = stats learn_step >= min_scale``)."""
    params, ref = fp
    (y, v, _), rep, _, _ = evaluate_setup(CFG, "qv_lsq:W4A4", params, CALIB, run)
    assert rep.unmatched_points == [] and "layer_0/attn/softmax" in rep.quantized
    p, st = flatten_dict(v["params"]), flatten_dict(v[q.STATS])
    steps = {k[:-1]: val for k, val in p.items() if k[-1] == "step"}
    assert ("layer_0", "attn", "q_proj", "weight") in steps
    assert ("layer_0", "ffn", "act", "offset") in p
    for k, s in steps.items():
        assert np.all(np.asarray(s) >= 1e-4), k
        np.testing.assert_array_equal(np.asarray(s), np.asarray(st[k + ("learn_step",)]))
    assert 1e-3 < rel_err(y, ref) < 1.0
