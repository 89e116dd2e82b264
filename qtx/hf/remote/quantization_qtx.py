"""qtx's fake quantization in PyTorch, from the sidecar an export writes next to the weights.

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    from quantization_qtx import apply_quantization   # (or import it from DIR)
    apply_quantization(model, DIR)                    # now W8A8 as qtx evaluated it

``quantization.json`` lists every quantized point of the qtx model by name
(``layer_3/attn/softmax``, see qtx's ``docs/quantization_points.md``)::

    {"format": "qtx-fake-quant", "version": 1, "model_type": "opt", "pre_ln": true,
     "points": {name: {"kind": "weight" | "act", "bits": b, "scheme": ..., "qmin": ..,
                       "qmax": .., "granularity": ..., "axis": a | null, "dynamic": bool,
                       "min_scale": m, "tensor": "<checkpoint key of a weight>"}}}

and ``quantization.safetensors`` holds ``<name>.scale``, ``<name>.zero_point`` and
``<name>.offset`` of every point that is not dynamic, shaped to broadcast against the tensor
(weights: in the checkpoint's torch layout; activations: in qtx's layout, which is the one
used here; leading singleton axes dropped). A point quantizes ``x`` to::

    q = clip(round((x - offset) / scale) + zero_point, qmin, qmax)
    y = (q - zero_point) * scale + offset

(``zero_point`` is an integer, ``offset`` is 0 except for LSQ+ points; symmetric 1-bit points
are ``y = sign(x) * scale`` with ``sign(0) = 1``). Dynamic points (``current_minmax``) take
``lo = min x``, ``hi = max x`` over the granularity's axes at every call and map them with
the scheme's rule (see ``qparams``). Weights are replaced by their quantized values (a tied
embedding is untied, the LM head keeps the full-precision table as in qtx); activations are
quantized by forward hooks and by qtx's attention forward (``modeling_qtx.py``), for
inference (``model.eval()``, under ``torch.no_grad()``). A weight point with
``"gain_offset": c`` quantizes ``w + c`` and stores ``q(w + c) - c`` (zero-centred RMSNorm
gains, applied as ``1 + w``); the query and gate rows of HF Qwen3.5's fused ``q_proj`` are
the points ``attn/q_proj`` and ``attn/gate/dense``. A rotated model's sidecar states its
rotations (``"rotation"``: the online Hadamard transforms before o_proj and down_proj, which
``modeling_qtx.py`` applies when ``config.qtx_online_hadamard`` is set, and the residual
rotation held by the weights); the model must be the rotated export it was written for.
"""

import json
import os
import re

import torch
from safetensors.torch import load_file
from torch import nn

try:  # loaded by transformers from the export directory, or imported from it directly
    from .modeling_qtx import DECODERS, attention_modules, base_model_type, install_attention
except ImportError:
    from modeling_qtx import DECODERS, attention_modules, base_model_type, install_attention

SIDECAR_JSON = "quantization.json"
SIDECAR_TENSORS = "quantization.safetensors"
ATTENTION_POINTS = ("q", "k", "v", "scores", "softmax", "context")

