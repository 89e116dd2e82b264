"""HF PyTorch <-> qtx parity of the llama family: Llama, Mistral, Qwen2, Qwen3, Qwen3.5 (text).

Random tiny HF models are saved locally, loaded with ``qtx.hf.load`` and compared on a
left-padded batch (logits and every hidden state to 1e-4, real tokens; HF gets qtx's position
ids ``cumsum(mask) - 1``), then exported back and reloaded with HF (state dicts equal). The
output gate fused into ``q_proj`` is checked in both row layouts (Qwen3.5's and the Gated
Attention paper's) and the unsupported settings are refused with one sentence.
"""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qtx.hf  # noqa: E402
from qtx.errors import UserError  # noqa: E402
from qtx.hf import convert_llama, io  # noqa: E402

torch.set_num_threads(2)
ATOL = 1e-4
VOCAB = 96
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=500.0,
    factor=4.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
FULL = ["full_attention", "full_attention"]
# (HF config class, fields beyond TINY)
CASES = {
    "llama3_tied_biases": (
        "LlamaConfig",
        dict(rope_parameters=LLAMA3, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    "mistral_untied": ("MistralConfig", dict(sliding_window=64, head_dim=16)),  # window >= T
    "qwen2_tied": (
        "Qwen2Config",
        dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e4)),
    ),
    "qwen3_untied": ("Qwen3Config", dict(head_dim=16, attention_bias=True)),
    "qwen3_5_partial_rotary": (
        "Qwen3_5TextConfig",
        dict(
            head_dim=16,
            layer_types=FULL,
            rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5),
        ),
    ),
    "qwen3_5_biases_tied": (
        "Qwen3_5TextConfig",
        dict(head_dim=8, layer_types=FULL, attention_bias=True, tie_word_embeddings=True),
    ),
}


def hf_config(name: str, **over):
    cls, kw = CASES[name]
    if cls == "Qwen3_5TextConfig":
        from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig as cls
    else:
        cls = getattr(transformers, cls)
    return cls(**{**TINY, **kw, **over})


def random_hf(config, seed=0):
    """The causal LM of ``config`` with noise on every parameter (norm gains, biases too)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def left_padded(vocab=VOCAB, seed=0):
    """Two rows of 7 tokens, the second with 2 pads in front; qtx's position ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, :2] = 0
    ids[1, :2] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def hf_outputs(hf, ids, mask, positions):
    with torch.no_grad():
        return hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
            output_hidden_states=True,
        )


def assert_parity(hf, model, variables):
    """Logits and every hidden state of qtx and HF agree to ATOL on the real tokens."""
    ids, mask, positions = left_padded()
    ref = hf_outputs(hf, ids, mask, positions)
    out = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    real = mask.astype(bool)
    pairs = [*zip(ref.hidden_states, out["hidden_states"], strict=True)]
    pairs.append((ref.logits, out["logits"]))
    diffs = [float(np.abs(r.numpy() - np.asarray(o))[real].max()) for r, o in pairs]
    assert max(diffs) < ATOL, diffs


