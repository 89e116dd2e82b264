"""qtx -> HF export round trips, loading into attention variants, heads and strict errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qtx.hf  # noqa: E402
from qtx.hf import io  # noqa: E402
from qtx.models import build, dummy_inputs, model_config  # noqa: E402

torch.set_num_threads(2)
ATOL = 1e-4
SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37)
GATE = {"gate": "linear", "gate_finetune": True, "pi_init": 0.25, "gate_init_std": 0.0}


def random_variables(cfg, seed=0):
    """``model.init`` plus noise on every leaf (so zero biases / unit LN scales are tested)."""
    v = build(cfg).init(jax.random.key(seed), **dummy_inputs(cfg))
    leaves, tree = jax.tree.flatten(v)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


def text_inputs(vocab, pad, left=False):
    """Two rows of 7 tokens; the second has 2 pads at the end (or at the start)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (2, 7))
    mask = np.ones((2, 7), np.int64)
    where = slice(0, 2) if left else slice(-2, None)
    mask[1, where] = 0
    ids[1, where] = pad
    return ids, mask


def outputs(cfg, model, variables, hf, left=False):
    """``[(hf tensor, qtx array)]`` of every hidden state and the logits (if any), and the
    mask of the positions to compare (OPT's pads differ: HF's attend to nothing)."""
    if cfg.family in ("vit", "swin"):
        size = cfg.image_size
        x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            ref = hf(pixel_values=torch.tensor(x), output_hidden_states=True)
        out = model.apply(
            variables, jnp.asarray(x.transpose(0, 2, 3, 1)), output_hidden_states=True
        )
        mask = None
    else:
        ids, mask = text_inputs(99, cfg.pad_token_id, left=left)
        with torch.no_grad():
            ref = hf(
                input_ids=torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                output_hidden_states=True,
            )
        out = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
        mask = mask.astype(bool) if cfg.family == "opt" else None
    pairs = list(zip(ref.hidden_states, out["hidden_states"], strict=True))
    if "logits" in out:
        pairs.append((ref.logits, out["logits"]))
    return pairs, mask


def max_diff(pairs, mask):
    diffs = [np.abs(h.numpy() - np.asarray(o)) for h, o in pairs]
    return max(float((d[mask] if mask is not None else d).max()) for d in diffs)


def hf_bert(tmp_path, cls=transformers.BertForSequenceClassification, seed=0):
    torch.manual_seed(seed)
    c = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=3,
    )
    hf = cls(c).eval()
    hf.save_pretrained(tmp_path)
    return hf


CASES = {  # qtx size preset, overrides, the HF architecture it exports as
    "bert_mlm": ("bert-tiny", dict(head="mlm", pooler=False), "BertForMaskedLM"),
    "bert_cls": (
        "bert-tiny",
        dict(head="classification", num_labels=3),
        "BertForSequenceClassification",
    ),
    "roberta_cls": (
        "roberta-tiny",
        dict(head="classification", pooler=False, max_positions=40),
        "RobertaForSequenceClassification",
    ),
    # logits at every position, pads included: positions count from pad_token_id + 1
    "roberta_mlm": (
        "roberta-tiny",
        dict(head="mlm", pooler=False, max_positions=40),
        "RobertaForMaskedLM",
    ),
    "opt_post_ln_proj": (
        "opt-tiny",
        dict(pre_ln=False, final_ln=False, word_embed_proj_dim=16),
        "OPTForCausalLM",
    ),
    "opt_base": ("opt-tiny", dict(head="none"), "OPTModel"),
    # positions from the attention mask: the real tokens of a left-padded row match HF's
    "opt_clm_left_padded": ("opt-tiny", dict(head="clm"), "OPTForCausalLM"),
    "vit_cls": ("vit-tiny", dict(num_channels=3), "ViTForImageClassification"),
    "deit_distilled": (
        "vit-tiny",
        dict(num_channels=3, distillation_token=True, max_positions=18),
        "DeiTForImageClassificationWithTeacher",
    ),
    # shifted windows at 16 x 16 and 8 x 8 patches, one window at 4 x 4
    "swin_cls": ("swin-tiny", dict(num_channels=3, image_size=32), "SwinForImageClassification"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_round_trip(tmp_path, case):
    name, over, want_arch = CASES[case]
    if name not in ("vit-tiny", "swin-tiny"):
        over = dict(over, vocab_size=99, max_positions=over.get("max_positions", 40))
    cfg = model_config(name, dict(SMALL, **over))
    model, variables = build(cfg), random_variables(cfg)
    qtx.hf.export(tmp_path, cfg, variables)
    arch = io.read_config(tmp_path)["architectures"][0]
    assert arch == want_arch
    hf = getattr(transformers, arch).from_pretrained(tmp_path).eval()

    pairs, mask = outputs(cfg, model, variables, hf, left=case.endswith("left_padded"))
    diff = max_diff(pairs, mask)
    print(f"{case}: max abs diff {diff:.2e}")
    assert diff < ATOL

    loaded, v2 = qtx.hf.load(tmp_path)
    assert loaded.cfg == cfg
    a, b = flatten_dict(variables["params"]), flatten_dict(v2["params"])
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))


