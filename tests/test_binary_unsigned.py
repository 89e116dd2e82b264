"""The unsigned 1-bit grid ``{0, s}`` (+ LSQ+ offset) against NumPy and its closed-form
gradients, its integer codes, and the ``binary`` preset's GELU output (docs/methods.md §3)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_runs import ONE_LAYER_BERT

from qtx import quant
from qtx.errors import UserError
from qtx.evaluate.ptq import calibrate_setup
from qtx.models import build, dummy_inputs, model_config
from qtx.quant import QuantPlan, QuantPoint, QuantSpec
from qtx.quant.integer import QArray, dequantize, pack_nibbles, unpack_nibbles
from qtx.train.steps import TrainState, make_train_step

GELU_1BIT = dict(
    bits=1,
    scheme="unsigned",
    learn="lsq+",
    estimator="lsq_init",
    grad_scale="act_qv",
    min_scale=1e-4,
)
KEY = jax.random.key(0)
BERT = ONE_LAYER_BERT


class Point(nn.Module):
    plan: QuantPlan
    operand: bool = False

    @nn.compact
    def __call__(self, x):
        return QuantPoint(self.plan, operand=self.operand, name="x")(x)


def _plan(mode="learn", **spec):
    return QuantPlan((quant.rule(".", "act", **spec),), mode=mode)


def _gelu(shape=(4, 16, 64), seed=0):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return jnp.asarray(jax.nn.gelu(jnp.asarray(x)))


def _calibrated(plan, x):
    """Variables of ``Point(plan)`` calibrated on ``x`` (LSQ steps and offsets initialised)."""
    m = Point(plan.with_mode("calibrate"))
    v = quant.calibrate(lambda v, b: m.apply(v, b, mutable=[quant.STATS]), m.init(KEY, x), [x])
    return quant.init_learnable(v) if "params" in v else v


def _with_params(plan, x, step, offset):
    """Variables of a calibrated LSQ+ point, its step and offset set to ``step``/``offset``."""
    v = _calibrated(plan, x)
    params = {"x": {"step": jnp.float32(step), "offset": jnp.float32(offset)}}
    return {**v, "params": params}


def test_spec_validation_and_binary_flag():
    assert QuantSpec(bits=1, scheme="symmetric").binary
    assert QuantSpec(bits=1, scheme="symmetric").dynamic
    u = QuantSpec(**GELU_1BIT)
    assert not u.binary and not u.dynamic
    assert quant.grid_bounds(1, "unsigned") == (0, 1)
    with pytest.raises(UserError, match="'scheme'='asymmetric'.*symmetric \\(sign\\) or unsigned"):
        QuantSpec(bits=1, scheme="asymmetric")
    with pytest.raises(UserError, match="'learn'='lsq'.*scheme='symmetric'"):
        QuantSpec(bits=1, scheme="symmetric", learn="lsq", estimator="lsq_init")


def test_unsigned_1bit_forward_matches_numpy():
    x = _gelu()
    # frozen: minmax range, step = max x, out = s * clip(round(x / s), 0, 1)
    plan = _plan("quantize", bits=1, scheme="unsigned", estimator="minmax")
    y = np.asarray(Point(plan).apply(_calibrated(plan, x), x))
    s = np.float32(np.max(np.asarray(x)))
    np.testing.assert_allclose(y, s * np.clip(np.round(np.asarray(x) / s), 0, 1), rtol=1e-6)
    assert set(np.unique(y)) <= {0.0, s}

    # LSQ+: the lsq_init step is 2 mean|x| (Qp = 1), offset 0
    plan = _plan(**GELU_1BIT)
    cal = _calibrated(plan, x)
    want_step = 2 * np.abs(np.asarray(x, np.float64)).mean()
    assert float(cal["params"]["x"]["step"]) == pytest.approx(want_step, rel=1e-5)
    assert float(cal["params"]["x"]["offset"]) == 0.0

    # values {b, a + b}, threshold at b + a / 2
    a, b = 0.5, -0.05
    probe = jnp.asarray([b + a / 2 - 1e-3, b + a / 2 + 1e-3, -1.0, 3.0, b, b + a], jnp.float32)
    xs = jnp.concatenate([x.reshape(-1), probe])
    y = np.asarray(Point(plan).apply(_with_params(plan, xs, a, b), xs))
    x64 = np.asarray(xs, np.float64)
    want = a * np.clip(np.round((x64 - b) / a), 0, 1) + b
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y[-6:], [b, a + b, b, a + b, b, a + b], rtol=1e-6)
    assert len(np.unique(y)) == 2


def test_unsigned_1bit_gradients_closed_form():
    """``v = (x - b) / a``; inside ``[0, 1]``: ``dx = 1``, ``da = round(v) - v``, ``db = 0``;
    above: ``dx = 0``, ``da = 1``, ``db = 1``; below: ``dx = 0``, ``da = 0``, ``db = 1``;
    ``da``/``db`` times ``act_qv``'s ``1 / (Qp sqrt(N))`` with ``Qp = 1``."""
    a, b = 0.4, -0.1
    x = jnp.concatenate([_gelu((64,)), jnp.asarray([-0.5, 0.9, 1.5], jnp.float32)])
    plan = _plan(**GELU_1BIT)
    v = _with_params(plan, x, a, b)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)

    def loss(p, x):
        return jnp.sum(ct * Point(plan).apply({**v, "params": p}, x))

    gp, gx = jax.grad(loss, argnums=(0, 1))(v["params"], x)
    x64, c64 = np.asarray(x, np.float64), np.asarray(ct, np.float64)
    r = (x64 - b) / a
    inside, above = (r >= 0) & (r <= 1), r > 1
    assert inside.any() and above.any() and (r < 0).any()
    g = 1.0 / np.sqrt(x.size)
    np.testing.assert_allclose(np.asarray(gx), np.where(inside, c64, 0.0), rtol=1e-6)
    da = np.sum(c64 * np.where(inside, np.round(r) - r, np.where(above, 1.0, 0.0))) * g
    db = np.sum(c64 * np.where(inside, 0.0, 1.0)) * g
    assert float(gp["x"]["step"]) == pytest.approx(da, rel=1e-4, abs=1e-6)
    assert float(gp["x"]["offset"]) == pytest.approx(db, rel=1e-4, abs=1e-6)


