"""Document sources for language-model pre-training (``task`` clm/mlm).

Each source yields documents (``str``) for a split, ``"train"`` or ``"eval"``:

==================== ============================================= ========================
name                 where                                         eval split
==================== ============================================= ========================
wikitext2_embedded   ``assets/wikitext2_{valid,test}.txt.gz``      test (train = valid)
wikitext2_local      ``<local_dir>/wikitext-2/{valid,test}.txt``   test (train = valid)
wikitext2            TFDS ``wikitext/wikitext-2-raw-v1`` [1]_      validation
wikitext103          TFDS ``wikitext/wikitext-103-raw-v1`` [1]_    validation
wikipedia            TFDS ``wikipedia/20230601.en`` (``text``)     last 1% of train
wiki40b              TFDS ``wiki40b/en`` (``text``, markers gone)  validation
text_files           ``config.data.text_files`` glob(s)            1 in 100 docs (CRC32)
==================== ============================================= ========================

.. [1] ``tensorflow-datasets`` 4.9 does not register ``wikitext``; a copy prepared elsewhere
   in ``<data_dir>/wikitext/<config>/<version>/`` is read with ``builder_from_directory``.
   WikiText lines are read in stored order (articles span lines), so only the block
   shuffle buffer randomizes their training order.

The offline WikiText-2 copy has no ``train.txt``, so its validation text is the training
split and its test text the evaluation split. WikiText articles start at a ``' = Title = '``
line; each article is one document.

``text_files``: every file matching the glob(s) (sorted) is read as UTF-8, gunzipped when
its name ends in ``.gz``; documents are separated by blank lines, and one longer than
1,000,000 characters is cut into pieces. Before any compute, :func:`check_text_files`
refuses files whose first 8 KiB are not UTF-8 text (a NUL byte, an invalid sequence, a
broken gzip stream) and files that together hold no non-blank line. A
document goes to the eval split when ``crc32(text) % 100 == 0``, otherwise to train. This
is the way to add BookCorpus, which TFDS lacks: on a machine with network, export the
Hugging Face ``bookcorpus`` dataset to text files with a blank line between books (or
between paragraphs), copy them here, and use ``name="wiki40b+text_files"`` (or
``"wikipedia+text_files"``) with ``text_files="/data/bookcorpus/*.txt"``.
"""

from __future__ import annotations

import codecs
import functools
import glob
import gzip
import io
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from qtx.data import tfds_sources
from qtx.data.config import IN_MEMORY_LM, DataSpec, require_local_path
from qtx.errors import UserError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
MAX_DOC_CHARS = 1_000_000
HOLDOUT_MOD = 100
TEXT_CHECK_BYTES = 8 * 1024  # prefix of each text file checked to be UTF-8 text
TEXT_FILES_ALLOWED = "UTF-8 text files (plain or .gz) with at least one non-blank line"
READ_ERRORS = (OSError, EOFError, zlib.error)  # unreadable file or broken gzip stream
TFDS_TEXT = {
    # name: (tfds name, train split, eval split, keeps line order and regroups articles)
    "wikitext2": ("wikitext/wikitext-2-raw-v1", "train", "validation", True),
    "wikitext103": ("wikitext/wikitext-103-raw-v1", "train", "validation", True),
    "wikipedia": ("wikipedia/20230601.en", "train[:99%]", "train[99%:]", False),
    "wiki40b": ("wiki40b/en", "train", "validation", False),
}
_HEADING = re.compile(r"^ = [^=].* = $")
_WIKI40B_MARKERS = re.compile(r"\n?_START_(?:ARTICLE|SECTION|PARAGRAPH)_\n")


def wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Group WikiText lines into articles (a new one starts at each ``' = Title = '``)."""
    current: list[str] = []
    for line in lines:
        if _HEADING.match(line.rstrip("\n")) and any(s.strip() for s in current):
            yield "".join(current).strip()
            current = []
        current.append(line if line.endswith("\n") else line + "\n")
    if any(s.strip() for s in current):
        yield "".join(current).strip()


def clean_wiki40b(text: str) -> str:
    """Drop wiki40b's ``_START_*_`` markers and turn ``_NEWLINE_`` into newlines."""
    text = _WIKI40B_MARKERS.sub("\n", text).replace("_NEWLINE_", "\n")
    return text.strip()


def open_bytes(path: str) -> BinaryIO:
    """A file's bytes, gunzipped when its name ends in ``.gz``."""
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def open_text(path: str, errors: str = "strict") -> TextIO:
    """A file as UTF-8 text (universal newlines), gunzipped when its name ends in ``.gz``."""
    return io.TextIOWrapper(open_bytes(path), encoding="utf-8", errors=errors)


@functools.lru_cache(maxsize=8)
def _wikitext_file_docs(path: str) -> tuple[str, ...]:
    with open_text(path) as f:
        return tuple(wikitext_articles(f))


