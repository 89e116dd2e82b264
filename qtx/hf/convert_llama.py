"""LLaMA-style decoders <-> Hugging Face: Llama 2/3, Mistral, Qwen2, Qwen3, Qwen3.5 (text).

All five ``model_type`` values load as the qtx family ``llama``; an export picks the HF class
that represents the config (:func:`hf_model_type`): Qwen3.5 for zero-centred norms, Qwen3 for
q/k norms, Qwen2 for q/k/v biases without an o_proj bias, Llama otherwise.

Mapping (canonical HF key, prefix ``model.`` removed -> flax path)::

    embed_tokens                               embed/word                   (V, D)
    layers.i.input_layernorm                   layer_i/attn_ln              RMSNorm weight
    layers.i.self_attn.{q,k,v,o}_proj          layer_i/attn/{q,k,v,o}_proj
    layers.i.self_attn.{q,k}_norm              layer_i/attn/{q,k}_norm      (qk_norm)
    layers.i.post_attention_layernorm          layer_i/ffn_ln
    layers.i.mlp.{gate,up,down}_proj           layer_i/ffn/{gate,up,down}_proj
    norm                                       final_ln
    lm_head (no prefix)                        lm_head                      (untied only)

The output gate (``attention.gate`` ``elementwise`` / ``headwise``, qtx's
``layer_i/attn/gate/dense``) is fused into ``q_proj`` by Qwen3.5 and by the Gated Attention
paper's Qwen3 code (``config.json`` flags ``elementwise_attn_output_gate`` /
``headwise_attn_output_gate``); :func:`unfuse` splits it on load into the gate's own key of the
layout, :func:`fuse` merges it back when exporting to Qwen3.5 (see :func:`split_q_gate` for
the two row layouts). Sliding-window attention and Qwen3.5's linear-attention (Gated DeltaNet)
layers have no qtx equivalent and are refused.

A rotated model (``ModelConfig.rotated``, docs/methods.md §5) is an ordinary checkpoint of its
model type (the residual rotation and the folded norms are in the weights) except the online
Hadamard transforms of the o_proj and down_proj inputs: it is exported with qtx's remote code
(:func:`native_attention` is False) and ``config.json`` fields ``qtx_online_hadamard: true``
and ``qtx_rotation_seed``, which :func:`config_from_hf` reads back.
"""

from __future__ import annotations

import numpy as np

from qtx.errors import UserError
from qtx.hf.common import (
    Entry,
    dense,
    embed,
    num_labels_from_hf,
    pop_tied,
    rms_norm,
    strip_prefix,
    unsupported,
)
from qtx.models.config import ModelConfig
from qtx.nn.attention import AttentionConfig

MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "qwen3_5_text": "llama",
}
# (base model, causal LM) class of every model type
CLASSES = {
    "llama": ("LlamaModel", "LlamaForCausalLM"),
    "mistral": ("MistralModel", "MistralForCausalLM"),
    "qwen2": ("Qwen2Model", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Model", "Qwen3ForCausalLM"),
    "qwen3_5_text": ("Qwen3_5TextModel", "Qwen3_5ForCausalLM"),
}
BASE_MODELS = {t: base for t, (base, _) in CLASSES.items()}
ARCHITECTURES = {a: h for base, lm in CLASSES.values() for a, h in ((base, "none"), (lm, "clm"))}
# the model type of each architecture (their names do not all start with it: Qwen3_5ForCausalLM)
ARCHITECTURE_MODEL_TYPES = {a: t for t, classes in CLASSES.items() for a in classes}
ORIGINAL_FORMAT = None
ACTIVATIONS = ("silu", "swish")  # the same function in HF (ACT2FN)
ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
ZERO_CENTERED = "rmsnorm_zero_centered"
FUSED_LAYOUTS = ("per_head", "per_group")
OUTPUT_GATES = ("headwise", "elementwise")


def _check_attention_layers(c) -> None:
    """Refuses sliding-window and linear-attention layers (qtx attends to every earlier token)."""
    mt = c.model_type
    for i, kind in enumerate(getattr(c, "layer_types", None) or ()):
        if kind == "linear_attention":
            raise unsupported(
                mt,
                f"layer_types[{i}]='linear_attention' (a Gated DeltaNet layer, allowed: "
                "full_attention)",
            )
    window = getattr(c, "sliding_window", None)
    if mt in ("qwen2", "qwen3") and not getattr(c, "use_sliding_window", False):
        window = None
    types = getattr(c, "layer_types", None)
    sliding = "sliding_attention" in types if types and mt != "mistral" else window is not None
    if sliding and window is not None and window < c.max_position_embeddings:
        raise unsupported(
            mt,
            f"sliding_window={window} below max_position_embeddings="
            f"{c.max_position_embeddings} (allowed: sliding_window null or >= "
            "max_position_embeddings, use_sliding_window false)",
        )


def _rope(c) -> tuple[float, float, tuple | None]:
    """``(rope_theta, partial_rotary_factor, rope_scaling)`` of HF config ``c``."""
    mt = c.model_type
    # transformers 5: rope_parameters; 4.x: rope_theta and a rope_scaling dict
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise unsupported(mt, f"rope_type={kind!r} (allowed: {', '.join(ROPE_TYPES)})")
    partial = float(rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)))
    if partial != 1.0 and mt != "qwen3_5_text":
        raise unsupported(mt, f"partial_rotary_factor={partial} (allowed for {mt}: 1.0)")
    scaling = None
    if kind == "llama3":
        rope.setdefault("original_max_position_embeddings", c.max_position_embeddings)
        missing = [k for k in LLAMA3_KEYS if rope.get(k) is None]
        if missing:
            raise unsupported(mt, f"rope_type='llama3' without {', '.join(missing)}")
        scaling = tuple(float(rope[k]) for k in LLAMA3_KEYS[:3]) + (
            int(rope["original_max_position_embeddings"]),
        )
    return theta, partial, scaling


