"""QuaRot-style rotations: the Hadamard constructions, the online transforms in the decoder,
the exact rotation of llama-family models (tied / untied heads, GQA, q/k norms, gates, sinks,
zero-centred norms, scanned layers), refusals, integer plans, and the PyTorch export."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx import quant
from qtx.errors import UserError
from qtx.evaluate import integer as int_models
from qtx.evaluate.ptq import calibrate_setup
from qtx.methods.capture import dense_inputs
from qtx.methods.quarot import ROTATION, ROTATION_REPARAM, rotate
from qtx.models import build, dummy_inputs, model_config
from qtx.nn import hadamard
from qtx.nn.attention import block_attention

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, max_positions=64, pad_token_id=0)


# -- Hadamard constructions ----------------------------------------------------------------------


def test_paley_and_sylvester_are_hadamard():
    for m in hadamard.paley_orders():
        p = hadamard.paley(m)
        np.testing.assert_array_equal(p @ p.T, m * np.eye(m, dtype=np.int64))
    for k in range(8):
        s = hadamard.sylvester(2**k)
        np.testing.assert_array_equal(s @ s.T, 2**k * np.eye(2**k, dtype=np.int64))
    assert hadamard.paley_orders()[:12] == (4, 8, 12, 20, 24, 32, 44, 48, 60, 68, 72, 80)


@pytest.mark.parametrize(
    "n, order", [(1, 1), (3, 1), (64, 64), (128, 128), (384, 384), (768, 768), (48, 48)]
)
def test_hadamard_matrices_are_orthogonal(n, order):
    assert hadamard.hadamard_order(n) == order
    h = hadamard.hadamard_matrix(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    if order == n and n > 1:  # a full Hadamard matrix: every entry ±1/sqrt(n)
        np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-12)
    q = hadamard.random_hadamard(n, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(q, np.diag(hadamard.random_signs(n, 3)) @ h, atol=1e-12)
    x = np.random.default_rng(0).standard_normal((2, 3, n)).astype(np.float32)
    got = np.asarray(hadamard.online_hadamard(jnp.asarray(x)))
    np.testing.assert_allclose(got, x @ h, atol=1e-5)


def test_wide_widths_use_blocks():
    """11008 = 256 · 43: blocks of 256 (43 is in no construction); applied block by block."""
    n = 11008
    assert hadamard.hadamard_order(n) == 256
    assert hadamard.hadamard_order(14336) == 14336  # 224 · 64 (Paley 224: 223 prime)
    h256 = hadamard.hadamard_matrix(256)
    x = np.random.default_rng(1).standard_normal((2, n))
    want = (x.reshape(2, n // 256, 256) @ h256).reshape(2, n)
    np.testing.assert_allclose(hadamard.hadamard_numpy(x), want, atol=1e-12)
    got = np.asarray(hadamard.online_hadamard(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), 1e-5)


# -- the rotation --------------------------------------------------------------------------------


def noisy_params(cfg, seed=0):
    """Init params with noise everywhere: non-trivial norm gains (about 1 ± 0.3, or w ~ 0.3
    zero-centred), biases, gates, sinks."""
    v = build(cfg).init(jax.random.key(seed), **dummy_inputs(cfg))
    rng = np.random.default_rng(seed + 1)
    flat = flatten_dict(v["params"])
    for k, x in flat.items():
        std = 0.3 if k[-1] == "scale" else 0.05
        flat[k] = jnp.asarray(np.asarray(x) + rng.normal(0, std, x.shape), x.dtype)
    return unflatten_dict(flat)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (2, 9))
    mask = np.ones((2, 9), np.int32)
    mask[1, :3], ids[1, :3] = 0, 0  # left padding
    return jnp.asarray(ids), jnp.asarray(mask)


CASES = {
    "tied": {},
    "untied": dict(tie_embeddings=False),
    "qk_norm_zero_centred_elementwise_gate_biases": dict(
        qk_norm=True,
        head_dim=48,  # o_proj width 4 · 48 = 192 = Paley 12 · 16
        norm="rmsnorm_zero_centered",
        partial_rotary_factor=0.5,
        attention={"gate": "elementwise", "pi_init": 0.4},
        qkv_bias=True,
        use_bias=True,
        mlp_bias=True,
    ),
    "headwise_gate_sink": dict(attention={"gate": "headwise", "softmax": "sink"}),
    "all_heads_linear_softpick_scan": dict(
        attention={"gate": "all_heads_linear", "softmax": "softpick"}, scan_layers=True
    ),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if "scan" in n else n for n in CASES]
)
def test_rotation_is_exact(name):
    """Logits of the rotated llama-tiny equal the original's to float32 rounding; the norms
    become identities, the head is untied, and the online transforms are active (the rotated
    weights without them are far off)."""
    cfg = model_config("llama-tiny", dict(SMALL, **CASES[name]))
    params = noisy_params(cfg)
    ids, mask = batch()
    ref = np.asarray(build(cfg).apply({"params": params}, ids, mask)["logits"])
    cfg2, params2, info = ROTATION.apply(cfg, params, [], None, {"rotation_seed": 7})
    assert cfg2.rotated and not cfg2.tie_embeddings and cfg2.rotation_seed == 7
    assert info["rotation_seed"] == 7 and info["untied_head"] == cfg.tie_embeddings
    out = np.asarray(build(cfg2).apply({"params": params2}, ids, mask)["logits"])
    real = np.asarray(mask, bool)
    rel = np.abs(out - ref)[real].max() / np.abs(ref)[real].max()
    print(f"{name}: max relative logit difference {rel:.2e}")
    assert rel < 1e-5, rel
    identity = 0.0 if cfg.norm == "rmsnorm_zero_centered" else 1.0
    flat = flatten_dict(params2)
    for k in flat:
        if k[-2] in ("attn_ln", "ffn_ln", "final_ln"):
            np.testing.assert_array_equal(np.asarray(flat[k]), identity)
    assert flat[("lm_head", "kernel")].shape == (cfg.hidden_size, VOCAB)
    off = build(cfg2.replace(rotated=False)).apply({"params": params2}, ids, mask)["logits"]
    assert np.abs(np.asarray(off) - ref)[real].max() > 1e-2


def test_online_hadamard_feeds_o_proj_and_down_proj():
    """The rotated model's o_proj / down_proj inputs are the original ones times H."""
    cfg = model_config("llama-tiny", SMALL)
    params = noisy_params(cfg)
    cfg2, params2, _ = rotate(cfg, params, 0)
    ids, mask = batch()
    batches = [{"input_ids": ids, "attention_mask": mask}]
    paths = ["layer_1/attn/o_proj", "layer_1/ffn/down_proj"]
    a = dense_inputs(cfg, params, batches, "rows", paths)
    b = dense_inputs(cfg2, params2, batches, "rows", paths)
    for p in paths:
        h = hadamard.hadamard_matrix(a[p].shape[-1])
        np.testing.assert_allclose(np.asarray(b[p]), np.asarray(a[p]) @ h, atol=2e-5)


