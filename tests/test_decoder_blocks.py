"""The decoder building blocks and attention variants against NumPy definitions.

RMSNorm (plain and zero-centred), rotary embeddings (partial, Llama-3 scaling), grouped-query
attention, the normalisers softpick / learned sink / normalized clipped softmax and the output
gate (headwise, elementwise) of one attention module, each against its formula; each check
fails when its variant is turned off (the gate forced to 1, the sink to -inf, softpick
replaced by softmax). HF parity of whole models is in tests/test_hf_decoders.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx.errors import UserError
from qtx.models import build, dummy_inputs, model_config
from qtx.nn import AttentionConfig, MultiHeadAttention
from qtx.nn.attention_variants import sink_softmax, softpick
from qtx.nn.norms import RMSNorm
from qtx.nn.rope import apply_rope, inv_frequencies, rope_tables

RNG = np.random.RandomState(0)


def np_softmax(x, mask):
    x = np.where(mask, x, -np.inf)
    m = x.max(-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0.0))
    return e / np.maximum(e.sum(-1, keepdims=True), 1e-30)


@pytest.mark.parametrize("kind", ["rmsnorm", "rmsnorm_zero_centered"])
def test_rms_norm_matches_its_definition(kind):
    x = RNG.randn(2, 3, 8).astype(np.float32) * 3
    w = RNG.randn(8).astype(np.float32)
    layer = RMSNorm(eps=1e-6, kind=kind)
    y = layer.apply({"params": {"scale": jnp.asarray(w)}}, jnp.asarray(x))
    gain = 1.0 + w if kind == "rmsnorm_zero_centered" else w
    want = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * gain
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    init = layer.init(jax.random.key(0), jnp.asarray(x))["params"]["scale"]
    assert float(init[0]) == (0.0 if kind == "rmsnorm_zero_centered" else 1.0)


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    c = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters=rope)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")
    got = inv_frequencies(128, 500000.0, 1.0, (32.0, 1.0, 4.0, 8192))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    plain = inv_frequencies(128, 500000.0)
    assert not np.allclose(got, plain)  # the scaling changes the low frequencies
    np.testing.assert_allclose(plain, 500000.0 ** (-np.arange(0, 128, 2) / 128), rtol=1e-6)


def test_partial_rope_rotates_the_first_dims_only():
    x = RNG.randn(1, 5, 2, 16).astype(np.float32)
    inv = inv_frequencies(16, 100.0, 0.25)  # R = 4 rotated dims
    assert inv.shape == (2,)
    pos = np.array([[0, 3, 1, 7, 2]])
    cos, sin = rope_tables(jnp.asarray(pos), inv)
    y = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    ang = pos[0][:, None] * inv[None, :]  # (T, 2)
    for j in range(2):  # pairs (j, j + R/2) rotate by the angle
        a, b = x[0, :, :, j], x[0, :, :, j + 2]
        c, s = np.cos(ang[:, j])[:, None], np.sin(ang[:, j])[:, None]
        np.testing.assert_allclose(y[0, :, :, j], a * c - b * s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(y[0, :, :, j + 2], b * c + a * s, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[..., 4:], x[..., 4:])


def test_softpick_matches_its_definition_with_masks():
    x = RNG.randn(2, 3, 4, 6).astype(np.float32) * 2
    mask = RNG.rand(2, 1, 4, 6) > 0.3
    mask[0, 0, 1] = False  # a row without keys
    y = np.asarray(softpick(jnp.asarray(x), jnp.asarray(mask), 1e-6))
    e = np.where(mask, np.exp(x.astype(np.float64)) - 1, 0.0)
    want = np.maximum(e, 0) / (np.abs(e).sum(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-7)
    assert np.all(y[0, :, 1] == 0) and np.all(y[~np.broadcast_to(mask, y.shape)] == 0)
    assert np.all(y.sum(-1) <= 1 + 1e-6)
    assert not np.allclose(y[mask[:, :1].repeat(3, 1).any(-1)], 0)
    # large logits stay finite (the row-max shift) and equal the unshifted value's limit
    big = np.asarray(softpick(jnp.asarray(x + 80.0), jnp.asarray(mask)))
    assert np.all(np.isfinite(big))
    g = jax.grad(lambda z: softpick(z, jnp.asarray(mask)).sum())(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g)))


def test_sink_softmax_matches_its_definition():
    x = RNG.randn(2, 3, 4, 5).astype(np.float32)
    s = np.array([0.5, -1.0, 2.0], np.float32)
    y = np.asarray(sink_softmax(jnp.asarray(x), jnp.asarray(s)))
    e = np.exp(x.astype(np.float64))
    want = e / (np.exp(s)[None, :, None, None] + e.sum(-1, keepdims=True))
    np.testing.assert_allclose(y, want, rtol=1e-5)
    # the sink at -inf is softmax; at 0 it is softmax_1 (off by one)
    off = np.asarray(sink_softmax(jnp.asarray(x), jnp.full((3,), -jnp.inf)))
    np.testing.assert_allclose(off, np_softmax(x, True), rtol=1e-5)
    assert np.abs(y - off).max() > 1e-2


def _attention(att: dict, kv=2, h=4, d=16, qk_norm=""):
    """One MultiHeadAttention with GQA and RoPE, its params (flat) and inputs."""
    cfg = AttentionConfig(**att)
    mod = MultiHeadAttention(h, cfg, num_kv_heads=kv, use_bias=False, qk_norm=qk_norm)
    b, t = 2, 5
    x = jnp.asarray(RNG.randn(b, t, d).astype(np.float32))
    token_mask = np.ones((b, t), bool)
    token_mask[0, :2] = False  # left padding
    mask = np.tril(np.ones((t, t), bool))[None, None] & token_mask[:, None, None, :]
    pos = np.maximum(np.cumsum(token_mask, 1) - 1, 0)
    rope = rope_tables(jnp.asarray(pos), inv_frequencies(d // h))
    args = (x, jnp.asarray(mask), jnp.asarray(token_mask), True, None, rope)
    params = mod.init(jax.random.key(1), *args)["params"]
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
    return mod, params, flat, args, mask


def np_attention(flat, args, mask, probs_fn, gate_fn=None, h=4, kv=2):
    """NumPy reference: projections, RoPE, GQA (query head j reads kv head j // (h / kv)),
    normaliser, gate, o_proj."""
    x, _, _, _, _, (cos, sin) = args
    x, cos, sin = np.asarray(x, np.float64), np.asarray(cos), np.asarray(sin)
    b, t, d = x.shape
    dh = d // h
    q = (x @ flat["q_proj/kernel"]).reshape(b, t, h, dh)
    k = (x @ flat["k_proj/kernel"]).reshape(b, t, kv, dh)
    v = (x @ flat["v_proj/kernel"]).reshape(b, t, kv, dh)

    def rot(y):
        half = dh // 2
        r = np.concatenate([-y[..., half:], y[..., :half]], -1)
        return y * cos[:, :, None] + r * sin[:, :, None]

    q, k = rot(q), rot(k)
    k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh)
    probs = probs_fn(scores, np.broadcast_to(mask, scores.shape))
    ctx = np.einsum("bhts,bshd->bthd", probs, v)
    if gate_fn is not None:
        ctx = ctx * gate_fn(x)
    return ctx.reshape(b, t, d) @ flat["o_proj/kernel"]


def _check(mod, params, args, want, off, real):
    got = np.asarray(mod.apply({"params": params}, *args))
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-5)
    assert np.abs(got[real] - off[real]).max() > 1e-3  # the variant changes the output


def test_softpick_attention_matches_numpy_and_differs_from_softmax():
    mod, params, flat, args, mask = _attention({"softmax": "softpick"})

    def sp(s, m):
        e = np.where(m, np.exp(s) - 1, 0.0)
        return np.maximum(e, 0) / (np.abs(e).sum(-1, keepdims=True) + 1e-6)

    real = np.asarray(args[2])
    want = np_attention(flat, args, mask, sp)
    off = np_attention(flat, args, mask, np_softmax)
    _check(mod, params, args, want, off, real)


def test_learned_sink_attention_matches_numpy_and_differs_from_a_sink_at_minus_inf():
    mod, params, flat, args, mask = _attention({"softmax": "sink", "sink_init": 0.3})
    assert np.allclose(flat["sink"], 0.3)
    sink = np.array([0.3, -0.5, 1.0, 2.0])
    params = {**params, "sink": jnp.asarray(sink, jnp.float32)}

    def sk(s, m):
        e = np.where(m, np.exp(s), 0.0)
        return e / (np.exp(sink)[None, :, None, None] + e.sum(-1, keepdims=True))

    real = np.asarray(args[2])
    _check(mod, params, args, np_attention(flat, args, mask, sk), np_attention(
        flat, args, mask, np_softmax), real)  # fmt: skip


def test_normalized_clipped_softmax_uses_each_querys_visible_keys():
    mod, params, flat, args, mask = _attention({"softmax": "normalized_clipped", "alpha": 2.0})

    def ncs(s, m):
        n = np.maximum(m.sum(-1, keepdims=True), 1)
        return np.clip((1 + 2.0 / n) * np_softmax(s, m) - 2.0 / n, 0, 1)

    def cs(s, m):  # the clipped softmax with the full key length
        return np.clip((1 + 2.0 / 5) * np_softmax(s, m) - 2.0 / 5, 0, 1)

    real = np.asarray(args[2])
    _check(mod, params, args, np_attention(flat, args, mask, ncs), np_attention(
        flat, args, mask, cs), real)  # fmt: skip


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_output_gate_matches_numpy_and_differs_from_a_gate_of_one(gate):
    mod, params, flat, args, mask = _attention({"gate": gate})
    w = flat["gate/dense/kernel"]
    assert w.shape == (16, 4 if gate == "headwise" else 16)
    assert "gate/dense/bias" not in flat  # the paper's gate has no bias
    assert abs(w.std() - 0.02) < 0.01

    def pi(x):
        z = 1 / (1 + np.exp(-(x @ w * 40)))  # larger weights: the gate departs from 0.5
        return z[..., None] if gate == "headwise" else z.reshape(*x.shape[:2], 4, 4)

    params = unflatten_dict(
        {
            k: (v * 40 if k[-2:] == ("dense", "kernel") else v)
            for k, v in flatten_dict(params).items()
        }  # fmt: skip
    )
    real = np.asarray(args[2])
    want = np_attention(flat, args, mask, np_softmax, pi)
    _check(mod, params, args, want, np_attention(flat, args, mask, np_softmax), real)


def test_output_gate_pi_init_sets_the_starting_value():
    _, _, flat, _, _ = _attention({"gate": "headwise", "pi_init": 0.9})
    np.testing.assert_allclose(flat["gate/dense/bias"], math.log(0.9 / 0.1), rtol=1e-6)


def test_gqa_equals_full_attention_with_repeated_key_value_heads():
    mod, params, flat, args, mask = _attention({}, kv=2)
    full = MultiHeadAttention(4, AttentionConfig(), use_bias=False)
    rep = dict(params)
    for n in ("k_proj", "v_proj"):  # kv head g serves query heads 2g, 2g + 1
        kern = flat[f"{n}/kernel"].reshape(16, 2, 4)
        rep[n] = {"kernel": jnp.asarray(np.repeat(kern, 2, axis=1).reshape(16, 16))}
    a = np.asarray(mod.apply({"params": params}, *args))
    b = np.asarray(full.apply({"params": rep}, *args))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "att",
    [
        {},
        {"softmax": "softpick"},
        {"softmax": "sink"},
        {"softmax": "normalized_clipped", "alpha": 4.0},
        {"gate": "elementwise"},
    ],
)
def test_left_padding_gives_each_sequence_its_unpadded_logits(att):
    cfg = model_config("llama-tiny", attention=att, qk_norm=True, partial_rotary_factor=0.5)
    model = build(cfg)
    v = model.init(jax.random.key(0), **dummy_inputs(cfg))
    ids = jnp.asarray(RNG.randint(4, 8192, (1, 7)))
    padded = jnp.concatenate([jnp.zeros((1, 3), ids.dtype), ids], 1)
    mask = jnp.asarray([[0, 0, 0] + [1] * 7])
    a = model.apply(v, ids)["logits"]
    b = model.apply(v, padded, mask)["logits"][:, 3:]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("num_kv_heads", 3, "None or a positive divisor of num_heads=4"),
        ("norm", "layernorm", "rmsnorm, rmsnorm_zero_centered for family 'llama'"),
        ("partial_rotary_factor", 1.5, "a number in (0, 1]"),
        ("rope_scaling", (8.0, 4.0, 1.0, 64), "None or Llama-3's"),
        ("activation", "gelu", "'silu' for family 'llama' (SwiGLU)"),
        ("partial_rotary_factor", 0.3, "an even number >= 2 of rotated dims of head_dim=32"),
        ("word_embed_proj_dim", 64, "None for family 'llama'"),
        ("position_offset", 2, "0 for family 'llama' (rotary positions)"),
    ],
)
def test_bad_decoder_fields_are_one_sentence(field, value, allowed):
    with pytest.raises(UserError, match=rf"config\.model\.{field}=.* is invalid; allowed: "):
        model_config("llama-tiny", **{field: value})
    try:
        model_config("llama-tiny", **{field: value})
    except UserError as e:
        assert allowed in str(e) and "\n" not in str(e)


def test_decoder_fields_are_refused_on_other_families():
    with pytest.raises(UserError, match=r"config\.model\.num_kv_heads=2 is invalid; allowed: "
                       r"None for family 'opt' \(a decoder field\)"):  # fmt: skip
        model_config("opt-tiny", num_kv_heads=2)
    with pytest.raises(UserError, match=r"gate_condition='head' is invalid; allowed: 'token'"):
        AttentionConfig(gate="elementwise", gate_condition="head")
    with pytest.raises(UserError, match=r"alpha=None is invalid; allowed: a positive number"):
        AttentionConfig(softmax="normalized_clipped")


NEW_VARIANTS = (
    {"softmax": "softpick"},
    {"softmax": "sink", "sink_init": 1.0},
    {"softmax": "normalized_clipped", "alpha": 4.0},
    {"gate": "headwise"},
    {"gate": "elementwise", "pi_init": 0.2},
)


SLOW_FAMILIES = [
    pytest.param(n, marks=pytest.mark.slow) for n in ("bert-tiny", "vit-tiny", "swin-tiny")
]


@pytest.mark.parametrize("name", ["opt-tiny", *SLOW_FAMILIES])
def test_the_new_variants_run_in_every_family(name):
    """Each new normaliser and gate builds in every family, gives finite outputs and changes
    them (the variant's own parameters start where they do in training)."""
    base = model_config(name, num_layers=1) if name != "swin-tiny" else model_config(name)
    x = dummy_inputs(base)
    if "input_ids" in x:
        x["input_ids"] = jnp.asarray(RNG.randint(4, 500, x["input_ids"].shape))
    else:
        x["images"] = jnp.asarray(RNG.randn(*x["images"].shape).astype(np.float32))
    vanilla = build(base)
    v0 = vanilla.init(jax.random.key(0), **x)
    y0 = np.asarray(jax.tree.leaves(vanilla.apply(v0, **x))[0])
    for att in NEW_VARIANTS:
        cfg = base.replace(attention=AttentionConfig(**att))
        model = build(cfg)
        v = model.init(jax.random.key(0), **x)
        flat, flat0 = flatten_dict(v["params"]), flatten_dict(v0["params"])
        v = {"params": unflatten_dict({k: flat0.get(k, a) for k, a in flat.items()})}
        y = np.asarray(jax.tree.leaves(model.apply(v, **x))[0])
        assert np.all(np.isfinite(y)), att
        assert np.abs(y - y0).max() > 1e-4, att


def test_decoder_layers_drop_whole_branches_in_training():
    """drop_path applies to the decoder's branches as to the transformer block's: with rate
    0.5 a training call differs from the deterministic one, and rate 0 changes nothing."""
    x = dummy_inputs(model_config("llama-tiny"))
    outs = {}
    for rate in (0.0, 0.5):
        cfg = model_config("llama-tiny", drop_path=rate)
        model = build(cfg)
        v = model.init(jax.random.key(0), **x)
        rngs = {"dropout": jax.random.key(3)}
        train = model.apply(v, **x, deterministic=False, rngs=rngs)["logits"]
        outs[rate] = float(jnp.abs(train - model.apply(v, **x)["logits"]).max())
    assert outs[0.0] == 0.0 and outs[0.5] > 1e-3
