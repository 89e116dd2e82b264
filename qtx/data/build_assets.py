"""Regenerate the offline assets shipped in ``qtx/data/assets``.

Run ``python -m qtx.data.build_assets --source DIR [--out DIR]`` where ``DIR`` is laid out
like the shared data folder (``DIR/wikitext-2/{valid,test}.txt``). It writes:

- ``wikitext2_valid.txt.gz`` / ``wikitext2_test.txt.gz``: the WikiText-2 text, gzip with a
  fixed header (mtime 0) so the bytes are reproducible.
- ``qtx_bpe.json``: byte-level BPE, vocab 8192, specials ``<s> <pad> </s> <unk>`` (ids 0-3,
  as in OPT); post-processor ``<s> $A`` / ``<s> $A </s> $B``.
- ``qtx_wordpiece.json``: uncased WordPiece, vocab 8192, specials ``[PAD] [UNK] [CLS] [SEP]
  [MASK]`` (ids 0-4), BERT normalizer and pre-tokenizer, post-processor ``[CLS] $A [SEP]`` and
  ``[CLS] $A [SEP] $B:1 [SEP]:1`` (token type ids 0/1).

Both tokenizers are trained on the WikiText-2 *validation* text only, which is the training
split of the embedded corpus (the test text is the evaluation split). WikiText's literal
``<unk>`` markers are removed from the training text so no merges are spent on them.
Training is single-pass and deterministic for a given input.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from qtx.errors import UserError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
VOCAB_SIZE = 8192
BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_FILE = "qtx_bpe.json"
WORDPIECE_FILE = "qtx_wordpiece.json"
WIKITEXT_FILES = {"valid": "wikitext2_valid.txt.gz", "test": "wikitext2_test.txt.gz"}


def _write_gzip(text: str, path: Path) -> None:
    """Gzip ``text`` (UTF-8) to ``path`` with a fixed header so the output is reproducible."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def _training_lines(text: str) -> list[str]:
    """Non-empty lines of the corpus with WikiText's ``<unk>`` markers removed."""
    lines = (line.replace("<unk>", " ").strip() for line in text.splitlines())
    return [line for line in lines if line]


def train_bpe(lines: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE in the GPT-2/OPT style (no prefix space, no lower-casing)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=BPE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    ids = {t: tok.token_to_id(t) for t in BPE_SPECIALS}
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A </s> $B:1",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
    )
    return tok


def _wordpiece_vocab(lines: list[str], normalizer, vocab_size: int) -> dict[str, int]:
    """Learn a WordPiece vocabulary of exactly ``vocab_size`` entries, deterministically.

    Plain BPE (whose trainer is deterministic, unlike the WordPiece one whose ids depend on
    hash-map order) is trained on BERT-pre-tokenized words marked with a word-start symbol.
    Each learned piece ``\u2581xyz`` becomes the word-initial piece ``xyz`` and each ``xyz``
    without the mark becomes the continuation ``##xyz``. Every character is kept in both forms
    so any word can be spelled, then pieces fill the vocabulary in merge order.
    """
    mark = "\u2581"
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizer
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.BertPreTokenizer(),
            pre_tokenizers.Metaspace(replacement=mark, prepend_scheme="always", split=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + vocab_size // 2, min_frequency=2, show_progress=False
    )
    learner.train_from_iterator(lines, trainer=trainer, length=len(lines))
    learned = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])
    chars = sorted(t for t, _ in learned if len(t) == 1 and t != mark)
    order = list(WORDPIECE_SPECIALS) + chars + ["##" + c for c in chars]
    seen = set(order)
    for piece, _ in learned:
        if len(piece) < 2 or len(order) >= vocab_size:
            continue
        word = piece[1:] if piece.startswith(mark) else "##" + piece
        if mark not in word and word not in seen:
            seen.add(word)
            order.append(word)
    if len(order) < vocab_size:
        raise UserError(f"corpus too small for a WordPiece vocabulary of {vocab_size}")
    return {t: i for i, t in enumerate(order)}


def train_wordpiece(lines: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Uncased WordPiece in the BERT style (see ``_wordpiece_vocab`` for how it is learned)."""
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    vocab = _wordpiece_vocab(lines, normalizer, vocab_size)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(WORDPIECE_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tok


def build(source: str | os.PathLike, out: str | os.PathLike = ASSETS_DIR) -> list[Path]:
    """Write all assets from ``source/wikitext-2`` into ``out``; returns the written paths."""
    src = Path(source) / "wikitext-2"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = {}
    for split in WIKITEXT_FILES:
        path = src / f"{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"missing {path}; --source must contain wikitext-2/{split}.txt")
        texts[split] = path.read_text(encoding="utf-8")
    written = []
    for split, name in WIKITEXT_FILES.items():
        _write_gzip(texts[split], out / name)
        written.append(out / name)
    lines = _training_lines(texts["valid"])
    for trainer_fn, fname in ((train_bpe, BPE_FILE), (train_wordpiece, WORDPIECE_FILE)):
        tok = trainer_fn(lines)
        (out / fname).write_text(tok.to_str(pretty=False), encoding="utf-8")
        written.append(out / fname)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", required=True, help="folder holding wikitext-2/{valid,test}.txt"
    )
    parser.add_argument("--out", default=str(ASSETS_DIR), help="output folder (default: assets)")
    args = parser.parse_args(argv)
    for path in build(args.source, args.out):
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
