"""PyTorch modeling code of qtx attention variants, written by qtx into exported directories.

Every class subclasses a Hugging Face model and changes only its self-attention, which computes

    q, k, v = projections of x (decoders: per-head q/k RMSNorm, then RoPE on the first
              cos.shape[-1] dims of each head; grouped keys/values repeated per query head)
    scores = q k^T / sqrt(d_head) (+ Swin's relative position bias), masked
    probs  = normaliser of ``config.qtx_attention`` (attention_qtx.py)
    out    = o_proj( concat_h( pi_h * (probs v)_h ) )       pi: the attention gate, if any

Gates and sinks are parameters of the base model (OPT: ``<base>.decoder``), one entry per
attention layer in layer order: ``<base>.qtx_gates.<i>.*`` (the modules of attention_qtx.py)
and ``<base>.qtx_sinks.<i>`` (H,), the sink logits of ``softmax="sink"``. The Qwen3.5 classes
here have a ``q_proj`` of the query alone (their output gate is in ``qtx_gates``); HF's own
Qwen3.5 (a plain export being quantized) keeps its gate in ``q_proj`` (per head: query rows,
then gate rows) and gets ``sigmoid`` of those rows elementwise.
Decoders keep HF's key/value cache (``generate`` works), except with head-pooled gates.
A rotated decoder (``config.qtx_online_hadamard``, qtx's QuaRot rotation) multiplies the gated
context, flattened to H·Dh, by the online Hadamard transform of hadamard_qtx.py before the
``context`` point and o_proj, and every down_proj input likewise (a forward pre-hook, which
runs before the ``ffn/act`` quantizer of quantization_qtx.py); the weights hold the rest.

Everything else (embeddings, MLPs, heads, generation, pipelines, ``save_pretrained``) is the
Hugging Face code. Needs transformers >= 5 (its module tree and attention signatures).
"""

import inspect
import math

import torch
import transformers
from torch import nn
from transformers import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    MistralModel,
    OPTForCausalLM,
    OPTModel,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen3_5ForCausalLM,
    Qwen3_5TextModel,
    Qwen3ForCausalLM,
    Qwen3Model,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
    SwinForImageClassification,
    SwinModel,
    ViTForImageClassification,
    ViTModel,
)

try:  # loaded by transformers from the export directory, or imported from it directly
    from .attention_qtx import (
        AttentionGate,
        allowed_keys,
        attention_probs,
        attention_settings,
        token_mask,
    )
    from .configuration_qtx import (
        QtxBertConfig,
        QtxDeiTConfig,
        QtxLlamaConfig,
        QtxMistralConfig,
        QtxOPTConfig,
        QtxQwen2Config,
        QtxQwen3_5TextConfig,
        QtxQwen3Config,
        QtxRobertaConfig,
        QtxSwinConfig,
        QtxViTConfig,
    )
    from .hadamard_qtx import hadamard_input_hook, online_hadamard
except ImportError:
    from attention_qtx import (
        AttentionGate,
        allowed_keys,
        attention_probs,
        attention_settings,
        token_mask,
    )
    from configuration_qtx import (
        QtxBertConfig,
        QtxDeiTConfig,
        QtxLlamaConfig,
        QtxMistralConfig,
        QtxOPTConfig,
        QtxQwen2Config,
        QtxQwen3_5TextConfig,
        QtxQwen3Config,
        QtxRobertaConfig,
        QtxSwinConfig,
        QtxViTConfig,
    )
    from hadamard_qtx import hadamard_input_hook, online_hadamard

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        f"this qtx export needs transformers>=5 (found {transformers.__version__}); "
        "upgrade transformers or re-export the model with the version you have."
    )