def test_unsigned_1bit_integer_codes():
    """In an integer plan the point hands its matmul codes {0, 1}, its step and LSQ+ offset."""
    x = _gelu((2, 8, 16))
    plan = _plan(**GELU_1BIT)
    v = _with_params(plan, x, 0.3, -0.02)
    out = Point(plan.with_mode("quantize").with_integer(), operand=True).apply(v, x)
    assert isinstance(out, QArray) and out.bits == 1 and out.zero is None
    assert set(np.unique(np.asarray(out.codes))) == {0, 1}
    deq = dequantize(out.codes, out.scale, out.zero, out.offset)
    np.testing.assert_allclose(np.asarray(deq), np.asarray(out.value), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out.value), np.asarray(Point(plan).apply(v, x)))
    codes = out.codes.reshape(-1)[:7]  # 4-bit packing keeps a 1-bit grid exact
    packed = pack_nibbles(codes, 0)
    np.testing.assert_array_equal(np.asarray(unpack_nibbles(packed, (7,), 0)), codes)


def _binary_plan(mode="learn", **options):
    return quant.plan_from_config({"preset": "binary", "bits": "W1A1", "mode": mode, **options})


def test_binary_preset_gelu_output_is_unsigned_1bit():
    plan = _binary_plan()
    spec, mode = plan.resolve("layer_0/ffn/act", "act")
    assert mode == "learn" and not spec.binary
    assert {k: getattr(spec, k) for k in GELU_1BIT} == GELU_1BIT
    for p in ("attn_ln/out", "attn/q", "attn/k", "attn/v", "attn/context", "ffn_ln/out"):
        assert plan.resolve(f"layer_0/{p}", "act")[0].binary, p
    assert plan.resolve("stage_0/merge/ln/out", "act")[0].binary  # Swin's patch merging
    soft = plan.resolve("layer_0/attn/softmax", "act")[0]
    assert (soft.bits, soft.scheme) == (8, "unsigned")
    soft = _binary_plan(options={"softmax_bits": 1}).resolve("layer_0/attn/softmax", "act")[0]
    assert (soft.bits, soft.scheme, soft.binary) == (1, "unsigned", False)  # {0, s}, not +1


