"""Recipe fidelity: the Quantizable Transformers setups as in the paper and its reference code
(W8A8 placement, gate and attention initialisation, the paper's OPT-350m / 1.3B, precision,
optimizer details, sequential calibration, Outlier Suppression's |x| percentile)."""

import importlib
import math
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qtx.quant as q
from configs import common
from qtx.errors import UserError
from qtx.models import build, dummy_inputs, model_config
from qtx.nn import AttentionConfig, Gate
from qtx.quant.estimators import percentile
from qtx.quant.ranges import make_view
from qtx.quant.spec import QuantSpec
from qtx.run import experiment


def test_w8a8_leaves_the_fc1_output_before_the_activation_in_full_precision():
    """The reference fuses fc1 with its activation: only ``ffn/act`` is quantized."""
    plan = q.QuantPlan(q.setup_rules("W8A8"), mode="quantize")
    assert plan.resolve("layer_0/ffn/hidden", "act")[0] is None
    for point in ("layer_0/ffn/act", "layer_0/ffn/out", "layer_0/attn/scores"):
        assert plan.resolve(point, "act")[0].bits == 8
    extra = q.QuantPlan(q.setup_rules("W8A8", ffn_hidden=True))
    assert extra.resolve("layer_0/ffn/hidden", "act")[0].bits == 8
    cfg = model_config("opt-tiny", num_layers=1)
    m = build(cfg, plan)
    x = dummy_inputs(cfg)
    pts = q.list_points(m.apply, jax.eval_shape(lambda: m.init(jax.random.key(0), **x)), **x)
    report = q.match_report(plan, {k: v[0] for k, v in pts.items()})
    assert "layer_0/ffn/hidden" not in report.quantized
    assert "layer_0/ffn/act" in report.quantized


def _gate_params(cfg, d=256, heads=4):
    x = jnp.ones((1, 3, d))
    return Gate(heads, cfg).init(jax.random.key(0), x)["params"]


def test_gates_take_pytorch_default_init_and_only_pi_init_sets_the_bias():
    """Unset ``gate_init_std``: weights and biases ``U(+-1/sqrt(fan_in))``; ``pi_init`` sets
    the output bias to ``logit(pi_init)``."""
    dh = 64
    p = _gate_params(AttentionConfig(gate="linear", pi_init=0.25))
    w = np.asarray(p["kernel"])
    assert np.abs(w).max() <= 1 / math.sqrt(dh)
    assert np.std(w) == pytest.approx(1 / math.sqrt(3 * dh), rel=0.1)
    np.testing.assert_allclose(p["bias"], math.log(0.25 / 0.75), rtol=1e-6)
    p = _gate_params(AttentionConfig(gate="mlp"))  # the BERT recipe: no pi_init
    hidden = dh // 4
    b = np.asarray(p["bias"])
    assert np.all(np.abs(b) <= 1 / math.sqrt(hidden)) and np.unique(b).size == b.size
    assert np.abs(np.asarray(p["hidden_bias"])).max() <= 1 / math.sqrt(dh)
    assert np.abs(np.asarray(p["out_kernel"])).max() <= 1 / math.sqrt(hidden)
    p = _gate_params(AttentionConfig(gate="all_heads_linear"))  # the OPT-1.3B recipe
    assert np.abs(np.asarray(p["dense"]["kernel"])).max() <= 1 / math.sqrt(256)
    p = _gate_params(AttentionConfig(gate="linear", gate_init_std=0.3))
    assert np.std(np.asarray(p["kernel"])) == pytest.approx(0.3, rel=0.1)


def test_recipes_set_pi_init_for_the_linear_gate_only():
    gated = {
        "bert": common.bert_mlm("gated", None),
        "opt-125m": common.opt_clm("gated", None),
        "opt-1.3b": common.opt_clm("gated", None, size="opt-1.3b"),
    }
    att = {k: experiment.load(c).model.attention for k, c in gated.items()}
    assert (att["bert"].gate, att["bert"].pi_init) == ("mlp", None)
    assert (att["opt-125m"].gate, att["opt-125m"].pi_init) == ("linear", 0.25)
    assert (att["opt-1.3b"].gate, att["opt-1.3b"].pi_init) == ("all_heads_linear", None)