# qtx module -> candidate module paths, relative to one transformer layer
LAYER_MODULES = {
    "attn/o_proj": (
        "attention.output.dense",
        "self_attn.out_proj",
        "attention.o_proj",
        "self_attn.o_proj",
    ),
    "attn/q_norm": ("self_attn.q_norm",),
    "attn/k_norm": ("self_attn.k_norm",),
    "attn_ln": (
        "attention.output.LayerNorm",
        "self_attn_layer_norm",
        "layernorm_before",
        "input_layernorm",
    ),
    "ffn/fc1": ("intermediate.dense", "fc1", "mlp.fc1"),
    "ffn/fc2": ("output.dense", "fc2", "mlp.fc2"),
    "ffn/gate_proj": ("mlp.gate_proj",),
    "ffn/up_proj": ("mlp.up_proj",),
    "ffn/down_proj": ("mlp.down_proj",),
    "ffn_ln": (
        "output.LayerNorm",
        "final_layer_norm",
        "layernorm_after",
        "post_attention_layernorm",
    ),
}
# qtx module -> candidate module (or parameter) paths, relative to the base model, then to
# the whole model
MODEL_MODULES = {
    "embed/word": ("embeddings.word_embeddings", "decoder.embed_tokens", "embed_tokens"),
    "embed/position": ("embeddings.position_embeddings", "decoder.embed_positions"),
    "embed/token_type": ("embeddings.token_type_embeddings",),
    "embed/patch": ("embeddings.patch_embeddings.projection",),
    "embed/cls": ("embeddings.cls_token",),
    "embed/dist": ("embeddings.distillation_token",),
    "embed/ln": ("embeddings.LayerNorm", "embeddings.norm"),
    "embed/project_in": ("decoder.project_in",),
    "embeddings": ("embeddings",),
    "project_out": ("decoder.project_out",),
    "final_ln": ("decoder.final_layer_norm", "layernorm", "norm"),
    "pooler": ("pooler",),
    "pooler/dense": ("pooler.dense", "classifier.dense"),
    "classifier/dense": ("classifier.out_proj", "classifier", "cls_classifier"),
    "dist_classifier/dense": ("distillation_classifier",),
    "mlm_head/transform": ("cls.predictions.transform.dense", "lm_head.dense"),
    "mlm_head/ln": ("cls.predictions.transform.LayerNorm", "lm_head.layer_norm"),
    "mlm_head/decoder": ("cls.predictions.decoder", "lm_head.decoder"),
    "lm_head": ("lm_head",),
    "stage/merge/ln": ("encoder.layers.{s}.downsample.norm",),
    "stage/merge/reduction": ("encoder.layers.{s}.downsample.reduction",),
}
# activation point -> (qtx module, "input" | "output")
LAYER_SITES = {
    "attn/out": ("attn/o_proj", "output"),
    "ffn/hidden": ("ffn/fc1", "output"),
    "ffn/act": ("ffn/fc2", "input"),
    "ffn/out": ("ffn/fc2", "output"),
}
# the SwiGLU FFN of decoders: down_proj(silu(gate_proj(x)) * up_proj(x))
DECODER_LAYER_SITES = {
    "ffn/gate": ("ffn/gate_proj", "output"),
    "ffn/up": ("ffn/up_proj", "output"),
    "ffn/act": ("ffn/down_proj", "input"),
    "ffn/out": ("ffn/down_proj", "output"),
}
MODEL_SITES = {
    "pooler/in": ("pooler/dense", "input"),
    "classifier/in": ("classifier/dense", "input"),
    "classifier/logits": ("classifier/dense", "output"),
    "dist_classifier/in": ("dist_classifier/dense", "input"),
    "dist_classifier/logits": ("dist_classifier/dense", "output"),
    "mlm_head/act": ("mlm_head/ln", "input"),
    "mlm_head/logits": ("mlm_head/decoder", "output"),
    "lm_head/logits": ("lm_head", "output"),
}


def qparams(lo, hi, p: dict):
    """``(scale, zero_point)`` of the range ``[lo, hi]`` (qtx's ``qparams_from_range``)."""
    qmin, qmax = p["qmin"], p["qmax"]
    if p["scheme"] == "symmetric":
        s = torch.clamp(torch.maximum(lo.abs(), hi.abs()) / qmax, min=p["min_scale"])
        return s, torch.zeros_like(s)
    if p["scheme"] == "unsigned":
        s = torch.clamp(torch.clamp(hi, min=0.0) / qmax, min=p["min_scale"])
        return s, torch.zeros_like(s)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    s = torch.clamp((hi - lo) / (qmax - qmin), min=p["min_scale"])
    return s, torch.clamp(torch.round(-lo / s), qmin, qmax)


def _sign(p: dict) -> bool:
    """A sign-binary point ``sign(x) * scale`` (1 bit, symmetric; unsigned 1 bit is ``{0, 1}``)."""
    return p["bits"] == 1 and p["scheme"] == "symmetric"