def test_binary_preset_gelu_error_is_well_below_sign():
    """On GELU outputs of Gaussian inputs, the preset's calibrated ``ffn/act`` quantizer has
    less than 0.6x the error of ``sign(x) mean|x|`` (per token): sign sends every positive
    value to the same code."""
    spec, _ = _binary_plan().resolve("layer_0/ffn/act", "act")
    plan = QuantPlan((quant.rule(".", "act", **dataclasses.asdict(spec)),), mode="quantize")
    x = _gelu()
    y = np.asarray(Point(plan).apply(_calibrated(plan, x), x), np.float64)
    x64 = np.asarray(x, np.float64)
    sign = np.where(x64 >= 0, 1.0, -1.0) * np.abs(x64).mean(-1, keepdims=True)
    mse, mse_sign = np.mean((y - x64) ** 2), np.mean((sign - x64) ** 2)
    assert mse < 0.6 * mse_sign, (mse, mse_sign)


def _tiny_binary_bert():
    """A 1-layer BERT classifier, the binary preset (learn mode), a batch and its variables
    calibrated on it."""
    cfg = model_config("bert-tiny", BERT)
    plan = _binary_plan()
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(3, 99, (4, 12))),
        "attention_mask": jnp.ones((4, 12), jnp.int32),
        "label": jnp.asarray(rng.integers(0, 2, 4)),
    }
    params = build(cfg).init(KEY, **dummy_inputs(cfg))["params"]
    return cfg, plan, batch, calibrate_setup(cfg, plan, params, [batch])


def test_tiny_binary_bert_qat_step():
    """One SGD step of a binary BERT: finite loss; the GELU point's step and offset move."""
    cfg, plan, batch, variables = _tiny_binary_bert()
    variables = dict(variables)
    params = variables.pop("params")
    act = params["layer_0"]["ffn"]["act"]
    assert set(act) == {"step", "offset"}
    tx = optax.sgd(0.1)
    model = build(cfg, plan)
    fn = make_train_step(model, "bert", "classification", tx, lambda s: 0.1, jax.random.key(1))
    state = TrainState(jnp.asarray(0, jnp.int32), params, tx.init(params), variables)
    new, metrics = jax.jit(fn)(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    moved = new.params["layer_0"]["ffn"]["act"]
    assert np.all(np.isfinite([float(moved["step"]), float(moved["offset"])]))
    assert float(moved["step"]) != float(act["step"])


def test_sidecar_reproduces_unsigned_1bit_point():
    """The HF sidecar states the GELU point's grid {0, 1} with its learned step and offset,
    and the PyTorch quantizer reproduces qtx's values (not sign(x) * step)."""
    torch = pytest.importorskip("torch")
    from qtx.hf import quant_sidecar
    from qtx.hf.remote.quantization_qtx import FakeQuant

    cfg, plan, _, variables = _tiny_binary_bert()
    sidecar, tensors = quant_sidecar.build_sidecar(cfg, plan, variables)
    name = "layer_0/ffn/act"
    p = sidecar["points"][name]
    assert (p["bits"], p["scheme"], p["qmin"], p["qmax"], p["dynamic"]) == (
        1,
        "unsigned",
        0,
        1,
        False,
    )
    assert sidecar["points"]["layer_0/ffn_ln/out"]["dynamic"]  # sign binarisation
    step = float(variables["params"]["layer_0"]["ffn"]["act"]["step"])
    offset = float(variables["params"]["layer_0"]["ffn"]["act"]["offset"])
    x = _gelu((2, 8, 64)) * 4.0 - 0.5  # values on both sides of the grid
    point = _plan(**GELU_1BIT)
    want = np.asarray(Point(point).apply(_with_params(point, x, step, offset), x))
    fq = FakeQuant(name, p, {k: torch.tensor(np.array(v)) for k, v in tensors.items()})
    got = fq(torch.tensor(np.array(x))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