WIKITEXT_WORD_LEVEL = ("wikitext2_embedded", "wikitext2_local")


def in_memory_documents(
    source: str, split: str, *, local_dir: str | None, data_dir: str | None, name: str
) -> tuple[str, ...]:
    """All documents of a small source's split, in file order (cached per process)."""
    wiki_split = "valid" if split == "train" else "test"
    if source == "wikitext2_embedded":
        path = ASSETS_DIR / f"wikitext2_{wiki_split}.txt.gz"
        if not path.is_file():
            raise UserError(f"config.data.name={name!r} needs the missing asset {path}.")
        return _wikitext_file_docs(str(path))
    if source == "wikitext2_local":
        path = require_local_path(local_dir, name, f"wikitext-2/{wiki_split}.txt")
        return _wikitext_file_docs(str(path))
    if source == "wikitext2":
        return _tfds_wikitext_docs(data_dir, name, split)
    raise UserError(f"config.data.name source {source!r} is not an in-memory text source.")


@functools.lru_cache(maxsize=4)
def _tfds_wikitext_docs(data_dir: str | None, name: str, split: str) -> tuple[str, ...]:
    tfds_name, train_split, eval_split, _ = TFDS_TEXT["wikitext2"]
    ds = tfds_sources.load_split(
        tfds_name, train_split if split == "train" else eval_split, data_dir=data_dir, name=name
    )
    lines = (ex["text"].decode("utf-8") for ex in tfds_sources.as_numpy(ds))
    return tuple(wikitext_articles(lines))


def _text_file_docs(spec: DataSpec, path: str) -> Iterator[str]:
    """Blank-line-separated documents of one file (long ones cut at MAX_DOC_CHARS).
    Bytes past the checked prefix that are not UTF-8 become U+FFFD."""
    buf: list[str] = []
    size = 0
    try:
        with open_text(path, errors="replace") as f:
            for line in f:
                if not line.strip():
                    if buf:
                        yield "".join(buf).strip()
                    buf, size = [], 0
                    continue
                buf.append(line)
                size += len(line)
                if size >= MAX_DOC_CHARS:
                    yield "".join(buf).strip()
                    buf, size = [], 0
    except READ_ERRORS as e:
        raise _read_problem(spec, path, e) from e
    if buf:
        yield "".join(buf).strip()


def _field(spec: DataSpec) -> str:
    return f"config.data.text_files={list(spec.text_files)!r}"


def _reason(err: BaseException) -> str:
    """An exception's message on one line, without a final period."""
    return " ".join(str(err).split()).rstrip(".") or type(err).__name__


def text_file_paths(spec: DataSpec) -> list[str]:
    """Sorted files matched by ``config.data.text_files`` (``~`` expanded); raises if none."""
    patterns = [os.path.expanduser(p) for p in spec.text_files]
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern, recursive=True)})
    paths = [p for p in paths if Path(p).is_file()]
    if not paths:
        raise UserError(
            f"{_field(spec)} matches no files; give a glob of plain-text files on this machine."
        )
    return paths


def _read_problem(spec: DataSpec, path: str, err: BaseException) -> UserError:
    kind = "a readable gzip file" if path.lower().endswith(".gz") else "a readable file"
    return UserError(
        f"{_field(spec)}: {path} is not {kind} ({_reason(err)}); allowed: {TEXT_FILES_ALLOWED}."
    )


def _text_prefix(spec: DataSpec, path: str) -> tuple[str, bool]:
    """``(text of the first TEXT_CHECK_BYTES after gunzip, whether more follows)``; raises a
    UserError naming the file when those bytes are not UTF-8 text."""
    try:
        with open_bytes(path) as f:
            head = f.read(TEXT_CHECK_BYTES + 1)
    except READ_ERRORS as e:
        raise _read_problem(spec, path, e) from e
    more = len(head) > TEXT_CHECK_BYTES
    head = head[:TEXT_CHECK_BYTES]
    if (nul := head.find(b"\0")) >= 0:
        why = f"is not text (a NUL byte at offset {nul})"
    else:
        try:  # not final when more follows: a character may be cut at the prefix's end
            return codecs.getincrementaldecoder("utf-8")().decode(head, final=not more), more
        except UnicodeDecodeError as e:
            why = f"is not UTF-8 text (an invalid byte at offset {e.start})"
    raise UserError(f"{_field(spec)}: {path} {why}; allowed: {TEXT_FILES_ALLOWED}.")


def _has_non_blank(spec: DataSpec, path: str) -> bool:
    """Whether a file holds a non-whitespace character (read in 1 MiB chunks)."""
    try:
        with open_text(path, errors="replace") as f:
            while chunk := f.read(1 << 20):
                if chunk.strip():
                    return True
    except READ_ERRORS as e:
        raise _read_problem(spec, path, e) from e
    return False


