"""Attention variants in Hugging Face directories: remote-code configs and gate parameters.

A model whose attention HF cannot represent (any softmax but vanilla, any gate except
Qwen3.5's own elementwise output gate) is exported with the PyTorch code in
:mod:`qtx.hf.remote`: ``config.json`` gets

* ``model_type`` ``qtx_<model_type>`` and ``architectures`` ``["Qtx<Architecture>"]``;
* ``qtx_attention``: every :class:`~qtx.nn.attention.AttentionConfig` field;
* ``auto_map``: ``AutoConfig`` and the ``AutoModel*`` classes, pointing into the shipped
  ``configuration_qtx.py`` / ``modeling_qtx.py`` (``Qtx<Base>Config``, ``Qtx<Base>Model``
  with ``<Base>Model`` the converter's ``BASE_MODELS[model_type]``, and ``Qtx<Architecture>``:
  ``QtxQwen3_5TextConfig``, ``QtxQwen3_5TextModel``, ``QtxQwen3_5ForCausalLM``).

Gate parameters of attention layer ``i`` (in layout order) have the canonical keys
``qtx_gates.{i}.*`` (under the base-model prefix, e.g. ``bert.qtx_gates.0.weight``,
``model.qtx_gates.0.dense.weight`` for decoders), flax -> torch::

    gate/kernel (H, Dh), gate/bias (H,)              weight, bias                (linear)
    gate/hidden_kernel (H, Dh, K), hidden_bias (H, K) hidden_weight, hidden_bias  (mlp*)
    gate/out_kernel (H, K), gate/bias (H,)           out_weight, bias            (mlp*)
    gate/dense/kernel (D, H), bias (H,)              dense.weight (H, D), bias   (all_heads_linear)
    gate/dense/kernel (D, H) or (D, H*Dh)            dense.weight (H or H*Dh, D) (headwise /
    gate/dense/bias (only with pi_init)              dense.bias                   elementwise)
    gate/logit (H,)                                  logit                       (condition none)

and the learned sink logits (``softmax="sink"``) of attention layer ``i``::

    attn/sink (H,)                                   qtx_sinks.{i} (H,)

A Qwen3.5 model whose attention HF represents (vanilla softmax, its token-conditioned
elementwise gate, a gate bias exactly with q/k/v biases, no ``gate_finetune``) is a plain HF
export: the converter fuses the gate into ``q_proj`` (``convert_llama.native_attention``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from qtx.errors import UserError
from qtx.hf import remote
from qtx.hf.common import Entry
from qtx.hf.converter import converter, converter_of_model_type
from qtx.models.config import ModelConfig
from qtx.nn.attention_variants import OUTPUT_GATES, AttentionConfig

PREFIX = "qtx_"
# the Auto class each exported architecture answers to (AutoModel always maps the base model)
AUTO_CLASSES = {
    "ForMaskedLM": "AutoModelForMaskedLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForCausalLM": "AutoModelForCausalLM",
    "ForImageClassification": "AutoModelForImageClassification",
    "ForImageClassificationWithTeacher": "AutoModelForImageClassification",
}


def is_variant(cfg: ModelConfig) -> bool:
    """True when the attention needs the remote code: any softmax but vanilla, any gate but
    one the family's HF class has (the converter's ``native_attention``, if it has one)."""
    native = getattr(converter(cfg.family), "native_attention", None)
    if native is not None:
        return not native(cfg)
    return cfg.attention.softmax != "vanilla" or cfg.attention.gate != "none"


def _gate_params(a: AttentionConfig) -> list[tuple[tuple[str, ...], str, str]]:
    """``(flax path under gate/, torch name, kind)`` of one layer's gate."""
    if a.gate == "none":
        return []
    if a.gate in OUTPUT_GATES:
        bias = [(("dense", "bias"), "dense.bias", "copy")] if a.pi_init is not None else []
        return [(("dense", "kernel"), "dense.weight", "linear"), *bias]
    if a.gate_condition == "none":
        return [(("logit",), "logit", "copy")]
    if a.gate == "all_heads_linear":
        return [
            (("dense", "kernel"), "dense.weight", "linear"),
            (("dense", "bias"), "dense.bias", "copy"),
        ]
    if a.gate == "linear":
        return [(("kernel",), "weight", "copy"), (("bias",), "bias", "copy")]
    return [
        (("hidden_kernel",), "hidden_weight", "copy"),
        (("hidden_bias",), "hidden_bias", "copy"),
        (("out_kernel",), "out_weight", "copy"),
        (("bias",), "bias", "copy"),
    ]


def gate_entries(cfg: ModelConfig, layout: list[Entry]) -> list[Entry]:
    """Layout entries of the gate and sink parameters, one set per attention layer of
    ``layout`` (in its order): each layer's gate entries, then its sink."""
    params = _gate_params(cfg.attention)
    sink = cfg.attention.softmax == "sink"
    if not params and not sink:
        return []
    layers = [
        e.ours[:-2]
        for e in layout
        if e.ours[-3:] in (("attn", "q_proj", "kernel"), ("attn", "qkv_proj", "kernel"))
    ]
    out = []
    for i, attn in enumerate(layers):
        out += [Entry(attn + ("gate",) + p, f"qtx_gates.{i}.{n}", k) for p, n, k in params]
        if sink:
            out.append(Entry(attn + ("sink",), f"qtx_sinks.{i}"))
    return out


def remote_config(cfg: ModelConfig, hf_dict: Mapping) -> dict:
    """``config.json`` of a variant export, from the vanilla HF config dict ``hf_dict``."""
    d = dict(hf_dict)
    model_type = d["model_type"]
    arch = d["architectures"][0]
    base = converter_of_model_type(model_type).BASE_MODELS[model_type]  # "BertModel"
    suffix = arch[arch.find("For") :] if "For" in arch else ""  # Qwen3_5ForCausalLM: no base
    auto_map = {
        "AutoConfig": f"configuration_qtx.Qtx{base.removesuffix('Model')}Config",
        "AutoModel": f"modeling_qtx.Qtx{base}",
    }
    if suffix in AUTO_CLASSES:
        auto_map[AUTO_CLASSES[suffix]] = f"modeling_qtx.Qtx{arch}"
    d.update(
        model_type=PREFIX + model_type,
        architectures=[f"Qtx{arch}"],
        qtx_attention=dataclasses.asdict(cfg.attention),
        auto_map=auto_map,
    )
    if cfg.attention.gate_condition == "head" and cfg.attention.gate != "none":
        d["use_cache"] = False  # the causal per-head pool needs every earlier token
    return d


def native_config(d: Mapping) -> tuple[dict, AttentionConfig | None]:
    """``(vanilla HF config dict, attention)`` of a ``config.json``; attention is None for
    a plain HF checkpoint."""
    d = dict(d)
    model_type = str(d.get("model_type", ""))
    if not model_type.startswith(PREFIX):
        return d, None
    d["model_type"] = model_type[len(PREFIX) :]
    d["architectures"] = [a[3:] if a.startswith("Qtx") else a for a in d.get("architectures") or []]
    d.pop("auto_map", None)
    fields = {f.name for f in dataclasses.fields(AttentionConfig)}
    raw = dict(d.pop("qtx_attention", None) or {})
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise UserError(
            f"config.json qtx_attention has unknown field(s) {unknown}; allowed: {sorted(fields)}."
        )
    return d, AttentionConfig(**raw)


def copy_remote_code(path: str) -> None:
    """Copies the PyTorch modeling code into the export directory ``path``."""
    remote.copy_code(path)