def _reduce_axes(x: torch.Tensor, p: dict) -> tuple[int, ...]:
    g, nd = p["granularity"], x.dim()
    if g == "tensor" and _sign(p) and p["kind"] == "act":  # mean|x| per token
        return tuple(range(2, nd)) if nd >= 3 else tuple(range(1, nd))
    if g == "tensor":
        return tuple(range(nd))
    if g == "token":  # one range per row, over the axes from "axis" (default: the last) on
        first = nd - 1 if p.get("axis") is None else p["axis"] % nd
        return tuple(range(first, nd))
    keep = p["axis"] % nd
    return tuple(i for i in range(nd) if i != keep)


class FakeQuant:
    """One point's fake quantizer: ``x`` (any shape) -> same shape and dtype."""

    def __init__(self, name: str, p: dict, tensors: dict):
        self.name, self.p = name, p
        get = lambda what: tensors.get(f"{name}.{what}")  # noqa: E731
        self.scale, self.zero_point, self.offset = get("scale"), get("zero_point"), get("offset")
        if not p["dynamic"] and self.scale is None:
            raise ValueError(f"{SIDECAR_TENSORS} has no {name}.scale.")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p, xf = self.p, x.float()
        if p["dynamic"]:
            axes = _reduce_axes(xf, p)
            if _sign(p):
                scale, zero, offset = xf.abs().mean(dim=axes, keepdim=True), 0.0, 0.0
            else:
                lo, hi = xf.amin(dim=axes, keepdim=True), xf.amax(dim=axes, keepdim=True)
                (scale, zero), offset = qparams(lo, hi, p), 0.0
        else:
            dev = xf.device
            scale, zero, offset = (t.to(dev) for t in (self.scale, self.zero_point, self.offset))
        if _sign(p):
            y = torch.where(xf >= 0, 1.0, -1.0) * scale
        else:
            v = torch.round((xf - offset) / scale)
            y = torch.clamp(v, p["qmin"] - zero, p["qmax"] - zero) * scale + offset
        return y.to(x.dtype)


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def _resolve(roots: list[nn.Module], candidates: tuple[str, ...], what: str, **fmt):
    for path in candidates:
        for root in roots:
            obj = _get(root, path.format(**fmt))
            if obj is not None:
                return obj
    raise ValueError(f"qtx point {what!r} has no module in this model (tried {candidates}).")


def _layer_of(model: nn.Module, attention: nn.Module) -> nn.Module:
    """The transformer layer holding ``attention`` (the nearest ancestor with its LayerNorm)."""
    names = {m: n for n, m in model.named_modules()}
    parts = names[attention].split(".")
    for cut in range(len(parts) - 1, -1, -1):
        layer = model.get_submodule(".".join(parts[:cut]))
        if any(_get(layer, c) is not None for c in LAYER_MODULES["attn_ln"]):
            return layer
    raise ValueError(f"no transformer layer around {names[attention]!r}.")