def test_reparametrisation_and_params_for():
    cfg = model_config("llama-tiny", dict(SMALL, rotation_seed=4))
    params = noisy_params(cfg)
    cfg2, v2 = ROTATION_REPARAM.apply(cfg, {"params": params})
    assert ROTATION_REPARAM.applied(cfg2) and cfg2.rotation_seed == 4
    again = ROTATION_REPARAM.params_for(cfg2, params)
    for k, x in flatten_dict(v2["params"]).items():
        np.testing.assert_array_equal(np.asarray(flatten_dict(again)[k]), np.asarray(x))
    with pytest.raises(UserError, match="already applied"):
        ROTATION_REPARAM.apply(cfg2, v2)
    with pytest.raises(UserError, match="parameters only"):
        ROTATION_REPARAM.apply(cfg, {"params": params, "quant_stats": {}})


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_rotation_seed(bad):
    cfg = model_config("llama-tiny", SMALL)
    with pytest.raises(UserError, match="ptq_options.rotation_seed"):
        ROTATION.apply(cfg, {}, [], None, {"rotation_seed": bad})


@pytest.mark.parametrize(
    "name, why",
    [
        ("bert-tiny", "post-LN"),
        ("opt-tiny", "subtracts the mean"),
        ("vit-tiny", "subtracts the mean"),
    ],
)
def test_layernorm_families_are_refused(name, why):
    cfg = model_config(name)
    with pytest.raises(UserError, match=f"family '{cfg.family}'.*{why}"):
        rotate(cfg, {}, 0)
    with pytest.raises(UserError, match="config.model.rotated"):
        cfg.replace(rotated=True)


