"""Decoders (llama family) with attention variants, exported with qtx's PyTorch code
(``trust_remote_code=True``): output gates, softpick, learned sinks and the normalized clipped
softmax on Llama / Qwen3 / Qwen3.5 shapes with grouped-query attention, against qtx's own
logits, hidden states, greedy decoding (HF's key/value cache) and fake quantization."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_export import max_diff as family_max_diff  # noqa: E402
from test_hf_export import random_variables  # noqa: E402
from test_hf_remote_code import outputs as family_outputs  # noqa: E402
from test_hf_remote_code import remote_auto_class, tiny_variant  # noqa: E402

import qtx.hf  # noqa: E402
from qtx import quant  # noqa: E402
from qtx.evaluate.ptq import calibrate_setup  # noqa: E402
from qtx.hf import io, quant_sidecar, remote, variants  # noqa: E402
from qtx.models import build, model_config  # noqa: E402
from qtx.nn.attention import AttentionConfig  # noqa: E402

torch.set_num_threads(2)
ATOL = 1e-4
VOCAB, PAD = 96, 0
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,  # grouped-query attention: 2 query heads per key/value head
    intermediate_size=48,
    max_positions=64,
    head="clm",
    pad_token_id=PAD,
    tie_embeddings=False,
)
SHAPES = {  # the HF class each exports as
    "llama": {},
    "qwen3": dict(qk_norm=True, head_dim=16),
    "qwen3_5": dict(
        qk_norm=True, head_dim=16, norm="rmsnorm_zero_centered", partial_rotary_factor=0.5
    ),
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_5": "Qwen3_5ForCausalLM",
}


def attention_modules(hf):
    return [m for m in hf.modules() if hasattr(m, "qtx_attention")]


def no_gate(hf):
    """Every gate forced to 1."""
    for m in attention_modules(hf):
        m.__dict__["qtx_gate"] = None


def plain_softmax(hf):
    for m in attention_modules(hf):
        m.qtx_attention = dict(m.qtx_attention, softmax="vanilla")


def no_sink(hf):
    """Sink logits at -inf: the sink softmax becomes the plain one."""
    sinks = [p for n, p in hf.named_parameters() if ".qtx_sinks." in n]
    assert sinks
    for p in sinks:
        p.data.fill_(-float("inf"))


VARIANTS = {  # name -> (attention, shape, what disables the variant in the HF model)
    "gate_headwise": ({"gate": "headwise"}, "llama", no_gate),
    "gate_elementwise_qk_norm": ({"gate": "elementwise", "pi_init": 0.3}, "qwen3", no_gate),
    "softpick": ({"softmax": "softpick"}, "llama", plain_softmax),
    "sink_qk_norm": ({"softmax": "sink", "sink_init": 1.0}, "qwen3", no_sink),
    "normalized_clipped_qwen3_5_headwise": (
        {"softmax": "normalized_clipped", "alpha": 4.0, "gate": "headwise"},
        "qwen3_5",
        plain_softmax,
    ),
}


def tiny_decoder(attention, shape, seed=0):
    """``(cfg, model, variables)`` of a tiny random decoder."""
    cfg = model_config("llama-tiny", dict(TINY, **SHAPES[shape], attention=attention))
    return cfg, build(cfg), random_variables(cfg, seed)


def left_padded():
    """Two rows of 7 tokens, the second with 2 pads in front; its mask and position ids
    ``cumsum(mask) - 1`` clipped at 0 (qtx's)."""
    ids = np.random.default_rng(0).integers(3, VOCAB, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, :2], ids[1, :2] = 0, PAD
    return ids, mask, np.clip(np.cumsum(mask, 1) - 1, 0, None)


def hf_outputs(hf, ids, mask, pos):
    """Every hidden state and the logits of the HF model, as numpy arrays."""
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos),
            output_hidden_states=True,
        )
    return [h.numpy() for h in out.hidden_states] + [out.logits.numpy()]


def qtx_outputs(model, variables, ids, mask):
    out = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    return [np.asarray(h) for h in out["hidden_states"]] + [np.asarray(out["logits"])]


def max_diff(a, b, mask):
    """Largest difference over the real tokens."""
    real = mask.astype(bool)
    return max(float(np.abs(x - y)[real].max()) for x, y in zip(a, b, strict=True))


