"""Tests of qtx.data: tokenizers, packing, MLM masking, determinism, sharding, errors."""

from __future__ import annotations

import gzip
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qtx.data import load_tokenizer, make_pipeline, text, tfds_sources
from qtx.data.batching import train_indices
from qtx.data.config import resolve_local_dir, resolve_spec
from qtx.data.tokenizers import ASSETS_DIR
from qtx.data.vision import load_digits_arrays

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_sst2 = pytest.mark.skipif(
    not (SHARED / "glue" / "SST-2" / "train.tsv").is_file(), reason="shared SST-2 absent"
)
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").is_file(), reason="shared MNIST absent"
)
needs_wikitext = pytest.mark.skipif(
    not (SHARED / "wikitext-2" / "valid.txt").is_file(), reason="shared WikiText-2 absent"
)
LM_CFG = {"seq_len": 128, "batch_size": 16, "eval_batch_size": 16}


def first(pipe, step=0):
    return next(pipe.train_iterator(step))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------- assets and tokenizers


def test_assets_present_and_small():
    for name in ("wikitext2_valid.txt.gz", "wikitext2_test.txt.gz"):
        path = ASSETS_DIR / name
        assert 100_000 < path.stat().st_size < 700_000
        with gzip.open(path, "rt", encoding="utf-8") as f:
            assert " = " in f.read(2000)
    for name in ("qtx_bpe.json", "qtx_wordpiece.json", "LICENSE.md"):
        assert (ASSETS_DIR / name).is_file()
    assert "CC BY-SA 3.0" in (ASSETS_DIR / "LICENSE.md").read_text()


@needs_wikitext
def test_build_assets_reproduces_shipped_files(tmp_path):
    from qtx.data import build_assets

    for path in build_assets.build(SHARED, tmp_path):
        assert path.read_bytes() == (ASSETS_DIR / path.name).read_bytes(), path.name


def test_bpe_tokenizer_roundtrip_and_specials():
    tok = load_tokenizer("qtx:bpe")
    assert len(tok) == 8192
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    text_in = " The lobster , Homarus gammarus , weighs 5 @.@ 6 kg ; naïve café ! <unk>"
    ids = tok(text_in, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text_in
    assert tok("hi")["input_ids"][0] == tok.bos_token_id


def test_wordpiece_tokenizer_roundtrip_and_pairs():
    tok = load_tokenizer("qtx:wordpiece")
    assert len(tok) == 8192
    specials = (tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token)
    assert specials == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    enc = tok("The Quick brown fox.", "It jumped!")
    assert enc["input_ids"][0] == tok.cls_token_id
    assert enc["input_ids"].count(tok.sep_token_id) == 2
    assert set(enc["token_type_ids"]) == {0, 1}
    assert (
        tok.decode(enc["input_ids"], skip_special_tokens=True) == "the quick brown fox. it jumped!"
    )


def test_tokenizer_file_loads_with_transformers_and_local_dir(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS_DIR / "qtx_wordpiece.json"), mask_token="[MASK]"
    )
    assert tok.convert_tokens_to_ids("[MASK]") == 4
    load_tokenizer("qtx:wordpiece").save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again("a b")["input_ids"] == load_tokenizer("qtx:wordpiece")("a b")["input_ids"]


def test_unknown_embedded_tokenizer_names_field():
    with pytest.raises(ValueError, match=r"config\.data\.tokenizer.*qtx:bpe"):
        load_tokenizer("qtx:sentencepiece")


def test_special_token_ids_include_punctuation():
    for spec in ("qtx:bpe", "qtx:wordpiece"):
        pipe_tok = load_tokenizer(spec)
        ids = make_pipeline({"tokenizer": spec, **LM_CFG}, task="clm").special_token_ids
        assert ids.dtype == np.int32
        assert set(pipe_tok.all_special_ids) <= set(ids.tolist())
        for punct in (".", ","):
            assert pipe_tok.convert_tokens_to_ids(punct) in ids


# ---------------------------------------------------------------- language modelling