# decoder attention classes: RoPE from position_embeddings, grouped keys/values, q/k norms
DECODER_ATTENTIONS = (
    "LlamaAttention",
    "MistralAttention",
    "Qwen2Attention",
    "Qwen3Attention",
    "Qwen3_5Attention",
)
FUSED_GATE_ATTENTIONS = ("Qwen3_5Attention",)  # q_proj rows: [q_h, gate_h] per head
# native attention class -> (q, k, v, output projection or None when outside the module)
ATTENTION_MODULES = {
    "BertSelfAttention": ("query", "key", "value", None),
    "RobertaSelfAttention": ("query", "key", "value", None),
    "ViTAttention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "DeiTAttention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "SwinAttention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "OPTAttention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    **{name: ("q_proj", "k_proj", "v_proj", "o_proj") for name in DECODER_ATTENTIONS},
}
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_5_text")
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
HEAD_POOLED_CACHE = (
    "gate_condition='head' pools the gate over all earlier tokens, which a key/value cache "
    "does not keep; call generate(..., use_cache=False)."
)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _points(module: nn.Module):
    """``name -> fake quantizer`` of the attention points (quantization_qtx.py), or identity."""
    quant = module.__dict__.get("qtx_quant", {})
    return lambda name: quant.get(name, _identity)


def _call_arguments(self, args: tuple, kwargs: dict) -> dict:
    """The keyword arguments of a call to the native ``forward`` (positional ones named)."""
    names = list(inspect.signature(type(self).__mro__[1].forward).parameters)[2:]
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _cache(kwargs: dict):
    """The key/value cache of a call; its argument name changed within transformers 5."""
    found = next((kwargs[n] for n in CACHE_ARGUMENTS if kwargs.get(n) is not None), None)
    return getattr(found, "self_attention_cache", found)


def _sink(module: nn.Module) -> torch.Tensor | None:
    sinks = module.__dict__.get("qtx_sinks")
    return None if sinks is None else sinks[module.qtx_index]


def _normalise(self, scores, v, allowed, attention_mask, hidden_states, past: int):
    """Scores (B, H, T, S), v (B, H, S, Dh) -> gated context (B, T, H, Dh) and the
    probabilities, for the attention input ``hidden_states`` (B, T, D); every class."""
    a, point, t = self.qtx_attention, _points(self), hidden_states.shape[1]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = attention_probs(scores, a, allowed, _sink(self)).to(v.dtype)
    probs = point("softmax")(probs)
    dropped = nn.functional.dropout(probs, p=self.qtx_dropout, training=self.training)
    context = torch.matmul(dropped, v).transpose(1, 2)  # (B, T, H, Dh)
    gate = self.__dict__.get("qtx_gate")
    if gate is not None:
        if past and a["gate_condition"] == "head" and self.qtx_causal:
            raise ValueError(HEAD_POOLED_CACHE)
        tokens = None if self.qtx_swin else token_mask(attention_mask, t, self.qtx_causal)
        context = context * gate(hidden_states, tokens).to(context.dtype)
    return context, probs


