"""GLUE sentence(-pair) classification pipelines (task ``classification``).

Sources:

- ``glue/<task>``: TFDS ``glue/<task>``; train split ``train``, eval split ``validation``
  (``validation_matched`` for mnli).
- ``sst2_local``: ``<local_dir>/glue/SST-2/{train,dev}.tsv`` (header, then
  ``sentence<TAB>label``).

Rows are encoded once per process with the tokenizer's own special tokens (``[CLS] a [SEP]
b [SEP]`` with token types 0/1 for WordPiece), truncated longest-first and padded to
``glue_max_len`` (default ``seq_len``). Batch: ``input_ids``, ``attention_mask``,
``token_type_ids`` (B,T) int32 and ``label`` (B,) int32, float32 for the stsb regression
(``num_classes`` 1).

``holdout`` n: n train rows (``batching.holdout_split``, the same for every seed) leave
training and calibration and become the eval rows, in place of the dev/validation split.

``length_buckets`` (b_1 < ... < b_K = T): training batches are grouped by real length
(``batching.length_grouped``) and each global batch is trimmed to width W = the smallest
b_k >= its longest real row, before it is sliced to this process's rows, so every process
gets the same (B/p, W). Eval and calibration batches keep width T.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import numpy as np

from qtx.data import batching, tfds_sources
from qtx.data.base import Batch, Pipeline, local_rows
from qtx.data.config import DataSpec, require_local_path, resolve_local_dir
from qtx.data.tokenizers import encode_fixed, load_tokenizer, special_token_ids
from qtx.errors import UserError

# task: (first text field, second text field or None, num_classes, eval split)
GLUE_META = {
    "cola": ("sentence", None, 2, "validation"),
    "sst2": ("sentence", None, 2, "validation"),
    "mrpc": ("sentence1", "sentence2", 2, "validation"),
    "qqp": ("question1", "question2", 2, "validation"),
    "stsb": ("sentence1", "sentence2", 1, "validation"),
    "mnli": ("premise", "hypothesis", 3, "validation_matched"),
    "qnli": ("question", "sentence", 2, "validation"),
    "rte": ("sentence1", "sentence2", 2, "validation"),
}


def glue_task(name: str) -> str:
    """GLUE task of a classification source name (``sst2_local`` -> ``sst2``)."""
    return "sst2" if name == "sst2_local" else name.split("/", 1)[1]


def read_sst2_tsv(path) -> tuple[list[str], np.ndarray]:
    """Sentences and (N,) int32 labels of an SST-2 ``sentence<TAB>label`` file."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:2] != ["sentence", "label"]:
            raise UserError(f"{path} must start with the header 'sentence<TAB>label'.")
        for line in f:
            if not line.strip():
                continue
            text, label = line.rstrip("\n").rsplit("\t", 1)
            texts.append(text.strip())
            labels.append(int(label))
    return texts, np.asarray(labels, np.int32)


def _read_tfds(task: str, split: str, data_dir, name: str):
    a_key, b_key, num_classes, _ = GLUE_META[task]
    ds = tfds_sources.load_split(f"glue/{task}", split, data_dir=data_dir, name=name)
    a, b, labels = [], [], []
    for ex in tfds_sources.as_numpy(ds):
        a.append(ex[a_key].decode("utf-8"))
        if b_key:
            b.append(ex[b_key].decode("utf-8"))
        labels.append(ex["label"])
    dtype = np.float32 if num_classes == 1 else np.int32
    return a, (b or None), np.asarray(labels, dtype)


@functools.lru_cache(maxsize=8)
def encoded_split(name: str, split: str, tok_spec: str, max_len: int, local_dir, data_dir):
    """Encoded rows of one split: dict of (N,T) arrays (int32 ids, int8 masks) + (N,) labels."""
    task = glue_task(name)
    if name == "sst2_local":
        fname = "train.tsv" if split == "train" else "dev.tsv"
        a, labels = read_sst2_tsv(require_local_path(local_dir, name, f"glue/SST-2/{fname}"))
        b = None
    else:
        tfds_split = "train" if split == "train" else GLUE_META[task][3]
        a, b, labels = _read_tfds(task, tfds_split, data_dir, name)
    enc = encode_fixed(load_tokenizer(tok_spec), a, b, max_len)
    return {
        "input_ids": enc["input_ids"].astype(np.int32),
        "attention_mask": enc["attention_mask"].astype(np.int8),
        "token_type_ids": enc["token_type_ids"].astype(np.int8),
        "label": labels,
    }


