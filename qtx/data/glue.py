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


def _rows(data: dict, idx: np.ndarray) -> Batch:
    return {
        "input_ids": data["input_ids"][idx],
        "attention_mask": data["attention_mask"][idx].astype(np.int32),
        "token_type_ids": data["token_type_ids"][idx].astype(np.int32),
        "label": data["label"][idx],
    }


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

    train = load("train")
    n_train = len(train["label"])
    B, rows = spec.batch_size, local_rows(spec.batch_size, spec)
    steps = batching.steps_per_epoch(n_train, B, f"config.data.name={spec.name!r}")
    fill = {"input_ids": tokenizer.pad_token_id}

    def train_iter(start_step: int) -> Iterator[Batch]:
        for step in itertools.count(start_step):
            yield _rows(train, batching.train_indices(n_train, B, spec.seed, step)[rows])

    def evaluate(limit: int | None) -> Iterator[Batch]:
        data = load("eval")
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
