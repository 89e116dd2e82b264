"""One record per model family: everything that differs between BERT, OPT, ViT, Swin, ....

A :class:`Family` holds a family's Flax module, its heads and tasks, how its inputs are built,
its outlier tensors (docs/methods.md §1) and its own config checks. Each record is defined
beside its module (``qtx/models/<family>.py``) and registered in ``qtx/models/registry.py``;
everything else reads the record of ``config.model.family`` through :func:`family_record`, so
adding a family is adding its record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from qtx.errors import UserError
from qtx.nn.transformer import run_layers

if TYPE_CHECKING:
    from qtx.models.config import ModelConfig

# A layer's point: layer_i/... of a plain stack, stage_s/layer_j/... of Swin's stages.
LAYER = r"^(stage_\d+/)?layer_\d+/"


def layer_points(names: str) -> str:
    """Regex of the points ``names`` (``"a|b"``) inside any layer."""
    return LAYER + rf"({names})$"


# the outlier tensors of pre-LN stacks (OPT, ViT): every residual-stream output and the final LN
PRE_LN_OUTLIER_POINTS = (
    layer_points("residual_ffn|ffn/out|ffn_ln/out|attn/out|attn_ln/out"),
    r"^final_ln/out$",
)


def text_inputs(batch: dict) -> dict:
    """``input_ids`` and, when present, ``attention_mask`` of a token batch."""
    inputs = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def text_inputs_with_token_types(batch: dict) -> dict:
    """:func:`text_inputs` plus ``token_type_ids`` when present (BERT's segments)."""
    inputs = text_inputs(batch)
    if "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


def image_inputs(batch: dict) -> dict:
    """``images`` (B, H, W, C) of an image batch."""
    return {"images": batch["image"]}


def text_dummy_inputs(cfg: ModelConfig, batch: int = 2, seq_len: int = 8) -> dict[str, Any]:
    """Token ids (B, min(seq_len, max_positions)) of 2 and an all-ones mask, for ``init``."""
    ids = jnp.full((batch, min(seq_len, cfg.max_positions)), 2, jnp.int32)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}


def image_dummy_inputs(cfg: ModelConfig, batch: int = 2, seq_len: int = 8) -> dict[str, Any]:
    """Zero images (B, image_size, image_size, num_channels), for ``init``."""
    shape = (batch, cfg.image_size, cfg.image_size, cfg.num_channels)
    return {"images": jnp.zeros(shape, jnp.float32)}


def text_tokens(cfg: ModelConfig, seq_len: int) -> int:
    """Tokens of one text example: its length."""
    return seq_len


def causal_layers(cfg, plan, h, token_mask, deterministic, collect, rope=None):
    """The layers of a decoder (``cfg`` a ModelConfig) over ``h`` (B, T, D) with the causal
    mask of the real tokens ``token_mask`` (B, T): ``(h, hidden states or None)`` as
    :func:`qtx.nn.transformer.run_layers`; ``rope``: the rotary tables, if any."""
    t = h.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & token_mask[:, None, None, :]
    return run_layers(
        cfg.block(),
        plan,
        cfg.num_layers,
        h,
        mask,
        token_mask,
        deterministic,
        cfg.remat,
        collect,
        scan=cfg.scan_layers,
        remat_policy=cfg.remat_policy,
        rope=rope,
    )


@dataclasses.dataclass(frozen=True)
class Family:
    """What is specific to one model family (``config.model.family``)."""

    name: str
    module: Any  # the Flax module class, called as module(cfg, plan)
    heads: tuple[str, ...]  # allowed config.model.head values
    tasks: tuple[str, ...]  # the config.task values it runs (qtx.train.losses.TASKS)
    model_inputs: Callable[[dict], dict]  # batch -> keyword inputs of the model call
    dummy_inputs: Callable[..., dict]  # (cfg, batch, seq_len) -> keyword inputs of ``init``
    # outlier statistics (qtx.evaluate.outliers): regexes over point names of the tensors whose
    # kurtosis / inf norm are summarised, and the one the papers' headline inf norm refers to
    kurtosis_points: tuple[str, ...]
    inf_norm_points: tuple[str, ...]
    headline_point: str
    causal: bool = False  # a decoder: position t attends to positions <= t only
    images: bool = False  # reads images (B, H, W, C) instead of token ids
    # gate weight std in fine-tuning mode when unset; None: the gate's own default
    finetune_gate_std: float | None = None
    # post-LN gamma migration (docs/methods.md §2) also folds the embedding LayerNorm
    # ``embed/ln`` into layer 0's attention inputs
    migrate_embed_ln: bool = False
    # keys of the no-op attention mass figure: "special" (special tokens and the first token),
    # "class" (the class token at position 0) or "" (the family has neither: no figure)
    noop_tokens: str = "special"
    # why ``config.model.scan_layers`` cannot be used ("" when it can)
    no_scan: str = ""
    # tokens one example puts through the layers at text length seq_len (FLOP counts);
    # None where they are not counted
    tokens_per_example: Callable[[ModelConfig, int], int] | None = None
    # family-specific validation, check(cfg, bad) with bad(field, allowed) raising the
    # UserError; runs before the shared checks and may normalise fields (object.__setattr__)
    check: Callable[[ModelConfig, Callable[[str, str], Any]], None] | None = None
    # a decoder with ModelConfig's decoder fields (GQA, RoPE, RMSNorm, SwiGLU: qtx.nn.decoder)
    decoder_fields: bool = False
    # quantization presets (qtx.quant.PRESETS) whose rules do not fit the family's points, and
    # why: config.quant.preset and config.eval.setups refuse them
    unfit_presets: tuple[str, ...] = ()
    unfit_presets_reason: str = ""


_FAMILIES: dict[str, Family] = {}


def register(record: Family) -> Family:
    """Adds ``record`` to the families (its name must be new); returns it."""
    if record.name in _FAMILIES:
        raise ValueError(f"model family {record.name!r} is already registered.")
    _FAMILIES[record.name] = record
    return record


def unregister(name: str) -> None:
    """Removes the family ``name`` (tests that register their own)."""
    _FAMILIES.pop(name, None)


def family_names() -> tuple[str, ...]:
    """The registered families, in registration order."""
    return tuple(_FAMILIES)


def family_record(name: str) -> Family:
    """The record of the family ``name``; a UserError naming config.model.family if unknown."""
    if name not in _FAMILIES:
        raise UserError(
            f"config.model.family={name!r} is invalid; allowed: {', '.join(_FAMILIES)}."
        )
    return _FAMILIES[name]


def families_of_task(task: str) -> tuple[str, ...]:
    """The families that run ``task``, in registration order."""
    return tuple(name for name, rec in _FAMILIES.items() if task in rec.tasks)
