"""The integer model from the command line on a tiny OPT workdir: eval.py with
``config.eval.integer``, ``export.py --int8`` (PTQ setup and QAT run) and ``eval.py --int8``."""

import json

import jax
import pytest
from test_cli import parse
from tiny_runs import ONE_LAYER_OPT

from qtx.errors import UserError
from qtx.run.evaluate import evaluate
from qtx.run.export import export_integer
from qtx.run.int8 import evaluate_directory
from qtx.run.train import train

TINY = (
    *ONE_LAYER_OPT,
    "--config.eval.max_batches=2",
    "--config.eval.calib_batches=2",
    "--config.eval.calib_batch_size=8",
    "--config.eval.figures=False",
)
QAT = ("--config.quant.preset=qv_lsq", "--config.quant.bits=W4A4", "--config.quant.mode=learn")


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    config = parse("configs/opt125m_gated.py:tiny", *TINY, "--config.eval.integer=True")
    workdir = tmp_path_factory.mktemp("fp")
    train(config, str(workdir), devices=jax.devices()[:1])
    return config, workdir


def test_eval_convert_and_evaluate_the_int8_directory(fp_run, tmp_path, capsys):
    config, workdir = fp_run
    results = evaluate(config, str(workdir))
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("W8A8: perplexity"))
    assert lines[at + 1].startswith("W8A8 int8: perplexity")  # under its own setup's line
    w8a8 = results["quantized"]["W8A8"]
    got = w8a8["integer"]
    assert got["integer_matmuls"] == 8 and got["float_matmuls"] == {}
    assert got["weight_bytes"] < got["float_weight_bytes"]
    assert abs(got["perplexity"] / w8a8["perplexity"] - 1) < 1e-2

    out = tmp_path / "int8"
    summary = export_integer(config, str(workdir), str(out), quantize="W8A8")
    assert summary["files"] == ["int8_config.json", "int8_model.safetensors"]
    again = evaluate_directory(config, str(out))
    # the directory reproduces eval.py's numbers: its integer model is the one eval.py
    # converted; its twin is the fake-quant model except for the tied LM head, which reads
    # the int8 table (the float table is not stored)
    assert again["fake_quant"]["perplexity"] == pytest.approx(w8a8["perplexity"], rel=1e-4)
    assert again["integer"]["perplexity"] == pytest.approx(got["perplexity"], rel=1e-6)
    assert again["weight_bytes"] == got["weight_bytes"]
    assert json.loads((out / "eval.json").read_text())["integer_matmuls"] == 8

    with pytest.raises(UserError, match="exists and is not empty"):
        export_integer(config, str(workdir), str(out), quantize="W8A8")
    export_integer(config, str(workdir), str(out), quantize="W4A8", overwrite=True)
    with pytest.raises(UserError, match="--int8 needs --quantize=SETUP"):
        export_integer(config, str(workdir), str(tmp_path / "other"))
    other = parse("configs/opt125m_gated.py:tiny", *TINY, "--config.model.num_layers=2")
    with pytest.raises(UserError, match="num_layers=1; the config has config.model.num_layers=2"):
        evaluate_directory(other, str(out))


def test_int8_export_of_a_qat_run(tmp_path):
    config = parse("configs/opt125m_gated.py:tiny", *TINY, *QAT)
    workdir = tmp_path / "qat"
    train(config, str(workdir), devices=jax.devices()[:1])
    out = tmp_path / "int8"
    summary = export_integer(config, str(workdir), str(out))
    # 6 matmul weights (4-bit, packed) and the 8-bit word embedding table
    assert summary["weights"] == 7 and summary["integer_matmuls"]
    result = evaluate_directory(config, str(out))
    trained = evaluate(config, str(workdir))["quantized"]["trained"]
    # the twin's tied head reads the int8 table
    assert result["fake_quant"]["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-3)
    assert abs(result["integer"]["perplexity"] / trained["perplexity"] - 1) < 1e-2
