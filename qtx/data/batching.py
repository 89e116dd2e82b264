"""Deterministic batch order, random streams and eval padding shared by all pipelines.

Every random draw is made from ``rng_for(seed, stream, *keys)``, a fresh NumPy generator
seeded by the tuple, so the batch of step ``s`` depends only on ``(seed, s)`` and never on
how many batches were drawn before: resuming at ``start_step=s`` gives the same batches as
an uninterrupted run. Random numbers are drawn at the *global* batch shape and then sliced
to this process's rows, so the shards of all processes concatenate to the global batch.

Repeated augmentation (``repeats`` r > 1, DeiT's RASampler): epoch e's row stream is its
permutation with every entry repeated r times in a row, ``perm[j // r]`` for j < steps * B,
so an epoch still has ``N // B`` steps and sees about N / r distinct images, each r times.
Process k of p then takes the rows ``k, k + p, k + 2p, ...`` of each global batch (the
repeated stream strided over processes), which puts the r copies on different processes.

Length grouping (:func:`length_grouped`, text rows of unequal length): the rows of P = 64
consecutive steps of an epoch (pool q, the same P * B rows :func:`train_indices` gives those
steps) are sorted by length, cut into P batches and visited in an order seeded by
``(seed, q)``, with q counted over all epochs; batches of similar rows can then be trimmed
to a short width (:func:`bucket_width`). An epoch's last pool may hold fewer than P steps.

Holdout (:func:`holdout_split`): the held-out rows are the last n of a permutation seeded
by the constant ``HOLDOUT_SEED``, so every run (any ``seed``) holds out the same rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np

from qtx.errors import UserError

# Stream tags keep independent uses of one seed apart.
PERMUTATION, MLM, AUGMENT, ERASE, CALIB, EVAL, SHUFFLE, RANDAUG, GROUP, HOLDOUT = range(1, 11)
EVAL_SEED = 20_231_028  # fixed: eval masking does not depend on config.data.seed
HOLDOUT_SEED = 20_240_611  # fixed: the held-out rows do not depend on config.data.seed
POOL_STEPS = 64  # steps per length-grouping pool


def rng_for(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """Independent generator for ``(seed, stream, *keys)`` (all non-negative ints)."""
    return np.random.default_rng([int(seed), int(stream), *(int(k) for k in keys)])


def steps_per_epoch(num_examples: int, global_batch: int, what: str) -> int:
    """``num_examples // global_batch``; raises if the split cannot fill one batch."""
    steps = num_examples // global_batch
    if steps == 0:
        raise UserError(
            f"config.data.batch_size={global_batch} exceeds the {num_examples} training "
            f"examples of {what}; lower config.data.batch_size."
        )
    return steps