def _paper_gate(c) -> str:
    """The Gated Attention paper's output gate of a ``qwen3`` config: none/headwise/elementwise
    (its code picks headwise when both flags are set)."""
    if getattr(c, "headwise_attn_output_gate", False):
        return "headwise"
    return "elementwise" if getattr(c, "elementwise_attn_output_gate", False) else "none"


def config_from_hf(c, arch: str | None, head: str) -> ModelConfig:
    """ModelConfig of a Llama / Mistral / Qwen2 / Qwen3 / Qwen3.5 text config ``c``."""
    mt = c.model_type
    act = getattr(c, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise unsupported(mt, f"hidden_act={act!r} (allowed: silu)")
    _check_attention_layers(c)
    theta, partial, scaling = _rope(c)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    bias = bool(getattr(c, "attention_bias", False))
    qkv_bias, o_bias, qk_norm, norm, gate = bias, bias, False, "rmsnorm", "none"
    if mt == "qwen2":
        qkv_bias, o_bias = True, False
    elif mt == "mistral":
        qkv_bias = o_bias = False
    elif mt == "qwen3":
        qk_norm, gate = True, _paper_gate(c)
        if gate != "none":  # the paper's code: qkv_bias on q/k/v/o, optional q/k norms
            qkv_bias = o_bias = bool(getattr(c, "qkv_bias", False))
            qk_norm = bool(getattr(c, "use_qk_norm", True))
    elif mt == "qwen3_5_text":
        qk_norm, norm, gate = True, ZERO_CENTERED, "elementwise"
    attention = {}
    if gate != "none":  # the gate's bias (part of the fused q_proj bias) exists with pi_init
        attention = dict(gate=gate, gate_condition="token", pi_init=0.5 if qkv_bias else None)
    eps = getattr(c, "rms_norm_eps", 1e-6)
    pad = getattr(c, "pad_token_id", None)
    rotated = bool(getattr(c, "qtx_online_hadamard", False))
    return ModelConfig(
        family="llama",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=None if kv == heads else int(kv),
        head_dim=None if head_dim * heads == c.hidden_size else int(head_dim),
        intermediate_size=c.intermediate_size,
        max_positions=c.max_position_embeddings,
        type_vocab_size=1,
        pre_ln=True,
        final_ln=True,
        rope_theta=theta,
        partial_rotary_factor=partial,
        rope_scaling=scaling,
        norm=norm,
        qk_norm=qk_norm,
        qkv_bias=qkv_bias,
        use_bias=o_bias,
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        activation="silu",
        ln_eps=float(eps),
        dropout=0.0,
        attention_dropout=float(getattr(c, "attention_dropout", 0.0) or 0.0),
        init_std=float(getattr(c, "initializer_range", 0.02)),
        pad_token_id=int(pad if pad is not None else 0),
        head=head,
        num_labels=num_labels_from_hf(c.to_dict()),
        pooler=False,
        attention=AttentionConfig(**attention),
        rotated=rotated,
        rotation_seed=int(getattr(c, "qtx_rotation_seed", 0) or 0) if rotated else 0,
    )


def refine(cfg: ModelConfig, keys) -> ModelConfig:
    return cfg


def infer_head(keys) -> str:
    return "clm" if "lm_head.weight" in keys else "none"


def canonical(sd: dict, cfg: ModelConfig) -> tuple[dict, list[str]]:
    """Strips ``model.``, a tied ``lm_head.weight`` and Qwen3.5's multi-token-prediction
    ``mtp.*`` layers (which HF's model does not load either)."""
    sd = strip_prefix(sd, ("model.",))
    if cfg.tie_embeddings:
        pop_tied(sd, "lm_head.weight", "embed_tokens.weight", "LM head")
    dropped = sorted(k for k in sd if k.startswith("mtp."))
    for k in dropped:
        del sd[k]
    return sd, dropped


def layout(cfg: ModelConfig) -> list[Entry]:
    """Every parameter of the vanilla model ``cfg`` with its canonical HF key."""
    e = embed("embed/word", "embed_tokens.weight")
    for i in range(cfg.num_layers):
        hf, ours = f"layers.{i}", f"layer_{i}"
        e += rms_norm(f"{ours}/attn_ln", f"{hf}.input_layernorm")
        for name in ("q_proj", "k_proj", "v_proj"):
            e += dense(f"{ours}/attn/{name}", f"{hf}.self_attn.{name}", cfg.qkv_bias)
        e += dense(f"{ours}/attn/o_proj", f"{hf}.self_attn.o_proj", cfg.use_bias)
        if cfg.qk_norm:
            e += rms_norm(f"{ours}/attn/q_norm", f"{hf}.self_attn.q_norm")
            e += rms_norm(f"{ours}/attn/k_norm", f"{hf}.self_attn.k_norm")
        e += rms_norm(f"{ours}/ffn_ln", f"{hf}.post_attention_layernorm")
        for name in ("gate_proj", "up_proj", "down_proj"):
            e += dense(f"{ours}/ffn/{name}", f"{hf}.mlp.{name}", cfg.mlp_bias)
    e += rms_norm("final_ln", "norm")
    if cfg.head == "clm" and not cfg.tie_embeddings:
        e += dense("lm_head", "lm_head", bias=False, head=True)
    return e


# -- the output gate fused into q_proj -------------------------------------------------------


def _fused_shape(rows: int, heads: int, kv_heads: int, head_dim: int, gate_dim: int, layout):
    if layout not in FUSED_LAYOUTS:
        raise UserError(f"fused q/gate layout={layout!r} is invalid; allowed: per_head, per_group.")
    if heads % kv_heads:
        raise UserError(f"num_heads={heads} is not a multiple of num_kv_heads={kv_heads}.")
    if rows != heads * (head_dim + gate_dim):
        raise UserError(
            f"fused q_proj has {rows} rows; expected num_heads * (head_dim + gate width) = "
            f"{heads} * ({head_dim} + {gate_dim})."
        )
    if layout == "per_head":
        return heads, head_dim, gate_dim
    g = heads // kv_heads
    return kv_heads, g * head_dim, g * gate_dim


def split_q_gate(w, heads: int, kv_heads: int, head_dim: int, gate_dim: int, layout: str):
    """``(query, gate)`` of a fused torch ``q_proj`` weight (H * (Dh + Dg), D) or bias.

    ``gate_dim`` Dg is Dh (elementwise gate) or 1 (headwise). Row layouts:

    * ``per_head`` (HF Qwen3.5): rows viewed (H, Dh + Dg): head h's query, then its gate;
    * ``per_group`` (the Gated Attention paper's Qwen3): rows viewed (KV, G*Dh + G*Dg), G =
      H / KV: the group's G queries, then its G gates.

    Returns the query (H*Dh, ...) and the gate (H*Dg, ...), head-major as qtx stores them.
    """
    w = np.asarray(w)
    n, q_width, g_width = _fused_shape(w.shape[0], heads, kv_heads, head_dim, gate_dim, layout)
    x = w.reshape(n, q_width + g_width, *w.shape[1:])
    query = x[:, :q_width].reshape(heads * head_dim, *w.shape[1:])
    gate = x[:, q_width:].reshape(heads * gate_dim, *w.shape[1:])
    return np.ascontiguousarray(query), np.ascontiguousarray(gate)


def merge_q_gate(query, gate, heads: int, kv_heads: int, head_dim: int, layout: str):
    """The fused ``q_proj`` tensor of ``query`` (H*Dh, ...) and ``gate`` (H*Dg, ...): the
    inverse of :func:`split_q_gate`."""
    query, gate = np.asarray(query), np.asarray(gate)
    gate_dim = gate.shape[0] // heads
    rows = query.shape[0] + gate.shape[0]
    n, q_width, g_width = _fused_shape(rows, heads, kv_heads, head_dim, gate_dim, layout)
    rest = query.shape[1:]
    x = np.concatenate([query.reshape(n, q_width, *rest), gate.reshape(n, g_width, *rest)], axis=1)
    return np.ascontiguousarray(x.reshape(rows, *rest))


def _gate_pairs(cfg: ModelConfig, layout: list[Entry]):
    """``(q_proj key, gate key)`` per layer and parameter (weight, bias) where the layout has a
    ``gate/dense`` output gate."""
    hf = {e.ours: e.hf for e in layout}
    for i in range(cfg.num_layers):
        attn = (f"layer_{i}", "attn")
        for leaf in ("kernel", "bias"):
            q, g = hf.get(attn + ("q_proj", leaf)), hf.get(attn + ("gate", "dense", leaf))
            if q is not None and g is not None:
                yield q, g


def _dims(cfg: ModelConfig) -> tuple[int, int, int, int, str]:
    heads = cfg.num_heads
    head_dim = cfg.attention_head_dim
    gate_dim = head_dim if cfg.attention.gate == "elementwise" else 1
    fused = "per_head" if cfg.norm == ZERO_CENTERED else "per_group"
    return heads, cfg.num_kv_heads or heads, head_dim, gate_dim, fused


def unfuse(sd: dict, cfg: ModelConfig, layout: list[Entry]) -> dict:
    """Splits fused q_proj + output gate tensors (Qwen3.5: ``per_head``; the paper's Qwen3:
    ``per_group``) of the canonical state dict ``sd`` into the layout's gate keys. Checkpoints
    that store the gate on its own (qtx's remote-code exports) pass unchanged."""
    if cfg.attention.gate not in OUTPUT_GATES:
        return sd
    heads, kv, head_dim, gate_dim, fused = _dims(cfg)
    sd = dict(sd)
    for q, g in _gate_pairs(cfg, layout):
        if g in sd or q not in sd or np.shape(sd[q])[0] != heads * (head_dim + gate_dim):
            continue
        sd[q], sd[g] = split_q_gate(sd[q], heads, kv, head_dim, gate_dim, fused)
    return sd


def native_attention(cfg: ModelConfig) -> bool:
    """True when HF's own class of :func:`hf_model_type` computes ``cfg``'s attention: vanilla
    softmax and no gate, or, on a Qwen3.5-shaped model (zero-centred norms), Qwen3.5's
    elementwise output gate, conditioned on the token, with a bias exactly when q/k/v have one,
    not divided by ``pi_init``; never for a rotated model (its online Hadamard transforms)."""
    a = cfg.attention
    if a.softmax != "vanilla" or cfg.rotated:
        return False
    if a.gate == "none":
        return True
    return (
        cfg.norm == ZERO_CENTERED
        and a.gate == "elementwise"
        and a.gate_condition == "token"
        and not a.gate_finetune
        and (a.pi_init is not None) == cfg.qkv_bias
    )


def fuse(sd: dict, cfg: ModelConfig, layout: list[Entry]) -> dict:
    """Merges the output gate into ``q_proj`` (Qwen3.5's ``per_head`` rows) when ``cfg`` exports
    as HF's Qwen3.5 with its native gate; otherwise ``sd`` unchanged (remote code keeps the
    gate on its own key)."""
    if cfg.attention.gate == "none" or not native_attention(cfg):
        return sd
    heads, kv, head_dim, _, _ = _dims(cfg)
    sd = dict(sd)
    for q, g in _gate_pairs(cfg, layout):
        sd[q] = merge_q_gate(sd[q], sd.pop(g), heads, kv, head_dim, "per_head")
    return sd


# -- export ----------------------------------------------------------------------------------


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF model type an export of ``cfg`` writes."""
    if cfg.norm == ZERO_CENTERED:
        return "qwen3_5_text"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.use_bias:
        return "qwen2"
    return "llama"


def head_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    return () if cfg.tie_embeddings else ("lm_head",)


def export_problems(cfg: ModelConfig) -> list[str]:
    """What the HF class of :func:`hf_model_type` cannot represent (attention variants are
    exported with remote code and are not listed)."""
    mt, out = hf_model_type(cfg), []
    name = BASE_MODELS[mt].removesuffix("Model").removesuffix("Text")
    if cfg.qkv_bias != cfg.use_bias and mt != "qwen2":
        out.append(
            f"config.model.qkv_bias={cfg.qkv_bias} with use_bias={cfg.use_bias} (HF {name} "
            "has one attention_bias)"
        )
    if cfg.mlp_bias and mt != "llama":
        out.append(f"config.model.mlp_bias=True (HF {name} has no MLP biases)")
    if mt == "qwen3_5_text" and not cfg.qk_norm:
        out.append("config.model.qk_norm=False with norm='rmsnorm_zero_centered' (HF Qwen3.5)")
    if mt == "qwen3_5_text" and cfg.attention.gate == "none" and cfg.attention.softmax == "vanilla":
        out.append(
            "config.model.attention.gate='none' with norm='rmsnorm_zero_centered' (HF Qwen3.5 "
            "always has the elementwise output gate)"
        )
    if cfg.partial_rotary_factor != 1.0 and mt != "qwen3_5_text":
        out.append(
            f"config.model.partial_rotary_factor={cfg.partial_rotary_factor} (HF {name} "
            "rotates whole heads)"
        )
    return out


def pretrained_problems(cfg: ModelConfig, ckpt_cfg: ModelConfig) -> list[str]:
    """Fields beyond :data:`qtx.hf.load.ARCHITECTURE_FIELDS` that change the decoder's math."""

    def effective(c: ModelConfig) -> dict:
        return {
            "num_kv_heads": c.num_kv_heads or c.num_heads,
            "head_dim": c.attention_head_dim,
            "rope_theta": c.rope_theta,
            "partial_rotary_factor": c.partial_rotary_factor,
            "rope_scaling": c.rope_scaling,
            "norm": c.norm,
            "qk_norm": c.qk_norm,
            "qkv_bias": c.qkv_bias,
            "mlp_bias": c.mlp_bias,
            "tie_embeddings": c.tie_embeddings,
        }

    ours, theirs = effective(cfg), effective(ckpt_cfg)
    out = [
        f"config.model.{f}={ours[f]!r} (checkpoint: {theirs[f]!r})"
        for f in ours
        if ours[f] != theirs[f]
    ]
    if ckpt_cfg.rotated and not cfg.rotated:  # its weights expect the online transforms
        out.append("config.model.rotated=False (checkpoint: True)")
    return out


def architecture(cfg: ModelConfig) -> str:
    base, lm = CLASSES[hf_model_type(cfg)]
    return lm if cfg.head == "clm" else base


def base_prefix(cfg: ModelConfig) -> str:
    return "model." if cfg.head == "clm" else ""


def _rope_parameters(cfg: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        factor, low, high, original = cfg.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=float(factor),
            low_freq_factor=float(low),
            high_freq_factor=float(high),
            original_max_position_embeddings=int(original),
        )
    if hf_model_type(cfg) == "qwen3_5_text":
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
    return rope


def _rope_kwargs(cfg: ModelConfig, major: int) -> dict:
    """The RoPE fields of an HF config: ``rope_parameters`` (transformers 5), or
    ``rope_theta`` and ``rope_scaling`` (4.x)."""
    rope = _rope_parameters(cfg)
    if major >= 5:
        return {"rope_parameters": rope}
    theta = rope.pop("rope_theta")
    return {"rope_theta": theta, "rope_scaling": rope if cfg.rope_scaling is not None else None}


def hf_config(cfg: ModelConfig):
    """The ``transformers`` config of ``cfg`` (class of :func:`hf_model_type`, with
    ``architectures``)."""
    import transformers

    mt = hf_model_type(cfg)
    kw = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        head_dim=cfg.attention_head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_positions,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.ln_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        **_rope_kwargs(cfg, int(transformers.__version__.split(".")[0])),
        attention_dropout=cfg.attention_dropout,
        pad_token_id=cfg.pad_token_id,
    )
    if mt == "llama":
        c = transformers.LlamaConfig(**kw, attention_bias=cfg.use_bias, mlp_bias=cfg.mlp_bias)
    elif mt == "qwen2":
        c = transformers.Qwen2Config(**kw)
    elif mt == "qwen3":
        c = transformers.Qwen3Config(**kw, attention_bias=cfg.use_bias)
    else:
        from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

        layer_types = ["full_attention"] * cfg.num_layers
        c = Qwen3_5TextConfig(**kw, attention_bias=cfg.use_bias, layer_types=layer_types)
    c.architectures = [architecture(cfg)]
    if cfg.rotated:  # read by the remote code (modeling_qtx.py) and by config_from_hf
        c.qtx_online_hadamard = True
        c.qtx_rotation_seed = int(cfg.rotation_seed)
    return c
