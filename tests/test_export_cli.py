"""export.py's driver on a QAT-trained tiny workdir: files, the sidecar in PyTorch, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_cli import parse  # noqa: E402
from tiny_runs import ONE_LAYER_OPT  # noqa: E402

from qtx.errors import UserError  # noqa: E402
from qtx.models import build  # noqa: E402
from qtx.run import experiment  # noqa: E402
from qtx.run.export import _restore, export_workdir  # noqa: E402
from qtx.run.train import train  # noqa: E402

torch.set_num_threads(2)
QAT = (  # the tiny gated OPT, one narrow layer, 3 steps of W4A4 module-dependent LSQ
    *ONE_LAYER_OPT,
    "--config.quant.preset=qv_lsq",
    "--config.quant.bits=W4A4",
    "--config.quant.mode=learn",
)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    config = parse("configs/opt125m_gated.py:tiny", *QAT)
    workdir = tmp_path_factory.mktemp("qat")
    train(config, str(workdir), devices=jax.devices()[:1])
    return config, workdir


def test_export_of_a_qat_run_reproduces_it_in_pytorch(qat_run, tmp_path):
    config, workdir = qat_run
    out = tmp_path / "hf"
    summary = export_workdir(config, str(workdir), str(out))
    assert summary["step"] == 3 and summary["quantized_points"] > 10
    for name in ("config.json", "model.safetensors", "tokenizer.json", "quantization.json"):
        assert name in summary["files"], name
    assert {"modeling_qtx.py", "configuration_qtx.py", "quantization_qtx.py"} <= set(
        summary["files"]
    )

    exp = experiment.load(config)
    _, params, extra = _restore(exp, str(workdir), None, True)
    ids = np.random.default_rng(0).integers(4, exp.model.vocab_size, (2, 12))
    mask = np.ones_like(ids)
    qmodel = build(exp.model, exp.plan.with_mode("quantize"))
    want = np.asarray(
        qmodel.apply({"params": params, **extra}, jnp.asarray(ids), jnp.asarray(mask))["logits"]
    )
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    get_class_from_dynamic_module("quantization_qtx.apply_quantization", out)(hf, str(out))
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    print(f"QAT W4A4: max |PyTorch - qtx| {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_export_errors_come_before_writing(qat_run, tmp_path):
    config, workdir = qat_run
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        export_workdir(config, str(workdir), str(out))
    with pytest.raises(UserError, match=r"--step=7 is not in .*allowed: \[3\]"):
        export_workdir(config, str(workdir), str(tmp_path / "new"), step=7)
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError, match="no checkpoint in"):
        export_workdir(config, str(tmp_path / "empty"), str(tmp_path / "new"))
    wider = parse("configs/opt125m_gated.py:tiny", *QAT, "--config.model.hidden_size=64")
    with pytest.raises(UserError, match="does not match the configured model"):
        export_workdir(wider, str(workdir), str(tmp_path / "new"))
    with pytest.raises(UserError, match="quantization bits"):
        export_workdir(config, str(workdir), str(tmp_path / "new"), quantize="W9")
    assert not (tmp_path / "new").exists()
    # --overwrite replaces what an export writes and leaves other files alone
    export_workdir(config, str(workdir), str(out), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()