def test_clm_blocks_exact_length_and_contiguous():
    pipe = make_pipeline(LM_CFG, task="clm")
    batch = first(pipe)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (16, 128) and batch["input_ids"].dtype == np.int32
    assert (batch["attention_mask"] == 1).all()
    spec, tok = pipe.spec, pipe.tokenizer
    blocks = text.in_memory_blocks(spec, text.lm_tokens(tok, spec), "train")
    assert blocks.shape[1] == 128 and pipe.steps_per_epoch == len(blocks) // 16
    flat, ends = text._token_stream(
        spec.tokenizer, "wikitext2_embedded", "train", str(resolve_local_dir(None)), None, spec.name
    )
    stream = np.insert(flat, ends, tok.eos_token_id)
    np.testing.assert_array_equal(blocks.ravel(), stream[: blocks.size])
    rows = {r.tobytes() for r in blocks}
    assert all(r.tobytes() in rows for r in batch["input_ids"])


def test_mlm_batch_format_and_masking_statistics():
    pipe = make_pipeline(LM_CFG, task="mlm")
    tok = pipe.tokenizer
    it = pipe.train_iterator()
    batches = [next(it) for _ in range(50)]
    b = batches[0]
    assert set(b) == {"input_ids", "targets", "weights", "attention_mask", "token_type_ids"}
    assert b["weights"].dtype == np.float32 and (b["token_type_ids"] == 0).all()
    assert (b["targets"][:, 0] == tok.cls_token_id).all()
    assert (b["targets"][:, -1] == tok.sep_token_id).all()
    inp, tgt, w = (
        np.concatenate([x[k] for x in batches]) for k in ("input_ids", "targets", "weights")
    )
    special = np.isin(tgt, tok.all_special_ids)
    assert not w[special].any(), "special tokens must never be selected"
    assert abs(w[~special].mean() - 0.15) < 0.01
    sel = w > 0
    assert (inp[~sel] == tgt[~sel]).all()
    masked = (inp[sel] == tok.mask_token_id).mean()
    unchanged = (inp[sel] == tgt[sel]).mean()
    assert abs(masked - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02
    assert abs(1 - masked - unchanged - 0.1) < 0.02
    spec = pipe.spec
    blocks = text.in_memory_blocks(spec, text.lm_tokens(tok, spec), "train")
    np.testing.assert_array_equal(b["targets"], blocks[train_indices(len(blocks), 16, 0, 0)])


def test_mlm_eval_masking_is_fixed_and_padded():
    cfg = {**LM_CFG, "eval_batch_size": 25}
    a = list(make_pipeline(cfg, task="mlm").eval_batches())
    b = list(make_pipeline({**cfg, "seed": 7}, task="mlm").eval_batches())
    assert len(a) == len(b) > 10
    for x, y in zip(a, b, strict=True):
        assert_same(x, y)
    last = a[-1]
    pad = last["example_mask"] == 0
    assert pad.any() and last["example_mask"].shape == (25,)
    assert (last["weights"][pad] == 0).all() and (last["attention_mask"][pad] == 0).all()
    assert 0.12 < np.mean([x["weights"].mean() for x in a[:-1]]) < 0.16
    assert len(list(make_pipeline(cfg, task="mlm").eval_batches(max_batches=3))) == 3


def test_calibration_uses_training_blocks():
    pipe = make_pipeline(LM_CFG, task="clm")
    spec, toks = pipe.spec, text.lm_tokens(pipe.tokenizer, pipe.spec)
    train_rows = {r.tobytes() for r in text.in_memory_blocks(spec, toks, "train")}
    eval_rows = {r.tobytes() for r in text.in_memory_blocks(spec, toks, "eval")}
    calib = pipe.calib_batches(4, 8)
    assert len(calib) == 4 and calib[0]["input_ids"].shape == (8, 128)
    for batch in calib:
        for row in batch["input_ids"]:
            assert row.tobytes() in train_rows and row.tobytes() not in eval_rows
    for x, y in zip(calib, pipe.calib_batches(4, 8), strict=True):
        assert_same(x, y)


# ---------------------------------------------------------------- determinism and sharding

DETERMINISM_CASES = [
    ("clm", LM_CFG),
    ("mlm", LM_CFG),
    (
        "image",
        {
            "name": "digits",
            "batch_size": 32,
            "mixup_alpha": 0.8,
            "cutmix_alpha": 1.0,
            "label_smoothing": 0.1,
            "random_erase": 0.25,
            "crop_scale": (0.5, 1.0),
            "hflip": True,
            "image_size": 12,
            "channels": 3,
        },
    ),
]


@pytest.mark.parametrize("task,cfg", DETERMINISM_CASES, ids=["clm", "mlm", "image-aug"])
def test_same_step_same_batch_and_resume(task, cfg):
    it = make_pipeline(cfg, task=task).train_iterator()
    fresh = [next(it) for _ in range(5)]
    assert not np.array_equal(fresh[3][list(fresh[3])[0]], fresh[4][list(fresh[4])[0]])
    other = make_pipeline(cfg, task=task)
    assert_same(first(other, 3), fresh[3])
    resumed = other.train_iterator(start_step=3)
    assert_same(next(resumed), fresh[3])
    assert_same(next(resumed), fresh[4])
    reseeded = first(make_pipeline({**cfg, "seed": 1}, task=task), 3)
    key = "input_ids" if task != "image" else "image"
    assert not np.array_equal(reseeded[key], fresh[3][key])


def test_epochs_are_permutations_and_reshuffle():
    e0 = np.concatenate([train_indices(1550, 100, 0, s) for s in range(15)])
    e1 = np.concatenate([train_indices(1550, 100, 0, s) for s in range(15, 30)])
    assert len(np.unique(e0)) == len(np.unique(e1)) == 1500  # tail of 50 dropped per epoch
    assert not np.array_equal(e0, e1)
    pipe = make_pipeline({"name": "digits", "batch_size": 100}, task="image")
    assert pipe.steps_per_epoch == 15
    it = pipe.train_iterator()
    labels = np.concatenate([next(it)["label"] for _ in range(15)])
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(load_digits_arrays()[1][:1500]))


