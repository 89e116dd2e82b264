"""A new user's mistakes and questions: each bad input is one ``error:`` line with status 2
before any compute and with nothing written; ``--help`` says how to override the config; an
override the run does not use is named at the start; the eval-batch cap is one knob."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

from configs import bert_glue_os, common
from qtx.errors import UserError
from qtx.run import experiment
from qtx.run.prepare import prepare
from qtx.run.train import summary_line
from qtx.train.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def run(*args, timeout=120):
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    return r, time.time() - t0


@pytest.mark.parametrize("program", ["train.py", "eval.py", "export.py"])
def test_misspelled_config_path_is_one_line(program, tmp_path):
    r, took = run(program, "--config=configs/opt125m_gatd.py:tiny", f"--workdir={tmp_path}/w")
    assert r.returncode == 2 and took < 30
    assert r.stderr.splitlines() == [
        "error: --config=configs/opt125m_gatd.py:tiny: no such file (did you mean "
        "configs/opt125m_gated.py?); allowed: a config file, e.g. "
        "configs/opt125m_gated.py:tiny (ls configs/)."
    ]
    assert os.listdir(tmp_path) == []


def test_misspelled_config_path_with_overrides_is_one_line():
    r, _ = run("train.py", "--config=configs/opt125m_gatd.py", "--config.train.steps=3")
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "no such file" in r.stderr


def test_a_config_file_that_does_not_import_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg=None):\n    return (\n")
    r, _ = run("train.py", f"--config={bad}")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"error: --config={bad} does not load ({bad}:2): SyntaxError: '(' was never closed; "
        "allowed: a config file whose get_config(arg) runs (--verbosity=1 shows the traceback)."
    ]


def test_a_config_that_fails_at_runtime_by_relative_path_is_one_line(tmp_path):
    bad = tmp_path / "runtime.py"
    bad.write_text("def get_config(arg=None):\n    return undefined_name\n")
    rel = os.path.relpath(bad, ROOT)
    r, _ = run("train.py", f"--config={rel}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.splitlines() == [
        f"error: --config={rel} does not load ({rel}:2): NameError: name 'undefined_name' is "
        "not defined; allowed: a config file whose get_config(arg) runs (--verbosity=1 shows "
        "the traceback)."
    ]


def test_help_says_how_to_override_and_exits_0():
    r, _ = run("train.py", "--help")
    assert r.returncode == 0 and r.stderr == ""
    out = r.stdout
    assert out.startswith("Trains a model from an ml_collections config.")
    for text in ("--config:", "--workdir:", "--config.<field>=<value>", "--verbosity=1"):
        assert text in out, text
    r, _ = run("export.py", "--help")
    assert r.returncode == 0
    # the docstring's continued command lines stay as written
    assert "--workdir=runs/opt_tiny \\\n        --out=runs/opt_tiny_hf" in r.stdout


def test_unwritable_workdir_is_one_line_within_seconds(tmp_path):
    r, took = run("train.py", "--config=configs/opt125m_gated.py:tiny", "--workdir=/proc/qtx_run")
    assert r.returncode == 2 and took < 60, r.stderr[-2000:]
    assert r.stderr.splitlines() == [
        "error: --workdir=/proc/qtx_run cannot be written (No such file or directory in /proc); "
        "allowed: a directory this user can create and write."
    ]
    assert r.stdout == ""


def test_check_workdir(tmp_path):
    experiment.check_workdir(str(tmp_path / "new" / "run"))  # creatable: fine, nothing made
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"cannot be created: .*/file is a file; allowed"):
        experiment.check_workdir(str(tmp_path / "file" / "run"))
    with pytest.raises(UserError, match=r"^--workdir=/proc/x/y cannot be written"):
        experiment.check_workdir("/proc/x/y")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"dangling is a broken symbolic link \(to .*nowhere\)"):
        experiment.check_workdir(str(tmp_path / "dangling"))
    assert sorted(os.listdir(tmp_path)) == ["dangling", "file"]


def test_learn_mode_without_preset_or_rules_is_one_line():
    c = common.opt_clm("gated", "tiny")
    c.quant.mode = "learn"
    with pytest.raises(UserError, match=r"^config\.quant\.mode='learn' has nothing to quantize"):
        experiment.load(c)


def test_an_unused_quant_override_is_named_at_the_start(capsys):
    c = common.opt_clm("gated", "tiny")
    assert experiment.load(c).warnings == ()
    c.quant.bits = "W4A4"
    exp, _, _ = prepare(c)
    assert len(exp.warnings) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"warning: {exp.warnings[0]}"]
    assert err.startswith("warning: config.quant.bits='W4A4' has no effect: config.quant.mode")
    assert "--config.eval.setups=\"('W4A4',)\"" in err
    c.quant.bits = None
    c.quant.preset = "os_fastertransformer"  # a preset alone: no bits to suggest at eval
    (line,) = experiment.load(c).warnings
    assert line.startswith("config.quant.preset='os_fastertransformer' has no effect")
    assert "eval.setups=" not in line.split("; to use it: ")[1]
    c.quant.update(preset="qv_lsq", mode="learn")  # the bits are used: no warning
    assert experiment.load(c).warnings == ()


def shipped_configs():
    for name, build, args in (
        ("opt_clm", common.opt_clm, [("gated", None), ("gated", "tiny")]),
        ("bert_mlm", common.bert_mlm, [("gated", None), ("gated", "tiny")]),
        ("vit_image", common.vit_image, [("gated", None), ("gated", "tiny")]),
        ("bert_glue", common.bert_glue, [(None,), ("tiny",)]),
        ("bert_glue_os", bert_glue_os.get_config, [("tiny",), ("minilm",)]),
    ):
        for a in args:
            yield name, a, build(*a)


@pytest.mark.parametrize("name, args, c", list(shipped_configs()))
def test_one_knob_caps_evaluation(name, args, c):
    """The configs cap evaluation with data.max_eval_batches alone; the per-run fields
    (train.max_eval_batches, eval.max_batches) stay unset so that the one knob works."""
    exp = experiment.load(c)
    assert exp.train["max_eval_batches"] is None and exp.eval["max_batches"] is None


def test_data_max_eval_batches_caps_the_eval_during_training_and_in_eval():
    c = common.opt_clm("gated", "tiny")
    c.data.max_eval_batches = 5
    exp, _, pipe = prepare(c)
    assert len(list(pipe.eval_batches(exp.train["max_eval_batches"]))) == 5
    assert len(list(pipe.eval_batches(exp.eval["max_batches"]))) == 5
    c.eval.max_batches = 2  # the per-run override still wins
    exp, _, pipe = prepare(c)
    assert len(list(pipe.eval_batches(exp.eval["max_batches"]))) == 2


def test_os_tiny_is_a_small_slice_of_the_minilm_table():
    tiny = experiment.load(bert_glue_os.get_config("tiny"))
    full = experiment.load(bert_glue_os.get_config("minilm"))
    assert len(tiny.eval_cells()) == 6 and len(full.eval_cells()) == 18
    assert tiny.train["steps"] < full.train["steps"] // 5
    with pytest.raises(
        UserError,
        match=r"^config arg 'mini' of configs/bert_glue_os.py is invalid; allowed: none "
        r"\(= 'sst2'\), 'sst2', .*'stsb', 'tiny', 'minilm'\.$",
    ):
        bert_glue_os.get_config("mini")


def test_summary_line(tmp_path):
    exp = experiment.load(common.opt_clm("gated", "tiny"))
    ck = Checkpointer(str(tmp_path / "run"))
    last = {"train": {"loss": 5.9234}, "eval": {"perplexity": 395.23}}
    line = summary_line(exp, last, 200, 0, ck, "runs/x/metrics.jsonl")
    assert line == (
        "done: trained to step 200, train loss 5.923, eval perplexity 395.2; no checkpoint; "
        "metrics runs/x/metrics.jsonl."
    )
    line = summary_line(exp, {}, 200, 200, ck, "m")
    assert line.startswith("done: nothing to train: the run is at step 200 of 200;")
