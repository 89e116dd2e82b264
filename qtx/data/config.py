"""Defaults and validation of ``config.data`` (see ``qtx.data.pipeline`` for the field list).

:func:`resolve_spec` turns a (possibly partial) ``ml_collections.ConfigDict`` into a frozen
:class:`DataSpec` with every default applied, and raises ``ValueError`` with one sentence
naming the offending field before any data is read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qtx.data import randaugment
from qtx.errors import UserError

TASKS = ("clm", "mlm", "classification", "image")
IN_MEMORY_LM = ("wikitext2_embedded", "wikitext2_local", "wikitext2")
STREAMING_LM = ("wikitext103", "wikipedia", "wiki40b", "text_files")
LM_SOURCES = IN_MEMORY_LM + STREAMING_LM
GLUE_TASKS = ("sst2", "mnli", "qnli", "rte", "mrpc", "qqp", "stsb", "cola")
CLASSIFICATION_SOURCES = tuple(f"glue/{t}" for t in GLUE_TASKS) + ("sst2_local",)
IMAGE_SOURCES = ("digits", "mnist_local", "mnist", "cifar10", "imagenette", "imagenet2012")
HOLDOUT_SOURCES = ("digits", "mnist_local") + CLASSIFICATION_SOURCES
ALL_SOURCES = LM_SOURCES + CLASSIFICATION_SOURCES + IMAGE_SOURCES
TASK_SOURCES = {
    "clm": LM_SOURCES,
    "mlm": LM_SOURCES,
    "classification": CLASSIFICATION_SOURCES,
    "image": IMAGE_SOURCES,
}
DEFAULT_NAME = {
    "clm": "wikitext2_embedded",
    "mlm": "wikitext2_embedded",
    "classification": "sst2_local",
    "image": "digits",
}
DEFAULT_TOKENIZER = {"clm": "qtx:bpe", "mlm": "qtx:wordpiece", "classification": "qtx:wordpiece"}
LOCAL_DIR_ENV = "QTX_DATA_DIR"
LOCAL_DIR_CANDIDATES = ("../shared/data", "../../shared/data")

DEFAULTS: dict[str, Any] = {
    "name": None,
    "tokenizer": None,
    "seq_len": 128,
    "batch_size": 16,
    "eval_batch_size": None,
    "seed": 0,
    "mlm_probability": 0.15,
    "local_dir": None,
    "data_dir": None,
    "text_files": None,
    "max_eval_batches": None,
    "shuffle_buffer": 10_000,
    "image_size": None,
    "channels": None,
    "crop_scale": None,
    "crop_pct": None,
    "hflip": None,
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
    "mix_switch_prob": 0.5,
    "label_smoothing": 0.0,
    "random_erase": 0.0,
    "randaugment": "",
    "repeated_aug": 1,
    "glue_max_len": None,
    "holdout": None,
    "length_buckets": (),
}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """``config.data`` with defaults applied, plus the task and process layout."""

    task: str
    name: str
    sources: tuple[str, ...]
    tokenizer: str | None
    seq_len: int
    batch_size: int
    eval_batch_size: int
    seed: int
    mlm_probability: float
    local_dir: str | None
    data_dir: str | None
    text_files: tuple[str, ...]
    max_eval_batches: int | None
    shuffle_buffer: int
    image_size: int | None
    channels: int | None
    crop_scale: tuple[float, float] | None
    crop_pct: float | None
    hflip: bool | None
    mixup_alpha: float
    cutmix_alpha: float
    mix_switch_prob: float
    label_smoothing: float
    random_erase: float
    randaugment: str
    repeated_aug: int
    glue_max_len: int | None
    holdout: int | None
    length_buckets: tuple[int, ...]
    process_index: int
    process_count: int

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def _fail(field: str, allowed: str, value: Any) -> None:
    raise UserError(f"config.data.{field} must be {allowed}; got {value!r}.")


def _int(cfg: dict, field: str, lo: int, optional: bool = False) -> int | None:
    v = cfg[field]
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        _fail(field, f"an integer >= {lo}" + (" or None" if optional else ""), v)
    return int(v)


def _float(cfg: dict, field: str, lo: float, hi: float, *, lo_open=False, hi_open=False) -> float:
    v = cfg[field]
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    if ok:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        _fail(field, f"a number in {lb}{lo}, {hi}{rb}", v)
    return float(v)


def _as_dict(data_cfg: Any) -> dict:
    if data_cfg is None:
        return {}
    if hasattr(data_cfg, "to_dict"):
        return dict(data_cfg.to_dict())
    if isinstance(data_cfg, Mapping):
        return dict(data_cfg)
    raise UserError(f"config.data must be an ml_collections.ConfigDict; got {type(data_cfg)}.")


def _check_name(name: Any, task: str) -> tuple[str, ...]:
    allowed = TASK_SOURCES[task]
    if not isinstance(name, str) or not name:
        _fail("name", f"one of {', '.join(allowed)}", name)
    parts = tuple(p.strip() for p in name.split("+"))
    for part in parts:
        if part not in ALL_SOURCES:
            _fail("name", f"one of {', '.join(ALL_SOURCES)} (text sources joined by '+')", name)
        if part not in allowed:
            raise UserError(
                f"config.data.name={name!r} does not fit task {task!r}, whose sources are "
                f"{', '.join(allowed)}."
            )
    if len(parts) > 1 and (task not in ("clm", "mlm") or len(set(parts)) != len(parts)):
        _fail("name", "a single source, or distinct text sources joined by '+' for clm/mlm", name)
    return parts


_HOLDOUT_NAMES = "digits, mnist_local, glue/<task> and sst2_local"


def _buckets(value: Any, name: str, padded: int) -> tuple[int, ...]:
    """``config.data.length_buckets`` as a tuple; () (off) unless a GLUE source is named."""
    if value is None or (isinstance(value, tuple | list) and not value):
        return ()
    if name not in CLASSIFICATION_SOURCES:
        _fail("length_buckets", f"() for {name!r} (only glue/<task> and sst2_local bucket)", value)
    ok = isinstance(value, tuple | list) and all(
        isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in value
    )
    ok = ok and all(a < b for a, b in zip(value[:-1], value[1:], strict=True))
    if not ok or value[-1] != padded:
        _fail(
            "length_buckets",
            f"() or strictly increasing positive integers ending at the padded row length "
            f"{padded} (glue_max_len or seq_len)",
            value,
        )
    return tuple(int(b) for b in value)


def resolve_spec(data_cfg: Any, task: str, process_index: int = 0, process_count: int = 1):
    """Apply defaults and validate; returns a :class:`DataSpec`. Raises ``ValueError``."""
    if task not in TASKS:
        raise UserError(f"make_pipeline(task=...) must be one of {', '.join(TASKS)}; got {task!r}.")
    given = _as_dict(data_cfg)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise UserError(
            f"config.data.{unknown[0]} is not a known field; known fields: {', '.join(DEFAULTS)}."
        )
    cfg = {**DEFAULTS, **given}
    if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
        raise UserError(f"process_count must be an integer >= 1; got {process_count!r}.")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise UserError(f"process_index must be in [0, {process_count}); got {process_index!r}.")
    name = cfg["name"] if cfg["name"] is not None else DEFAULT_NAME[task]
    sources = _check_name(name, task)
    text_task = task != "image"

    tokenizer = cfg["tokenizer"]
    if tokenizer is None and text_task:
        tokenizer = DEFAULT_TOKENIZER[task]
    if tokenizer is not None and (not isinstance(tokenizer, str) or not tokenizer.strip()):
        _fail("tokenizer", "'qtx:bpe', 'qtx:wordpiece', a hub name or a local directory", tokenizer)
    seq_len = _int(cfg, "seq_len", 8)
    batch_size = _int(cfg, "batch_size", 1)
    eval_bs = _int(cfg, "eval_batch_size", 1, optional=True) or batch_size
    for field, value in (("batch_size", batch_size), ("eval_batch_size", eval_bs)):
        if value % process_count:
            raise UserError(
                f"config.data.{field}={value} must be divisible by the process count "
                f"{process_count} (it is the global batch size)."
            )
    seed = cfg["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        _fail("seed", "a non-negative integer", seed)
    mlm_p = _float(cfg, "mlm_probability", 0.0, 1.0, lo_open=True, hi_open=True)

    text_files = cfg["text_files"]
    if isinstance(text_files, str | os.PathLike):
        text_files = (str(text_files),)
    elif text_files is not None:
        if not all(isinstance(t, str | os.PathLike) for t in text_files):
            _fail("text_files", "a glob string or a list of glob strings", text_files)
        text_files = tuple(str(t) for t in text_files)
    if "text_files" in sources and not text_files:
        _fail("text_files", "a glob of text files when config.data.name uses text_files", None)
    if text_files and "text_files" not in sources:
        if not text_task or task == "classification":
            _fail("text_files", f"None for task {task!r} (they feed clm/mlm only)", text_files)
        # given text files are mixed into the LM sources (the papers' BookCorpus + Wikipedia)
        sources = (*sources, "text_files")
    for field in ("local_dir", "data_dir"):
        if cfg[field] is not None and not isinstance(cfg[field], str | os.PathLike):
            _fail(field, "a directory path or None", cfg[field])

    crop_scale = cfg["crop_scale"]
    if crop_scale is not None:
        try:
            lo, hi = (float(x) for x in crop_scale)
        except (TypeError, ValueError):
            lo, hi = -1.0, -1.0
        if not 0 < lo <= hi <= 1:
            _fail("crop_scale", "a pair (lo, hi) with 0 < lo <= hi <= 1, or None", crop_scale)
        crop_scale = (lo, hi)
    crop_pct = cfg["crop_pct"]
    if crop_pct is not None:
        crop_pct = _float(cfg, "crop_pct", 0.0, 1.0, lo_open=True)
    if cfg["channels"] not in (None, 1, 3) or isinstance(cfg["channels"], bool):
        _fail("channels", "1, 3 or None (the source's own)", cfg["channels"])
    if cfg["hflip"] is not None and not isinstance(cfg["hflip"], bool):
        _fail("hflip", "True, False or None (the dataset default)", cfg["hflip"])
    randaugment.parse(cfg["randaugment"])  # raises naming config.data.randaugment
    holdout = _int(cfg, "holdout", 1, optional=True)
    if holdout is not None and not (set(sources) & set(HOLDOUT_SOURCES)):
        _fail("holdout", f"None for {name!r} (an integer >= 1 only for {_HOLDOUT_NAMES})", holdout)
    glue_max_len = _int(cfg, "glue_max_len", 8, optional=True)
    length_buckets = _buckets(cfg["length_buckets"], name, glue_max_len or seq_len)

    return DataSpec(
        task=task,
        name=name,
        sources=sources,
        tokenizer=tokenizer if text_task else None,
        seq_len=seq_len,
        batch_size=batch_size,
        eval_batch_size=eval_bs,
        seed=seed,
        mlm_probability=mlm_p,
        local_dir=str(cfg["local_dir"]) if cfg["local_dir"] is not None else None,
        data_dir=str(cfg["data_dir"]) if cfg["data_dir"] else None,
        text_files=text_files or (),
        max_eval_batches=_int(cfg, "max_eval_batches", 1, optional=True),
        shuffle_buffer=_int(cfg, "shuffle_buffer", 1),
        image_size=_int(cfg, "image_size", 1, optional=True),
        channels=cfg["channels"],
        crop_scale=crop_scale,
        crop_pct=crop_pct,
        hflip=cfg["hflip"],
        mixup_alpha=_float(cfg, "mixup_alpha", 0.0, 1e6),
        cutmix_alpha=_float(cfg, "cutmix_alpha", 0.0, 1e6),
        mix_switch_prob=_float(cfg, "mix_switch_prob", 0.0, 1.0),
        label_smoothing=_float(cfg, "label_smoothing", 0.0, 1.0, hi_open=True),
        random_erase=_float(cfg, "random_erase", 0.0, 1.0),
        randaugment=cfg["randaugment"] or "",
        repeated_aug=_int(cfg, "repeated_aug", 1),
        glue_max_len=glue_max_len,
        holdout=holdout,
        length_buckets=length_buckets,
        process_index=process_index,
        process_count=process_count,
    )


def resolve_local_dir(local_dir: str | None) -> Path | None:
    """``config.data.local_dir``, else ``$QTX_DATA_DIR``, else the first existing of
    ``../shared/data`` and ``../../shared/data`` (relative to the cwd), else None."""
    if local_dir:
        return Path(local_dir)
    if os.environ.get(LOCAL_DIR_ENV):
        return Path(os.environ[LOCAL_DIR_ENV])
    for cand in LOCAL_DIR_CANDIDATES:
        path = Path.cwd() / cand
        if path.is_dir():
            return path.resolve()
    return None


def require_local_path(local_dir: str | None, name: str, relative: str) -> Path:
    """``<local_dir>/<relative>``; raises a config error naming ``config.data.local_dir``."""
    root = resolve_local_dir(local_dir)
    if root is None:
        raise UserError(
            f"config.data.name={name!r} reads local files but config.data.local_dir is "
            f"unset and neither ${LOCAL_DIR_ENV} nor ../shared/data exists; set "
            "config.data.local_dir to the folder holding them."
        )
    path = root / relative
    if not path.exists():
        raise UserError(
            f"config.data.name={name!r} needs {path}, which does not exist; point "
            "config.data.local_dir at the folder that holds it."
        )
    return path
