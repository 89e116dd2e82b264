"""Loading Hugging Face checkpoints into qtx models.

``load(path)`` reads a local checkpoint directory, builds the :class:`ModelConfig` from its
``config.json`` and copies every tensor into the flax tree. It is strict: a checkpoint key
that maps to nothing, or a model parameter without a checkpoint value, raises ValueError
naming them. The only parameters initialised fresh (by ``model.init``) are

* those an ``attention=`` variant or a quantization ``plan`` adds (gates, LSQ steps), and
* a task head the caller asked for (``head=``) that the checkpoint does not have
  (a warning lists them); the checkpoint's own head is then dropped.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx.errors import UserError
from qtx.hf import io, variants
from qtx.hf.common import Entry, to_ours
from qtx.hf.converter import converter, converter_of_model_type, model_types
from qtx.models.config import ModelConfig, model_config_from_dict
from qtx.models.family import family_record
from qtx.models.registry import build, dummy_inputs
from qtx.quant import QuantPlan


def full_layout(cfg: ModelConfig) -> list[Entry]:
    """The family's layout of ``cfg`` plus the gate parameters of its attention variant."""
    layout = converter(cfg.family).layout(cfg)
    return layout + variants.gate_entries(cfg, layout)


def _hf_config_object(d: dict):
    if converter_of_model_type(str(d.get("model_type"))) is None:
        raise UserError(
            f"Hugging Face model_type={d.get('model_type')!r} is not supported; allowed: "
            f"{', '.join(model_types())}."
        )
    from transformers import AutoConfig

    return AutoConfig.for_model(**d)


def _arch_and_head(c, module, head: str | None) -> tuple[str | None, str]:
    archs = list(getattr(c, "architectures", None) or [])
    arch = archs[0] if archs else None
    owner = getattr(module, "ARCHITECTURE_MODEL_TYPES", {})  # when names don't tell
    allowed = [
        a
        for a in module.ARCHITECTURES
        if (owner[a] == c.model_type if a in owner else a.lower().startswith(c.model_type))
    ]
    if arch is not None and arch not in allowed:
        raise UserError(
            f"architecture {arch!r} is not supported; allowed for model_type "
            f"{c.model_type!r}: {', '.join(allowed)}."
        )
    ckpt_head = module.ARCHITECTURES[arch] if arch else "none"
    return arch, head or ckpt_head


def config_from_hf(hf_config, *, head: str | None = None) -> ModelConfig:
    """ModelConfig of a HF config (``config.json`` dict or ``PretrainedConfig``).

    The family comes from ``model_type`` (:func:`qtx.hf.converter.model_types`), the head from
    ``architectures[0]`` (base models: ``none``) unless ``head`` is given. A qtx export with
    an attention variant (``model_type`` ``qtx_*``) gives its ``qtx_attention``.
    """
    if not isinstance(hf_config, Mapping):  # a transformers PretrainedConfig
        hf_config = hf_config.to_dict()
    d, attention = variants.native_config(hf_config)
    c = _hf_config_object(d)
    module = converter_of_model_type(c.model_type)
    arch, head = _arch_and_head(c, module, head)
    cfg = module.config_from_hf(c, arch, head)
    return cfg if attention is None else cfg.replace(attention=attention)


def _convert(sd: Mapping, cfg: ModelConfig):
    """``(flat params, {path: hf key}, {paths of head entries})`` of the vanilla ``cfg``
    model; raises on checkpoint keys that map to nothing and on parameters left without a
    checkpoint value."""
    module = converter(cfg.family)
    sd, _ = module.canonical(dict(sd), cfg)
    layout = full_layout(cfg)
    if hasattr(module, "unfuse"):  # tensors HF fuses (a q_proj holding the output gate)
        sd = module.unfuse(sd, cfg, layout)
    entries = {e.hf: e for e in layout}
    unknown = sorted(k for k in sd if k not in entries)
    if unknown:
        raise UserError(
            f"checkpoint key(s) {unknown} map to no parameter of the qtx {cfg.family} model "
            f"(head={cfg.head!r}); qtx never drops weights silently."
        )
    missing = sorted(e.hf for e in layout if e.hf not in sd)
    if missing:
        raise UserError(
            f"checkpoint lacks the key(s) {missing} of the qtx {cfg.family} model "
            f"(head={cfg.head!r}); refusing to initialise pretrained weights randomly."
        )
    flat, origin, head = {}, {}, set()
    for key, value in sd.items():
        e = entries[key]
        flat[e.ours] = to_ours(e.kind, value)
        origin[e.ours] = key
        if e.head:
            head.add(e.ours)
    return flat, origin, head