def assert_same_state_dict(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, bad


@pytest.mark.parametrize("name", list(CASES))
def test_load_parity_and_export_round_trip(tmp_path, name):
    hf = random_hf(hf_config(name))
    hf.save_pretrained(tmp_path / "hf")
    model, variables = qtx.hf.load(tmp_path / "hf")
    cfg = model.cfg
    assert cfg.family == "llama" and cfg.head == "clm"
    assert cfg.num_kv_heads == 2
    assert_parity(hf, model, variables)

    qtx.hf.export(tmp_path / "out", cfg, variables)
    written = io.read_config(tmp_path / "out")
    expected = "llama" if name.startswith("mistral") else hf.config.model_type
    assert written["model_type"] == expected
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_same_state_dict(hf, back)


def test_config_fields():
    """Each model type's settings land in the ModelConfig fields of the decoder family."""
    cfg = qtx.hf.config_from_hf(hf_config("llama3_tied_biases").to_dict())
    assert cfg.rope_scaling == (4.0, 1.0, 4.0, 16) and cfg.rope_theta == 500.0
    assert (cfg.qkv_bias, cfg.use_bias, cfg.mlp_bias, cfg.tie_embeddings) == (1, 1, 1, 1)
    assert (cfg.norm, cfg.qk_norm, cfg.head_dim, cfg.activation) == ("rmsnorm", 0, None, "silu")
    cfg = qtx.hf.config_from_hf(hf_config("qwen2_tied").to_dict())
    assert (cfg.qkv_bias, cfg.use_bias, cfg.qk_norm) == (True, False, False)
    cfg = qtx.hf.config_from_hf(hf_config("qwen3_untied").to_dict())
    assert (cfg.qk_norm, cfg.head_dim, cfg.tie_embeddings) == (True, 16, False)
    cfg = qtx.hf.config_from_hf(hf_config("qwen3_5_partial_rotary").to_dict(), head="clm")
    assert (cfg.norm, cfg.partial_rotary_factor) == ("rmsnorm_zero_centered", 0.5)
    assert (cfg.attention.gate, cfg.attention.pi_init) == ("elementwise", None)
    assert convert_llama.architecture(cfg) == "Qwen3_5ForCausalLM"


def one_sentence(match):
    """``pytest.raises`` of a UserError matching ``match`` whose message is one sentence."""

    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(UserError, match=match)
            self.info = self.ctx.__enter__()

        def __exit__(self, *exc):
            done = self.ctx.__exit__(*exc)
            msg = str(self.info.value)
            assert msg.endswith(".") and not re.search(r"[.;]\s", msg), msg
            return done

    return Check()


@pytest.mark.parametrize(
    "name, over, match",
    [
        (
            "qwen3_5_partial_rotary",
            dict(layer_types=["linear_attention", "full_attention"]),
            r"layer_types\[0\]='linear_attention' \(a Gated DeltaNet layer,",
        ),
        ("mistral_untied", dict(sliding_window=16), "sliding_window=16 below"),
        (
            "qwen2_tied",
            dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
            "sliding_window=8",
        ),
        ("qwen3_untied", dict(hidden_act="gelu"), r"hidden_act='gelu' \(allowed: silu\)"),
        (
            "llama3_tied_biases",
            dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0)),
            r"rope_type='linear' \(allowed: default, llama3\)",
        ),
    ],
    ids=["deltanet", "mistral_window", "qwen2_window", "activation", "rope_type"],
)
def test_refusals(name, over, match):
    d = hf_config(name, **over).to_dict()
    with one_sentence(match):
        qtx.hf.config_from_hf(d)


def test_architecture_must_belong_to_the_model_type():
    d = hf_config("qwen3_untied").to_dict()
    d["architectures"] = ["Qwen3_5ForCausalLM"]
    with pytest.raises(UserError, match="allowed for model_type 'qwen3': Qwen3Model, Qwen3For"):
        qtx.hf.config_from_hf(d)


# -- the output gate fused into q_proj -------------------------------------------------------


def paper_q_and_gate(y, heads, kv, head_dim, gate_dim):
    """The Gated Attention paper's Qwen3 code on the fused q_proj output ``y`` (B, T, rows):
    view (B, T, KV, -1), split [G*Dh, G*Dg], query (B, T, H, Dh), gate (B, T, H, Dg)."""
    b, t, _ = y.shape
    g = heads // kv
    y = y.reshape(b, t, kv, -1)
    query, gate = y[..., : g * head_dim], y[..., g * head_dim :]
    assert gate.shape[-1] == g * gate_dim
    return query.reshape(b, t, heads, head_dim), gate.reshape(b, t, heads, gate_dim)


def qwen35_q_and_gate(y, heads, head_dim):
    """HF Qwen3_5Attention on the q_proj output: view (B, T, H, 2 Dh), chunk in two."""
    b, t, _ = y.shape
    query, gate = np.split(y.reshape(b, t, heads, 2 * head_dim), 2, axis=-1)
    return query, gate


