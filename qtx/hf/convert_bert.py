"""BERT and RoBERTa <-> Hugging Face (BertModel/ForMaskedLM/ForPreTraining/
ForSequenceClassification, RobertaModel/ForMaskedLM/ForSequenceClassification).

Mapping (canonical HF key, base prefix ``bert.`` / ``roberta.`` removed -> flax path)::

    embeddings.{word,position,token_type}_embeddings     embed/{word,position,token_type}
    embeddings.LayerNorm                                 embed/ln
    encoder.layer.i.attention.self.{query,key,value}     layer_i/attn/{q,k,v}_proj
    encoder.layer.i.attention.output.dense / LayerNorm   layer_i/attn/o_proj / layer_i/attn_ln
    encoder.layer.i.intermediate.dense / output.dense    layer_i/ffn/fc1 / fc2
    encoder.layer.i.output.LayerNorm                     layer_i/ffn_ln
    pooler.dense                                         pooler/dense
    cls.predictions.transform.{dense,LayerNorm}, .bias   mlm_head/{transform,ln}, mlm_head/bias
    classifier                                           classifier/dense         (BERT)
    lm_head.{dense,layer_norm}, lm_head.bias             mlm_head/{transform,ln,bias} (RoBERTa)
    classifier.dense / classifier.out_proj               pooler/dense / classifier/dense (RoBERTa)

The MLM decoder weight is tied to the word embeddings (a stored copy must equal them); its
bias may be stored as ``*.decoder.bias``. BertForPreTraining's next-sentence head
(``cls.seq_relationship``) has no qtx counterpart and is dropped; the buffers
``embeddings.position_ids`` / ``token_type_ids`` of old checkpoints are ignored.
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
    pop_alias,
    pop_tied,
    strip_prefix,
    unsupported,
)
from qtx.models.config import ModelConfig

MODEL_TYPES = {"bert": "bert", "roberta": "roberta"}
BASE_MODELS = {"bert": "BertModel", "roberta": "RobertaModel"}
ORIGINAL_FORMAT = None
ARCHITECTURES = {
    "BertModel": "none",
    "BertForMaskedLM": "mlm",
    "BertForPreTraining": "mlm",
    "BertForSequenceClassification": "classification",
    "RobertaModel": "none",
    "RobertaForMaskedLM": "mlm",
    "RobertaForSequenceClassification": "classification",
}
_WITH_POOLER = ("BertModel", "BertForPreTraining", "BertForSequenceClassification", "RobertaModel")
DROPPED = ("cls.seq_relationship.weight", "cls.seq_relationship.bias")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_WORD = "embeddings.word_embeddings.weight"


def config_from_hf(c, arch: str | None, head: str) -> ModelConfig:
    """ModelConfig of a BERT/RoBERTa ``PretrainedConfig`` ``c``."""
    mt = c.model_type
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise unsupported(mt, f"position_embedding_type={c.position_embedding_type!r}")
    if getattr(c, "is_decoder", False) or getattr(c, "add_cross_attention", False):
        raise unsupported(mt, "is_decoder/add_cross_attention (decoder BERT)")
    act = activation_from_hf(c.hidden_act, mt)
    if mt == "roberta" and head == "mlm" and act != "gelu":
        raise unsupported(mt, f"hidden_act={c.hidden_act!r} and an MLM head (its head is gelu)")
    return ModelConfig(
        family=mt,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        max_positions=c.max_position_embeddings,
        type_vocab_size=c.type_vocab_size,
        pre_ln=False,
        final_ln=False,
        activation=act,
        ln_eps=float(c.layer_norm_eps),
        dropout=float(c.hidden_dropout_prob),
        attention_dropout=float(c.attention_probs_dropout_prob),
        init_std=float(c.initializer_range),
        pad_token_id=int(c.pad_token_id if c.pad_token_id is not None else 0),
        head=head,
        num_labels=num_labels_from_hf(c.to_dict()),
        pooler=arch in _WITH_POOLER if arch else True,
    )


def refine(cfg: ModelConfig, keys) -> ModelConfig:
    """Pooler present iff the checkpoint stores one (base checkpoints may omit it)."""
    if cfg.family == "roberta" and cfg.head == "classification":
        return cfg.replace(pooler=False)
    return cfg.replace(pooler="pooler.dense.weight" in keys)


def infer_head(keys) -> str:
    """The head of a checkpoint whose config names no architecture."""
    if "cls.predictions.bias" in keys or "lm_head.bias" in keys:
        return "mlm"
    return (
        "classification"
        if "classifier.weight" in keys or "classifier.out_proj.weight" in keys
        else "none"
    )


def canonical(sd: dict, cfg: ModelConfig) -> tuple[dict, list[str]]:
    """Strips ``bert.``/``roberta.``, resolves tied/aliased head tensors; returns the canonical
    state dict and the keys dropped on purpose."""
    sd = strip_prefix(sd, (f"{cfg.family}.",))
    for k in _BUFFERS:
        sd.pop(k, None)
    if cfg.family == "bert":
        pop_tied(sd, "cls.predictions.decoder.weight", _WORD, "MLM decoder")
        pop_alias(sd, "cls.predictions.decoder.bias", "cls.predictions.bias")
    else:
        pop_tied(sd, "lm_head.decoder.weight", _WORD, "MLM decoder")
        pop_alias(sd, "lm_head.decoder.bias", "lm_head.bias")
    dropped = [k for k in DROPPED if k in sd]
    for k in dropped:
        sd.pop(k)
    return sd, dropped


def layout(cfg: ModelConfig) -> list[Entry]:
    """Every parameter of the vanilla model ``cfg`` with its canonical HF key."""
    e = embed("embed/word", _WORD)
    e += embed("embed/position", "embeddings.position_embeddings.weight")
    e += embed("embed/token_type", "embeddings.token_type_embeddings.weight")
    e += layer_norm("embed/ln", "embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        hf = f"encoder.layer.{i}"
        e += attention_block(
            i, f"{hf}.attention", "self.query", "self.key", "self.value", "output.dense", True
        )
        e += layer_norm(f"layer_{i}/attn_ln", f"{hf}.attention.output.LayerNorm")
        e += dense(f"layer_{i}/ffn/fc1", f"{hf}.intermediate.dense")
        e += dense(f"layer_{i}/ffn/fc2", f"{hf}.output.dense")
        e += layer_norm(f"layer_{i}/ffn_ln", f"{hf}.output.LayerNorm")
    roberta, cls = cfg.family == "roberta", cfg.head == "classification"
    if roberta and cls:
        e += dense("pooler/dense", "classifier.dense", head=True)
        e += dense("classifier/dense", "classifier.out_proj", head=True)
    else:
        if cfg.pooler or cls:
            e += dense("pooler/dense", "pooler.dense")
        if cls:
            e += dense("classifier/dense", "classifier", head=True)
    if cfg.head == "mlm":
        hf = "lm_head" if roberta else "cls.predictions"
        e += dense(
            "mlm_head/transform", f"{hf}.dense" if roberta else f"{hf}.transform.dense", head=True
        )
        e += layer_norm(
            "mlm_head/ln", f"{hf}.layer_norm" if roberta else f"{hf}.transform.LayerNorm", head=True
        )
        e.append(Entry(("mlm_head", "bias"), f"{hf}.bias", "copy", True))
    return e


def head_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    """Top-level modules a new head of ``cfg`` may initialise fresh."""
    return {"mlm": ("mlm_head",), "classification": ("pooler", "classifier")}.get(cfg.head, ())


def export_problems(cfg: ModelConfig) -> list[str]:
    out = []
    if cfg.pre_ln:
        out.append("config.model.pre_ln=True (HF BERT/RoBERTa are post-LN)")
    if cfg.final_ln:
        out.append("config.model.final_ln=True")
    if not cfg.use_bias:
        out.append("config.model.use_bias=False")
    if cfg.position_offset:
        out.append(f"config.model.position_offset={cfg.position_offset}")
    if cfg.family == "roberta" and cfg.head == "mlm" and cfg.activation != "gelu":
        out.append(f"config.model.activation={cfg.activation!r} with a RoBERTa MLM head")
    return out


def pretrained_problems(cfg: ModelConfig, ckpt_cfg: ModelConfig) -> list[str]:
    """RoBERTa's ``pad_token_id`` sets its position ids, so it must equal the checkpoint's."""
    if cfg.family == "roberta" and cfg.pad_token_id != ckpt_cfg.pad_token_id:
        return [
            f"config.model.pad_token_id={cfg.pad_token_id} (checkpoint: "
            f"{ckpt_cfg.pad_token_id}; it sets RoBERTa's position ids)"
        ]
    return []


def architecture(cfg: ModelConfig) -> str:
    base = "Bert" if cfg.family == "bert" else "Roberta"
    suffix = {"none": "Model", "mlm": "ForMaskedLM", "classification": "ForSequenceClassification"}
    return base + suffix[cfg.head]


def base_prefix(cfg: ModelConfig) -> str:
    return "" if cfg.head == "none" else f"{cfg.family}."


def hf_config(cfg: ModelConfig):
    """The ``transformers`` config of ``cfg`` (with ``architectures``)."""
    from transformers import BertConfig, RobertaConfig

    cls = BertConfig if cfg.family == "bert" else RobertaConfig
    c = cls(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=ACTIVATIONS_TO_HF[cfg.activation],
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_positions,
        type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.ln_eps,
        pad_token_id=cfg.pad_token_id,
        num_labels=cfg.num_labels,
    )
    c.architectures = [architecture(cfg)]
    return c