def train_indices(
    num_examples: int, global_batch: int, seed: int, step: int, repeats: int = 1
) -> np.ndarray:
    """Global row indices (B,) of training step ``step``.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)``; the last partial batch
    of an epoch is dropped, so with ``repeats=1`` every step has ``global_batch`` distinct
    rows. With ``repeats`` r > 1, row j of the epoch is ``perm[j // r]`` (see above).
    """
    spe = steps_per_epoch(num_examples, global_batch, "the dataset")
    epoch, pos = divmod(int(step), spe)
    perm = _epoch_permutation(num_examples, seed, epoch)
    return perm[(pos * global_batch + np.arange(global_batch)) // int(repeats)]


def holdout_split(num_examples: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held)`` sorted row indices, (N - n,) and (n,): ``held`` is the last ``count``
    entries of the permutation seeded by ``HOLDOUT_SEED`` (needs 1 <= count < N)."""
    perm = rng_for(HOLDOUT_SEED, HOLDOUT).permutation(num_examples)
    cut = num_examples - int(count)
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def row_lengths(mask: np.ndarray) -> np.ndarray:
    """(N,) extent of each row of an (N,T) attention mask: 1 + the index of its last nonzero
    entry, 0 for an empty row (the real length of a right-padded row)."""
    nz = np.asarray(mask) != 0
    return np.where(nz.any(1), nz.shape[1] - np.argmax(nz[:, ::-1], axis=1), 0)


def bucket_width(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest of the increasing ``buckets`` that is >= ``length`` (<= buckets[-1])."""
    return int(buckets[int(np.searchsorted(buckets, length))])


def length_grouped(
    lengths: np.ndarray, global_batch: int, seed: int, pool_steps: int = POOL_STEPS
) -> Callable[[int], np.ndarray]:
    """``step -> (B,)`` global row indices with each pool's rows grouped by ``lengths`` (N,).

    Pool q = (epoch, i) covers steps ``[i P, min((i + 1) P, S))`` of the epoch (S steps per
    epoch): their :func:`train_indices` rows sorted by length (stable), cut into batches of
    B and visited in the order ``rng_for(seed, GROUP, q)``, q = epoch * ceil(S / P) + i.
    """
    n, B, P = len(lengths), int(global_batch), int(pool_steps)
    spe = steps_per_epoch(n, B, "the dataset")
    pools = -(-spe // P)
    cache: dict[tuple[int, int], np.ndarray] = {}

    def indices(step: int) -> np.ndarray:
        epoch, pos = divmod(int(step), spe)
        i, j = divmod(pos, P)
        if (epoch, i) not in cache:
            lo, hi = i * P, min((i + 1) * P, spe)
            rows = _epoch_permutation(n, seed, epoch)[lo * B : hi * B]
            rows = rows[np.argsort(lengths[rows], kind="stable")].reshape(hi - lo, B)
            order = rng_for(seed, GROUP, epoch * pools + i).permutation(hi - lo)
            cache.clear()
            cache[(epoch, i)] = rows[order]
        return cache[(epoch, i)][j]

    return indices


def shard_rows(global_batch: int, process_index: int, process_count: int, strided: bool):
    """(B/p,) rows of a global batch kept by process k of p: the block ``[k B/p, (k+1) B/p)``,
    or ``k, k + p, ...`` when ``strided`` (repeated augmentation)."""
    if strided:
        return np.arange(process_index, global_batch, process_count)
    n = global_batch // process_count
    return np.arange(process_index * n, (process_index + 1) * n)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = rng_for(seed, PERMUTATION, epoch).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def calib_indices(num_examples: int, count: int, seed: int) -> np.ndarray:
    """``count`` training row indices (count,) for calibration, in a seeded order."""
    reps = -(-count // num_examples)
    perms = [rng_for(seed, CALIB, r).permutation(num_examples) for r in range(reps)]
    return np.concatenate(perms)[:count]


def eval_slices(num_examples: int, global_batch: int, max_batches: int | None):
    """Yield ``(start, stop)`` row ranges of the eval split in order; the last may be short."""
    num = -(-num_examples // global_batch)
    if max_batches is not None:
        num = min(num, max_batches)
    for b in range(num):
        yield b * global_batch, min((b + 1) * global_batch, num_examples)


def pad_rows(batch: dict[str, np.ndarray], rows: int, fill: dict[str, float]) -> dict:
    """Pad every array of ``batch`` along axis 0 to ``rows`` with ``fill[key]`` (default 0)."""
    out = {}
    for key, arr in batch.items():
        n = arr.shape[0]
        if n == rows:
            out[key] = arr
            continue
        pad = np.full((rows - n,) + arr.shape[1:], fill.get(key, 0), dtype=arr.dtype)
        out[key] = np.concatenate([arr, pad], axis=0)
    return out


def padded_eval_batch(
    make: Callable[[np.ndarray], dict], rows: np.ndarray, global_batch: int, fill: dict
) -> dict:
    """Build the batch for ``rows`` (n <= B), pad it to B and add ``example_mask`` (B,)."""
    batch = pad_rows(make(rows), global_batch, fill)
    mask = np.zeros((global_batch,), np.float32)
    mask[: len(rows)] = 1.0
    batch["example_mask"] = mask
    return batch


def local(batch: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    """This process's rows of a global batch."""
    return {k: v[rows] for k, v in batch.items()}


def advance(it: Iterator, n: int) -> Iterator:
    """Advance ``it`` by ``n`` items (consuming them) and return it."""
    for _ in range(n):
        next(it)
    return it