def test_fine_tuning_gate_std_defaults_per_family_and_needs_pi_init():
    ft = {"gate": "linear", "pi_init": 0.25, "gate_finetune": True}
    assert model_config("opt-tiny", attention=ft).block().attention.gate_init_std == 0.001
    assert model_config("bert-tiny", attention=ft).block().attention.gate_init_std == 0.01
    mine = {**ft, "gate_init_std": 0.05}
    assert model_config("opt-tiny", attention=mine).block().attention.gate_init_std == 0.05
    with pytest.raises(ValueError, match="attention.pi_init=None is invalid; allowed: a number"):
        AttentionConfig(gate="mlp", gate_finetune=True)
    # every gate type starts at 1 in fine-tuning mode (small weights, bias logit(pi_init))
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    for gate in ("linear", "mlp", "mlp_wide", "all_heads_linear"):
        cfg = AttentionConfig(gate=gate, pi_init=0.25, gate_finetune=True, gate_init_std=1e-4)
        g = Gate(4, cfg)
        pi = g.apply(g.init(jax.random.key(0), x), x)
        np.testing.assert_allclose(np.asarray(pi), 1.0, atol=2e-3)


def _kernel_stats(params, path):
    node = params
    for k in path.split("/"):
        node = node[k]
    return np.asarray(node["kernel"]), np.asarray(node["bias"])


@pytest.mark.parametrize(
    "proj_init,torch_projs",
    [("pytorch_qkvo", "qkvo"), ("pytorch_qkv", "qkv"), ("normal", "")],
)
def test_attention_projections_keep_pytorch_default_init(proj_init, torch_projs):
    """The reference builds its attention modules after the model: OPT's q, k, v, out (BERT's
    q, k, v) get ``U(+-1/sqrt(d))`` (std 0.036 at d 256) instead of ``N(0, init_std)``."""
    d = 256
    cfg = model_config(
        "opt-tiny",
        num_layers=1,
        hidden_size=d,
        intermediate_size=512,
        init_std=0.006,
        attention_proj_init=proj_init,
    )
    m = build(cfg)
    params = m.init(jax.random.key(0), **dummy_inputs(cfg))["params"]
    for proj in "qkvo":
        w, b = _kernel_stats(params, f"layer_0/attn/{proj}_proj")
        if proj in torch_projs:
            assert np.abs(w).max() <= 1 / math.sqrt(d)
            assert np.std(w) == pytest.approx(1 / math.sqrt(3 * d), rel=0.05)
            assert np.abs(b).max() <= 1 / math.sqrt(d) and np.std(b) > 0.01
        else:
            assert np.std(w) == pytest.approx(0.006, rel=0.05) and np.all(b == 0)
    w, _ = _kernel_stats(params, "layer_0/ffn/fc1")
    assert np.std(w) == pytest.approx(0.006, rel=0.05)


def test_recipes_use_the_reference_initialisation():
    assert experiment.load(common.opt_clm("gated", None)).model.attention_proj_init == (
        "pytorch_qkvo"
    )
    assert experiment.load(common.bert_mlm("gated", None)).model.attention_proj_init == (
        "pytorch_qkv"
    )


@pytest.mark.parametrize("size,width", [("opt-350m", 1024), ("opt-1.3b", 2048)])
def test_paper_opt_350m_and_1_3b_are_the_reference_architecture(size, width):
    """Pre-LN with a final LN, a 768-wide embedding projection, 1024 positions, and no weight
    decay on LN gamma; HF's architecture stays available for loading checkpoints."""
    exp = experiment.load(common.opt_clm("gated", None, size=size))
    m = exp.model
    assert (m.hidden_size, m.pre_ln, m.final_ln) == (width, True, True)
    assert (m.word_embed_proj_dim, m.max_positions, m.init_std) == (768, 1024, 0.006)
    assert exp.optim["decay_ln_gamma"] is False
    assert experiment.load(common.opt_clm("gated", None)).optim["decay_ln_gamma"] is True
    hf350 = model_config("opt-350m")
    assert (hf350.pre_ln, hf350.word_embed_proj_dim) == (False, 512)
    tiny = experiment.load(common.opt_clm("gated", "tiny", size=size)).model
    assert tiny.pre_ln and tiny.final_ln and tiny.word_embed_proj_dim == 64