SHARD_CASES = DETERMINISM_CASES + [
    ("image", {"name": "digits", "batch_size": 32, "eval_batch_size": 50}),
]


@pytest.mark.parametrize("task,cfg", SHARD_CASES, ids=["clm", "mlm", "image-aug", "image"])
def test_process_shards_concatenate_to_global_batch(task, cfg):
    whole = make_pipeline(cfg, task=task)
    shards = [make_pipeline(cfg, task=task, process_index=i, process_count=2) for i in range(2)]
    assert shards[0].local_batch_size * 2 == whole.local_batch_size
    assert_same(concat([first(s, 4) for s in shards]), first(whole, 4))
    evals = [list(s.eval_batches(max_batches=6)) for s in shards]
    for b, ref in enumerate(whole.eval_batches(max_batches=6)):
        assert_same(concat([evals[0][b], evals[1][b]]), ref)
    calib = [s.calib_batches(2, 8) for s in shards]
    for b, ref in enumerate(whole.calib_batches(2, 8)):
        assert_same(concat([calib[0][b], calib[1][b]]), ref)


# ---------------------------------------------------------------- GLUE and images


@needs_sst2
def test_sst2_local_shapes_labels_and_sharding():
    cfg = {"name": "sst2_local", "local_dir": str(SHARED), "seq_len": 64, "batch_size": 32}
    pipe = make_pipeline(cfg, task="classification")
    assert pipe.num_classes == 2 and pipe.steps_per_epoch == 67349 // 32
    b = first(pipe, 2)
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "label"}
    assert b["input_ids"].shape == (32, 64) and b["label"].dtype == np.int32
    assert set(np.unique(b["label"])) <= {0, 1}
    assert (b["input_ids"][:, 0] == pipe.tokenizer.cls_token_id).all()
    assert ((b["input_ids"] == pipe.pad_id) == (b["attention_mask"] == 0)).all()
    evals = list(pipe.eval_batches())
    assert sum(e["example_mask"].sum() for e in evals) == 872
    shards = [
        make_pipeline(cfg, task="classification", process_index=i, process_count=2)
        for i in range(2)
    ]
    assert_same(concat([first(s, 2) for s in shards]), b)
    assert_same(first(make_pipeline(cfg, task="classification"), 2), b)


