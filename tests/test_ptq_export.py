"""export.py --method: a composed post-training method's transformed model and sidecar in
PyTorch (a rotated decoder with GPTQ weights), its integer model, and what is refused before
any compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_cli import parse  # noqa: E402

from qtx.errors import UserError  # noqa: E402
from qtx.evaluate import integer  # noqa: E402
from qtx.models import build  # noqa: E402
from qtx.run import experiment  # noqa: E402
from qtx.run.export import (  # noqa: E402
    _calibrated,
    _model_params,
    _restore,
    export_integer,
    export_workdir,
)
from qtx.run.train import train  # noqa: E402

torch.set_num_threads(2)
TINY_LLAMA = (  # the tiny LLaMA, one layer, 3 steps, two calibration batches
    "--config.model.num_layers=1",
    "--config.data.seq_len=16",
    "--config.data.batch_size=8",
    "--config.train.steps=3",
    "--config.train.checkpoint_every=3",
    "--config.eval.calib_batches=2",
    "--config.eval.calib_batch_size=8",
)
METHOD = "rotation+gptq"


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    config = parse("configs/llama_ptq.py:tiny", *TINY_LLAMA)
    workdir = tmp_path_factory.mktemp("llama_ptq")
    train(config, str(workdir), devices=jax.devices()[:1])
    return config, workdir


@pytest.mark.slow
def test_rotated_gptq_export_reproduces_the_quantized_model_in_pytorch(llama_run, tmp_path):
    config, workdir = llama_run
    out = tmp_path / "hf"
    summary = export_workdir(config, str(workdir), str(out), quantize="w8a8_dynamic", method=METHOD)
    assert summary["quantized_points"] > 5 and "hadamard_qtx.py" in summary["files"]

    exp = experiment.load(config)
    _, params, _ = _restore(exp, str(workdir), None, False)
    params = jax.device_get(_model_params(exp.model, params))
    cfg, plan, variables = _calibrated(exp, config, params, "w8a8_dynamic", METHOD)
    assert cfg.rotated and not cfg.tie_embeddings
    ids = np.random.default_rng(0).integers(4, cfg.vocab_size, (2, 12))
    mask = np.ones_like(ids)
    want = build(cfg, plan).apply(variables, jnp.asarray(ids), jnp.asarray(mask))["logits"]
    fp = build(exp.model).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    get_class_from_dynamic_module("quantization_qtx.apply_quantization", out)(hf, str(out))
    with torch.no_grad():
        got = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    want, fp = np.asarray(want), np.asarray(fp["logits"])
    # per-token dynamic 8-bit activations: a float32 rounding difference can move one code
    assert np.abs(got - want).max() < 0.1 * np.abs(want - fp).max() + 1e-4
    assert np.abs(want - fp).max() > 1e-3  # the model is quantized


@pytest.mark.slow
def test_integer_export_of_a_method(llama_run, tmp_path):
    config, workdir = llama_run
    out = tmp_path / "int8"
    summary = export_integer(config, str(workdir), str(out), quantize="w8a8_dynamic", method=METHOD)
    assert summary["integer_matmuls"]
    cfg, plan, variables, meta = integer.load(str(out))
    assert cfg.rotated and meta["source"]["method"] == METHOD
    ids = jnp.asarray(np.random.default_rng(1).integers(4, cfg.vocab_size, (2, 10)))
    logits = build(cfg, plan).apply(variables, ids, jnp.ones_like(ids))["logits"]
    assert np.isfinite(np.asarray(logits)).all()


def test_method_exports_fail_before_compute(tmp_path):
    config, workdir = parse("configs/llama_ptq.py:tiny", *TINY_LLAMA), tmp_path / "no_run"
    with pytest.raises(UserError, match="needs --quantize"):
        export_workdir(config, str(workdir), str(tmp_path / "a"), method=METHOD)
    with pytest.raises(UserError, match="unknown part 'kmeans'"):
        export_workdir(
            config, str(workdir), str(tmp_path / "b"), quantize="w8a8_dynamic",
            method="rotation+kmeans",
        )  # fmt: skip
    bert = parse("configs/bert_glue_ptq.py:tiny")
    with pytest.raises(UserError, match=r"shortcut_affine=True \(given by --method=smoothquant"):
        export_workdir(bert, str(tmp_path / "none"), str(tmp_path / "c"), quantize="W8A8",
                       method="smoothquant")  # fmt: skip
    with pytest.raises(UserError, match="rotation needs a pre-RMSNorm decoder"):
        export_integer(bert, str(tmp_path / "none"), str(tmp_path / "d"), quantize="W8A8",
                       method="rotation")  # fmt: skip
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
