"""OPT <-> Hugging Face (OPTModel, OPTForCausalLM).

Mapping (canonical HF key, prefix ``model.decoder.`` / ``decoder.`` removed -> flax path)::

    embed_tokens / embed_positions            embed/word / embed/position   ((max + 2), D)
    project_in / project_out (no bias)        embed/project_in / project_out
    layers.i.self_attn.{q,k,v,out}_proj       layer_i/attn/{q,k,v,o}_proj
    layers.i.self_attn_layer_norm             layer_i/attn_ln
    layers.i.fc1 / fc2                        layer_i/ffn/fc1 / fc2
    layers.i.final_layer_norm                 layer_i/ffn_ln
    final_layer_norm                          final_ln         (pre-LN models)

``lm_head.weight`` is tied to ``embed_tokens`` (a stored copy must equal it).
``do_layer_norm_before=False`` (opt-350m) gives ``pre_ln=False, final_ln=False``.
"""

from __future__ import annotations

from qtx.hf.common import (
    ACTIVATIONS_TO_HF,
    Entry,
    activation_from_hf,
    attention_block,
    dense,
    embed,
    layer_norm,
    num_labels_from_hf,
    pop_tied,
    strip_prefix,
    unsupported,
)
from qtx.models.config import ModelConfig

MODEL_TYPES = {"opt": "opt"}
BASE_MODELS = {"opt": "OPTModel"}
ORIGINAL_FORMAT = None
ARCHITECTURES = {"OPTModel": "none", "OPTForCausalLM": "clm"}
OFFSET = 2  # OPT's learned positions start at index 2


def config_from_hf(c, arch: str | None, head: str) -> ModelConfig:
    """ModelConfig of an ``OPTConfig`` ``c``."""
    if not getattr(c, "layer_norm_elementwise_affine", True):
        raise unsupported("opt", "layer_norm_elementwise_affine=False")
    pre_ln = bool(c.do_layer_norm_before)
    proj = c.word_embed_proj_dim
    return ModelConfig(
        family="opt",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        intermediate_size=c.ffn_dim,
        max_positions=c.max_position_embeddings,
        type_vocab_size=1,
        pre_ln=pre_ln,
        final_ln=pre_ln and not getattr(c, "_remove_final_layer_norm", False),
        activation=activation_from_hf(c.activation_function, "opt"),
        ln_eps=1e-5,  # torch's LayerNorm default, which OPT uses
        dropout=float(c.dropout),
        attention_dropout=float(c.attention_dropout),
        use_bias=bool(getattr(c, "enable_bias", True)),
        init_std=float(c.init_std),
        pad_token_id=int(c.pad_token_id if c.pad_token_id is not None else 1),
        position_offset=OFFSET,
        word_embed_proj_dim=None if proj in (None, c.hidden_size) else int(proj),
        head=head,
        num_labels=num_labels_from_hf(c.to_dict()),
        pooler=False,
    )


def refine(cfg: ModelConfig, keys) -> ModelConfig:
    return cfg


def infer_head(keys) -> str:
    return "none"  # the tied LM head stores nothing


def canonical(sd: dict, cfg: ModelConfig) -> tuple[dict, list[str]]:
    """Strips the decoder prefix and the tied ``lm_head.weight``."""
    sd = strip_prefix(sd, ("model.decoder.", "decoder."))
    pop_tied(sd, "lm_head.weight", "embed_tokens.weight", "LM head")
    return sd, []


def layout(cfg: ModelConfig) -> list[Entry]:
    """Every parameter of the vanilla model ``cfg`` with its canonical HF key."""
    e = embed("embed/word", "embed_tokens.weight")
    e += embed("embed/position", "embed_positions.weight")
    if cfg.word_embed_proj_dim not in (None, cfg.hidden_size):
        e += dense("embed/project_in", "project_in", bias=False)
        e += dense("project_out", "project_out", bias=False)
    for i in range(cfg.num_layers):
        hf = f"layers.{i}"
        e += attention_block(
            i, f"{hf}.self_attn", "q_proj", "k_proj", "v_proj", "out_proj", cfg.use_bias
        )
        e += layer_norm(f"layer_{i}/attn_ln", f"{hf}.self_attn_layer_norm")
        e += dense(f"layer_{i}/ffn/fc1", f"{hf}.fc1", cfg.use_bias)
        e += dense(f"layer_{i}/ffn/fc2", f"{hf}.fc2", cfg.use_bias)
        e += layer_norm(f"layer_{i}/ffn_ln", f"{hf}.final_layer_norm")
    if cfg.final_ln:
        e += layer_norm("final_ln", "final_layer_norm")
    return e


def head_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    return ()  # the LM head is tied: it has no parameters of its own


def export_problems(cfg: ModelConfig) -> list[str]:
    out = []
    if cfg.final_ln and not cfg.pre_ln:
        out.append("config.model.final_ln=True with pre_ln=False")
    if cfg.position_offset != OFFSET:
        out.append(f"config.model.position_offset={cfg.position_offset} (HF OPT uses {OFFSET})")
    if cfg.ln_eps != 1e-5:
        out.append(f"config.model.ln_eps={cfg.ln_eps} (HF OPT uses 1e-5)")
    return out


def pretrained_problems(cfg: ModelConfig, ckpt_cfg: ModelConfig) -> list[str]:
    return []


def architecture(cfg: ModelConfig) -> str:
    return "OPTForCausalLM" if cfg.head == "clm" else "OPTModel"


def base_prefix(cfg: ModelConfig) -> str:
    return "model.decoder." if cfg.head == "clm" else "decoder."


def hf_config(cfg: ModelConfig):
    """The ``transformers.OPTConfig`` of ``cfg`` (with ``architectures``)."""
    from transformers import OPTConfig

    c = OPTConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        ffn_dim=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions,
        do_layer_norm_before=cfg.pre_ln,
        _remove_final_layer_norm=cfg.pre_ln and not cfg.final_ln,
        word_embed_proj_dim=cfg.word_embed_proj_dim or cfg.hidden_size,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        num_attention_heads=cfg.num_heads,
        activation_function=ACTIVATIONS_TO_HF[cfg.activation],
        init_std=cfg.init_std,
        pad_token_id=cfg.pad_token_id,
        enable_bias=cfg.use_bias,
    )
    c.architectures = [architecture(cfg)]
    return c