def _rows(data: dict, idx: np.ndarray, width: int | None = None) -> Batch:
    """Rows ``idx`` of ``data``, the (N,T) arrays cut to their first ``width`` columns."""
    cols = slice(None, width)
    return {
        "input_ids": data["input_ids"][idx, cols],
        "attention_mask": data["attention_mask"][idx, cols].astype(np.int32),
        "token_type_ids": data["token_type_ids"][idx, cols].astype(np.int32),
        "label": data["label"][idx],
    }


def _subset(data: dict, idx: np.ndarray) -> dict:
    return {k: v[idx] for k, v in data.items()}


def _holdout(spec: DataSpec, train: dict) -> tuple[dict, dict | None]:
    """``(train rows, eval rows or None)`` after taking ``config.data.holdout`` rows out."""
    if spec.holdout is None:
        return train, None
    n = len(train["label"])
    if spec.holdout >= n:
        raise UserError(
            f"config.data.holdout={spec.holdout} leaves no training rows of the {n} in the "
            f"train split of {spec.name}; allowed: 1 to {n - 1}."
        )
    kept, held = batching.holdout_split(n, spec.holdout)
    return _subset(train, kept), _subset(train, held)


def build_glue_pipeline(spec: DataSpec) -> Pipeline:
    """Pipeline for task classification (see the module docstring)."""
    task = glue_task(spec.name)
    tokenizer = load_tokenizer(spec.tokenizer)
    if tokenizer.pad_token_id is None:
        raise UserError(
            f"config.data.tokenizer={spec.tokenizer!r} has no pad token, which GLUE rows need."
        )
    max_len = spec.glue_max_len or spec.seq_len
    local_dir = str(resolve_local_dir(spec.local_dir))

    def load(split: str) -> dict:
        return encoded_split(spec.name, split, spec.tokenizer, max_len, local_dir, spec.data_dir)

    train, held = _holdout(spec, load("train"))
    n_train = len(train["label"])
    B, rows = spec.batch_size, local_rows(spec.batch_size, spec)
    steps = batching.steps_per_epoch(n_train, B, f"config.data.name={spec.name!r}")
    fill = {"input_ids": tokenizer.pad_token_id}
    buckets = spec.length_buckets
    if buckets:
        lengths = batching.row_lengths(train["attention_mask"])
        order = batching.length_grouped(lengths, B, spec.seed)
    else:
        order = functools.partial(batching.train_indices, n_train, B, spec.seed)

    def train_iter(start_step: int) -> Iterator[Batch]:
        for step in itertools.count(start_step):
            idx = order(step)
            width = batching.bucket_width(lengths[idx].max(), buckets) if buckets else None
            yield _rows(train, idx[rows], width)

    def evaluate(limit: int | None) -> Iterator[Batch]:
        data = load("eval") if held is None else held
        Be = spec.eval_batch_size
        for lo, hi in batching.eval_slices(len(data["label"]), Be, limit):
            batch = batching.padded_eval_batch(
                lambda idx: _rows(data, idx), np.arange(lo, hi), Be, fill
            )
            yield batching.local(batch, local_rows(Be, spec))

    def calib(num: int, size: int) -> list[Batch]:
        idx = batching.calib_indices(n_train, num * size, spec.seed)
        sl = local_rows(size, spec)
        return [_rows(train, idx[b * size : (b + 1) * size][sl]) for b in range(num)]

    return Pipeline(
        task=spec.task,
        vocab_size=len(tokenizer),
        pad_id=int(tokenizer.pad_token_id),
        num_classes=GLUE_META[task][2],
        tokenizer=tokenizer,
        special_token_ids=special_token_ids(tokenizer),
        steps_per_epoch=steps,
        spec=spec,
        _train=train_iter,
        _eval=evaluate,
        _calib=calib,
    )
