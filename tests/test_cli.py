"""The command line: every config field overridable, config args validated, user errors as
one line with status 2, missing data and tokenizers named before compute, nothing written
to the workdir by a run that fails."""

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags
from tiny_runs import opt_train_cmd

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p.stem
    for p in (ROOT / "configs").glob("*.py")
    if p.stem not in ("__init__", "common", "qv_common")
)
ARGS = {
    "bert_base_glue": (None, "tiny", "mnli"),
    "bert_glue_os": (None, "tiny", "minilm", "cola"),
    "bert_glue_os_qat": (None, "tiny", "stsb"),
    "deit_t": (None, "W2A2", "W3A3,tiny"),
    "deit_s": ("W4A4,tiny",),
    "deit_b": ("W2A2",),
    "swin_t": (None, "FP,tiny", "W2A2,tiny"),
    "bert_binary": ("tiny", "rte"),
}


def parse(config_arg: str, *overrides: str) -> ml_collections.ConfigDict:
    """``--config=<config_arg> <overrides>`` through the same flag machinery as train.py."""
    argv = ["prog", f"--config={config_arg}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv)
    saved, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv
    try:
        fv(argv)
    finally:
        sys.argv = saved
    return fv.config


def leaves(c: ml_collections.ConfigDict, prefix: str = ""):
    """(path, flag type, value) of every leaf; an empty dict is a leaf (a dict literal)."""
    for key in c.keys():
        value, path = c[key], f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            yield from leaves(value, path + ".")
        else:
            yield path, c.get_type(key), value


def new_value(kind, value):
    """A flag string for a leaf of type ``kind`` and the value it must parse to."""
    if kind is bool:
        return str(not value).lower(), not value
    if kind is int:
        return str((value or 0) + 3), (value or 0) + 3
    if kind is float:
        return repr((value or 0.0) + 0.5), (value or 0.0) + 0.5
    if kind is str:
        return "override_text", "override_text"
    if kind is tuple:
        return "('a', 'b')", ("a", "b")
    if kind is ml_collections.ConfigDict:
        return "{'k': 1}", {"k": 1}
    if kind is object:
        return "/data/some text/*.txt", "/data/some text/*.txt"
    raise AssertionError(f"a leaf of type {kind} cannot be set from the command line")


def get(c, path):
    for part in path.split("."):
        c = c[part]
    return c.to_dict() if isinstance(c, ml_collections.ConfigDict) else c


@pytest.mark.parametrize(
    "config_arg",
    [
        f"configs/{name}.py" + (f":{arg}" if arg else "")
        for name in CONFIGS
        for arg in ARGS.get(name, (None, "tiny"))
    ],
)
def test_every_leaf_of_every_config_can_be_overridden(config_arg, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = parse(config_arg)
    found = list(leaves(base))
    assert len(found) > 100
    expected = {path: new_value(kind, value) for path, kind, value in found}
    cfg = parse(config_arg, *(f"--config.{p}={flag}" for p, (flag, _) in expected.items()))
    for path, (_, value) in expected.items():
        assert get(cfg, path) == value, path


def test_none_fields_take_typed_values(monkeypatch):
    monkeypatch.chdir(ROOT)
    c = parse(
        "configs/opt125m_gated.py:tiny",
        "--config.quant.bits=W4A4",
        "--config.data.text_files=/data/bookcorpus/*.txt",
        "--config.data.max_eval_batches=5",
        "--config.data.crop_scale=(0.08, 1.0)",
        "--config.data.hflip=true",
    )
    assert c.quant.bits == "W4A4" and c.data.text_files == "/data/bookcorpus/*.txt"
    assert c.data.max_eval_batches == 5 and c.data.crop_scale == (0.08, 1.0)
    assert c.data.hflip is True


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_config_arg_is_refused_naming_the_allowed(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(flags.IllegalFlagValueError, match=r"'tny' .*is invalid; allowed: .*tiny"):
        parse(f"configs/{name}.py:tny")


def run(*args, env=None, cwd=ROOT, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})}
    env.pop("QTX_TRACEBACK", None) if "QTX_TRACEBACK" not in (env or {}) else None
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def error_lines(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.strip()]


def tree(path: pathlib.Path) -> dict:
    """Every file and folder under ``path`` with its size and mtime."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


@pytest.mark.parametrize(
    "override,line",
    [
        ("--config.train.steps=-1", "error: config.train.steps=-1 is invalid; allowed: an integer"),
        ("--config.optim.lrr=1", "error: --config.optim.lrr names no field of the config (did you"),
        ("--config.quant.bits=W9", "error: quantization bits 'W9' are invalid"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tmp_path, override, line):
    wd = tmp_path / "wd"
    r = run("train.py", "--config=configs/opt125m_gated.py:tiny", f"--workdir={wd}", override)
    assert r.returncode == 2, r.stderr
    assert error_lines(r) == [error_lines(r)[0]] and error_lines(r)[0].startswith(line)
    assert not wd.exists()


def test_traceback_on_request(tmp_path):
    args = ("train.py", "--config=configs/opt125m_gated.py:tny", f"--workdir={tmp_path}")
    r = run(*args, "--verbosity=1")
    assert r.returncode == 2 and "Traceback" in r.stderr
    assert "error: config arg 'tny' of configs/opt125m_gated.py is invalid" in r.stderr
    r = run(*args, env={"QTX_TRACEBACK": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr
    r = run(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_programming_errors_keep_their_traceback():
    code = (
        "from qtx.run import cli\ndef main(argv):\n    return {}['missing']\ncli.run(main, 'x.py')"
    )
    r = run("-c", code)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError" in r.stderr
    assert "error:" not in r.stderr


def test_headline_command_offline_names_each_missing_thing(tmp_path):
    wd = tmp_path / "wd"
    env = {"HF_HUB_OFFLINE": "1", "TFDS_DATA_DIR": str(tmp_path / "tfds"), "HF_HOME": str(tmp_path)}
    r = run("train.py", "--config=configs/opt125m_gated.py", f"--workdir={wd}", env=env)
    assert r.returncode == 2, r.stderr
    lines = error_lines(r)
    assert len(lines) == 3, lines
    assert "tokenizer config.data.tokenizer='facebook/opt-125m'" in lines[0]
    assert "AutoTokenizer.from_pretrained('facebook/opt-125m')" in lines[0]
    assert "TFDS dataset 'wiki40b/en'" in lines[1] and "download_and_prepare()" in lines[1]
    assert "--config=configs/opt125m_gated.py:tiny" in lines[2]
    assert not wd.exists() and not (tmp_path / "tfds").exists()


def test_text_files_glob_that_matches_nothing(tmp_path):
    r = run(
        "train.py",
        "--config=configs/opt125m_gated.py:tiny",
        f"--workdir={tmp_path / 'wd'}",
        "--config.data.name=text_files",
        f"--config.data.text_files={tmp_path}/bookcorpus/*.txt",
    )
    assert r.returncode == 2
    assert error_lines(r)[0].startswith("error: config.data.text_files=")
    assert "matches no files" in error_lines(r)[0]
    assert not (tmp_path / "wd").exists()


def test_eval_without_checkpoint_writes_nothing(tmp_path):
    for wd in (tmp_path / "absent", tmp_path / "empty"):
        if wd.name == "empty":
            wd.mkdir()
        r = run("eval.py", "--config=configs/opt125m_gated.py:tiny", f"--workdir={wd}")
        assert r.returncode == 2
        assert error_lines(r) == [
            f"error: no checkpoint in {wd}/checkpoints; train first with "
            "the same --workdir, or pass --hf_checkpoint=<local Hugging "
            "Face directory>."
        ]
    assert not (tmp_path / "absent").exists() and list((tmp_path / "empty").iterdir()) == []


def test_failed_resume_leaves_the_workdir_as_it_was(tmp_path):
    wd = tmp_path / "wd"
    cmd = opt_train_cmd(wd, 2, width=32)[1:]
    assert run(*cmd).returncode == 0
    before = tree(wd)
    r = run(*cmd, "--config.model.hidden_size=64")
    assert r.returncode == 2 and "does not match the configured model" in r.stderr
    assert tree(wd) == before