def test_mixed_precision_keeps_the_residual_stream_in_float32():
    """bf16 matmuls; embeddings, LayerNorm outputs and residual sums stay float32."""
    cfg = model_config("bert-tiny", num_layers=1, dtype="bfloat16")
    plan = q.QuantPlan(q.setup_rules("W8A8"), mode="calibrate")
    m = build(cfg, plan)
    x = dummy_inputs(cfg)
    v = m.init(jax.random.key(0), **x)
    seen = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(out, jax.Array):
            seen["/".join(context.module.path)] = out.dtype
        return out

    with nn.intercept_methods(capture):
        m.apply(v, **x, mutable=[q.STATS])
    for p in (
        "embed/ln/out",
        "layer_0/residual_attn",
        "layer_0/residual_ffn",
        "layer_0/ffn_ln/out",
    ):
        assert seen[p] == jnp.float32, p
    assert seen["layer_0/attn/q_proj"] == jnp.bfloat16


def test_optimizer_and_eval_precision_follow_the_reference():
    exp = experiment.load(common.bert_mlm("gated", None))
    assert exp.optim["eps"] == 1e-8
    assert exp.eval["dtype"] == "float32"
    vit = experiment.load(common.vit_image("gated", None))
    assert vit.optim["clip_norm"] == 0.0  # DeiT does not clip
    assert (vit.data["randaugment"], vit.data["repeated_aug"]) == ("rand-m9-mstd0.5-inc1", 3)
    bad = common.bert_mlm("gated", "tiny")
    bad.eval.dtype = "fp8"
    with pytest.raises(ValueError, match=r"config.eval.dtype='fp8' is invalid; allowed: float32"):
        experiment.load(bad)


def _two_point_stats(calibration):
    """Calibrated stats of two activation points, the second downstream of the first."""
    rules = (
        q.rule(r"layer_0/attn_ln/out$", "act", bits=3, estimator="minmax"),
        q.rule(r"layer_1/ffn/out$", "act", bits=3, estimator="minmax"),
    )
    plan = q.QuantPlan(rules, mode="calibrate", calibration=calibration)
    cfg = model_config("bert-tiny")
    m = build(cfg, plan)
    ids = jax.random.randint(jax.random.key(3), (2, 8), 3, 100)
    x = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    v = m.init(jax.random.key(0), **x)
    v = q.calibrate(lambda v, b: m.apply(v, **b, mutable=[q.STATS]), v, [x, x])
    return v[q.STATS], m, v, x


def test_sequential_calibration_sees_quantized_earlier_points_parallel_does_not():
    seq, *_ = _two_point_stats("sequential")
    par, m, v, x = _two_point_stats("parallel")
    first = lambda s: s["layer_0"]["attn_ln"]["out"]  # noqa: E731
    second = lambda s: s["layer_1"]["ffn"]["out"]  # noqa: E731
    for k in ("lo", "hi"):  # the first point has no quantized point upstream: identical
        np.testing.assert_array_equal(first(seq)[k], first(par)[k])
        assert not np.allclose(second(seq)[k], second(par)[k])
    # parallel ranges are those of the full-precision model
    fp = build(model_config("bert-tiny"), q.QuantPlan(track=(r"layer_1/ffn/out$",)))
    _, inter = fp.apply({"params": v["params"]}, **x, mutable=["intermediates"])
    want_hi = float(inter["intermediates"]["layer_1"]["ffn"]["out"]["inf_norm"][0].max())
    assert float(max(abs(second(par)["lo"]), abs(second(par)["hi"]))) == pytest.approx(
        want_hi, rel=1e-5
    )
    with pytest.raises(ValueError, match="calibration='batched' is invalid"):
        q.QuantPlan(calibration="batched")
    with pytest.raises(ValueError, match="config.quant.calibration='x' is invalid"):
        q.plan_from_config({"calibration": "x"})


def test_outlier_suppression_percentile_is_of_abs_x():
    """``t = P_99.999(|x|)``; range ``(max(min x, -t), min(max x, t))``."""
    x = np.random.default_rng(0).standard_t(3, size=(4, 5000)).astype(np.float32)
    x[0, 0] = 80.0
    spec = QuantSpec(estimator="percentile", percentile=99.9, percentile_of="abs")
    lo, hi = percentile(jnp.asarray(x), make_view(x.shape, spec), spec)
    t = np.percentile(np.abs(x), 99.9)
    assert float(lo) == pytest.approx(max(x.min(), -t), rel=1e-4)
    assert float(hi) == pytest.approx(min(x.max(), t), rel=1e-4)
    signed = spec.replace(percentile_of="x")
    lo_s, hi_s = percentile(jnp.asarray(x), make_view(x.shape, signed), signed)
    assert float(hi_s) == pytest.approx(np.percentile(x, 99.9), rel=1e-4)
    assert float(lo_s) == pytest.approx(np.percentile(x, 0.1), rel=1e-4)
    os_plan = q.QuantPlan(q.setup_rules("os_fastertransformer:W8A8", act_estimator="percentile"))
    assert os_plan.resolve("layer_0/ffn/act", "act")[0].percentile_of == "abs"
    with pytest.raises(ValueError, match="'percentile_of'='both' is invalid; allowed: x, abs"):
        QuantSpec(percentile_of="both")