def params_from_hf(family: str, state_dict: Mapping, cfg: ModelConfig) -> dict:
    """Nested flax params of the vanilla ``cfg`` model from a HF state dict (numpy arrays in
    torch layout; base prefixes optional). Every key must map and every parameter must be
    present, else ValueError naming them."""
    conv = converter_of_model_type(family)  # an HF model_type such as deit names its family
    name = conv.MODEL_TYPES[family] if conv is not None else family
    if name != cfg.family:
        raise UserError(f"family={name!r} does not match config.model.family={cfg.family!r}.")
    flat, _, _ = _convert(state_dict, cfg)
    return unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def _shapes(model, cfg: ModelConfig, seed: int):
    inputs = dummy_inputs(cfg, batch=1, seq_len=4)
    return jax.eval_shape(lambda: model.init(jax.random.key(seed), **inputs))


def _check_against(flat, origin, vanilla_shapes, fresh_ok, cfg) -> list:
    """Shape and coverage checks of the converted params against the vanilla model."""
    extra = sorted(origin[p] for p in flat if p not in vanilla_shapes)
    if extra:
        raise UserError(
            f"checkpoint key(s) {extra} have no parameter in the qtx {cfg.family} model "
            f"(head={cfg.head!r})."
        )
    bad = [
        f"{origin[p]} {tuple(v.shape)} -> {'/'.join(p)} {tuple(vanilla_shapes[p].shape)}"
        for p, v in flat.items()
        if tuple(v.shape) != tuple(vanilla_shapes[p].shape)
    ]
    if bad:
        raise UserError(f"checkpoint tensor shape(s) do not match the qtx model: {bad}.")
    missing = [p for p in vanilla_shapes if p not in flat]
    not_ok = sorted("/".join(p) for p in missing if p[0] not in fresh_ok)
    if not_ok:
        raise UserError(
            f"qtx parameter(s) {not_ok} have no value in the checkpoint; refusing to initialise "
            "pretrained weights randomly."
        )
    return sorted("/".join(p) for p in missing)


def load(
    path,
    *,
    head: str | None = None,
    attention: Mapping[str, Any] | None = None,
    plan: QuantPlan | None = None,
    dtype: str = "float32",
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
):
    """Loads a local HF checkpoint dir into ``(model, variables)``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin``.
      head: ``mlm``, ``classification``, ``clm`` or ``none``; default: the checkpoint's.
      attention: AttentionConfig fields (e.g. ``{"gate": "linear", "gate_finetune": True}``);
        parameters the variant adds are initialised by ``model.init``, all others copied.
      plan: quantization plan of the built model. Its learnable steps (LSQ) get
        ``model.init`` placeholders; calibrate and call ``qtx.quant.init_learnable``.
      dtype: compute dtype (``config.model.dtype``); parameters stay float32.
      overrides: further ModelConfig fields (e.g. ``{"dropout": 0.0}``).
      seed: PRNG seed of ``model.init`` for the fresh parameters.
    """
    hf = io.read_config(path)
    ckpt_cfg = config_from_hf(hf)
    module = converter(ckpt_cfg.family)
    sd = io.read_state_dict(path)
    keys, _ = module.canonical(dict(sd), ckpt_cfg)
    if not hf.get("architectures"):  # e.g. a bare config.save_pretrained: the keys tell
        ckpt_cfg = config_from_hf(hf, head=module.infer_head(keys))
        keys, _ = module.canonical(dict(sd), ckpt_cfg)
    ckpt_cfg = module.refine(ckpt_cfg, keys)
    flat, origin, ckpt_head = _convert(sd, ckpt_cfg)

    changes = dict(overrides or {})
    changes.setdefault("dtype", dtype)
    if head is not None:
        changes["head"] = head
    cfg = model_config_from_dict(changes, ckpt_cfg)
    fresh_ok: tuple[str, ...] = ()
    if cfg.head != ckpt_cfg.head:
        head_paths = {e.ours for e in module.layout(cfg) if e.head}
        thrown = sorted(origin[p] for p in flat if p in ckpt_head or p in head_paths)
        flat = {p: v for p, v in flat.items() if p not in ckpt_head and p not in head_paths}
        fresh_ok = module.head_prefixes(cfg)
        if thrown:
            warnings.warn(
                f"head={cfg.head!r}: dropped the checkpoint's head key(s) {thrown}.", stacklevel=2
            )
    stored = cfg.replace(attention=ckpt_cfg.attention)  # the checkpoint's own attention
    vanilla_shapes = flatten_dict(_shapes(build(stored), stored, seed)["params"])
    fresh = _check_against(flat, origin, vanilla_shapes, fresh_ok, cfg)
    if fresh:
        warnings.warn(
            f"head={cfg.head!r}: initialised {fresh} fresh (not in the checkpoint).", stacklevel=2
        )

    if attention is not None:
        cfg = model_config_from_dict({"attention": dict(attention)}, cfg)
    model = build(cfg, plan)
    shapes = _shapes(model, cfg, seed)
    model_paths = set(flatten_dict(shapes["params"]))
    dropped = sorted(origin[p] for p in flat if p not in model_paths)
    if dropped:
        raise UserError(
            f"checkpoint key(s) {dropped} (its attention variant's gates) have no place in the "
            f"model with attention={dict(attention or {})}; keep the checkpoint's gate type."
        )
    needs_init = set(shapes) != {"params"} or model_paths != set(flat)
    if needs_init:
        variables = model.init(jax.random.key(seed), **dummy_inputs(cfg, batch=1, seq_len=4))
        params = flatten_dict(variables["params"])
        for p, v in flat.items():
            params[p] = jnp.asarray(v, params[p].dtype)
        variables = {**variables, "params": unflatten_dict(params)}
    else:
        variables = {"params": unflatten_dict({p: jnp.asarray(v) for p, v in flat.items()})}
    return model, variables


ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "max_positions",
    "type_vocab_size",
    "pre_ln",
    "final_ln",
    "activation",
    "word_embed_proj_dim",
    "position_offset",
    "image_size",
    "patch_size",
    "num_channels",
    "distillation_token",
    "depths",
    "stage_heads",
    "window_size",
    "use_bias",
    "ln_eps",
)