@pytest.mark.parametrize("gate_dim", [8, 1], ids=["elementwise", "headwise"])
@pytest.mark.parametrize("layout", ["per_group", "per_head"])
def test_split_and_merge_q_gate(layout, gate_dim):
    heads, kv, dh, d = 4, 2, 8, 12
    rng = np.random.default_rng(0)
    w = rng.standard_normal((heads * (dh + gate_dim), d)).astype(np.float32)
    bias = rng.standard_normal(heads * (dh + gate_dim)).astype(np.float32)
    q, g = convert_llama.split_q_gate(w, heads, kv, dh, gate_dim, layout)
    qb, gb = convert_llama.split_q_gate(bias, heads, kv, dh, gate_dim, layout)
    assert q.shape == (heads * dh, d) and g.shape == (heads * gate_dim, d)
    np.testing.assert_array_equal(convert_llama.merge_q_gate(q, g, heads, kv, dh, layout), w)
    np.testing.assert_array_equal(convert_llama.merge_q_gate(qb, gb, heads, kv, dh, layout), bias)
    # the halves are what the reference code computes from the fused projection
    x = rng.standard_normal((2, 3, d)).astype(np.float32)
    y = x @ w.T + bias
    if layout == "per_group":
        ref_q, ref_g = paper_q_and_gate(y, heads, kv, dh, gate_dim)
    elif gate_dim == dh:
        ref_q, ref_g = qwen35_q_and_gate(y, heads, dh)
    else:
        ref = y.reshape(2, 3, heads, dh + gate_dim)
        ref_q, ref_g = ref[..., :dh], ref[..., dh:]
    np.testing.assert_allclose((x @ q.T + qb).reshape(ref_q.shape), ref_q, atol=1e-5)
    np.testing.assert_allclose((x @ g.T + gb).reshape(ref_g.shape), ref_g, atol=1e-5)


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_paper_layout_checkpoint_loads(tmp_path, gate):
    """A qwen3 ``config.json`` with the paper's flags and its fused q_proj (per KV group, with
    biases) loads into the gated qtx model: same outputs as the model it was written from."""
    hf = random_hf(hf_config("qwen3_untied"), seed=1)
    hf.save_pretrained(tmp_path / "plain")
    model, variables = qtx.hf.load(tmp_path / "plain", attention={"gate": gate, "pi_init": 0.3})
    cfg = model.cfg
    # the checkpoint as the paper's code writes it: q_proj rows per KV group, gates after
    sd = qtx.hf.state_dict_to_hf(cfg, variables["params"])
    heads, kv, dh = 4, 2, 16
    for i in range(cfg.num_layers):
        for leaf in ("weight", "bias"):
            q = f"model.layers.{i}.self_attn.q_proj.{leaf}"
            g = [k for k in sd if k.startswith(f"model.qtx_gates.{i}.") and k.endswith(leaf)]
            assert len(g) == 1, (list(sd), i, leaf)
            sd[q] = convert_llama.merge_q_gate(sd[q], sd.pop(g[0]), heads, kv, dh, "per_group")
    out = tmp_path / "paper"
    out.mkdir()
    io.write_safetensors(out / io.SAFETENSORS, sd)
    config = hf.config.to_dict()
    config.update({f"{gate}_attn_output_gate": True, "qkv_bias": True, "use_qk_norm": True})
    (out / "config.json").write_text(json.dumps(config))

    loaded, loaded_vars = qtx.hf.load(out)
    assert loaded.cfg.attention.gate == gate and loaded.cfg.qkv_bias
    ids, mask, _ = left_padded()
    want = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask))["logits"]
    got = loaded.apply(loaded_vars, jnp.asarray(ids), jnp.asarray(mask))["logits"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_base_model_heads_and_pretrained_params(tmp_path):
    """A base Qwen3Model loads with head none (and back as Qwen3Model); an untied causal LM
    loaded with head none drops its lm_head; pretrained_params names a differing decoder field."""
    config = hf_config("qwen3_untied")
    torch.manual_seed(0)
    base = transformers.Qwen3Model(config).eval()
    base.save_pretrained(tmp_path / "base")
    model, variables = qtx.hf.load(tmp_path / "base")
    assert model.cfg.head == "none"
    ids, mask, positions = left_padded()
    with torch.no_grad():
        ref = base(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).last_hidden_state.numpy()
    out = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask))["last_hidden_state"]
    assert np.abs(ref - np.asarray(out))[mask.astype(bool)].max() < ATOL
    qtx.hf.export(tmp_path / "out", model.cfg, variables)
    assert io.read_config(tmp_path / "out")["architectures"] == ["Qwen3Model"]
    assert sorted(io.read_state_dict(tmp_path / "out")) == sorted(base.state_dict())

    random_hf(config).save_pretrained(tmp_path / "lm")
    with pytest.warns(UserWarning, match=r"dropped the checkpoint's head key\(s\) \['lm_head"):
        model, variables = qtx.hf.load(tmp_path / "lm", head="none")
    assert "lm_head" not in variables["params"]
    cfg = model.cfg.replace(head="clm", rope_theta=500.0)
    with pytest.raises(UserError, match=r"config.model.rope_theta=500.0 \(checkpoint: 10000.0\)"):
        qtx.hf.pretrained_params(tmp_path / "lm", cfg)
    assert "lm_head" in qtx.hf.pretrained_params(tmp_path / "lm", cfg.replace(rope_theta=1e4))


@pytest.mark.parametrize(
    "over, field",
    [
        (dict(qkv_bias=False, use_bias=True), "qkv_bias=False with use_bias=True"),
        (dict(qk_norm=True, mlp_bias=True), "mlp_bias=True (HF Qwen3 has no MLP biases)"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 (HF Llama rotates"),
        (dict(norm="rmsnorm_zero_centered", qk_norm=True), "gate='none' with norm="),
    ],
)
def test_export_refuses_what_the_hf_class_cannot_represent(tmp_path, over, field):
    from qtx.models import model_config

    cfg = model_config("llama-tiny", **over)
    with pytest.raises(UserError, match=re.escape(field)):
        qtx.hf.export(tmp_path, cfg, {"params": {}})