@pytest.mark.parametrize(
    "over, field",
    [
        (dict(fused_qkv=True), "config.model.fused_qkv"),
        (dict(pre_ln=True), "config.model.pre_ln"),
    ],
)
def test_export_rejects_what_hf_cannot_represent(tmp_path, over, field):
    cfg = model_config("bert-tiny", dict(SMALL, vocab_size=99, **over))
    variables = jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), **dummy_inputs(cfg)))
    with pytest.raises(ValueError, match=field) as e:
        qtx.hf.export(tmp_path, cfg, variables)
    assert "orbax" in str(e.value)
    assert not (tmp_path / "model.safetensors").exists()


def test_load_into_gated_variant_keeps_weights(tmp_path):
    hf_bert(tmp_path)
    ids, mask = text_inputs(99, 0)
    m0, v0 = qtx.hf.load(tmp_path)
    m1, v1 = qtx.hf.load(tmp_path, attention=GATE)
    assert m1.cfg.attention.gate == "linear"
    p0, p1 = flatten_dict(v0["params"]), flatten_dict(v1["params"])
    gate = {k for k in p1 if "gate" in k}
    assert gate and set(p1) - gate == set(p0)
    for k in p0:
        np.testing.assert_array_equal(np.asarray(p0[k]), np.asarray(p1[k]), err_msg=str(k))
    for k in gate:
        if k[-1] == "kernel":
            assert not np.any(np.asarray(p1[k]))
    y0 = m0.apply(v0, jnp.asarray(ids), jnp.asarray(mask))["logits"]
    y1 = m1.apply(v1, jnp.asarray(ids), jnp.asarray(mask))["logits"]
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), atol=1e-6)
    # A variant without new parameters (clipped softmax) loads every weight as well.
    m2, v2 = qtx.hf.load(tmp_path, attention={"softmax": "clipped", "gamma": -0.0})
    assert set(flatten_dict(v2["params"])) == set(p0)


def _rewrite(path, change):
    sd = io.read_state_dict(path)
    change(sd)
    io.write_safetensors(path / "model.safetensors", sd)


def test_unknown_tensor_raises(tmp_path):
    hf_bert(tmp_path)
    key = "bert.encoder.layer.0.attention.self.extra_scale"
    _rewrite(tmp_path, lambda sd: sd.__setitem__(key, np.ones(4, np.float32)))
    with pytest.raises(ValueError, match="encoder.layer.0.attention.self.extra_scale"):
        qtx.hf.load(tmp_path)


def test_missing_tensor_raises(tmp_path):
    hf_bert(tmp_path)
    _rewrite(tmp_path, lambda sd: sd.pop("bert.encoder.layer.1.output.dense.bias"))
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        qtx.hf.load(tmp_path)


