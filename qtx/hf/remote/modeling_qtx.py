"""PyTorch modeling code of qtx attention variants, written by qtx into exported directories.

Every class subclasses a Hugging Face model and changes only its self-attention, which computes

    scores = q k^T / sqrt(d_head) (+ Swin's relative position bias), masked
    probs  = softmax variant of ``config.qtx_attention`` (see configuration_qtx.py)
    out    = o_proj( concat_h( pi_h * (probs v)_h ) )       pi: the attention gate, if any

Gates take the attention input x (B, T, D): ``linear`` Linear(d_head -> 1) per head on the
head's slice of x; ``mlp`` / ``mlp_wide`` d_head -> d_head/4 (or d_head) -> 1 with ReLU;
``all_heads_linear`` Linear(D -> H) on x; ``gate_condition`` ``head`` mean-pools the logits
over the real tokens (a running mean over positions <= t in OPT), ``none`` is one learned
logit per head; ``pi = sigmoid(logits)``, divided by ``pi_init`` for fine-tuning gates. The
gate parameters live in ``<base model>.qtx_gates.<layer>`` (OPT: ``<base>.decoder``).

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
    OPTForCausalLM,
    OPTModel,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
    SwinForImageClassification,
    SwinModel,
    ViTForImageClassification,
    ViTModel,
)

try:  # loaded by transformers from the export directory, or imported from it directly
    from .configuration_qtx import (
        QtxBertConfig,
        QtxDeiTConfig,
        QtxOPTConfig,
        QtxRobertaConfig,
        QtxSwinConfig,
        QtxViTConfig,
    )
except ImportError:
    from configuration_qtx import (
        QtxBertConfig,
        QtxDeiTConfig,
        QtxOPTConfig,
        QtxRobertaConfig,
        QtxSwinConfig,
        QtxViTConfig,
    )

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        f"this qtx export needs transformers>=5 (found {transformers.__version__}); "
        "upgrade transformers or re-export the model with the version you have."
    )

# native attention class -> (q, k, v, output projection or None when outside the module)
ATTENTION_MODULES = {
    "BertSelfAttention": ("query", "key", "value", None),
    "RobertaSelfAttention": ("query", "key", "value", None),
    "ViTAttention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "DeiTAttention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "SwinAttention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "OPTAttention": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
SOFTMAXES = ("vanilla", "clipped", "off_by_one")
GATES = ("none", "linear", "mlp", "mlp_wide", "all_heads_linear")
GATE_CONDITIONS = ("token", "head", "none")
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def attention_settings(config) -> dict:
    """``config.qtx_attention`` with defaults, validated (one error naming the field)."""
    a = {
        "softmax": "vanilla",
        "gamma": 0.0,
        "zeta": 1.0,
        "alpha": None,
        "softmax_T": None,
        "gate": "none",
        "gate_condition": "token",
        "pi_init": None,
        "gate_finetune": False,
    }
    a.update(dict(getattr(config, "qtx_attention", None) or {}))
    for field, allowed in (
        ("softmax", SOFTMAXES),
        ("gate", GATES),
        ("gate_condition", GATE_CONDITIONS),
    ):
        if a[field] not in allowed:
            raise ValueError(f"qtx_attention.{field}={a[field]!r}; allowed: {', '.join(allowed)}.")
    if a["gate_finetune"] and not a["pi_init"]:
        raise ValueError("qtx_attention.pi_init must be in (0, 1) when gate_finetune is true.")
    return a


def attention_probs(scores: torch.Tensor, a: dict) -> torch.Tensor:
    """Attention weights of the configured softmax variant, float32 (B, H, T, S)."""
    scores = scores.float()
    if a["softmax"] == "clipped":
        if a["alpha"] is not None:
            gamma, zeta = -a["alpha"] / float(a["softmax_T"] or scores.shape[-1]), 1.0
        else:
            gamma, zeta = a["gamma"], a["zeta"]
        return torch.clip((zeta - gamma) * torch.softmax(scores, dim=-1) + gamma, 0.0, 1.0)
    if a["softmax"] == "off_by_one":
        m = torch.clamp(scores.amax(dim=-1, keepdim=True), min=0.0).detach()
        e = torch.exp(scores - m)
        return e / (torch.exp(-m) + e.sum(dim=-1, keepdim=True))
    return torch.softmax(scores, dim=-1)


class AttentionGate(nn.Module):
    """Gate probabilities ``pi`` (B, T, H), or (B, 1, H) when not token-conditioned."""

    def __init__(self, a: dict, hidden_size: int, num_heads: int, causal: bool):
        super().__init__()
        self.a, self.num_heads, self.causal = a, num_heads, causal
        dh = hidden_size // num_heads
        if a["gate_condition"] == "none":
            self.logit = nn.Parameter(torch.zeros(num_heads))
        elif a["gate"] == "all_heads_linear":
            self.dense = nn.Linear(hidden_size, num_heads)
        elif a["gate"] == "linear":
            self.weight = nn.Parameter(torch.zeros(num_heads, dh))
            self.bias = nn.Parameter(torch.zeros(num_heads))
        else:
            hidden = dh if a["gate"] == "mlp_wide" else max(dh // 4, 1)
            self.hidden_weight = nn.Parameter(torch.zeros(num_heads, dh, hidden))
            self.hidden_bias = nn.Parameter(torch.zeros(num_heads, hidden))
            self.out_weight = nn.Parameter(torch.zeros(num_heads, hidden))
            self.bias = nn.Parameter(torch.zeros(num_heads))

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        a, h = self.a, self.num_heads
        b, t, d = x.shape
        x = x.float()
        if a["gate_condition"] == "none":
            logits = self.logit[None, None, :]
        elif a["gate"] == "all_heads_linear":
            logits = nn.functional.linear(x, self.dense.weight.float(), self.dense.bias.float())
        else:
            xh = x.reshape(b, t, h, d // h)
            if a["gate"] == "linear":
                logits = torch.einsum("bthd,hd->bth", xh, self.weight.float()) + self.bias
            else:
                z = torch.einsum("bthd,hdk->bthk", xh, self.hidden_weight.float())
                z = torch.relu(z + self.hidden_bias)
                logits = torch.einsum("bthk,hk->bth", z, self.out_weight.float()) + self.bias
        if a["gate_condition"] == "head":
            m = x.new_ones(b, t, 1) if token_mask is None else token_mask.float()[..., None]
            if self.causal:
                num, den = torch.cumsum(logits * m, dim=1), torch.cumsum(m, dim=1)
            else:
                num, den = (logits * m).sum(1, keepdim=True), m.sum(1, keepdim=True)
            logits = num / torch.clamp(den, min=1.0)
        pi = torch.sigmoid(logits)
        return pi / a["pi_init"] if a["gate_finetune"] else pi


def _token_mask(mask: torch.Tensor | None, t: int, causal: bool) -> torch.Tensor | None:
    """Real tokens (B, T) from a 4-D attention mask (B, 1, T, S), additive or boolean."""
    if mask is None or mask.dim() != 4:
        return None
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    s = allowed.shape[-1]
    if causal:  # a padded position is masked as a key for every query, itself included
        idx = torch.arange(t, device=mask.device)
        return allowed[:, 0, idx, s - t + idx]
    return allowed[:, 0, 0, :]


def _swin_shift_mask(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Adds Swin's (windows, N, N) shift mask to the scores (B windows, H, N, N)."""
    if attention_mask is None:
        return scores
    windows, n = attention_mask.shape[0], scores.shape[-1]
    mask = attention_mask[None, :, None].expand(scores.shape[0] // windows, -1, -1, -1, -1)
    return scores + mask.reshape(-1, 1, n, n)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _call_arguments(self, args: tuple, kwargs: dict) -> dict:
    """The keyword arguments of a call to the native ``forward`` (positional ones named)."""
    names = list(inspect.signature(type(self).__mro__[1].forward).parameters)[2:]
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _attention_forward(self, hidden_states, *args, **kwargs):
    """Replaces the ``forward`` of the native attention modules listed in ATTENTION_MODULES."""
    kwargs = _call_arguments(self, args, kwargs)
    if kwargs.get("encoder_hidden_states") is not None:
        raise ValueError("qtx attention variants support self-attention only.")
    attention_mask = kwargs.get("attention_mask")
    past_key_values = next(  # the key/value cache; its name changed within transformers 5
        (kwargs[n] for n in CACHE_ARGUMENTS if kwargs.get(n) is not None), None
    )
    a, (qn, kn, vn, on) = self.qtx_attention, self.qtx_names
    quant = self.__dict__.get("qtx_quant", {})  # fake quantizers (quantization_qtx.py)
    point = lambda name: quant.get(name, _identity)  # noqa: E731
    b, t, _ = hidden_states.shape
    h, dh = self.qtx_heads, self.qtx_head_dim
    # q, k, v are quantized as (B, T, H, Dh), like qtx's points
    split = lambda y, name: point(name)(y.view(b, -1, h, dh)).transpose(1, 2)  # noqa: E731
    q = split(getattr(self, qn)(hidden_states), "q")
    k = split(getattr(self, kn)(hidden_states), "k")
    v = split(getattr(self, vn)(hidden_states), "v")
    past = 0
    if past_key_values is not None:
        cache = getattr(past_key_values, "self_attention_cache", past_key_values)
        past = cache.get_seq_length(self.layer_idx)
        k, v = cache.update(k, v, self.layer_idx)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(dh)
    if self.qtx_swin:
        scores = point("scores")(scores + self.relative_position_bias())
        scores = _swin_shift_mask(scores, attention_mask)
    else:
        scores = point("scores")(scores)
        if attention_mask is not None:
            mask = attention_mask[..., : k.shape[-2]]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
    probs = point("softmax")(attention_probs(scores, a).to(q.dtype))
    dropped = nn.functional.dropout(probs, p=self.qtx_dropout, training=self.training)
    context = torch.matmul(dropped, v).transpose(1, 2)  # (B, T, H, Dh)
    gate = self.__dict__.get("qtx_gate")
    if gate is not None:
        if past and a["gate_condition"] == "head" and self.qtx_causal:
            raise ValueError(
                "gate_condition='head' pools the gate over all earlier tokens, which a key/value "
                "cache does not keep; call generate(..., use_cache=False)."
            )
        token_mask = None if self.qtx_swin else _token_mask(attention_mask, t, self.qtx_causal)
        context = context * gate(hidden_states, token_mask)[..., None].to(context.dtype)
    out = point("context")(context).reshape(b, t, h * dh)
    if on is not None:
        out = getattr(self, on)(out)
    return out, probs


_SUBCLASSES: dict = {}


def _qtx_attention_class(native: type) -> type:
    if native not in _SUBCLASSES:
        _SUBCLASSES[native] = type(
            "Qtx" + native.__name__, (native,), {"forward": _attention_forward}
        )
    return _SUBCLASSES[native]


def _gate_holder(model: nn.Module) -> nn.Module:
    base = getattr(model, model.base_model_prefix, model)
    return base.decoder if isinstance(base, OPTModel) else base


def base_model_type(config) -> str:
    """``bert``, ``roberta``, ``opt``, ``vit``, ``deit`` or ``swin`` (``qtx_`` prefix removed)."""
    return config.model_type.removeprefix("qtx_")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of ``model`` in layer order (Swin: stage by stage)."""
    return [m for m in _gate_holder(model).modules() if _native_name(m) in ATTENTION_MODULES]


def _native_name(module: nn.Module) -> str:
    name = type(module).__name__  # a qtx attention subclass is named Qtx<native name>
    return name[3:] if name.startswith("Qtx") and name[3:] in ATTENTION_MODULES else name


def install_attention(model: nn.Module) -> None:
    """Turns every native self-attention of ``model`` into the configured variant and adds the
    gates (``<holder>.qtx_gates``); parameters of the native modules are kept as they are.
    Does nothing when already installed."""
    config = model.config
    a = attention_settings(config)
    holder = _gate_holder(model)
    modules = attention_modules(model)
    depths = getattr(config, "depths", None)
    family = base_model_type(config)
    expected = sum(depths) if family == "swin" else config.num_hidden_layers
    if len(modules) != expected:
        raise ValueError(f"found {len(modules)} attention modules for {expected} layers.")
    if all(hasattr(m, "qtx_attention") for m in modules):
        return
    gates = []
    for m in modules:
        names = ATTENTION_MODULES[type(m).__name__]
        proj = getattr(m, names[0])
        heads = getattr(m, "num_attention_heads", None) or m.num_heads
        dropout = getattr(m, "attention_dropout", None)
        if dropout is None:
            dropout = m.dropout.p if isinstance(m.dropout, nn.Dropout) else m.dropout
        m.__class__ = _qtx_attention_class(type(m))
        m.qtx_attention, m.qtx_names = a, names
        m.qtx_heads, m.qtx_head_dim = heads, proj.out_features // heads
        m.qtx_dropout = float(dropout)
        m.qtx_causal = family == "opt"
        m.qtx_swin = family == "swin"
        if a["gate"] != "none":
            gate = AttentionGate(a, proj.in_features, heads, m.qtx_causal)
            m.__dict__["qtx_gate"] = gate  # registered once, under holder.qtx_gates
            gates.append(gate)
    if gates:
        holder.qtx_gates = nn.ModuleList(gates)


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


def _variant(native: type, config_class: type) -> type:
    def __init__(self, config, *args, **kwargs):
        native.__init__(self, config, *args, **kwargs)
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
