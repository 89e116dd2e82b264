"""Text files given as ``config.data.text_files``: gzip is read as text, and files that are
not text or hold no document are refused up front with one line."""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qtx.data import make_pipeline
from qtx.data.availability import missing_resources
from qtx.data.config import resolve_spec
from qtx.data.text_sources import TEXT_CHECK_BYTES, check_text_files, is_holdout
from qtx.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = "allowed: UTF-8 text files (plain or .gz) with at least one non-blank line."
PIPE_CFG = {"name": "text_files", "seq_len": 32, "batch_size": 4, "shuffle_buffer": 16}


def spec_for(text_files) -> object:
    return resolve_spec({"name": "text_files", "text_files": text_files}, "clm")


def refusal(text_files) -> str:
    """The one-line message with which the check refuses ``text_files``."""
    with pytest.raises(UserError) as info:
        check_text_files(spec_for(text_files))
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(f"config.data.text_files={[str(text_files)]!r}: ")
    assert line.endswith(ALLOWED)
    return line


def corpus_text(docs: int = 300) -> str:
    rng = np.random.default_rng(0)
    words = "the lobster moved across a sea floor while crabs slept under stones".split()
    paras = [" ".join(rng.choice(words, rng.integers(5, 40))) + f" ({d})." for d in range(docs)]
    return "\n\n".join(paras) + "\n"


@contextlib.contextmanager
def deadline(seconds: int):
    """Raises TimeoutError in this (main) thread after ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- the up-front check


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    assert f"{path} is empty, so there is no document" in refusal(path)


def test_whitespace_only_file_is_refused(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("  \n\n\t \r\n\u3000\n")
    assert f"{path} holds only whitespace" in refusal(path)


def test_blank_files_together_are_refused(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.txt").write_text("\n\n")
    line = refusal(tmp_path / "*.txt")
    assert f"the 2 files it matches ({tmp_path / 'a.txt'}, ...) hold only whitespace" in line


def test_empty_gzip_is_refused(tmp_path):
    path = tmp_path / "empty.txt.gz"
    path.write_bytes(gzip.compress(b""))
    assert f"{path} is empty" in refusal(path)


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    assert f"{path} is not text (a NUL byte at offset 4)" in refusal(path)


def test_invalid_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait\n".encode("latin-1"))
    assert f"{path} is not UTF-8 text (an invalid byte at offset 3)" in refusal(path)


def test_binary_inside_gzip_is_refused(tmp_path):
    path = tmp_path / "data.gz"
    path.write_bytes(gzip.compress(b"text\0\0\0"))
    assert f"{path} is not text (a NUL byte at offset 4)" in refusal(path)


@pytest.mark.parametrize("kind", ["not_gzip", "truncated", "bad_block"])
def test_corrupt_gzip_is_refused(tmp_path, kind):
    packed = gzip.compress(corpus_text(50).encode())
    data = {
        "not_gzip": b"plain text, not gzip\n",
        "truncated": packed[: len(packed) // 2],
        "bad_block": packed[:10] + b"\xff" * 32 + packed[42:],
    }[kind]
    path = tmp_path / f"{kind}.txt.gz"
    path.write_bytes(data)
    assert f"{path} is not a readable gzip file (" in refusal(path)


def test_one_bad_file_among_good_ones_is_named(tmp_path):
    (tmp_path / "a.txt").write_text(corpus_text(5))
    (tmp_path / "b.txt").write_bytes(b"\0" * 10)
    assert f"{tmp_path / 'b.txt'} is not text" in refusal(tmp_path / "*.txt")


def test_character_cut_at_the_checked_prefix_is_text(tmp_path):
    path = tmp_path / "cut.txt"
    head = "a" * (TEXT_CHECK_BYTES - 1) + "é"  # its 2 bytes straddle the prefix's end
    path.write_text(head + " and more text\n")
    assert check_text_files(spec_for(path)) == [str(path)]


def test_invalid_utf8_past_the_checked_prefix_is_not_read(tmp_path):
    path = tmp_path / "tail.txt"
    path.write_bytes(b"x" * TEXT_CHECK_BYTES + b"\xff\0")
    assert check_text_files(spec_for(path)) == [str(path)]


def test_text_after_a_long_blank_prefix_is_found(tmp_path):
    path = tmp_path / "late.txt.gz"
    path.write_bytes(gzip.compress(b"\n" * (3 * TEXT_CHECK_BYTES) + b"a late document\n"))
    assert check_text_files(spec_for(path)) == [str(path)]


def test_empty_file_beside_text_is_accepted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(corpus_text(5).encode()))
    paths = check_text_files(spec_for(str(tmp_path / "*")))
    assert paths == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt.gz")]


def test_missing_resources_runs_the_check(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"config\.data\.text_files=.*empty\.txt is empty"):
        missing_resources(spec_for(path))
    assert missing_resources(spec_for(tmp_path / "none*.txt"))[0].startswith(
        "config.data.text_files="
    )


# ---------------------------------------------------------------- the stream itself


def test_train_stream_without_a_document_raises_instead_of_spinning(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    pipe = make_pipeline({**PIPE_CFG, "text_files": str(path)}, task="clm")
    with deadline(30), pytest.raises(UserError, match=r"gave no training document"):
        next(pipe.train_iterator())


def test_train_stream_of_holdout_documents_only_raises(tmp_path):
    doc = next(f"held out {i}." for i in range(100_000) if is_holdout(f"held out {i}."))
    path = tmp_path / "holdout.txt"
    path.write_text(doc + "\n")
    pipe = make_pipeline({**PIPE_CFG, "text_files": str(path)}, task="clm")
    with deadline(30), pytest.raises(UserError, match=rf"{path} gave no training document"):
        next(pipe.train_iterator())


def test_gzip_trains_like_the_same_plain_text(tmp_path):
    text = corpus_text()
    plain, packed = tmp_path / "corpus.txt", tmp_path / "corpus.txt.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    pipes = [make_pipeline({**PIPE_CFG, "text_files": str(p)}, task="clm") for p in (plain, packed)]
    runs = [[next(it) for _ in range(3)] for it in (p.train_iterator() for p in pipes)]
    for a, b in zip(*runs, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    evals = [list(p.eval_batches()) for p in pipes]
    assert len(evals[0]) == len(evals[1]) > 0
    for a, b in zip(*evals, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


# ---------------------------------------------------------------- the command line


def test_train_on_an_empty_file_exits_at_once_with_one_line(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    start = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/opt125m_gated.py:tiny",
            "--config.data.name=text_files",
            f"--config.data.text_files={path}",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: config.data.text_files={[str(path)]!r}: {path} is empty, so there is no "
        f"document; {ALLOWED}"
    ]
    assert elapsed < 60
    assert not (tmp_path / "run").exists()
