"""ViT and DeiT under ``w8a8_all`` below 8 activation bits: the class (and distillation)
token survives the residual stream's per-tensor ranges, which its patch tokens set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from qtx import quant as q
from qtx.errors import UserError
from qtx.evaluate.ptq import calibrate_setup
from qtx.models import build, dummy_inputs, model_config

STREAM = ("embed/sum", "layer_0/residual_attn", "layer_0/residual_ffn", "layer_1/residual_ffn")


def images(cfg, seed, n=8):
    shape = (n, cfg.image_size, cfg.image_size, cfg.num_channels)
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return {"image": jnp.asarray(x), "label": jnp.zeros((n,), jnp.int32)}


def forward(model, variables, batch):
    """Logits (B, L) and every quantization point's output ``{name: array}``."""
    is_point = lambda m, _: isinstance(m, q.QuantPoint)  # noqa: E731
    out, state = model.apply(
        variables, images=batch["image"], capture_intermediates=is_point, mutable=["intermediates"]
    )
    flat = flatten_dict(state["intermediates"])
    return np.asarray(out["logits"]), {"/".join(k[:-1]): np.asarray(v[0]) for k, v in flat.items()}


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit"])
def test_w4a4_keeps_the_class_tokens_and_the_logits_depend_on_the_image(distilled):
    """A random vit-tiny: the patch tokens are ~50x the class token in the residual stream, so a
    4-bit per-tensor residual range rounded the class token to zeros (the logits were the
    classifier bias for every image). The class token rows stay non-zero."""
    kw = dict(distillation_token=True, max_positions=18) if distilled else {}
    cfg = model_config("vit-tiny", **kw)
    params = build(cfg).init(jax.random.key(0), **dummy_inputs(cfg))["params"]
    evals = images(cfg, 3)
    ref, fp = forward(build(cfg), {"params": params}, evals)
    prefix = 2 if distilled else 1
    assert np.abs(fp["embed/sum"][:, :prefix]).max() < 0.05 * np.abs(fp["embed/sum"]).max()

    plan = q.QuantPlan(q.setup_rules("W4A4"), mode="quantize")
    variables = calibrate_setup(cfg, plan, params, [images(cfg, 1), images(cfg, 2)])
    logits, out = forward(build(cfg, plan), variables, evals)
    heads = ("classifier/in", "dist_classifier/in") if distilled else ("classifier/in",)
    for name in heads:
        assert np.all(np.abs(out[name]).max(-1) > 0), name  # every image's feature is non-zero
    for name in STREAM:
        rows = np.abs(out[name][:, :prefix]).max(-1)  # (B, prefix) per-token max
        assert np.all(rows > 0), name
    assert logits.std(0).mean() > 0.2 * ref.std(0).mean()  # the logits depend on the image


def test_residual_stream_bits():
    """The residual stream is quantized at max(A, 8) bits (0: full precision); every other
    activation at A bits. At W8A8 the stream has the same spec as every other activation."""
    names = ("embed/sum", "layer_2/residual_attn", "stage_1/layer_0/residual_ffn")

    def spec(setup, name, **options):
        return q.QuantPlan(q.setup_rules(setup, **options)).resolve(name, "act")[0]

    for name in names:
        assert spec("W8A8", name) == spec("W8A8", "layer_2/attn/out")
        assert spec("W4A4", name).bits == 8 and spec("W8A16", name).bits == 16
        assert spec("W4A4", name, residual_bits=4) == spec("W4A4", "layer_2/attn/out")
        assert spec("W4A4", name, residual_bits=0) is None
    assert spec("W4A4", "layer_2/attn/out").bits == 4
    assert spec("W4A4", "classifier/in").bits == 4
    for bad in (1, 17, "8", True):
        with pytest.raises(UserError, match="residual_bits"):
            q.setup_rules("W4A4", residual_bits=bad)
