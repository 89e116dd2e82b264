"""The quantization sidecar: qtx's fake-quant model reproduced in PyTorch from an export."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_remote_code import outputs, tiny_variant  # noqa: E402

import qtx.hf  # noqa: E402
from qtx import quant  # noqa: E402
from qtx.errors import UserError  # noqa: E402
from qtx.evaluate.ptq import calibrate_setup  # noqa: E402
from qtx.hf import quant_sidecar, remote  # noqa: E402
from qtx.models import build  # noqa: E402

torch.set_num_threads(2)
AUTO = {
    "bert": "AutoModelForMaskedLM",
    "roberta": "AutoModelForSequenceClassification",
    "opt": "AutoModelForCausalLM",
}
GATED = {"gate": "mlp", "gate_condition": "head", "softmax": "clipped", "gamma": -0.03}
slow = pytest.mark.slow
CASES = [  # family, setup, attention
    ("opt", "W8A8", {}),  # pre-LN: the residual sums are also the shortcut
    ("bert", "qv_lsq:W4A4", {}),  # learned LSQ steps, LSQ+ offsets, unsigned softmax
    pytest.param("opt", "W8A8", GATED, marks=slow),  # gates stay FP, remote-code attention
    pytest.param("bert", "W8A8", {}, marks=slow),  # post-LN
    pytest.param("roberta", "W8A8", {}, marks=slow),  # tanh output = classifier input
    pytest.param("opt", "os_fastertransformer:W6A6E6", {}, marks=slow),  # per-channel weights
    pytest.param("bert", "binary", {}, marks=slow),  # 1-bit weights, dynamic 1-bit inputs
    pytest.param("vit", "W8A8", {}, marks=slow),
    pytest.param("deit", "qv_lsq", {}, marks=slow),
    pytest.param("swin", "W8A8", {}, marks=slow),
]


def calib_batches(cfg, n=3):
    rng = np.random.default_rng(1)
    if cfg.family in ("vit", "swin"):
        size = cfg.image_size
        return [
            {"image": rng.standard_normal((2, size, size, 3)).astype(np.float32)} for _ in range(n)
        ]
    ids = rng.integers(3, 99, (n, 2, 7))
    ones = np.ones((2, 7), np.int32)
    return [{"input_ids": ids[i], "attention_mask": ones, "labels": ids[i]} for i in range(n)]


def quantized_export(tmp_path, family, setup, attention):
    cfg, arch, model, variables = tiny_variant(family, attention)
    plan = quant.QuantPlan(quant.setup_rules(setup), mode="quantize")
    frozen = calibrate_setup(cfg, plan, variables["params"], calib_batches(cfg))
    path = tmp_path / f"{family}_{setup.replace(':', '_')}_{len(attention)}"
    qtx.hf.export(path, cfg, variables)
    n = quant_sidecar.write_sidecar(str(path), cfg, plan, frozen)
    remote.copy_all(str(path))
    return cfg, model, variables, build(cfg, plan), frozen, path, n


@pytest.mark.parametrize("family, setup, attention", CASES)
def test_sidecar_reproduces_fake_quant_in_pytorch(tmp_path, family, setup, attention):
    """PyTorch + sidecar gives qtx's fake-quant logits: equal up to rare rounding ties that
    float reassociation moves across a grid boundary, i.e. far closer to qtx's quantized model
    than qtx's quantized model is to the FP one."""
    cfg, model, variables, qmodel, frozen, path, n = quantized_export(
        tmp_path, family, setup, attention
    )
    sidecar = json.loads((path / quant_sidecar.SIDECAR_JSON).read_text())
    assert n == len(sidecar["points"]) > 10
    auto = getattr(transformers, AUTO.get(family, "AutoModelForImageClassification"))
    hf = auto.from_pretrained(path, trust_remote_code=True).eval()
    fp_pairs, mask = outputs(cfg, model, variables, hf)
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    apply_quantization = get_class_from_dynamic_module("quantization_qtx.apply_quantization", path)
    assert sorted(apply_quantization(hf, str(path))) == sorted(sidecar["points"])
    q_pairs, mask = outputs(cfg, qmodel, frozen, hf)
    pick = (lambda d: d[mask]) if mask is not None else (lambda d: d)
    ours, theirs = np.asarray(q_pairs[-1][1]), q_pairs[-1][0].numpy()
    effect = float(pick(np.abs(ours - np.asarray(fp_pairs[-1][1]))).max())
    diff = float(pick(np.abs(ours - theirs)).max())
    print(f"{family} {setup}: torch vs qtx {diff:.2e}, quantization changes logits {effect:.2e}")
    assert effect > 1e-3 and diff < 0.1 * effect


def test_sidecar_needs_calibration(tmp_path):
    cfg, _, _, variables = tiny_variant("opt", {})
    plan = quant.QuantPlan(quant.setup_rules("W8A8"), mode="quantize")
    qtx.hf.export(tmp_path, cfg, variables)
    with pytest.raises(UserError, match="no calibration statistics"):
        quant_sidecar.write_sidecar(str(tmp_path), cfg, plan, variables)