def _attention_forward(self, hidden_states, *args, **kwargs):
    """Replaces the ``forward`` of the encoder and OPT attention modules."""
    kwargs = _call_arguments(self, args, kwargs)
    if kwargs.get("encoder_hidden_states") is not None:
        raise ValueError("qtx attention variants support self-attention only.")
    attention_mask = kwargs.get("attention_mask")
    cache = _cache(kwargs)
    qn, kn, vn, on = self.qtx_names
    point = _points(self)
    b, t, _ = hidden_states.shape
    h, dh = self.qtx_heads, self.qtx_head_dim
    # q, k, v are quantized as (B, T, H, Dh), like qtx's points
    split = lambda y, name: point(name)(y.view(b, -1, h, dh)).transpose(1, 2)  # noqa: E731
    q = split(getattr(self, qn)(hidden_states), "q")
    k = split(getattr(self, kn)(hidden_states), "k")
    v = split(getattr(self, vn)(hidden_states), "v")
    past = 0
    if cache is not None:
        past = cache.get_seq_length(self.layer_idx)
        k, v = cache.update(k, v, self.layer_idx)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(dh)
    if self.qtx_swin:
        scores = scores + self.relative_position_bias()
    scores = point("scores")(scores)
    allowed = allowed_keys(attention_mask, scores, swin=self.qtx_swin)
    context, probs = _normalise(self, scores, v, allowed, attention_mask, hidden_states, past)
    out = point("context")(context).reshape(b, t, h * dh)
    if on is not None:
        out = getattr(self, on)(out)
    return out, probs


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` (B, T, H, Dh) on its first ``R = cos.shape[-1]`` dims (HF's
    ``apply_rotary_pos_emb`` with partial rotation), ``cos`` / ``sin`` (B, T, R)."""
    r = cos.shape[-1]
    cos, sin = cos[:, :, None], sin[:, :, None]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1)


def _causal(t: int, s: int, device) -> torch.Tensor:
    """(1, 1, T, S): the last T of S positions each see themselves and every earlier one."""
    rows = torch.arange(t, device=device)[:, None] + (s - t)
    return (torch.arange(s, device=device)[None, :] <= rows)[None, None]


def _decoder_attention_forward(self, hidden_states, *args, **kwargs):
    """Replaces the ``forward`` of the decoder attention classes (DECODER_ATTENTIONS)."""
    kwargs = _call_arguments(self, args, kwargs)
    attention_mask = kwargs.get("attention_mask")
    cache = _cache(kwargs)
    point = _points(self)
    b, t, _ = hidden_states.shape
    h, kv, dh = self.qtx_heads, self.qtx_kv_heads, self.qtx_head_dim
    q = self.q_proj(hidden_states)
    fused_gate = None
    if self.qtx_fused_gate:  # Qwen3.5: per head [q (Dh), gate logits (Dh)]
        q, fused_gate = torch.chunk(q.view(b, t, h, 2 * dh), 2, dim=-1)
    q = q.reshape(b, t, h, dh)
    k = self.k_proj(hidden_states).view(b, t, kv, dh)
    v = self.v_proj(hidden_states).view(b, t, kv, dh)
    if self.qtx_qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = kwargs["position_embeddings"]
    # q, k (after RoPE), v are quantized as (B, T, heads, Dh), like qtx's points
    q = point("q")(rotary(q, cos, sin)).transpose(1, 2)
    k = point("k")(rotary(k, cos, sin)).transpose(1, 2)
    v = point("v")(v).transpose(1, 2)
    past = 0
    if cache is not None:
        past = cache.get_seq_length(self.layer_idx)
        k, v = cache.update(k, v, self.layer_idx)
    s = k.shape[-2]
    if h != kv:  # grouped-query attention: each key/value head serves h // kv query heads
        k = k[:, :, None].expand(b, kv, h // kv, s, dh).reshape(b, h, s, dh)
        v = v[:, :, None].expand(b, kv, h // kv, s, dh).reshape(b, h, s, dh)
    scores = point("scores")(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(dh))
    allowed = allowed_keys(attention_mask, scores)
    if allowed is None and t > 1:
        allowed = _causal(t, s, scores.device)
    context, probs = _normalise(self, scores, v, allowed, attention_mask, hidden_states, past)
    if fused_gate is not None:
        context = context * self.qtx_fused_gate(fused_gate).to(context.dtype)
    if self.qtx_online_hadamard:
        context = online_hadamard(context.reshape(b, t, h * dh)).reshape(b, t, h, dh)
    out = point("context")(context).reshape(b, t, h * dh)
    return self.o_proj(out), probs


class FusedGate:
    """Qwen3.5's output gate: ``sigmoid(logits)`` (divided by ``pi_init`` when fine-tuning)."""

    def __init__(self, a: dict):
        self.a = a

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        pi = torch.sigmoid(logits.float())
        return pi / self.a["pi_init"] if self.a["gate_finetune"] else pi


_SUBCLASSES: dict = {}


def _qtx_attention_class(native: type) -> type:
    if native not in _SUBCLASSES:
        decoder = native.__name__ in DECODER_ATTENTIONS
        forward = _decoder_attention_forward if decoder else _attention_forward
        _SUBCLASSES[native] = type("Qtx" + native.__name__, (native,), {"forward": forward})
    return _SUBCLASSES[native]


def _gate_holder(model: nn.Module) -> nn.Module:
    base = getattr(model, model.base_model_prefix, model)
    return base.decoder if isinstance(base, OPTModel) else base


def base_model_type(config) -> str:
    """``bert``, ``roberta``, ``opt``, ``vit``, ``deit``, ``swin`` or a decoder's
    (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``qwen3_5_text``), ``qtx_`` removed."""
    return config.model_type.removeprefix("qtx_")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of ``model`` in layer order (Swin: stage by stage)."""
    return [m for m in _gate_holder(model).modules() if _native_name(m) in ATTENTION_MODULES]


def _native_name(module: nn.Module) -> str:
    name = type(module).__name__  # a qtx attention subclass is named Qtx<native name>
    return name[3:] if name.startswith("Qtx") and name[3:] in ATTENTION_MODULES else name


def _expected_layers(config, family: str) -> int:
    if family == "swin":
        return sum(config.depths)
    layer_types = getattr(config, "layer_types", None) or []
    return config.num_hidden_layers - sum(t == "linear_attention" for t in layer_types)


def _head_shape(m: nn.Module, config, proj: nn.Module) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head dim)`` of the attention module ``m``."""
    if type(m).__name__ in DECODER_ATTENTIONS:
        heads = config.num_attention_heads
        return heads, heads // m.num_key_value_groups, m.head_dim
    heads = getattr(m, "num_attention_heads", None) or m.num_heads
    return heads, heads, proj.out_features // heads


def install_attention(model: nn.Module) -> None:
    """Turns every native self-attention of ``model`` into the configured variant and adds the
    gates (``<holder>.qtx_gates``) and sink logits (``<holder>.qtx_sinks``); parameters of the
    native modules are kept as they are. Does nothing when already installed."""
    config = model.config
    a = attention_settings(config)
    holder = _gate_holder(model)
    modules = attention_modules(model)
    family = base_model_type(config)
    expected = _expected_layers(config, family)
    if len(modules) != expected:
        raise ValueError(f"found {len(modules)} attention modules for {expected} layers.")
    if all(hasattr(m, "qtx_attention") for m in modules):
        return
    rotated = bool(getattr(config, "qtx_online_hadamard", False))
    if rotated and family not in DECODERS:
        raise ValueError(f"qtx_online_hadamard is for decoders, not {family} models.")
    if rotated:  # every down_proj input, before any quantizer hook registered later
        for mlp in holder.modules():
            if isinstance(getattr(mlp, "down_proj", None), nn.Linear):
                mlp.down_proj.register_forward_pre_hook(hadamard_input_hook, with_kwargs=True)
    gates, sinks = [], nn.ParameterList()
    for i, m in enumerate(modules):
        names = ATTENTION_MODULES[type(m).__name__]
        proj = getattr(m, names[0])
        heads, kv_heads, head_dim = _head_shape(m, config, proj)
        dropout = getattr(m, "attention_dropout", None)
        if dropout is None:
            dropout = m.dropout.p if isinstance(m.dropout, nn.Dropout) else m.dropout
        # HF's Qwen3.5 (a native export being quantized): q_proj holds the output gate
        fused = (
            type(m).__name__ in FUSED_GATE_ATTENTIONS and proj.out_features == 2 * heads * head_dim
        )
        m.__class__ = _qtx_attention_class(type(m))
        m.qtx_attention, m.qtx_names, m.qtx_index = a, names, i
        m.qtx_heads, m.qtx_kv_heads, m.qtx_head_dim = heads, kv_heads, head_dim
        m.qtx_dropout = float(dropout)
        m.qtx_causal = family == "opt" or family in DECODERS
        m.qtx_swin = family == "swin"
        m.qtx_qk_norm = hasattr(m, "q_norm")
        m.qtx_online_hadamard = rotated
        m.__dict__["qtx_fused_gate"] = FusedGate(a) if fused else None
        if a["gate"] != "none" and not fused:
            gate = AttentionGate(a, proj.in_features, heads, head_dim, m.qtx_causal)
            m.__dict__["qtx_gate"] = gate  # registered once, under holder.qtx_gates
            gates.append(gate)
        if a["softmax"] == "sink":
            sinks.append(nn.Parameter(torch.full((heads,), float(a["sink_init"]))))
            m.__dict__["qtx_sinks"] = sinks  # registered once, as holder.qtx_sinks
    if gates:
        holder.qtx_gates = nn.ModuleList(gates)
    if len(sinks):
        holder.qtx_sinks = sinks


def _register_key_mapping(cls: type, native: type) -> None:
    """Gives ``cls`` the checkpoint key renames transformers applies to ``native``."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:
        return
    mapping = get_checkpoint_conversion_mapping(native.__name__)
    if mapping is None:
        mapping = get_checkpoint_conversion_mapping(native.config_class.model_type)
    if mapping is not None:
        register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)


def _separate_q_proj(model: nn.Module) -> None:
    """Qwen3.5's ``q_proj`` (per head: query rows, then output-gate rows) becomes the query's
    alone: a qtx export keeps the gate, whatever its kind, in ``qtx_gates``."""
    for m in attention_modules(model):
        if type(m).__name__ in FUSED_GATE_ATTENTIONS:
            q = m.q_proj
            m.q_proj = nn.Linear(q.in_features, q.out_features // 2, bias=q.bias is not None)


def _variant(native: type, config_class: type) -> type:
    def __init__(self, config, *args, **kwargs):
        native.__init__(self, config, *args, **kwargs)
        _separate_q_proj(self)
        install_attention(self)

    cls = type(
        "Qtx" + native.__name__,
        (native,),
        {
            "__init__": __init__,
            "__module__": __name__,
            "config_class": config_class,
            # the variants are written for eager attention (they need the probabilities)
            "_supports_sdpa": False,
            "_supports_flash_attn": False,
            "_supports_flex_attn": False,
            "_supports_attention_backend": False,
        },
    )
    _register_key_mapping(cls, native)
    return cls


QtxBertModel = _variant(BertModel, QtxBertConfig)
QtxBertForMaskedLM = _variant(BertForMaskedLM, QtxBertConfig)
QtxBertForSequenceClassification = _variant(BertForSequenceClassification, QtxBertConfig)
QtxRobertaModel = _variant(RobertaModel, QtxRobertaConfig)
QtxRobertaForMaskedLM = _variant(RobertaForMaskedLM, QtxRobertaConfig)
QtxRobertaForSequenceClassification = _variant(RobertaForSequenceClassification, QtxRobertaConfig)
QtxOPTModel = _variant(OPTModel, QtxOPTConfig)
QtxOPTForCausalLM = _variant(OPTForCausalLM, QtxOPTConfig)
QtxViTModel = _variant(ViTModel, QtxViTConfig)
QtxViTForImageClassification = _variant(ViTForImageClassification, QtxViTConfig)
QtxDeiTModel = _variant(DeiTModel, QtxDeiTConfig)
QtxDeiTForImageClassificationWithTeacher = _variant(
    DeiTForImageClassificationWithTeacher, QtxDeiTConfig
)
QtxSwinModel = _variant(SwinModel, QtxSwinConfig)
QtxSwinForImageClassification = _variant(SwinForImageClassification, QtxSwinConfig)
QtxLlamaModel = _variant(LlamaModel, QtxLlamaConfig)
QtxLlamaForCausalLM = _variant(LlamaForCausalLM, QtxLlamaConfig)
QtxMistralModel = _variant(MistralModel, QtxMistralConfig)
QtxMistralForCausalLM = _variant(MistralForCausalLM, QtxMistralConfig)
QtxQwen2Model = _variant(Qwen2Model, QtxQwen2Config)
QtxQwen2ForCausalLM = _variant(Qwen2ForCausalLM, QtxQwen2Config)
QtxQwen3Model = _variant(Qwen3Model, QtxQwen3Config)
QtxQwen3ForCausalLM = _variant(Qwen3ForCausalLM, QtxQwen3Config)
QtxQwen3_5TextModel = _variant(Qwen3_5TextModel, QtxQwen3_5TextConfig)
QtxQwen3_5ForCausalLM = _variant(Qwen3_5ForCausalLM, QtxQwen3_5TextConfig)