def check_text_files(spec: DataSpec) -> list[str]:
    """The files of ``config.data.text_files``; raises a one-line UserError unless each
    starts with UTF-8 text (its first TEXT_CHECK_BYTES) and together they hold a document."""
    paths = text_file_paths(spec)
    has_text, all_empty = False, True
    longer_blank = []  # files with more than a blank checked prefix
    for path in paths:
        text, more = _text_prefix(spec, path)
        has_text = has_text or bool(text.strip())
        all_empty = all_empty and not text
        if more and not text.strip():
            longer_blank.append(path)
    if has_text or any(_has_non_blank(spec, path) for path in longer_blank):
        return paths
    if len(paths) == 1:
        what = f"{paths[0]} " + ("is empty" if all_empty else "holds only whitespace")
    else:
        what = f"the {len(paths)} files it matches ({paths[0]}, ...) " + (
            "are all empty" if all_empty else "hold only whitespace"
        )
    raise UserError(
        f"{_field(spec)}: {what}, so there is no document; allowed: {TEXT_FILES_ALLOWED}."
    )


def is_holdout(doc: str) -> bool:
    return zlib.crc32(doc.encode("utf-8")) % HOLDOUT_MOD == 0


def text_file_documents(spec: DataSpec, split: str, epoch: int) -> Iterator[str]:
    """Documents of ``config.data.text_files`` for the split (train: files shuffled per
    ``(seed, epoch)``). A train pass without a document raises a UserError, since the
    train stream repeats passes until it has a batch."""
    from qtx.data.batching import SHUFFLE, rng_for

    paths = text_file_paths(spec)
    if split == "train":
        paths = [paths[i] for i in rng_for(spec.seed, SHUFFLE, epoch).permutation(len(paths))]
    want_holdout = split == "eval"
    found = False
    for path in paths:
        for doc in _text_file_docs(spec, path):
            if doc and is_holdout(doc) == want_holdout:
                found = True
                yield doc
    if split == "train" and not found:
        which = paths[0] if len(paths) == 1 else f"the {len(paths)} files it matches"
        raise UserError(
            f"{_field(spec)}: {which} gave no training document (all blank, or every document "
            f"in the 1-in-{HOLDOUT_MOD} eval holdout); allowed: {TEXT_FILES_ALLOWED} outside "
            "that holdout."
        )


def streaming_documents(
    spec: DataSpec, source: str, split: str, epoch: int, unk_as: str | None = None
) -> Iterator[str]:
    """Documents of one source and split; train order is shuffled per ``(seed, epoch)``.
    ``unk_as`` replaces the literal ``<unk>`` of word-level WikiText."""
    from qtx.data.batching import SHUFFLE, rng_for

    if source in IN_MEMORY_LM:
        docs = in_memory_documents(
            source, split, local_dir=spec.local_dir, data_dir=spec.data_dir, name=spec.name
        )
        order = range(len(docs))
        if split == "train":
            order = rng_for(spec.seed, SHUFFLE, epoch).permutation(len(docs))
        swap = unk_as if source in WIKITEXT_WORD_LEVEL else None
        yield from (docs[i].replace("<unk>", swap) if swap else docs[i] for i in order)
        return
    if source == "text_files":
        yield from text_file_documents(spec, split, epoch)
        return
    tfds_name, train_split, eval_split, keep_order = TFDS_TEXT[source]
    shuffle = split == "train" and not keep_order
    ds = tfds_sources.load_split(
        tfds_name,
        train_split if split == "train" else eval_split,
        data_dir=spec.data_dir,
        name=spec.name,
        shuffle_seed=(spec.seed * 1_000_003 + epoch) % (2**31) if shuffle else None,
    )
    texts = (ex["text"].decode("utf-8") for ex in tfds_sources.as_numpy(ds))
    if keep_order:
        yield from wikitext_articles(texts)
    elif source == "wiki40b":
        yield from (t for t in map(clean_wiki40b, texts) if t)
    else:
        yield from (t.strip() for t in texts if t.strip())


def mixed_documents(
    spec: DataSpec, split: str, epoch: int, unk_as: str | None = None
) -> Iterator[str]:
    """Documents of ``config.data.name`` (sources joined by '+').

    Train: round-robin interleave of the sources' documents (one each in turn) until the
    longest runs out; shorter sources drop out when exhausted. Eval: the first source's
    eval split only (so ``wiki40b+text_files`` evaluates on wiki40b validation).
    """
    sources = spec.sources if split == "train" else spec.sources[:1]
    iters = [streaming_documents(spec, s, split, epoch, unk_as) for s in sources]
    while iters:
        alive = []
        for it in iters:
            doc = next(it, None)
            if doc is not None:
                alive.append(it)
                yield doc
        iters = alive
