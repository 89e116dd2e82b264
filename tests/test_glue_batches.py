"""GLUE batches: config.data.holdout (eval rows taken from train) and length_buckets."""

from __future__ import annotations

import numpy as np
import pytest

from qtx.data import make_pipeline
from qtx.errors import UserError

N_TRAIN, N_DEV, T = 300, 40, 32
WORDS = ("good", "bad", "movie", "the", "a", "film", "plot", "actor", "great", "boring")


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory):
    """``<dir>/glue/SST-2/{train,dev}.tsv`` with unique sentences of 1 to ~40 words."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for fname, prefix, n in (("train.tsv", "r", N_TRAIN), ("dev.tsv", "dev", N_DEV)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            words = rng.choice(WORDS, size=min(int(rng.geometric(0.15)), 40))
            lines.append(f"{prefix}{i} {' '.join(words)}\t{i % 2}")
        (folder / fname).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(root)


def pipe(sst2_dir, _proc=None, **kw):
    cfg = {"name": "sst2_local", "local_dir": sst2_dir, "seq_len": T, "batch_size": 4, **kw}
    return make_pipeline(cfg, task="classification", **(_proc or {}))


def keys(batch) -> list[tuple]:
    """One hashable key per real row: its token ids up to its real length."""
    mask = batch.get("example_mask", np.ones(len(batch["label"])))
    n = batch["attention_mask"].sum(1)
    return [tuple(r[:k]) for r, k, m in zip(batch["input_ids"], n, mask, strict=True) if m]


def rows_of(it, steps: int) -> list[tuple]:
    return [k for _, b in zip(range(steps), it, strict=False) for k in keys(b)]


# ---------------------------------------------------------------- holdout


def test_glue_holdout_eval_rows_come_from_train_only(sst2_dir):
    every = set(keys(pipe(sst2_dir).calib_batches(1, N_TRAIN)[0]))
    assert len(every) == N_TRAIN
    p = pipe(sst2_dir, holdout=40)
    held = [k for b in p.eval_batches() for k in keys(b)]
    assert len(held) == len(set(held)) == 40 and set(held) <= every
    assert p.steps_per_epoch == (N_TRAIN - 40) // 4
    seen = set(rows_of(p.train_iterator(), 2 * p.steps_per_epoch + 3))
    assert len(seen) >= N_TRAIN - 40 - 4 and not seen & set(held)
    assert not set(keys(p.calib_batches(1, N_TRAIN - 40)[0])) & set(held)
    again = [k for b in pipe(sst2_dir, holdout=40, seed=7).eval_batches() for k in keys(b)]
    assert again == held
    dev = [k for b in pipe(sst2_dir).eval_batches() for k in keys(b)]
    assert len(dev) == N_DEV and not set(dev) & every


def test_glue_holdout_errors(sst2_dir):
    with pytest.raises(UserError, match=r"config\.data\.holdout=300 .*allowed: 1 to 299"):
        pipe(sst2_dir, holdout=N_TRAIN)
    with pytest.raises(UserError, match=r"config\.data\.holdout .*sst2_local"):
        make_pipeline({"name": "wikitext2_embedded", "holdout": 5}, task="clm")


def test_digits_holdout_unchanged():
    p = make_pipeline({"name": "digits", "batch_size": 32, "holdout": 100}, task="image")
    assert sum(e["example_mask"].sum() for e in p.eval_batches()) == 100
    assert p.steps_per_epoch == (1797 - 100) // 32


# ---------------------------------------------------------------- length buckets

BUCKETS = (8, 16, 32)


def test_bucket_widths_fit_the_longest_row(sst2_dir):
    p = pipe(sst2_dir, length_buckets=BUCKETS)
    widths = []
    for _, b in zip(range(2 * p.steps_per_epoch), p.train_iterator(), strict=False):
        w, longest = b["input_ids"].shape[1], int(b["attention_mask"].sum(1).max())
        prev = ([0, *BUCKETS])[BUCKETS.index(w)]
        assert prev < longest <= w and all(v.shape[1] == w for k, v in b.items() if k != "label")
        widths.append(w)
    assert np.mean(np.array(widths) < T) > 0.6
    assert all(e["input_ids"].shape[1] == T for e in p.eval_batches())
    assert all(c["input_ids"].shape[1] == T for c in p.calib_batches(2, 8))


def test_bucketed_pool_has_the_unbucketed_rows_and_resumes(sst2_dir):
    p, plain = pipe(sst2_dir, length_buckets=BUCKETS), pipe(sst2_dir)
    spe = p.steps_per_epoch  # 75: pools of 64 and 11 steps
    assert sorted(rows_of(p.train_iterator(), 64)) == sorted(rows_of(plain.train_iterator(), 64))
    tail = sorted(rows_of(p.train_iterator(64), spe - 64))
    assert tail == sorted(rows_of(plain.train_iterator(64), spe - 64))
    assert rows_of(p.train_iterator(), 64) != rows_of(plain.train_iterator(), 64)
    ref = list(zip(range(spe + 70), p.train_iterator(), strict=False))
    for k in (5, 70, spe + 3):
        for (_, a), b in zip(ref[k:], p.train_iterator(k), strict=False):
            assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_bucketed_shards_share_the_global_width(sst2_dir):
    whole = zip(range(20), pipe(sst2_dir, length_buckets=BUCKETS).train_iterator(), strict=False)
    shards = [
        pipe(sst2_dir, length_buckets=BUCKETS, _proc={"process_index": i, "process_count": 2})
        for i in range(2)
    ]
    for (_, ref), *parts in zip(whole, *(s.train_iterator() for s in shards), strict=False):
        for n in ref:
            np.testing.assert_array_equal(np.concatenate([q[n] for q in parts]), ref[n])


@pytest.mark.parametrize(
    "bad", [(8, 16), (16, 8, 32), (0, 32), (8, 8, 32), (8.0, 32), "32", (True, 32)]
)
def test_bad_length_buckets_raise(sst2_dir, bad):
    with pytest.raises(UserError, match=r"config\.data\.length_buckets"):
        pipe(sst2_dir, length_buckets=bad)


def test_length_buckets_need_a_glue_source():
    with pytest.raises(UserError, match=r"config\.data\.length_buckets .*sst2_local"):
        make_pipeline({"name": "digits", "length_buckets": (8, 32)}, task="image")
    p = make_pipeline({"name": "digits", "length_buckets": ()}, task="image")
    assert p.spec.length_buckets == ()