def test_digits_shapes_and_labels():
    pipe = make_pipeline({"name": "digits", "batch_size": 32}, task="image")
    b = first(pipe)
    assert set(b) == {"image", "label"} and pipe.num_classes == 10
    assert b["image"].shape == (32, 8, 8, 1) and b["image"].dtype == np.float32
    assert b["label"].min() >= 0 and b["label"].max() <= 9
    assert abs(b["image"].mean()) < 0.3 and 0.7 < b["image"].std() < 1.3
    evals = list(pipe.eval_batches())
    assert sum(e["example_mask"].sum() for e in evals) == 297
    soft = make_pipeline(
        {
            "name": "digits",
            "batch_size": 32,
            "mixup_alpha": 0.8,
            "label_smoothing": 0.1,
            "channels": 3,
        },
        task="image",
    )
    sb = first(soft)
    assert sb["image"].shape == (32, 8, 8, 3) and sb["label_soft"].shape == (32, 10)
    np.testing.assert_allclose(sb["label_soft"].sum(1), 1.0, rtol=1e-5)
    assert "label_soft" not in next(soft.eval_batches())


@needs_mnist
def test_mnist_local_shapes_and_split():
    pipe = make_pipeline(
        {"name": "mnist_local", "local_dir": str(SHARED), "batch_size": 64}, task="image"
    )
    assert pipe.steps_per_epoch == 9000 // 64
    b = first(pipe)
    assert b["image"].shape == (64, 28, 28, 1) and set(np.unique(b["label"])) <= set(range(10))
    assert sum(e["example_mask"].sum() for e in pipe.eval_batches()) == 1000


def test_mnist_local_falls_back_to_digits(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        pipe = make_pipeline({"name": "mnist_local", "local_dir": str(tmp_path)}, task="image")
    assert "digits" in caplog.text
    assert first(pipe)["image"].shape[1:] == (8, 8, 1)


# ---------------------------------------------------------------- streamed text


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = "the lobster moved across a sea floor while crabs slept under stones".split()
    for f in range(3):
        docs = [
            " ".join(rng.choice(words, rng.integers(5, 60))) + f" ({f}:{d})." for d in range(200)
        ]
        (root / f"part{f}.txt").write_text("\n\n".join(docs) + "\n")
    return str(root / "*.txt")


def test_text_files_stream_resume_shard_and_eval(text_corpus):
    cfg = {
        "name": "text_files",
        "text_files": text_corpus,
        "seq_len": 32,
        "batch_size": 4,
        "shuffle_buffer": 64,
    }
    pipe = make_pipeline(cfg, task="mlm")
    assert pipe.steps_per_epoch is None
    it = pipe.train_iterator()
    fresh = [next(it) for _ in range(5)]
    assert_same(first(pipe, 4), fresh[4])
    shards = [make_pipeline(cfg, task="mlm", process_index=i, process_count=2) for i in range(2)]
    assert_same(concat([first(s, 4) for s in shards]), fresh[4])
    evals = list(pipe.eval_batches())
    assert evals and all(e["input_ids"].shape == (4, 32) for e in evals)
    mixed = make_pipeline({**cfg, "name": "wikitext2_embedded+text_files"}, task="clm")
    assert first(mixed, 2)["input_ids"].shape == (4, 32)
    with pytest.raises(ValueError, match=r"config\.data\.text_files"):
        make_pipeline({**cfg, "text_files": str(Path(text_corpus).parent / "none*.md")}, task="clm")


# ---------------------------------------------------------------- configuration errors

BAD = [
    ({"name": "nope"}, "clm", {}, r"config\.data\.name"),
    ({}, "translation", {}, r"task"),
    ({"name": "digits"}, "mlm", {}, r"config\.data\.name"),
    ({"name": "sst2_local"}, "clm", {}, r"config\.data\.name"),
    ({"name": "digits+wikitext2_embedded"}, "clm", {}, r"config\.data\.name"),
    ({"seq_len": 4}, "clm", {}, r"config\.data\.seq_len"),
    ({"batch_size": 3}, "clm", {"process_count": 2}, r"config\.data\.batch_size"),
    ({"eval_batch_size": 5}, "mlm", {"process_count": 2}, r"config\.data\.eval_batch_size"),
    ({"mlm_probability": 1.5}, "mlm", {}, r"config\.data\.mlm_probability"),
    ({"mlm_probability": 0.0}, "mlm", {}, r"config\.data\.mlm_probability"),
    ({"batch_sise": 8}, "clm", {}, r"config\.data\.batch_sise"),
    ({"name": "text_files"}, "clm", {}, r"config\.data\.text_files"),
    ({"name": "digits", "crop_scale": (0.5, 0.2)}, "image", {}, r"config\.data\.crop_scale"),
    ({"name": "digits", "channels": 2}, "image", {}, r"config\.data\.channels"),
    ({"name": "digits", "label_smoothing": 1.0}, "image", {}, r"config\.data\.label_smoothing"),
    ({"name": "digits", "batch_size": 4096}, "image", {}, r"config\.data\.batch_size"),
    ({"tokenizer": "qtx:nope"}, "clm", {}, r"config\.data\.tokenizer"),
    ({"tokenizer": "qtx:bpe"}, "mlm", {}, r"config\.data\.tokenizer"),
]


@pytest.mark.parametrize("cfg,task,kw,field", BAD, ids=[b[3] for b in BAD])
def test_bad_config_names_the_field(cfg, task, kw, field):
    with pytest.raises(ValueError, match=field):
        make_pipeline(cfg, task=task, **kw)


def test_config_accepts_configdict_and_applies_defaults():
    import ml_collections

    spec = resolve_spec(ml_collections.ConfigDict({"seq_len": 64}), "mlm")
    assert (spec.name, spec.tokenizer, spec.batch_size, spec.eval_batch_size) == (
        "wikitext2_embedded",
        "qtx:wordpiece",
        16,
        16,
    )
    assert resolve_spec(None, "image").name == "digits"


def test_local_names_without_local_dir_name_the_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QTX_DATA_DIR", raising=False)
    assert resolve_local_dir(None) is None
    with pytest.raises(ValueError, match=r"config\.data\.local_dir"):
        make_pipeline({"name": "sst2_local"}, task="classification")
    with pytest.raises(ValueError, match=r"config\.data\.local_dir"):
        make_pipeline({"name": "wikitext2_local", "local_dir": str(tmp_path)}, task="clm")
    assert first(make_pipeline(LM_CFG, task="clm"))["input_ids"].shape == (16, 128)  # embedded
    monkeypatch.setenv("QTX_DATA_DIR", str(tmp_path))
    assert resolve_local_dir(None) == tmp_path


def test_import_is_light():
    code = "import sys, qtx.data; assert 'tensorflow' not in sys.modules; print('ok')"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=root
    )
    assert out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------- TFDS


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.mark.parametrize(
    "name,task",
    [("mnist", "image"), ("glue/sst2", "classification"), ("wiki40b", "clm"), ("wikitext2", "clm")],
)
def test_tfds_missing_dataset_is_a_clear_error(name, task, tmp_path, no_network):
    with pytest.raises(ValueError) as err:
        pipe = make_pipeline({"name": name, "data_dir": str(tmp_path)}, task=task)
        next(pipe.train_iterator())
    msg = str(err.value)
    assert "config.data.name" in msg and "config.data.data_dir" in msg and str(tmp_path) in msg
    assert no_network == []


