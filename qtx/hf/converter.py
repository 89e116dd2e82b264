"""The Hugging Face converter protocol and the registry of converters.

A converter (``qtx/hf/convert_<family>.py``, a module) translates one or more qtx families
(:mod:`qtx.models.family`) to and from the ``transformers`` models of some HF ``model_type``
values: configs both ways, the :class:`~qtx.hf.common.Entry` layout that maps every parameter,
the state-dict clean-ups of loading and what an export cannot represent. Optionally it also
reads the family's original-format (timm) files. :func:`converter` finds the converter of a
family, :func:`converter_of_model_type` that of a ``config.json``.

Optional members (looked up with ``getattr``):

* ``ARCHITECTURE_MODEL_TYPES``: HF architecture -> its model_type, for architectures whose
  names do not start with their model_type (``Qwen3_5ForCausalLM``: ``qwen3_5_text``);
* ``unfuse(sd, cfg, layout)``: the canonical state dict with tensors that HF fuses split into
  the keys of ``layout`` (the full layout, gates included), before the entries are mapped;
* ``fuse(sd, cfg, layout)``: the inverse on export, applied to the canonical torch-layout
  state dict before the base-model prefix is added;
* ``native_attention(cfg)``: True when the HF class itself computes ``cfg``'s attention
  variant (Qwen3.5's output gate), so :func:`qtx.hf.variants.is_variant` needs no remote code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from qtx.errors import UserError
from qtx.hf import convert_bert, convert_llama, convert_opt, convert_swin, convert_vit
from qtx.hf.common import Entry, OriginalFormat
from qtx.models.config import ModelConfig


class Converter(Protocol):
    """What every ``convert_<family>`` module defines."""

    MODEL_TYPES: Mapping[str, str]  # HF model_type -> the qtx family it loads as
    BASE_MODELS: Mapping[str, str]  # HF model_type -> its base model class ("BertModel")
    ARCHITECTURES: Mapping[str, str]  # HF architecture -> qtx head ("BertForMaskedLM": "mlm")
    ORIGINAL_FORMAT: OriginalFormat | None  # the timm-style files it reads, if any

    def config_from_hf(self, c: Any, arch: str | None, head: str) -> ModelConfig:
        """ModelConfig of the ``transformers`` config ``c`` with architecture ``arch``."""

    def refine(self, cfg: ModelConfig, keys) -> ModelConfig:
        """``cfg`` adjusted to what the checkpoint's canonical ``keys`` hold (a pooler)."""

    def infer_head(self, keys) -> str:
        """The head of a checkpoint whose config names no architecture."""

    def canonical(self, sd: dict, cfg: ModelConfig) -> tuple[dict, list[str]]:
        """``(state dict with canonical keys, keys dropped on purpose)``."""

    def layout(self, cfg: ModelConfig) -> list[Entry]:
        """Every parameter of the vanilla ``cfg`` model with its canonical HF key."""

    def head_prefixes(self, cfg: ModelConfig) -> tuple[str, ...]:
        """Top-level modules a new head of ``cfg`` may initialise fresh."""

    def export_problems(self, cfg: ModelConfig) -> list[str]:
        """Settings of ``cfg`` the HF model cannot represent (``config.model.<field>=...``)."""

    def pretrained_problems(self, cfg: ModelConfig, ckpt_cfg: ModelConfig) -> list[str]:
        """Family-specific fields that change the math and differ from the checkpoint's."""

    def architecture(self, cfg: ModelConfig) -> str:
        """The HF architecture of ``cfg`` ("BertForMaskedLM")."""

    def base_prefix(self, cfg: ModelConfig) -> str:
        """The base-model key prefix of ``architecture(cfg)`` ("bert.", "" for base models)."""

    def hf_config(self, cfg: ModelConfig) -> Any:
        """The ``transformers`` config of ``cfg``, with ``architectures``."""


_CONVERTERS: list[Converter] = [convert_bert, convert_opt, convert_vit, convert_swin, convert_llama]


def register(conv: Converter) -> Converter:
    """Adds the converter ``conv`` (its model types must be new); returns it."""
    taken = sorted(set(conv.MODEL_TYPES) & set(model_types()))
    if taken:
        raise ValueError(f"HF model_type(s) {taken} already have a converter.")
    _CONVERTERS.append(conv)
    return conv


def unregister(conv: Converter) -> None:
    """Removes the converter ``conv`` (tests that register their own)."""
    if conv in _CONVERTERS:
        _CONVERTERS.remove(conv)


def converters() -> tuple[Converter, ...]:
    """The registered converters, in registration order."""
    return tuple(_CONVERTERS)


def model_types() -> list[str]:
    """Every HF ``model_type`` some converter reads, sorted."""
    return sorted(mt for c in _CONVERTERS for mt in c.MODEL_TYPES)


def families() -> list[str]:
    """Every qtx family some converter writes, sorted."""
    return sorted({f for c in _CONVERTERS for f in c.MODEL_TYPES.values()})


def converter(name: str) -> Converter:
    """The converter of the qtx family ``name``; a UserError when it has none."""
    for c in _CONVERTERS:
        if name in c.MODEL_TYPES.values():
            return c
    raise UserError(
        f"config.model.family={name!r} has no Hugging Face converter; allowed: "
        f"{', '.join(families())}."
    )


def converter_of_model_type(model_type: str) -> Converter | None:
    """The converter reading HF ``model_type``, or None."""
    return next((c for c in _CONVERTERS if model_type in c.MODEL_TYPES), None)
