"""HF PyTorch <-> qtx parity: random tiny HF models saved locally, loaded with qtx.hf.load.

Every hidden state and the logits must agree to 1e-4 in float32 (text inputs include padding).
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qtx.hf  # noqa: E402

torch.set_num_threads(2)
ATOL = 1e-4
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
IMAGE = dict(TEXT, image_size=16, patch_size=4, num_channels=3, num_labels=5)


def save(hf_model, path, safe=True):
    """``save_pretrained`` (safetensors), or config.json + a torch ``pytorch_model.bin`` of the
    full state dict (tied copies included) when ``safe=False``."""
    hf_model.eval()
    if safe:
        hf_model.save_pretrained(path)
    else:
        hf_model.config.architectures = [type(hf_model).__name__]
        hf_model.config.save_pretrained(path)
        torch.save(hf_model.state_dict(), path / "pytorch_model.bin")
    return path


def text_inputs(vocab, pad, batch=2, seq=7, seed=0):
    """Random ids with the second row right-padded by 2 (``pad`` ids, mask 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[1, -2:] = 0
    ids[1, -2:] = pad
    return ids, mask


def hf_run(hf_model, **inputs):
    with torch.no_grad():
        out = hf_model(**{k: torch.tensor(v) for k, v in inputs.items()}, output_hidden_states=True)
    return out


def max_diff(a, b, mask=None):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.abs(a - b)
    if mask is not None:
        d = d[mask.astype(bool)]
    return float(d.max())


def check(ref, out, mask=None, extra=()):
    """All hidden states and the ``(hf_name, qtx_name)`` pairs of ``extra`` agree to ATOL."""
    assert len(ref.hidden_states) == len(out["hidden_states"])
    pairs = zip(ref.hidden_states, out["hidden_states"], strict=True)
    diffs = [max_diff(h.numpy(), o, mask) for h, o in pairs]
    diffs += [max_diff(getattr(ref, a).numpy(), out[b], mask) for a, b in extra]
    print(f"max abs diff {max(diffs):.2e}")
    assert max(diffs) < ATOL, diffs


def test_bert_mlm(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=99, **TEXT))
    model, variables = qtx.hf.load(save(hf, tmp_path))
    cfg = model.cfg
    assert (cfg.family, cfg.head, cfg.pooler, cfg.num_layers) == ("bert", "mlm", False, 2)
    ids, mask = text_inputs(99, 0)
    tt = np.zeros_like(ids)
    tt[:, 4:] = 1
    ref = hf_run(hf, input_ids=ids, attention_mask=mask, token_type_ids=tt)
    out = model.apply(
        variables, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tt), output_hidden_states=True
    )
    check(ref, out, extra=[("logits", "logits")])


def test_bert_classification(tmp_path):
    torch.manual_seed(1)
    hf = transformers.BertForSequenceClassification(
        transformers.BertConfig(vocab_size=99, num_labels=3, hidden_act="gelu_new", **TEXT)
    )
    model, variables = qtx.hf.load(save(hf, tmp_path))
    assert (model.cfg.head, model.cfg.num_labels, model.cfg.activation) == (
        "classification",
        3,
        "gelu_new",
    )
    ids, mask = text_inputs(99, 0)
    ref = hf_run(hf, input_ids=ids, attention_mask=mask)
    out = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    check(ref, out, extra=[("logits", "logits")])


def test_bert_pretraining_from_torch_bin(tmp_path):
    """pytorch_model.bin with the tied decoder copies; the NSP head is dropped."""
    torch.manual_seed(2)
    hf = transformers.BertForPreTraining(transformers.BertConfig(vocab_size=99, **TEXT))
    path = save(hf, tmp_path, safe=False)
    assert "cls.predictions.decoder.weight" in hf.state_dict()
    assert not (path / "model.safetensors").exists()
    model, variables = qtx.hf.load(path)
    assert (model.cfg.head, model.cfg.pooler) == ("mlm", True)
    ids, mask = text_inputs(99, 0)
    ref = hf_run(hf, input_ids=ids, attention_mask=mask)
    out = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    check(ref, out, extra=[("prediction_logits", "logits")])


@pytest.mark.parametrize("head", ["mlm", "classification"])
def test_roberta(tmp_path, head):
    torch.manual_seed(3)
    c = transformers.RobertaConfig(
        vocab_size=99,
        max_position_embeddings=40,
        type_vocab_size=1,
        pad_token_id=1,
        num_labels=4,
        **TEXT,
    )
    cls = {
        "mlm": transformers.RobertaForMaskedLM,
        "classification": transformers.RobertaForSequenceClassification,
    }[head]
    hf = cls(c)
    model, variables = qtx.hf.load(save(hf, tmp_path))
    assert (model.cfg.family, model.cfg.head) == ("roberta", head)
    ids, mask = text_inputs(99, 1)
    ref = hf_run(hf, input_ids=ids, attention_mask=mask)
    out = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    check(ref, out, extra=[("logits", "logits")])


@pytest.mark.parametrize("post_ln", [False, True], ids=["pre_ln", "post_ln_proj"])
def test_opt(tmp_path, post_ln):
    torch.manual_seed(4)
    kw = dict(do_layer_norm_before=False, word_embed_proj_dim=16) if post_ln else {}
    c = transformers.OPTConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=37,
        num_attention_heads=4,
        max_position_embeddings=40,
        **kw,
    )
    hf = transformers.OPTForCausalLM(c)
    model, variables = qtx.hf.load(save(hf, tmp_path))
    cfg = model.cfg
    assert (cfg.pre_ln, cfg.final_ln) == ((False, False) if post_ln else (True, True))
    assert cfg.word_embed_proj_dim == (16 if post_ln else None)
    ids, mask = text_inputs(99, 1)
    ref = hf_run(hf, input_ids=ids, attention_mask=mask)
    out = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    # Padded rows differ by design (HF masks them out entirely); compare real tokens.
    check(ref, out, mask, extra=[("logits", "logits")])