def test_refused_llama_settings():
    cfg = model_config("llama-tiny", SMALL)
    with pytest.raises(UserError, match="tie_embeddings"):
        cfg.replace(rotated=True)
    with pytest.raises(UserError, match="head"):
        cfg.replace(rotated=True, tie_embeddings=False, head="none")
    with pytest.raises(UserError, match="already applied"):
        rotate(cfg.replace(rotated=True, tie_embeddings=False), {}, 0)
    sliced = cfg.replace(attention=cfg.attention.__class__(gate="linear"))
    with pytest.raises(UserError, match="gate='linear'"):
        rotate(sliced, {}, 0)


def test_transformer_block_has_no_online_hadamard():
    """The BERT / OPT block never gets the online transform, even from a stray flag."""
    c = dataclasses.replace(model_config("bert-tiny").block(), online_hadamard=True)
    assert not block_attention(c, quant.QuantPlan()).online_hadamard
    d = model_config("llama-tiny", dict(SMALL, rotated=True, tie_embeddings=False)).block()
    assert block_attention(d, quant.QuantPlan()).online_hadamard


def calib_batches(n=2, vocab=VOCAB):
    ids = np.random.default_rng(1).integers(3, vocab, (n, 2, 7))
    ones = np.ones((2, 7), np.int32)
    return [{"input_ids": ids[i], "attention_mask": ones, "labels": ids[i]} for i in range(n)]


@pytest.mark.slow
def test_rotated_integer_model_matches_fake_quant():
    """W8A8 on the rotated model: the integer model (int8 matmuls, the context / act points
    after the Hadamard) equals its fake-quant twin."""
    cfg = model_config("llama-tiny", SMALL)
    cfg2, params2, _ = rotate(cfg, noisy_params(cfg), 1)
    plan = quant.QuantPlan(quant.setup_rules("W8A8"), mode="quantize")
    frozen = calibrate_setup(cfg2, plan, params2, calib_batches())
    iplan, int_vars, report = int_models.to_integer(cfg2, plan, frozen)
    assert any("o_proj" in m for m in report.integer_matmuls)
    assert any("down_proj" in m for m in report.integer_matmuls)
    ids, mask = batch()
    fq = build(cfg2, plan).apply(frozen, ids, mask)["logits"]
    twin = build(cfg2, int_models.fake_twin(iplan)).apply(int_vars, ids, mask)["logits"]
    np.testing.assert_allclose(np.asarray(twin), np.asarray(fq), rtol=1e-5, atol=1e-5)


# -- export with the PyTorch remote code ----------------------------------------------------------

torch_tests = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("torch", "transformers")),
    reason="torch and transformers are needed",
)


@torch_tests
def test_torch_construction_is_identical():
    import torch

    from qtx.hf.remote import hadamard_qtx

    assert hadamard_qtx.paley_orders() == hadamard.paley_orders()
    for n in (1, 2, 12, 48, 64, 192, 384, 768, 1000, 5120, 11008, 14336):
        assert hadamard_qtx.hadamard_split(n) == hadamard.hadamard_split(n), n
        ours, theirs = hadamard.hadamard_factors(n), hadamard_qtx.hadamard_factors(n)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b.numpy())
    for n in (48, 192, 384, 768):
        x = np.random.default_rng(n).standard_normal((2, 5, n)).astype(np.float32)
        got = hadamard_qtx.online_hadamard(torch.tensor(x)).numpy()
        want = np.asarray(hadamard.online_hadamard(jnp.asarray(x)))
        np.testing.assert_allclose(got, want, atol=2e-6)


