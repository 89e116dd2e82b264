"""Language-model pipelines: tokenize, pack ("group texts"), and mask for MLM.

Packing: documents are tokenized without special tokens and concatenated with a separator
after each (``eos`` for clm, ``sep`` for mlm; falling back to the other when missing), then
cut into blocks. A clm block is ``seq_len`` tokens; an mlm block is ``[CLS] + seq_len-2
tokens + [SEP]``. The tail shorter than a block is dropped.

Batches (ids int32, B = this process's rows):

- clm: ``input_ids`` (B,T), ``attention_mask`` (B,T) ones. The model shifts for the loss.
- mlm: ``input_ids`` (B,T) masked, ``targets`` (B,T) original ids, ``weights`` (B,T) float32
  1.0 where a token was selected, ``attention_mask`` (B,T), ``token_type_ids`` (B,T) zeros.

MLM masking is BERT's: each non-special token is selected with ``mlm_probability``; a
selected token becomes ``[MASK]`` with probability 0.8, a random non-special token with 0.1,
and stays unchanged with 0.1. Training masks are drawn from ``(seed, step)``, eval masks from
a fixed seed and the batch index, calibration masks from ``(seed, batch index)``.

In-memory sources (wikitext2_embedded, wikitext2_local, wikitext2) are tokenized once per
process (``functools.lru_cache``) and the blocks reshuffled each epoch. Other sources stream:
documents (train order shuffled per epoch) are packed on the fly, blocks pass a seeded
shuffle buffer of ``shuffle_buffer`` blocks, and ``train_iterator(start_step=k)`` replays and
discards the first ``k`` global batches (cost: tokenizing ``k * B * T`` tokens; several
million tokens per second per core with a fast tokenizer). Every process reads the full
stream and keeps its rows.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterator

import numpy as np

from qtx.data import batching
from qtx.data.base import Batch, Pipeline, local_rows
from qtx.data.config import IN_MEMORY_LM, DataSpec, resolve_local_dir
from qtx.data.text_sources import (
    WIKITEXT_WORD_LEVEL,
    in_memory_documents,
    mixed_documents,
    text_file_paths,
)
from qtx.data.tokenizers import encode_texts, load_tokenizer, special_token_ids, unk_replacement
from qtx.errors import UserError

DOCS_PER_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class LMTokens:
    """Special ids used for packing and masking."""

    sep: int | None  # appended after every document
    cls: int | None  # first token of an mlm block
    end: int | None  # last token of an mlm block
    mask: int | None
    pad: int
    never_mask: np.ndarray  # (S,) ids never selected for prediction
    replace_pool: np.ndarray  # (V',) ids drawn for the 10% random replacement


def lm_tokens(tokenizer, spec: DataSpec) -> LMTokens:
    """Pick separators for the task; raises naming config.data.tokenizer if one is missing."""
    t = tokenizer
    if spec.task == "clm":
        sep = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id
        cls = end = mask = None
    else:
        sep = t.sep_token_id if t.sep_token_id is not None else t.eos_token_id
        cls = t.cls_token_id if t.cls_token_id is not None else t.bos_token_id
        end, mask = sep, t.mask_token_id
        if mask is None or cls is None or end is None:
            raise UserError(
                f"config.data.tokenizer={spec.tokenizer!r} lacks a mask, cls/bos or sep/eos "
                "token, which mlm needs; use 'qtx:wordpiece' or a BERT-style tokenizer."
            )
    pad = t.pad_token_id if t.pad_token_id is not None else sep
    if pad is None:
        raise UserError(
            f"config.data.tokenizer={spec.tokenizer!r} has neither a pad nor an eos token."
        )
    never = np.asarray(sorted(set(t.all_special_ids) | {pad}), np.int32)
    pool = np.setdiff1d(np.arange(len(t), dtype=np.int32), never)
    return LMTokens(sep, cls, end, mask, int(pad), never, pool)


def mask_tokens(
    ids: np.ndarray,
    rng: np.random.Generator,
    rows: slice,
    global_rows: int,
    toks: LMTokens,
    probability: float,
) -> Batch:
    """BERT masking of ``ids`` (n,T), the ``rows`` of a (global_rows,T) batch.

    Random numbers are drawn at the global shape and sliced, so shards agree with the
    global batch. Returns ``input_ids``, ``targets`` (n,T) int32 and ``weights`` (n,T) f32.
    """
    shape = (global_rows, ids.shape[1])
    u_select = rng.random(shape, dtype=np.float32)[rows]
    u_kind = rng.random(shape, dtype=np.float32)[rows]
    pick = rng.integers(0, len(toks.replace_pool), shape)[rows]
    selected = (u_select < probability) & ~np.isin(ids, toks.never_mask)
    inputs = np.where(selected & (u_kind < 0.8), toks.mask, ids)
    random_tok = selected & (u_kind >= 0.8) & (u_kind < 0.9)
    inputs = np.where(random_tok, toks.replace_pool[pick], inputs)
    return {
        "input_ids": inputs.astype(np.int32),
        "targets": ids.astype(np.int32),
        "weights": selected.astype(np.float32),
    }


def _content_len(spec: DataSpec) -> int:
    return spec.seq_len - 2 if spec.task == "mlm" else spec.seq_len


def _wrap(content: np.ndarray, spec: DataSpec, toks: LMTokens) -> np.ndarray:
    """(n, L) content -> (n, seq_len) blocks (adds [CLS]/[SEP] for mlm)."""
    if spec.task != "mlm":
        return content.astype(np.int32)
    n = content.shape[0]
    cls = np.full((n, 1), toks.cls, np.int32)
    end = np.full((n, 1), toks.end, np.int32)
    return np.concatenate([cls, content.astype(np.int32), end], axis=1)


def _lm_batch(ids, spec: DataSpec, toks: LMTokens, rng, rows: slice, global_rows: int) -> Batch:
    """Batch dict for block ids (n,T): clm keys, or mlm keys when ``spec.task == 'mlm'``."""
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": np.ones(ids.shape, np.int32)}
    if spec.task == "mlm":
        batch.update(mask_tokens(ids, rng, rows, global_rows, toks, spec.mlm_probability))
        batch["token_type_ids"] = np.zeros(ids.shape, np.int32)
    return batch


@functools.lru_cache(maxsize=16)
def _token_stream(tok_spec: str, source: str, split: str, local_dir, data_dir, name):
    """All tokens of a split as (N,) int32 plus (D,) end offsets of its documents."""
    tokenizer = load_tokenizer(tok_spec)
    docs = in_memory_documents(source, split, local_dir=local_dir, data_dir=data_dir, name=name)
    swap = unk_replacement(tokenizer) if source in WIKITEXT_WORD_LEVEL else None
    if swap:
        docs = [d.replace("<unk>", swap) for d in docs]
    ids = encode_texts(tokenizer, list(docs))
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
    return flat, np.cumsum(lengths)


def pack_blocks(tokens: np.ndarray, doc_ends: np.ndarray, sep: int | None, length: int):
    """Insert ``sep`` after each document and cut into (n, length) blocks (tail dropped)."""
    if sep is not None:
        tokens = np.insert(tokens, doc_ends, sep)
    n = len(tokens) // length
    return tokens[: n * length].reshape(n, length)


def in_memory_blocks(spec: DataSpec, toks: LMTokens, split: str) -> np.ndarray:
    """(N, seq_len) int32 blocks of the split; train concatenates every source's blocks,
    eval uses the first source only."""
    sources = spec.sources if split == "train" else spec.sources[:1]
    local_dir = resolve_local_dir(spec.local_dir)
    parts = []
    for source in sources:
        flat, ends = _token_stream(
            spec.tokenizer, source, split, str(local_dir), spec.data_dir, spec.name
        )
        parts.append(_wrap(pack_blocks(flat, ends, toks.sep, _content_len(spec)), spec, toks))
    blocks = np.concatenate(parts, axis=0)
    if len(blocks) == 0:
        raise UserError(
            f"config.data.seq_len={spec.seq_len} is longer than the {split} split of "
            f"config.data.name={spec.name!r}."
        )
    return blocks


def stream_blocks(spec: DataSpec, toks: LMTokens, tokenizer, split: str) -> Iterator[np.ndarray]:
    """Packed (seq_len,) blocks of the split; train repeats over epochs forever."""
    length, unk = _content_len(spec), unk_replacement(tokenizer)
    epochs = itertools.count() if split == "train" else [0]
    pending = np.zeros((0,), np.int32)
    for epoch in epochs:
        docs = mixed_documents(spec, split, epoch, unk)
        while chunk := list(itertools.islice(docs, DOCS_PER_CHUNK)):
            pieces = [pending]
            for ids in encode_texts(tokenizer, chunk):
                pieces.append(np.asarray(ids, np.int32))
                if toks.sep is not None:
                    pieces.append(np.asarray([toks.sep], np.int32))
            pending = np.concatenate(pieces)
            n = len(pending) // length
            if n:
                yield from _wrap(pending[: n * length].reshape(n, length), spec, toks)
                pending = pending[n * length :]


def shuffle_buffer(items: Iterator[np.ndarray], size: int, rng: np.random.Generator):
    """Seeded streaming shuffle: keep ``size`` items, emit a random one per new item."""
    buf: list[np.ndarray] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    for j in rng.permutation(len(buf)):
        yield buf[j]


def _batched(blocks: Iterator[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """Stack consecutive blocks into (rows, T) arrays; a final partial batch is yielded."""
    while group := list(itertools.islice(blocks, rows)):
        yield np.stack(group)


def build_lm_pipeline(spec: DataSpec) -> Pipeline:
    """Pipeline for task clm/mlm (see the module docstring)."""
    tokenizer = load_tokenizer(spec.tokenizer)
    toks = lm_tokens(tokenizer, spec)
    if "text_files" in spec.sources:
        text_file_paths(spec)  # fail now, not at the first batch
    B, rows = spec.batch_size, local_rows(spec.batch_size, spec)
    in_memory = all(s in IN_MEMORY_LM for s in spec.sources)

    def eval_batch(ids: np.ndarray, b: int) -> Batch:
        """Padded global eval batch ``b`` from (n<=B_eval,T) blocks, sliced to this process."""
        Be = spec.eval_batch_size
        n = len(ids)
        ids = batching.pad_rows({"x": ids}, Be, {"x": toks.pad})["x"]
        rng = batching.rng_for(batching.EVAL_SEED, batching.EVAL, b)
        batch = _lm_batch(ids, spec, toks, rng, slice(None), Be)
        batch["example_mask"] = (np.arange(Be) < n).astype(np.float32)
        batch["attention_mask"] *= batch["example_mask"][:, None].astype(np.int32)
        if "weights" in batch:
            batch["weights"] *= batch["example_mask"][:, None]
        return batching.local(batch, local_rows(Be, spec))

    def calib_batch(ids: np.ndarray, b: int) -> Batch:
        rng = batching.rng_for(spec.seed, batching.CALIB, 1_000_000 + b)
        batch = _lm_batch(ids, spec, toks, rng, slice(None), len(ids))
        return batching.local(batch, local_rows(len(ids), spec))

    if in_memory:
        train_blocks = in_memory_blocks(spec, toks, "train")
        steps = batching.steps_per_epoch(len(train_blocks), B, f"config.data.name={spec.name!r}")

        def train(start_step: int) -> Iterator[Batch]:
            for step in itertools.count(start_step):
                idx = batching.train_indices(len(train_blocks), B, spec.seed, step)
                rng = batching.rng_for(spec.seed, batching.MLM, step)
                yield _lm_batch(train_blocks[idx[rows]], spec, toks, rng, rows, B)

        def evaluate(limit: int | None) -> Iterator[Batch]:
            blocks = in_memory_blocks(spec, toks, "eval")
            for b, (lo, hi) in enumerate(
                batching.eval_slices(len(blocks), spec.eval_batch_size, limit)
            ):
                yield eval_batch(blocks[lo:hi], b)

        def calib(num: int, size: int) -> list[Batch]:
            idx = batching.calib_indices(len(train_blocks), num * size, spec.seed)
            picks = [idx[b * size : (b + 1) * size] for b in range(num)]
            return [calib_batch(train_blocks[rows_b], b) for b, rows_b in enumerate(picks)]

    else:
        steps = None

        def train_stream() -> Iterator[np.ndarray]:
            rng = batching.rng_for(spec.seed, batching.SHUFFLE, 1_000_000)
            blocks = stream_blocks(spec, toks, tokenizer, "train")
            return _batched(shuffle_buffer(blocks, spec.shuffle_buffer, rng), B)

        def train(start_step: int) -> Iterator[Batch]:
            batches = batching.advance(train_stream(), start_step)
            for step, ids in enumerate(batches, start_step):
                rng = batching.rng_for(spec.seed, batching.MLM, step)
                yield _lm_batch(ids[rows], spec, toks, rng, rows, B)

        def evaluate(limit: int | None) -> Iterator[Batch]:
            batches = _batched(stream_blocks(spec, toks, tokenizer, "eval"), spec.eval_batch_size)
            for b, ids in enumerate(itertools.islice(batches, limit)):
                yield eval_batch(ids, b)

        def calib(num: int, size: int) -> list[Batch]:
            blocks = shuffle_buffer(
                stream_blocks(spec, toks, tokenizer, "train"),
                spec.shuffle_buffer,
                batching.rng_for(spec.seed, batching.CALIB, 1_000_000),
            )
            batches = itertools.islice(_batched(blocks, size), num)
            return [calib_batch(ids, b) for b, ids in enumerate(batches)]

    return Pipeline(
        task=spec.task,
        vocab_size=len(tokenizer),
        pad_id=toks.pad,
        num_classes=None,
        tokenizer=tokenizer,
        special_token_ids=special_token_ids(tokenizer),
        steps_per_epoch=steps,
        spec=spec,
        _train=train,
        _eval=evaluate,
        _calib=calib,
    )