def qtx_greedy(model, variables, ids, mask, steps):
    """qtx's greedy decoding, re-running the whole prefix at every step."""
    for _ in range(steps):
        logits = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask))["logits"]
        ids = np.concatenate([ids, np.asarray(logits[:, -1].argmax(-1))[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
    return ids


def hf_greedy(hf, ids, mask, steps):
    with torch.no_grad():
        return hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=None if mask is None else torch.tensor(mask),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=PAD,
        ).numpy()


# about 20-30 s each (qtx's greedy reference recompiles per length): with the slow tests; the
# sidecar tests below export and load the same decoders in the fast suite
@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_decoder_variant_matches_qtx_and_generates(tmp_path, name):
    """Logits and every hidden state to 1e-4 on a left-padded batch; greedy ``generate()`` with
    the key/value cache (left-padded with a mask, and one row without) equals qtx's greedy
    decoding; ``qtx.hf.load`` gives back the config and the parameters bit for bit; disabling
    the variant in the HF model moves the outputs far beyond the tolerance."""
    attention, shape, disable = VARIANTS[name]
    cfg, model, variables = tiny_decoder(attention, shape)
    path = tmp_path / name
    qtx.hf.export(path, cfg, variables)
    config = io.read_config(path)
    arch = ARCHITECTURES[shape]
    assert config["architectures"] == ["Qtx" + arch]
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_qtx.Qtx{arch}"
    assert config["model_type"].startswith("qtx_")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(hf).__name__ == "Qtx" + arch

    ids, mask, pos = left_padded()
    ours = qtx_outputs(model, variables, ids, mask)
    diff = max_diff(hf_outputs(hf, ids, mask, pos), ours, mask)
    print(f"{name}: max abs diff {diff:.2e}")
    assert diff < ATOL, (name, diff)

    prompt, prompt_mask = ids[:, :5], mask[:, :5]
    np.testing.assert_array_equal(
        hf_greedy(hf, prompt, prompt_mask, 6), qtx_greedy(model, variables, prompt, prompt_mask, 6)
    )
    np.testing.assert_array_equal(
        hf_greedy(hf, prompt[:1], None, 6),
        qtx_greedy(model, variables, prompt[:1], prompt_mask[:1], 6),
    )

    loaded, again = qtx.hf.load(path)
    assert loaded.cfg == cfg
    a, b = flatten_dict(variables["params"]), flatten_dict(again["params"])
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))

    disable(hf)
    disabled = max_diff(hf_outputs(hf, ids, mask, pos), ours, mask)
    print(f"{name} disabled: max abs diff {disabled:.2e}")
    assert disabled > 100 * ATOL, (name, disabled)


def test_native_qwen3_5_gate_needs_no_remote_code(tmp_path):
    """Qwen3.5's own elementwise output gate exports as HF's Qwen3.5 (gate fused into
    q_proj); adding a variant (here a sink) switches to remote code with the gate on its own
    keys and the sink logits in ``model.qtx_sinks.<i>``."""
    cfg, _, variables = tiny_decoder({"gate": "elementwise"}, "qwen3_5")
    assert not variants.is_variant(cfg)
    qtx.hf.export(tmp_path / "native", cfg, variables)
    assert io.read_config(tmp_path / "native")["model_type"] == "qwen3_5_text"
    assert not (tmp_path / "native" / "modeling_qtx.py").exists()

    cfg = cfg.replace(attention=AttentionConfig(gate="elementwise", softmax="sink"))
    assert variants.is_variant(cfg)
    config = variants.remote_config(
        cfg, qtx.hf.converter.converter("llama").hf_config(cfg).to_dict()
    )
    assert config["model_type"] == "qtx_qwen3_5_text"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_qtx.QtxQwen3_5TextConfig",
        "AutoModel": "modeling_qtx.QtxQwen3_5TextModel",
        "AutoModelForCausalLM": "modeling_qtx.QtxQwen3_5ForCausalLM",
    }
    layout = qtx.hf.converter.converter("llama").layout(cfg)
    entries = variants.gate_entries(cfg, layout)
    assert [(e.ours, e.hf, e.kind) for e in entries[:2]] == [
        (("layer_0", "attn", "gate", "dense", "kernel"), "qtx_gates.0.dense.weight", "linear"),
        (("layer_0", "attn", "sink"), "qtx_sinks.0", "copy"),
    ]
    assert [e.hf for e in entries[2:]] == ["qtx_gates.1.dense.weight", "qtx_sinks.1"]


