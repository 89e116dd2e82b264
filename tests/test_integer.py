"""Integer models: the int8 matmul against exact arithmetic, BERT / OPT / ViT integer models
against their fake-quant twins, the int8 directory round trip and conversion errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx import quant
from qtx.errors import UserError
from qtx.evaluate import integer as int_models
from qtx.evaluate.ptq import calibrate_setup
from qtx.models import build, dummy_inputs, model_config
from qtx.quant.convert import convert
from qtx.quant.integer import (
    QArray,
    dequantize,
    integer_einsum,
    pack_nibbles,
    reference_einsum,
    unpack_nibbles,
)
from qtx.quant.ranges import qparams_from_range


def qarray(rng, shape, param_shape, bits=8, zero=True, offset=False):
    lo = -(2 ** (bits - 1))
    codes = jnp.asarray(rng.integers(lo, -lo, shape), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.01, 0.1, param_shape), jnp.float32)
    z = jnp.asarray(rng.integers(lo, -lo, param_shape), jnp.int32) if zero else None
    off = jnp.asarray(rng.normal(size=param_shape), jnp.float32) if offset else None
    return QArray(codes, scale, z, off, dequantize(codes, scale, z, off), bits)


@pytest.mark.parametrize(
    "subscripts, a_shape, a_param, b_shape, b_param, zeros, offsets",
    [
        # Dense: per-token activation scale, per-channel weight scale, both zero points
        ("btk,kn->btn", (2, 5, 96), (2, 5, 1), (96, 24), (1, 24), (True, True), (False, False)),
        # attention q k^T: per-tensor asymmetric q and k, heads as a batch axis
        ("bthd,bshd->bhts", (2, 6, 3, 16), (), (2, 7, 3, 16), (), (True, True), (False, False)),
        # probs v with per-head scales on both sides
        (
            "bhts,bshd->bthd",
            (2, 3, 6, 7),
            (1, 3, 1, 1),
            (2, 7, 3, 16),
            (1, 1, 3, 1),
            (True, False),
            (False, False),
        ),
        # LSQ+ offsets on the activation (GELU output into fc2), symmetric weight
        ("tk,kn->tn", (9, 64), (), (64, 12), (1, 12), (False, False), (True, False)),
        ("tk,kn->tn", (9, 64), (), (64, 12), (), (True, True), (True, True)),
    ],
)
def test_integer_einsum_matches_exact_arithmetic(
    subscripts, a_shape, a_param, b_shape, b_param, zeros, offsets
):
    """The int8 x int8 -> int32 product with the folded zero-point bias equals the float64
    product of the exact dequantized inputs, up to float32 rounding of the one rescale."""
    rng = np.random.default_rng(0)
    a = qarray(rng, a_shape, a_param, zero=zeros[0], offset=offsets[0])
    b = qarray(rng, b_shape, b_param, zero=zeros[1], offset=offsets[1])
    got = np.asarray(integer_einsum(subscripts, a, b), np.float64)
    want = reference_einsum(subscripts, a, b)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


def test_integer_accumulator_is_exact():
    """With unit scales the result is the integer sum itself, zero points included: exact."""
    rng = np.random.default_rng(1)
    a, b = qarray(rng, (4, 200), ()), qarray(rng, (200, 3), (1, 3))
    a = a.replace(scale=jnp.float32(1.0))
    b = b.replace(scale=jnp.ones((1, 3), jnp.float32))
    got = np.asarray(integer_einsum("tk,kn->tn", a, b))
    ka = np.asarray(a.codes, np.int64) - np.asarray(a.zero, np.int64)
    kb = np.asarray(b.codes, np.int64) - np.asarray(b.zero, np.int64)
    np.testing.assert_array_equal(got, (ka @ kb).astype(np.float32))


@pytest.mark.parametrize("qmin", [-8, 0, -1])
@pytest.mark.parametrize("shape", [(7, 3), (4, 4), (1,)])
def test_nibble_packing_round_trips(qmin, shape):
    rng = np.random.default_rng(2)
    codes = jnp.asarray(rng.integers(qmin, qmin + 16, shape), jnp.int8)
    packed = pack_nibbles(codes, qmin)
    assert packed.dtype == jnp.uint8 and packed.size == (codes.size + 1) // 2
    np.testing.assert_array_equal(unpack_nibbles(packed, shape, qmin), codes)


def random_batch(cfg, seed, batch=2, seq_len=16):
    inputs = dummy_inputs(cfg, batch, seq_len)
    key = jax.random.key(seed)
    if "images" in inputs:
        return {"image": jax.random.normal(key, inputs["images"].shape)}
    return {"input_ids": jax.random.randint(key, inputs["input_ids"].shape, 0, cfg.vocab_size)}


def model_kwargs(batch):
    return {"images": batch["image"]} if "image" in batch else batch


def calibrated(name, setup, **options):
    cfg = model_config(name)
    params = build(cfg).init(jax.random.key(0), **dummy_inputs(cfg))["params"]
    plan = quant.QuantPlan(quant.setup_rules(setup, **options), mode="quantize")
    variables = calibrate_setup(cfg, plan, params, [random_batch(cfg, i) for i in range(3)])
    return cfg, plan, variables


# per model: the quantized point that feeds the head (its step bounds the hidden state) and
# the head's weight (how far one step of every head input can move a logit; None: the
# head is full precision, so rows with equal inputs give identical logits)
HEADS = {
    "opt-tiny": ("final_ln/out", ("embed", "word", "embedding")),
    "bert-tiny": ("layer_1/ffn_ln/out", None),
    "vit-tiny": ("classifier/in", ("classifier", "dense", "kernel")),
}


def step_of(point, plan, variables):
    spec, _ = plan.resolve(point, "act")
    stats = variables[quant.STATS]
    for part in point.split("/"):
        stats = stats[part]
    return float(np.max(qparams_from_range(stats["lo"], stats["hi"], spec)[0]))


def head_l1(kernel, variables):
    """``max_n ||W_n||_1`` of the head (rows of an embedding, columns of a kernel)."""
    w = variables["params"]
    for part in kernel:
        w = w[part]
    w = np.abs(np.asarray(w))
    return float((w.sum(axis=1) if kernel[-1] == "embedding" else w.sum(axis=0)).max())


@pytest.mark.parametrize("setup", ["W8A8", "W4A8"])
@pytest.mark.parametrize("name", ["bert-tiny", "opt-tiny", "vit-tiny"])
def test_integer_model_matches_its_fake_quant_twin(name, setup):
    """Every quantity that is not a matmul output is computed by the same float ops in both
    models, so:

    * exactly equal: where the integer model's quantized head input equals fake quant's, a
      full-precision head (OPT's LM head, BERT's MLM head) gives identical logits;
    * to float32 rounding: the converted model run with float matmuls (its fake-quant twin)
      and the fake-quant model (same inputs to every matmul; XLA may move a per-tensor
      scale out of one float dot and not the other), once fake quant's tied head reads the
      int8 table the converted models keep instead of the float one (:func:`int8_tables`);
    * within one quantization step of the output: the head input (OPT, BERT) and the logits
      (one step of every head input through the head: ``s_in * max_n ||W_n||_1``). The int8
      matmuls are exact where fake quant's float32 sums round, so a value a rounding error
      from a grid midpoint can land one step apart at the next point.
    """
    cfg, plan, variables = calibrated(name, setup)
    iplan, int_vars, report = int_models.to_integer(cfg, plan, variables)
    assert report.integer_matmuls and report.weights > 0
    assert all("mlm_head" in m or "pooler" in m for m in report.float_matmuls), report
    assert report.weight_bytes < report.float_weight_bytes
    x = model_kwargs(random_batch(cfg, 7))
    fq_vars = int8_tables(plan, variables, int_vars)
    assert (fq_vars is variables) == (name == "vit-tiny")  # OPT, BERT: int8 tables
    if name != "vit-tiny":  # no float table left: weights ~4x (W8) / ~8x (W4) smaller
        smaller = report.float_weight_bytes / report.weight_bytes
        assert smaller > (3.5 if setup == "W8A8" else 6.5), smaller
    fq = build(cfg, plan).apply(fq_vars, **x)
    out = build(cfg, iplan).apply(int_vars, **x)
    twin = build(cfg, int_models.fake_twin(iplan)).apply(int_vars, **x)
    np.testing.assert_allclose(twin["logits"], fq["logits"], rtol=1e-5, atol=1e-6)
    point, kernel = HEADS[name]
    step = step_of(point, plan, variables)
    if kernel is not None:
        diff = float(jnp.max(jnp.abs(out["logits"] - fq["logits"])))
        assert diff <= step * head_l1(kernel, fq_vars), (diff, step)
    if name != "vit-tiny":
        hidden, want = np.asarray(out["last_hidden_state"]), np.asarray(fq["last_hidden_state"])
        assert np.abs(hidden - want).max() <= step * (1 + 1e-5)
        same = np.all(hidden == want, -1)
        assert same.mean() > 0.5
        np.testing.assert_array_equal(
            np.asarray(out["logits"])[same], np.asarray(twin["logits"])[same]
        )


def int8_tables(plan, variables, int_vars):
    """``variables`` with every embedding table the integer model stores as int8 codes
    replaced by its dequantized codes (``variables`` itself when there is none)."""
    stored = flatten_dict(int_vars[quant.quantizer.INT])
    params = flatten_dict(variables["params"])
    tables = {}
    for path in {k[:-1] for k in stored}:
        table = path[:-1] + ("embedding",)
        if table in params:
            get = lambda k, path=path: stored.get(path + (k,))  # noqa: E731
            codes = get("codes")
            if codes.dtype == jnp.uint8:  # two 4-bit codes a byte
                spec, _ = plan.resolve("/".join(path), "weight")
                qmin = quant.quantizer._code_min(spec)
                codes = unpack_nibbles(codes, params[table].shape, qmin)
            tables[table] = dequantize(codes, get("scale"), get("zero"), get("offset"))
    if not tables:
        return variables
    return {**variables, "params": unflatten_dict({**params, **tables})}


def test_int8_directory_round_trip_is_bit_exact(tmp_path):
    cfg, plan, variables = calibrated("opt-tiny", "W4A8")
    iplan, int_vars, report = int_models.to_integer(cfg, plan, variables)
    int_models.save(str(tmp_path), cfg, plan, int_vars, report)
    cfg2, plan2, vars2, meta = int_models.load(str(tmp_path))
    assert cfg2 == cfg and plan2 == iplan and meta["report"]["weights"] == report.weights
    codes = vars2[quant.quantizer.INT]["layer_0"]["ffn"]["fc1"]["weight"]["codes"]
    assert codes.dtype == jnp.uint8 and codes.size == 128 * 512 // 2  # 4-bit: two per byte
    x = model_kwargs(random_batch(cfg, 3))
    want = build(cfg, iplan).apply(int_vars, **x)["logits"]
    got = build(cfg2, plan2).apply(vars2, **x)["logits"]
    np.testing.assert_array_equal(got, want)
    # the stored (packed) codes are the codes the float weights quantize to on the fly
    on_the_fly = build(cfg, iplan).apply(variables, **x)["logits"]
    np.testing.assert_array_equal(got, on_the_fly)


def test_int8_directory_errors(tmp_path):
    with pytest.raises(UserError, match="not an int8 model directory"):
        int_models.load(str(tmp_path))
    cfg, plan, variables = calibrated("opt-tiny", "W8A8")
    iplan, int_vars, report = int_models.to_integer(cfg, plan, variables)
    int_models.save(str(tmp_path), cfg, plan, int_vars, report)
    with pytest.raises(UserError, match="num_layers=2; the config has config.model.num_layers=3"):
        int_models.check_same_model(cfg, cfg.replace(num_layers=3), str(tmp_path))


def test_conversion_errors_name_the_point_before_compute():
    cfg = model_config("opt-tiny")
    params = build(cfg).init(jax.random.key(0), **dummy_inputs(cfg))["params"]
    plan = quant.QuantPlan(quant.setup_rules("W8A8"), mode="quantize")
    with pytest.raises(UserError, match="'embed/sum' has no calibration statistics"):
        int_models.to_integer(cfg, plan, {"params": params})
    wide = quant.QuantPlan(quant.setup_rules("W8A16"), mode="quantize")
    variables = calibrate_setup(cfg, wide, params, [random_batch(cfg, 0)])
    with pytest.raises(UserError, match=r"has bits=16; the integer model holds 1\.\.8 bits"):
        int_models.to_integer(cfg, wide, variables)
    lsq = quant.QuantPlan(quant.setup_rules("qv_lsq:W4A4"), mode="quantize")
    with pytest.raises(UserError, match="has no parameter 'step'"):
        int_models.to_integer(cfg, lsq, {"params": params})
    with pytest.raises(UserError, match="needs a model built with an integer plan"):
        convert(build(cfg, plan), {"params": params}, **dummy_inputs(cfg))


def _int32_sums(fn, *args) -> int:
    """How many reductions to int32 (zero-point sums of codes) ``fn`` traces."""
    jaxpr = jax.make_jaxpr(fn)(*args)

    def count(j):
        n = 0
        for e in j.eqns:
            if e.primitive.name == "reduce_sum" and e.outvars[0].aval.dtype == jnp.int32:
                n += 1
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                n += count(sub)
        return n

    return count(jaxpr.jaxpr)


def test_weight_column_sums_are_stored_and_symmetric_activations_need_none():
    """The weights' column sums are computed once at conversion (no per-call sums of weight
    codes); with symmetric activation grids (``act_scheme='symmetric'``) the integer model
    has no zero-point term at all, and still matches fake quant to one output step."""
    x = model_kwargs(random_batch(model_config("bert-tiny"), 5))
    counts = {}
    for scheme in ("asymmetric", "symmetric"):
        cfg, plan, variables = calibrated("bert-tiny", "W8A8", act_scheme=scheme)
        iplan, int_vars, report = int_models.to_integer(cfg, plan, variables)
        stored = int_vars[quant.quantizer.INT]["layer_0"]["ffn"]["fc1"]["weight"]
        codes = np.asarray(stored["codes"], np.int64)
        np.testing.assert_array_equal(stored["code_sums"], codes.sum(0, keepdims=True))
        model = build(cfg, iplan)
        counts[scheme] = _int32_sums(lambda v, m=model: m.apply(v, **x)["logits"], int_vars)
        out, fq = model.apply(int_vars, **x), build(cfg, plan).apply(variables, **x)
        step = step_of("layer_1/ffn_ln/out", plan, variables)
        diff = np.abs(np.asarray(out["last_hidden_state"]) - np.asarray(fq["last_hidden_state"]))
        assert diff.max() <= step * (1 + 1e-5)
    # asymmetric: only the activations' per-head row sums of q k^T and probs v remain
    assert 0 < counts["asymmetric"] <= 4 * 2, counts
    assert counts["symmetric"] == 0, counts
    with pytest.raises(UserError, match="act_scheme"):
        quant.setup_rules("W8A8", act_scheme="unsigned")
