"""Original-format (timm / DeiT / Swin repository) checkpoints: the fused qkv is split so the
split model reproduces the fused one, Swin matches HF PyTorch, and mismatched keys fail loudly."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx.hf import original
from qtx.models import build, dummy_inputs, model_config
from qtx.models.swin import relative_position_index
from qtx.train.pretrained import load_pretrained


def _images(cfg, seed=0):
    shape = (2, cfg.image_size, cfg.image_size, cfg.num_channels)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit_distilled"])
def test_fused_qkv_split_reproduces_the_fused_model(tmp_path, distilled):
    over = dict(distillation_token=distilled, max_positions=17 + distilled)
    fused_cfg = model_config("vit-tiny", dict(over, fused_qkv=True))
    fused = build(fused_cfg)
    variables = fused.init(jax.random.key(0), **dummy_inputs(fused_cfg))
    sd = original.original_state_dict(fused_cfg, variables["params"])
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 64, 64)
    assert ("dist_token" in sd) == distilled
    file = tmp_path / "deit.npz"
    np.savez(file, **sd)

    split_cfg = model_config("vit-tiny", over)
    params = load_pretrained(str(file), split_cfg)
    q = params["layer_0"]["attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(
        q, np.asarray(variables["params"]["layer_0"]["attn"]["qkv_proj"]["kernel"])[:, :64]
    )
    images = _images(split_cfg)
    want = fused.apply(variables, images)["logits"]
    got = build(split_cfg).apply({"params": params}, images)["logits"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    # back to the fused layout, bit for bit
    again = original.original_state_dict(split_cfg, params)
    assert set(again) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(again[k], sd[k], err_msg=k)


def test_key_mismatches_fail_loudly(tmp_path):
    cfg = model_config("vit-tiny")
    variables = build(cfg).init(jax.random.key(0), **dummy_inputs(cfg))
    sd = original.original_state_dict(cfg, variables["params"])
    extra = dict(sd, **{"blocks.0.attn.q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(
        ValueError, match=r"keys with no parameter \['blocks.0.attn.q_norm.weight'\]"
    ):
        original.params_from_original(extra, cfg)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.weight"}
    with pytest.raises(ValueError, match=r"parameters with no key \['blocks.1.attn.qkv.weight'\]"):
        original.params_from_original(missing, cfg)
    odd = dict(sd, **{"blocks.1.attn.qkv.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(ValueError, match="not a fused"):
        original.params_from_original(odd, cfg)
    # a checkpoint of another width: the shape check of init_from names the tensors
    from qtx.train.pretrained import merge_pretrained

    small = model_config("vit-tiny", dict(hidden_size=32, intermediate_size=64))
    with pytest.raises(ValueError, match="shape mismatches"):
        merge_pretrained(
            variables["params"],
            original.params_from_original(
                original.original_state_dict(
                    small, build(small).init(jax.random.key(1), **dummy_inputs(small))["params"]
                ),
                cfg,
            ),
        )


def test_swin_official_checkpoint_matches_hf(tmp_path):
    """An HF Swin rewritten in the official repository's layout (fused qkv, downsample at the
    end of each stage, index buffers), and in timm >= 0.9's (downsample at the start of the
    next stage, head.fc), both load and give HF's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from test_hf_parity import swin_model

    hf = swin_model(transformers.SwinForImageClassification, 32, seed=3)
    hsd = {k: v.numpy() for k, v in hf.state_dict().items()}

    def official(timm_09: bool):
        sd = {}
        for k, v in hsd.items():
            k = k.removeprefix("swin.")
            k = k.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
            k = k.replace("embeddings.norm", "patch_embed.norm").replace("encoder.layers", "layers")
            k = k.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
            k = k.replace("attention.o_proj", "attn.proj")
            k = k.replace("attention.relative_position_bias.", "attn.")
            k = re.sub(r"^layernorm\.", "norm.", k)
            if timm_09:
                k = re.sub(
                    r"^layers\.(\d+)\.downsample",
                    lambda m: f"layers.{int(m.group(1)) + 1}.downsample",
                    k,
                )
                k = re.sub(r"^classifier\.", "head.fc.", k)
            else:
                k = re.sub(r"^classifier\.", "head.", k)
            sd[k] = v
        for key in [k for k in sd if ".attention.q_proj." in k]:
            stem, leaf = key.split(".attention.q_proj.")
            parts = [sd.pop(f"{stem}.attention.{n}_proj.{leaf}") for n in "qkv"]
            sd[f"{stem}.attn.qkv.{leaf}"] = np.concatenate(parts, axis=0)
        sd["layers.0.blocks.1.attn.relative_position_index"] = relative_position_index(4)
        sd["layers.0.blocks.1.attn_mask"] = np.zeros((16, 16, 16), np.float32)
        return sd

    cfg = model_config(
        "swin-tiny",
        dict(
            hidden_size=16,
            intermediate_size=64,
            depths=(2, 2, 1),
            stage_heads=(2, 2, 4),
            image_size=32,
            num_channels=3,
            num_labels=5,
        ),
    )
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = hf(pixel_values=torch.tensor(x)).logits.numpy()
    for timm_09 in (False, True):
        params = original.params_from_original(official(timm_09), cfg)
        got = build(cfg).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))["logits"]
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    bad = official(False)
    bad["layers.0.blocks.1.attn.relative_position_index"] = relative_position_index(3)
    with pytest.raises(ValueError, match="relative position index"):
        original.params_from_original(bad, cfg)