def pretrained_params(path, cfg: ModelConfig) -> dict:
    """The parameters of the checkpoint at ``path`` (its own head) for starting ``cfg``.

    The checkpoint's architecture must equal ``cfg``'s in every field that changes the math:
    the family, :data:`ARCHITECTURE_FIELDS` (shapes, LayerNorm placement and epsilon,
    activation, positions), ``vocab_size`` (equal, not larger: the embedding is not padded)
    and, for RoBERTa, ``pad_token_id`` (it sets the position ids). Any difference is an error
    naming ``config.model.<field>``. The attention variant may differ; heads, gates and
    quantizer parameters are reconciled by :func:`qtx.train.pretrained.merge_pretrained`.
    """
    hf = io.read_config(path)
    ckpt_cfg = config_from_hf(hf)
    module = converter(ckpt_cfg.family)
    sd = io.read_state_dict(path)
    keys, _ = module.canonical(dict(sd), ckpt_cfg)
    if not hf.get("architectures"):
        ckpt_cfg = config_from_hf(hf, head=module.infer_head(keys))
        keys, _ = module.canonical(dict(sd), ckpt_cfg)
    ckpt_cfg = module.refine(ckpt_cfg, keys)
    ours, theirs = cfg.family, ckpt_cfg.family
    if theirs != ours:
        raise UserError(
            f"config.init_from is a {theirs} checkpoint; config.model.name is a {ours} model."
        )
    diffs = [
        f"config.model.{f}={getattr(cfg, f)!r} (checkpoint: {getattr(ckpt_cfg, f)!r})"
        for f in ARCHITECTURE_FIELDS
        if getattr(cfg, f) != getattr(ckpt_cfg, f)
    ]
    if not family_record(ours).images and cfg.vocab_size != ckpt_cfg.vocab_size:
        diffs.append(
            f"config.model.vocab_size={cfg.vocab_size} (checkpoint: {ckpt_cfg.vocab_size})"
        )
    diffs += module.pretrained_problems(cfg, ckpt_cfg)
    if diffs:
        raise UserError(
            f"the checkpoint at {path} has another architecture: " + "; ".join(diffs) + "."
        )
    flat, _, _ = _convert(sd, ckpt_cfg)
    return unflatten_dict({k: np.asarray(v) for k, v in flat.items()})
