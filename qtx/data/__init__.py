"""Data layer: tokenizers, offline assets and deterministic sharded input pipelines.

Public API: :func:`make_pipeline` (see ``qtx.data.pipeline`` for tasks, batch keys and
``config.data`` fields), :class:`Pipeline`, :func:`load_tokenizer`.
"""

from qtx.data.base import Pipeline
from qtx.data.config import DEFAULTS
from qtx.data.pipeline import make_pipeline
from qtx.data.tokenizers import load_tokenizer

__all__ = ["DEFAULTS", "Pipeline", "load_tokenizer", "make_pipeline"]
