"""The :class:`Pipeline` object returned by ``qtx.data.make_pipeline``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from qtx.data.config import DataSpec
from qtx.errors import UserError

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Pipeline:
    """Deterministic, process-sharded batches for one task.

    Attributes:
      task: "clm", "mlm", "classification" or "image".
      vocab_size: ``len(tokenizer)`` for text tasks, else None.
      pad_id: the tokenizer's pad id (text), else None.
      num_classes: classes (1 for the stsb regression), None for LM tasks.
      tokenizer: the ``transformers`` tokenizer, or None for images.
      special_token_ids: (S,) int32 ids of special tokens plus '.' and ',' (empty for images).
      steps_per_epoch: global steps per pass over the training split (None for text streams,
        whose length is unknown until read).
      spec: the resolved ``config.data`` (:class:`qtx.data.config.DataSpec`).

    Every method yields this process's rows ``[pi*B/pc, (pi+1)*B/pc)`` of the global batch.
    """

    task: str
    vocab_size: int | None
    pad_id: int | None
    num_classes: int | None
    tokenizer: Any
    special_token_ids: np.ndarray
    steps_per_epoch: int | None
    spec: DataSpec
    _train: Callable[[int], Iterator[Batch]] = dataclasses.field(repr=False)
    _eval: Callable[[int | None], Iterator[Batch]] = dataclasses.field(repr=False)
    _calib: Callable[[int, int], list[Batch]] = dataclasses.field(repr=False)

    @property
    def batch_size(self) -> int:
        """Global training batch size B."""
        return self.spec.batch_size

    @property
    def local_batch_size(self) -> int:
        """B / process_count: the leading dimension of every yielded array."""
        return self.spec.local_batch_size

    def train_iterator(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches of steps start_step, start_step+1, ...; step s depends only on (seed, s)."""
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise UserError(f"start_step must be a non-negative integer; got {start_step!r}.")
        return self._train(start_step)

    def eval_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """The eval split in a fixed order, in global batches of ``eval_batch_size``.

        The last partial batch is padded (pad ids / zeros) and every eval batch carries
        ``example_mask`` (B_local,) float32, 1 for real rows; padded rows also have zero
        ``attention_mask`` (text) and zero MLM ``weights``. ``max_batches`` (default
        ``config.data.max_eval_batches``) caps the number of batches.
        """
        limit = self.spec.max_eval_batches if max_batches is None else max_batches
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise UserError(f"max_batches must be a positive integer or None; got {limit!r}.")
        if limit is not None and limit < 1:
            raise UserError(f"max_batches must be a positive integer or None; got {limit!r}.")
        return self._eval(limit)

    def calib_batches(self, num_batches: int, batch_size: int) -> list[Batch]:
        """``num_batches`` global batches of ``batch_size`` TRAINING examples (deterministic,
        eval-time preprocessing, fixed MLM masking seed), each sliced to this process."""
        for label, v in (("num_batches", num_batches), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"calib_batches {label} must be a positive integer; got {v!r}.")
        if batch_size % self.spec.process_count:
            raise UserError(
                f"calib_batches batch_size={batch_size} must be divisible by the process "
                f"count {self.spec.process_count}."
            )
        return self._calib(num_batches, batch_size)


def local_rows(global_batch: int, spec: DataSpec) -> slice:
    """This process's rows of a global batch of ``global_batch`` rows."""
    n = global_batch // spec.process_count
    return slice(spec.process_index * n, (spec.process_index + 1) * n)