ENCODER_CASES = {  # family -> (attention, what disables it), one new variant each
    "bert": ({"softmax": "softpick"}, plain_softmax),
    "roberta": ({"gate": "elementwise", "pi_init": 0.3}, no_gate),
    "opt": ({"softmax": "sink", "sink_init": 1.0}, no_sink),
    "vit": ({"gate": "headwise"}, no_gate),
    "swin": ({"softmax": "normalized_clipped", "alpha": 4.0}, plain_softmax),  # shifted windows
}


@pytest.mark.parametrize(
    "family",
    [f if f == "opt" else pytest.param(f, marks=pytest.mark.slow) for f in ENCODER_CASES],
)
def test_new_variants_in_every_family(tmp_path, family):
    """The new normalisers and output gates in the other families' remote code: every hidden
    state and the logits to 1e-4 (OPT left-padded, Swin with its shifted windows), far off
    with the variant disabled."""
    attention, disable = ENCODER_CASES[family]
    cfg, _, model, variables = tiny_variant(family, attention)
    path = tmp_path / family
    qtx.hf.export(path, cfg, variables)
    auto = getattr(transformers, remote_auto_class(io.read_config(path)))
    hf = auto.from_pretrained(path, trust_remote_code=True).eval()
    diff = family_max_diff(*family_outputs(cfg, model, variables, hf))
    print(f"{family} {attention}: max abs diff {diff:.2e}")
    assert diff < ATOL, (family, diff)
    assert qtx.hf.load(path)[0].cfg == cfg
    disable(hf)
    disabled = family_max_diff(*family_outputs(cfg, model, variables, hf))
    assert disabled > 100 * ATOL, (family, disabled)


# -- the quantization sidecar ------------------------------------------------------------------

SIDECAR_CASES = [  # setup, attention, shape
    # static per-tensor ranges everywhere, sinks and a headwise gate, GQA
    ("W8A8", {"softmax": "sink", "sink_init": 1.0, "gate": "headwise"}, "llama"),
    # per-token dynamic activations, per-channel weights, softpick, q/k norms
    ("w8a8_dynamic", {"softmax": "softpick", "gate": "elementwise"}, "qwen3"),
    # HF's own Qwen3.5: fused q_proj + gate rows, zero-centred RMSNorm gains (1 + w)
    ("W8A8", {"gate": "elementwise"}, "qwen3_5"),
]


def calib_batches(n=3):
    ids = np.random.default_rng(1).integers(3, VOCAB, (n, 2, 7))
    ones = np.ones((2, 7), np.int32)
    return [{"input_ids": ids[i], "attention_mask": ones, "labels": ids[i]} for i in range(n)]


@pytest.mark.parametrize("setup, attention, shape", SIDECAR_CASES)
def test_decoder_sidecar_reproduces_fake_quant(tmp_path, setup, attention, shape):
    """PyTorch + sidecar gives qtx's fake-quant logits on a left-padded batch: equal up to
    rare rounding ties, far closer to qtx's quantized model than that is to the FP one."""
    cfg, model, variables = tiny_decoder(attention, shape)
    plan = quant.QuantPlan(quant.setup_rules(setup), mode="quantize")
    frozen = calibrate_setup(cfg, plan, variables["params"], calib_batches())
    path = tmp_path / "export"
    qtx.hf.export(path, cfg, variables)
    n = quant_sidecar.write_sidecar(str(path), cfg, plan, frozen)
    remote.copy_all(str(path))
    sidecar = json.loads((path / quant_sidecar.SIDECAR_JSON).read_text())
    assert n == len(sidecar["points"]) > 20
    for point in ("layer_1/attn/k", "layer_1/ffn/gate" if setup == "W8A8" else "layer_1/ffn/act"):
        assert point in sidecar["points"], point
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    apply_quantization = get_class_from_dynamic_module("quantization_qtx.apply_quantization", path)
    assert sorted(apply_quantization(hf, str(path))) == sorted(sidecar["points"])
    ids, mask, pos = left_padded()
    theirs = hf_outputs(hf, ids, mask, pos)[-1]
    ours = qtx_outputs(build(cfg, plan), frozen, ids, mask)[-1]
    fp = qtx_outputs(model, variables, ids, mask)[-1]
    real = mask.astype(bool)
    effect = float(np.abs(ours - fp)[real].max())
    diff = float(np.abs(ours - theirs)[real].max())
    print(f"{shape} {setup}: torch vs qtx {diff:.2e}, quantization changes logits {effect:.2e}")
    assert effect > 1e-3 and diff < 0.1 * effect