def test_tfds_sources_read_with_mock_data(tmp_path, monkeypatch, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds_sources, "is_prepared", lambda builder: True)
    monkeypatch.setattr(tfds_sources, "num_examples", lambda *a, **k: 40)
    policy = tfds.testing.MockPolicy.USE_CODE
    with tfds.testing.mock_data(num_examples=40, policy=policy):
        cfg = {
            "name": "mnist",
            "batch_size": 8,
            "data_dir": str(tmp_path),
            "shuffle_buffer": 16,
            "mixup_alpha": 0.8,
            "random_erase": 0.5,
        }
        pipe = make_pipeline(cfg, task="image")
        it = pipe.train_iterator()
        b0, b1 = next(it), next(it)
        assert b0["image"].shape == (8, 28, 28, 1) and b0["label_soft"].shape == (8, 10)
        assert_same(first(pipe, 1), b1)
        evals = list(pipe.eval_batches())
        assert len(evals) == 5 and all(e["example_mask"].sum() == 8 for e in evals)
        glue = make_pipeline(
            {"name": "glue/mnli", "batch_size": 8, "seq_len": 32, "data_dir": str(tmp_path)},
            task="classification",
        )
        gb = first(glue)
        assert glue.num_classes == 3 and gb["input_ids"].shape == (8, 32)
        assert set(np.unique(gb["label"])) <= {0, 1, 2}
        lm = make_pipeline(
            {
                "name": "wiki40b",
                "batch_size": 2,
                "seq_len": 32,
                "data_dir": str(tmp_path),
                "shuffle_buffer": 4,
            },
            task="clm",
        )
        assert first(lm)["input_ids"].shape == (2, 32)
    assert no_network == []