class _Sites:
    """Where each qtx point of ``model`` lives."""

    def __init__(self, model: nn.Module, sidecar: dict):
        self.family = base_model_type(model.config)
        self.decoder = self.family in DECODERS  # pre-RMSNorm, SwiGLU
        self.model, self.pre_ln = model, sidecar["pre_ln"] or self.decoder
        self.layer_sites = {**LAYER_SITES, **DECODER_LAYER_SITES} if self.decoder else LAYER_SITES
        self.roots = [model.base_model, model]
        self.attention = attention_modules(model)
        self.layers = [_layer_of(model, a) for a in self.attention]
        self.stage_offsets = [0]
        for depth in getattr(model.config, "depths", None) or []:
            self.stage_offsets.append(self.stage_offsets[-1] + depth)

    def split(self, name: str) -> tuple[int | None, dict, str]:
        """``(layer index or None, format fields, rest of the name)``."""
        m = re.fullmatch(r"(?:stage_(\d+)/)?layer_(\d+)/(.+)", name)
        if m:
            stage, j = int(m.group(1) or 0), int(m.group(2))
            i = self.stage_offsets[stage] + j if m.group(1) else j
            if i >= len(self.layers):
                raise ValueError(f"qtx point {name!r}: the model has {len(self.layers)} layers.")
            return i, {}, m.group(3)
        m = re.fullmatch(r"stage_(\d+)/(.+)", name)
        if m:
            return None, {"s": int(m.group(1))}, "stage/" + m.group(2)
        return None, {}, name

    def module(self, name: str, i: int | None, fmt: dict, module: str):
        if i is None:
            if module not in MODEL_MODULES:
                raise ValueError(f"qtx point {name!r}: unknown module {module!r}.")
            return _resolve(self.roots, MODEL_MODULES[module], name, **fmt)
        if module in ("attn/q_proj", "attn/k_proj", "attn/v_proj"):
            a = self.attention[i]
            return getattr(a, a.qtx_names["qkv".index(module[5])])
        if module == "attn/gate/dense":
            return self.attention[i].__dict__["qtx_gate"].dense
        if module not in LAYER_MODULES:
            raise ValueError(f"qtx point {name!r}: unknown module {module!r}.")
        return _resolve([self.layers[i]], LAYER_MODULES[module], name)

    def activation(self, name: str):
        """``(module, site)``, site ``input`` / ``output`` / ``input_inplace`` or an
        attention point."""
        i, fmt, rest = self.split(name)
        if i is not None:
            if rest.startswith("attn/") and rest[5:] in ATTENTION_POINTS:
                return self.attention[i], rest[5:]
            if rest == "residual_attn":
                if self.pre_ln:  # x + Attn(LN(x)): the FFN LayerNorm's input, also the shortcut
                    return self.module(name, i, fmt, "ffn_ln"), "input_inplace"
                return self.module(name, i, fmt, "attn_ln"), "input"
            if rest == "residual_ffn":
                if self.pre_ln:
                    return self.layers[i], "output"
                return self.module(name, i, fmt, "ffn_ln"), "input"
            module, site = self.layer_sites.get(rest, (rest.removesuffix("/out"), "output"))
            return self.module(name, i, fmt, module), site
        if rest == "embed/sum":
            if self.family == "opt" or self.decoder:
                return self.layers[0], "input"
            if self.family in ("vit", "deit"):
                return self.module(name, None, fmt, "embeddings"), "output"
            return self.module(name, None, fmt, "embed/ln"), "input"
        if rest == "pooler/out":
            if self.family == "roberta":  # its classification head's tanh output
                return self.module(name, None, fmt, "classifier/dense"), "input"
            return self.module(name, None, fmt, "pooler"), "output"
        if rest in MODEL_SITES:
            module, site = MODEL_SITES[rest]
            return self.module(name, None, fmt, module), site
        if not rest.endswith("/out"):
            raise ValueError(f"qtx point {name!r} has no place in a {self.family} model.")
        return self.module(name, None, fmt, rest.removesuffix("/out")), "output"

    def weight(self, name: str):
        """``(owner module, attribute, part)`` of a weight point's tensor; ``part`` is None, or
        ``(0 or 1, heads)`` for the query / output-gate rows of HF Qwen3.5's fused ``q_proj``."""
        i, fmt, rest = self.split(name)
        module = rest.removesuffix("/weight")
        if i is not None and module in ("attn/q_proj", "attn/gate/dense"):
            a = self.attention[i]
            if a.__dict__.get("qtx_fused_gate") is not None:
                return a.q_proj, "weight", (int(module == "attn/gate/dense"), a.qtx_heads)
        target = self.module(name, i, fmt, module)
        if isinstance(target, nn.Parameter):  # a bare parameter (positions, class token)
            owner_path = MODEL_MODULES[rest.removesuffix("/weight")]
            for path in owner_path:
                for root in self.roots:
                    if _get(root, path) is target:
                        *parents, attr = path.split(".")
                        return _get(root, ".".join(parents)) if parents else root, attr, None
        return target, "weight", None


def _quantize_weight(owner: nn.Module, attr: str, part, fq: FakeQuant, name: str) -> None:
    """Replaces ``owner.attr`` by its fake-quantized value (only the rows of ``part`` of a
    fused q_proj, viewed (H, 2, Dh, D): per head, query rows then gate rows)."""
    old = getattr(owner, attr).detach()
    new, shape = old.clone(), tuple(fq.p["shape"])
    block = new
    if part is not None:
        which, heads = part
        rows = new.view(heads, 2, -1, old.shape[-1])
        block = rows[:, which].reshape(-1, old.shape[-1])
    if tuple(block.shape) != shape:
        raise ValueError(f"{name}: weight shape {tuple(block.shape)} != {list(shape)}.")
    if part is None:
        offset = fq.p.get("gain_offset", 0.0)  # zero-centred RMSNorm: the gain is 1 + w
        new = fq(block + offset) - offset if offset else fq(block)
    else:
        rows[:, which] = fq(block).view(rows[:, which].shape)
    setattr(owner, attr, nn.Parameter(new, requires_grad=False))