TINY = dict(  # the exported decoder: o_proj width 32, down_proj width 48 = Paley 12 · 4
    SMALL, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48
)


@torch_tests
@pytest.mark.parametrize(
    "over", [{}, pytest.param(dict(qk_norm=True, head_dim=12), marks=pytest.mark.slow)]
)
def test_rotated_export_matches_qtx(tmp_path, over):
    """A rotated llama (tied head before rotation) exports with remote code that applies the
    online transforms: logits and hidden states to 1e-4 on a left-padded batch; qtx.hf.load
    gives back the rotated config; without the transforms the HF model is far off."""
    import torch
    import transformers

    import qtx.hf
    from qtx.hf import io

    cfg = model_config("llama-tiny", dict(TINY, **over))
    cfg2, params2, _ = rotate(cfg, noisy_params(cfg), 3)
    path = tmp_path / "rotated"
    qtx.hf.export(path, cfg2, {"params": params2})
    config = io.read_config(path)
    assert config["qtx_online_hadamard"] is True and config["qtx_rotation_seed"] == 3
    assert config["model_type"].startswith("qtx_") and (path / "hadamard_qtx.py").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ids, mask = (np.asarray(a) for a in batch())
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)

    def hf_logits():
        with torch.no_grad():
            out = hf(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(pos, dtype=torch.long),
            )
        return out.logits.numpy()

    ours = np.asarray(build(cfg2).apply({"params": params2}, ids, mask)["logits"])
    real = mask.astype(bool)
    diff = float(np.abs(hf_logits() - ours)[real].max())
    print(f"rotated export {over}: max abs logit diff {diff:.2e}")
    assert diff < 1e-4, diff
    loaded, _ = qtx.hf.load(path)
    assert loaded.cfg == cfg2
    for m in hf.modules():
        if hasattr(m, "qtx_online_hadamard"):
            m.qtx_online_hadamard = False
    assert float(np.abs(hf_logits() - ours)[real].max()) > 1e-2


@pytest.mark.slow
@torch_tests
def test_rotated_sidecar_states_rotation_and_quantizes(tmp_path):
    """The quantized export of a rotated model states its rotations in the sidecar and the
    PyTorch fake quantization (Hadamard before ``ffn/act`` / ``attn/context``) reproduces
    qtx's quantized logits far closer than quantization moves them."""
    import torch
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    import qtx.hf
    from qtx.hf import quant_sidecar, remote

    cfg = model_config("llama-tiny", TINY)
    cfg2, params2, _ = rotate(cfg, noisy_params(cfg), 2)
    plan = quant.QuantPlan(quant.setup_rules("W8A8"), mode="quantize")
    frozen = calibrate_setup(cfg2, plan, params2, calib_batches())
    path = tmp_path / "q"
    qtx.hf.export(path, cfg2, {"params": params2})
    quant_sidecar.write_sidecar(str(path), cfg2, plan, frozen)
    remote.copy_all(str(path))
    sidecar = json.loads((path / quant_sidecar.SIDECAR_JSON).read_text())
    assert sidecar["rotation"] == {
        "online_hadamard": ["o_proj", "down_proj"],
        "residual": "random_hadamard",
        "seed": 2,
        "blocks": {"residual": 32, "o_proj": 32, "down_proj": 48},
    }
    assert "layer_1/ffn/act" in sidecar["points"] and "layer_1/attn/context" in sidecar["points"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    apply_quantization = get_class_from_dynamic_module("quantization_qtx.apply_quantization", path)
    apply_quantization(hf, str(path))
    ids, mask = (np.asarray(a) for a in batch())
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(pos, dtype=torch.long),
        ).logits.numpy()
    ours = np.asarray(build(cfg2, plan).apply(frozen, ids, mask)["logits"])
    fp = np.asarray(build(cfg2).apply({"params": params2}, ids, mask)["logits"])
    real = mask.astype(bool)
    effect, diff = (float(np.abs(ours - x)[real].max()) for x in (fp, theirs))
    print(f"rotated W8A8: torch vs qtx {diff:.2e}, quantization moves {effect:.2e}")
    assert effect > 1e-3 and diff < 0.1 * effect