def test_given_text_files_are_mixed_into_the_lm_source():
    """BookCorpus text files join wiki40b (the papers' corpus); other tasks refuse them."""
    from qtx.data.config import resolve_spec

    c = common.opt_clm("gated", None)
    assert resolve_spec(c.data, "clm").sources == ("wiki40b",)
    c.data.text_files = "/data/bookcorpus/*.txt"
    assert resolve_spec(c.data, "clm").sources == ("wiki40b", "text_files")
    c.data.name = "wiki40b+text_files"
    assert resolve_spec(c.data, "clm").sources == ("wiki40b", "text_files")
    g = common.bert_glue("sst2")
    g.data.text_files = "/data/x.txt"
    with pytest.raises(ValueError, match="text_files must be None for task 'classification'"):
        resolve_spec(g.data, "classification")


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config_modules() -> dict:
    """Every experiment config file (a module of configs/ with ``get_config``) by name."""
    out = {}
    for p in sorted((ROOT / "configs").glob("*.py")):
        module = importlib.import_module(f"configs.{p.stem}")
        if hasattr(module, "get_config"):
            out[p.stem] = module
    return out


def _mentioned_args(text: str) -> set[tuple[str, str]]:
    """(config, arg) of every ``<config>.py:<arg>`` a text shows (``arg`` '' when none)."""
    return set(re.findall(r"\b([a-z0-9_]+)\.py(?::([A-Za-z0-9]+(?:,[A-Za-z0-9]+)?))?", text))


def test_parse_arg_is_one_grammar():
    bits = ("W4A4", "W3A3", "W2A2")
    assert common.parse_arg(None, "x") == (None, None)
    assert common.parse_arg("", "x") == (None, None)
    assert common.parse_arg("tiny", "x") == (None, "tiny")
    assert common.parse_arg(None, "x", bits, combined=True) == ("W4A4", None)
    assert common.parse_arg("W2A2", "x", bits, combined=True) == ("W2A2", None)
    assert common.parse_arg("W2A2,tiny", "x", bits, combined=True) == ("W2A2", "tiny")
    assert common.parse_arg("tiny", "x", bits, combined=True) == ("W4A4", "tiny")
    assert common.parse_arg("minilm", "x", common.GLUE_TASKS, ("tiny", "minilm")) == (
        "sst2",
        "minilm",
    )
    refused = [("tny", (), False), (" tiny", (), False), ("W2A2,tiny", bits, False)]
    refused += [("tiny,W2A2", bits, True), ("W2A2,W3A3", bits, True), ("W2A2,", bits, True)]
    for bad, choices, combined in refused:
        with pytest.raises(UserError, match=r"^config arg .* of configs/x\.py is invalid; al"):
            common.parse_arg(bad, "x", choices, combined=combined)


def test_every_config_refuses_a_bad_arg_in_one_sentence_and_takes_what_it_shows():
    """Each config's bad ``:arg`` is the same sentence naming the file and every allowed arg;
    each allowed arg, and each ``<config>.py:<arg>`` its docstring or the README shows,
    gives a config."""
    modules = _config_modules()
    assert len(modules) >= 20 and "common" not in modules and "qv_common" not in modules
    shape = re.compile(
        r"^config arg 'tny' of configs/(\w+)\.py is invalid; allowed: none "
        r"\((the full recipe|= '[\w,]+')\)((, '[\w,]+')+)\.$"
    )
    shown = _mentioned_args((ROOT / "README.md").read_text())
    for module in modules.values():
        shown |= _mentioned_args(module.__doc__)
    for name, module in modules.items():
        with pytest.raises(UserError) as e:
            module.get_config("tny")
        m = shape.match(str(e.value))
        assert m and m.group(1) == name, str(e.value)
        allowed = re.findall(r"'([\w,]+)'", m.group(3))
        assert "tiny" in allowed, name
        for arg in (None, "", *allowed):
            assert len(module.get_config(arg).to_dict()) > 5, (name, arg)
        for config, arg in shown:
            if config == name:
                assert arg in ("", *allowed), (name, arg)
                module.get_config(arg or None)
