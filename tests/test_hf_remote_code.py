"""Attention variants exported with qtx's PyTorch modeling code (``trust_remote_code=True``)
against qtx's own outputs, for every family and every softmax / gate variant."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_export import CASES, SMALL, max_diff, random_variables  # noqa: E402
from test_hf_export import outputs as hf_and_qtx_outputs  # noqa: E402

import qtx.hf  # noqa: E402
from qtx.hf import io, remote  # noqa: E402
from qtx.models import build, model_config  # noqa: E402

torch.set_num_threads(2)
ATOL = 1e-4
FAMILIES = {  # family -> a case of test_hf_export (size preset, overrides, architecture)
    "bert": "bert_mlm",
    "roberta": "roberta_cls",
    "opt": "opt_clm_left_padded",
    "vit": "vit_cls",
    "deit": "deit_distilled",
    "swin": "swin_cls",
}
VARIANTS = {
    "clipped_gamma_zeta": {"softmax": "clipped", "gamma": -0.03, "zeta": 1.01},
    "clipped_alpha": {"softmax": "clipped", "alpha": 2.0},
    "off_by_one": {"softmax": "off_by_one"},
    "gate_linear": {"gate": "linear"},
    "gate_mlp_head_pooled": {"gate": "mlp", "gate_condition": "head"},
    "gate_all_heads_linear_clipped": {
        "gate": "all_heads_linear",
        "softmax": "clipped",
        "gamma": -0.03,
    },
    "gate_mlp_wide_finetune_unconditioned": {
        "gate": "mlp_wide",
        "gate_condition": "none",
        "gate_finetune": True,
        "pi_init": 0.25,
    },
}


def outputs(cfg, model, variables, hf):
    """Hidden states and logits of both models (OPT inputs left-padded)."""
    return hf_and_qtx_outputs(cfg, model, variables, hf, left=cfg.family == "opt")


def tiny_variant(family, attention):
    """``(cfg, model, variables)`` of a tiny random model of ``family`` with ``attention``."""
    name, over, arch = CASES[FAMILIES[family]]
    if family not in ("vit", "deit", "swin"):
        over = dict(over, vocab_size=99, max_positions=over.get("max_positions", 40))
    cfg = model_config(name, dict(SMALL, **over, attention=attention))
    return cfg, arch, build(cfg), random_variables(cfg)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_remote_code_matches_qtx_for_every_variant(tmp_path, family):
    """Each family x each variant: logits and every hidden state to 1e-4, and ``qtx.hf.load``
    gives back the same config and bit-equal parameters."""
    for variant, attention in VARIANTS.items():
        cfg, arch, model, variables = tiny_variant(family, attention)
        path = tmp_path / f"{family}_{variant}"  # a module-cache name of its own
        qtx.hf.export(path, cfg, variables)
        config = io.read_config(path)
        assert config["architectures"] == ["Qtx" + arch]
        assert config["model_type"] == "qtx_" + family
        auto = getattr(transformers, remote_auto_class(config))
        hf = auto.from_pretrained(path, trust_remote_code=True).eval()
        assert type(hf).__name__ == "Qtx" + arch
        diff = max_diff(*outputs(cfg, model, variables, hf))
        print(f"{family} {variant}: max abs diff {diff:.2e}")
        assert diff < ATOL, (family, variant, diff)

        loaded, v2 = qtx.hf.load(path)
        assert loaded.cfg == cfg, variant
        a, b = flatten_dict(variables["params"]), flatten_dict(v2["params"])
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))


def remote_auto_class(config):
    """The ``AutoModel*`` class ``auto_map`` lists for the exported architecture."""
    arch = "modeling_qtx." + config["architectures"][0]
    autos = [k for k, v in config["auto_map"].items() if v == arch]
    assert autos, config["auto_map"]
    return autos[-1]


def test_vanilla_export_needs_no_remote_code(tmp_path):
    cfg, arch, model, variables = tiny_variant("bert", {})
    qtx.hf.export(tmp_path, cfg, variables)
    config = io.read_config(tmp_path)
    assert "auto_map" not in config and "qtx_attention" not in config
    assert config["model_type"] == "bert"
    for name in (*remote.FILES, remote.QUANT_FILE):
        assert not (tmp_path / name).exists()
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == arch
    assert max_diff(*outputs(cfg, model, variables, hf)) < ATOL


def test_variant_needs_trust_remote_code(tmp_path):
    cfg, _, _, variables = tiny_variant("bert", VARIANTS["gate_linear"])
    qtx.hf.export(tmp_path, cfg, variables)
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=False)


def test_gated_opt_generates_and_saves(tmp_path):
    """generate() with a head-pooled gate (no cache) and a token gate (cache), greedy tokens
    equal to qtx's argmax decoding; save_pretrained of the loaded model round-trips."""
    for variant in ("gate_mlp_head_pooled", "gate_linear"):
        cfg, _, model, variables = tiny_variant("opt", dict(VARIANTS[variant]))
        path = tmp_path / variant
        qtx.hf.export(path, cfg, variables)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        hf.eval()
        prompt = np.array([[2, 11, 12, 13, 14], [1, 1, 2, 15, 16]])  # row 2 left-padded
        mask = (prompt != 1).astype(np.int64)
        with torch.no_grad():
            got = hf.generate(
                input_ids=torch.tensor(prompt),
                attention_mask=torch.tensor(mask),
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=1,
            ).numpy()
        ids = prompt
        for _ in range(5):  # qtx's greedy decoding, recomputing the whole prefix
            logits = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask))["logits"]
            ids = np.concatenate([ids, np.asarray(logits[:, -1:].argmax(-1))], axis=1)
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
        np.testing.assert_array_equal(got, ids, err_msg=variant)

        resaved = tmp_path / f"{variant}_resaved"
        hf.save_pretrained(resaved)
        config = json.loads((resaved / "config.json").read_text())
        assert config["qtx_attention"]["gate"] == cfg.attention.gate
        assert (resaved / "modeling_qtx.py").exists()
        again = transformers.AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True)
        sd, sd2 = hf.state_dict(), again.state_dict()
        assert set(sd) == set(sd2)
        for k in sd:
            torch.testing.assert_close(sd[k], sd2[k], rtol=0, atol=0, msg=k)
        assert qtx.hf.load(resaved)[0].cfg == cfg