def _first_tensor(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str | None]:
    """The module's tensor input and its keyword (None: the first positional argument)."""
    if args:
        return args[0], None
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return kwargs[key], key
    raise ValueError("a quantized module was called without a tensor input.")


def _hook(module: nn.Module, site: str, fq: FakeQuant) -> None:
    if site == "output":

        def out_hook(mod, args, output):
            if isinstance(output, tuple):
                return (fq(output[0]), *output[1:])
            return fq(output)

        module.register_forward_hook(out_hook)
    elif site == "input":

        def in_hook(mod, args, kwargs):
            x, key = _first_tensor(args, kwargs)
            if key is None:
                return (fq(x), *args[1:]), kwargs
            return args, {**kwargs, key: fq(x)}

        module.register_forward_pre_hook(in_hook, with_kwargs=True)
    else:  # input_inplace: the tensor is also read elsewhere (the pre-LN shortcut)

        def inplace_hook(mod, args, kwargs):
            x, _ = _first_tensor(args, kwargs)
            x.copy_(fq(x))

        module.register_forward_pre_hook(inplace_hook, with_kwargs=True)


def read_sidecar(path: str) -> tuple[dict, dict]:
    """``(quantization.json, quantization.safetensors tensors)`` of an export directory."""
    json_path = os.path.join(path, SIDECAR_JSON)
    if not os.path.exists(json_path):
        raise FileNotFoundError(f"{json_path} does not exist; this export is not quantized.")
    with open(json_path) as f:
        sidecar = json.load(f)
    if sidecar.get("format") != "qtx-fake-quant" or sidecar.get("version") != 1:
        raise ValueError(f"{json_path} is not a version-1 qtx-fake-quant sidecar.")
    tensors_path = os.path.join(path, SIDECAR_TENSORS)
    tensors = load_file(tensors_path) if os.path.exists(tensors_path) else {}
    return sidecar, tensors


@torch.no_grad()
def apply_quantization(model: nn.Module, path: str | None = None) -> list[str]:
    """Fake-quantizes ``model`` (loaded from ``path``, default ``model.name_or_path``) at the
    points of its sidecar; returns their names. Call once, for inference."""
    if getattr(model, "qtx_quantized", False):
        raise ValueError("apply_quantization was already applied to this model.")
    path = path or model.config.name_or_path
    sidecar, tensors = read_sidecar(path)
    if sidecar["model_type"] != base_model_type(model.config):
        raise ValueError(
            f"the sidecar is for a {sidecar['model_type']} model, not "
            f"{base_model_type(model.config)}."
        )
    rotated = bool(getattr(model.config, "qtx_online_hadamard", False))
    if bool(sidecar.get("rotation")) != rotated:
        raise ValueError(
            f"the sidecar is for a {'' if sidecar.get('rotation') else 'not '}rotated model; "
            f"this model's config has qtx_online_hadamard={rotated}."
        )
    install_attention(model)  # qtx's attention forward holds the attention points
    sites = _Sites(model, sidecar)
    # shared inputs (RoBERTa's tanh output is also the classifier input) in qtx's order
    names = sorted(sidecar["points"], key=lambda n: n.endswith("/in"))
    for name in names:
        p = sidecar["points"][name]
        fq = FakeQuant(name, p, tensors)
        if p["kind"] == "weight":
            _quantize_weight(*sites.weight(name), fq, name)
            continue
        module, site = sites.activation(name)
        if site in ATTENTION_POINTS:
            module.__dict__.setdefault("qtx_quant", {})[site] = fq
        else:
            _hook(module, site, fq)
    model.qtx_quantized = True
    return names