def image_inputs(channels=3, size=16, seed=0):
    """(B, C, H, W) for HF and the same images (B, H, W, C) for qtx."""
    x = np.random.default_rng(seed).standard_normal((2, channels, size, size)).astype(np.float32)
    return x, jnp.asarray(x.transpose(0, 2, 3, 1))


def test_vit_classification(tmp_path):
    torch.manual_seed(5)
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**IMAGE))
    model, variables = qtx.hf.load(save(hf, tmp_path))
    assert (model.cfg.head, model.cfg.distillation_token) == ("classification", False)
    pixels, images = image_inputs()
    ref = hf_run(hf, pixel_values=pixels)
    out = model.apply(variables, images, output_hidden_states=True)
    check(ref, out, extra=[("logits", "logits")])


def test_vit_model_drops_pooler(tmp_path):
    torch.manual_seed(6)
    hf = transformers.ViTModel(transformers.ViTConfig(**IMAGE))
    assert "pooler.dense.weight" in hf.state_dict()
    model, variables = qtx.hf.load(save(hf, tmp_path))
    assert model.cfg.head == "none"
    pixels, images = image_inputs()
    ref = hf_run(hf, pixel_values=pixels)
    out = model.apply(variables, images, output_hidden_states=True)
    check(ref, out, extra=[("last_hidden_state", "last_hidden_state")])


@pytest.mark.parametrize("teacher", [True, False], ids=["with_teacher", "cls_only"])
def test_deit_distilled(tmp_path, teacher):
    torch.manual_seed(7)
    cls = (
        transformers.DeiTForImageClassificationWithTeacher
        if teacher
        else transformers.DeiTForImageClassification
    )
    hf = cls(transformers.DeiTConfig(**IMAGE))
    model, variables = qtx.hf.load(save(hf, tmp_path))
    assert (model.cfg.head, model.cfg.distillation_token) == ("classification", True)
    pixels, images = image_inputs()
    ref = hf_run(hf, pixel_values=pixels)
    out = model.apply(variables, images, output_hidden_states=True)
    extra = [("logits", "logits")]
    if teacher:
        extra += [("cls_logits", "cls_logits"), ("distillation_logits", "dist_logits")]
    check(ref, out, extra=extra)


def swin_model(cls, image_size, seed):
    """A random tiny HF Swin (16 wide, stages of 2, 2, 1 blocks, window 4) whose relative
    position tables and LayerNorms are perturbed away from their constant init."""
    torch.manual_seed(seed)
    config = transformers.SwinConfig(
        image_size=image_size,
        patch_size=2,
        num_channels=3,
        embed_dim=16,
        depths=[2, 2, 1],
        num_heads=[2, 2, 4],
        window_size=4,
        num_labels=5,
    )
    hf = cls(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "relative_position_bias_table" in name or "norm" in name:
                p.add_(0.5 * torch.randn_like(p))
    return hf


# 32: 16 x 16 and 8 x 8 patches with shifted windows, then one 4 x 4 window; 28: 14 x 14 and
# 7 x 7 padded to the window, an odd map padded before merging
@pytest.mark.parametrize("image_size", [32, 28])
def test_swin_classification(tmp_path, image_size):
    hf = swin_model(transformers.SwinForImageClassification, image_size, seed=8)
    model, variables = qtx.hf.load(save(hf, tmp_path))
    cfg = model.cfg
    assert (cfg.family, cfg.head, cfg.depths, cfg.stage_heads) == (
        "swin",
        "classification",
        (2, 2, 1),
        (2, 2, 4),
    )
    pixels, images = image_inputs(size=image_size)
    ref = hf_run(hf, pixel_values=pixels)
    out = model.apply(variables, images, output_hidden_states=True)
    check(ref, out, extra=[("logits", "logits")])


def test_swin_model_from_the_newer_key_spelling(tmp_path):
    """``state_dict()`` of newer transformers (``attention.q_proj``, ``mlp.fc1``) in a torch
    bin, plus a stale relative position index: loads; a wrong index is refused."""
    hf = swin_model(transformers.SwinModel, 32, seed=9)
    sd = hf.state_dict()
    assert any(".attention.q_proj." in k for k in sd)
    save(hf, tmp_path, safe=False)
    model, variables = qtx.hf.load(tmp_path)
    assert model.cfg.head == "none"
    pixels, images = image_inputs(size=32)
    ref = hf_run(hf, pixel_values=pixels)
    out = model.apply(variables, images, output_hidden_states=True)
    check(ref, out, extra=[("last_hidden_state", "last_hidden_state"), ("pooler_output", "pooled")])

    from qtx.models.swin import relative_position_index

    key = "encoder.layers.0.blocks.1.attention.self.relative_position_index"
    sd = {k: v.numpy() for k, v in sd.items()}
    sd[key] = relative_position_index(4).ravel()
    qtx.hf.params_from_hf("swin", sd, model.cfg)
    sd[key] = relative_position_index(3).ravel()
    with pytest.raises(ValueError, match="relative position index"):
        qtx.hf.params_from_hf("swin", sd, model.cfg)