def test_untied_decoder_raises(tmp_path):
    hf_bert(tmp_path, transformers.BertForMaskedLM)
    _rewrite(
        tmp_path,
        lambda sd: sd.__setitem__("cls.predictions.decoder.weight", np.ones((99, 32), np.float32)),
    )
    with pytest.raises(ValueError, match="not tied"):
        qtx.hf.load(tmp_path)


def test_head_override(tmp_path):
    """A base checkpoint loads with a new classification head (fresh, with a warning); a
    classification checkpoint loads as a bare encoder (its head dropped, with a warning)."""
    hf_bert(tmp_path / "base", transformers.BertModel)
    with pytest.warns(UserWarning, match="classifier/dense"):
        m, v = qtx.hf.load(tmp_path / "base", head="classification", overrides={"num_labels": 5})
    assert (m.cfg.head, m.cfg.num_labels) == ("classification", 5)
    assert v["params"]["classifier"]["dense"]["kernel"].shape == (32, 5)
    hf_bert(tmp_path / "cls")
    with pytest.warns(UserWarning, match="classifier.weight"):
        m, v = qtx.hf.load(tmp_path / "cls", head="none")
    assert "classifier" not in v["params"] and "pooler" in v["params"]


def test_low_level_api(tmp_path):
    hf = hf_bert(tmp_path)
    cfg = qtx.hf.config_from_hf(io.read_config(tmp_path))
    assert (cfg.family, cfg.head, cfg.num_labels, cfg.hidden_size) == (
        "bert",
        "classification",
        3,
        32,
    )
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    params = qtx.hf.params_from_hf("bert", sd, cfg)
    np.testing.assert_array_equal(
        np.asarray(params["layer_0"]["attn"]["q_proj"]["kernel"]),
        sd["bert.encoder.layer.0.attention.self.query.weight"].T,
    )
    sd.pop("classifier.bias")
    with pytest.raises(ValueError, match="classifier.bias"):
        qtx.hf.params_from_hf("bert", sd, cfg)


def test_bfloat16_safetensors_and_tokenizer_errors(tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(3, 4).to(torch.bfloat16)
    save_file({"w": t}, tmp_path / "x.safetensors")
    np.testing.assert_array_equal(
        io.read_safetensors(tmp_path / "x.safetensors")["w"].astype(np.float32), t.float().numpy()
    )
    with pytest.raises(ValueError, match="no tokenizer files"):
        qtx.hf.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        qtx.hf.load(tmp_path / "nope")


def _hf_roberta(path):
    torch.manual_seed(0)
    c = transformers.RobertaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        type_vocab_size=1,
    )
    transformers.RobertaForMaskedLM(c).save_pretrained(path)


@pytest.mark.parametrize(
    "field,value,match",
    [
        (None, None, None),
        ("ln_eps", 1e-12, r"config.model.ln_eps=1e-12 \(checkpoint: 1e-05\)"),
        ("pad_token_id", 0, r"config.model.pad_token_id=0 \(checkpoint: 1; it sets RoBERTa"),
        ("vocab_size", 128, r"config.model.vocab_size=128 \(checkpoint: 99\)"),
    ],
)
def test_pretrained_params_refuses_every_field_that_changes_the_math(tmp_path, field, value, match):
    _hf_roberta(tmp_path)
    over = dict(SMALL, vocab_size=99, max_positions=40, ln_eps=1e-5, pad_token_id=1, head="mlm")
    if field:
        over[field] = value
    cfg = model_config("roberta-tiny", **over)
    if match is None:
        params = qtx.hf.pretrained_params(str(tmp_path), cfg)
        assert params["embed"]["word"]["embedding"].shape == (99, 32)
        return
    with pytest.raises(ValueError, match=match):
        qtx.hf.pretrained_params(str(tmp_path), cfg)
