"""The decoder family trains as the other families do: scanned layers with remat, FSDP
sharding, bfloat16 matmuls and the attention variants, through the same train loop."""

import jax
import numpy as np
import pytest
from test_train import read_metrics, read_params

from configs import common
from qtx.run.train import train


def tiny_llama(variant="gated", **model):
    c = common.llama_clm(variant, "tiny")
    c.model.update(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, **model)
    c.model.update(intermediate_size=96, vocab_size=8192)
    c.data.update(seq_len=32, batch_size=8, max_eval_batches=2)
    c.train.update(steps=3, log_every=1, checkpoint_every=3, max_eval_batches=2, tensorboard=False)
    c.optim.update(warmup_steps=0, lr=3e-3)
    c.eval.update(setups=())
    return c


def test_scanned_fsdp_run_matches_one_device(tmp_path):
    """data x fsdp = 2 x 4 with scanned, rematerialised layers has the losses and parameters
    of the same run on one device, saved under the layer loop's per-layer names."""
    c = tiny_llama(qk_norm=True, scan_layers=True, remat=True)
    c.mesh.update(data=2, fsdp=4)
    train(c, str(tmp_path / "mesh"))
    c.mesh.update(data=1, fsdp=1)
    train(c, str(tmp_path / "one"), devices=jax.devices()[:1])
    a, b = read_metrics(tmp_path / "mesh"), read_metrics(tmp_path / "one")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        np.testing.assert_allclose(a[s]["loss"], b[s]["loss"], rtol=2e-5)
    assert a[3]["loss"] < a[1]["loss"]
    pa, pb = read_params(tmp_path / "mesh", 3), read_params(tmp_path / "one", 3)
    assert sorted(pa) == sorted(pb)
    assert "layer_1/attn/gate/dense/kernel" in pa and "layer_0/attn/q_norm/scale" in pa
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], atol=1e-4, err_msg=k)


@pytest.mark.parametrize(
    "variant", ["softpick", *(pytest.param(v, marks=pytest.mark.slow) for v in ("vanilla", "sink"))]
)
def test_bfloat16_variants_train_with_finite_falling_loss(tmp_path, variant):
    c = tiny_llama(variant, dtype="bfloat16")
    c.train.steps = 4
    train(c, str(tmp_path / variant))
    m = read_metrics(tmp_path / variant)
    assert all(np.isfinite(r["loss"]) for r in m.values())
    assert m[4]["loss"] < m[1]["loss"]


@pytest.mark.parametrize(
    "over", [{"quant.preset": "qv_lsq", "quant.mode": "learn"}, {"eval.setups": ("lsq:W4A4",)}]
)
def test_presets_written_for_gelu_ffns_are_refused_on_swiglu_decoders(over):
    from qtx.errors import UserError
    from qtx.run import experiment

    c = tiny_llama()
    for path, value in over.items():
        section, field = path.split(".")
        c[section][field] = value
    fits = r"the preset '(qv_)?lsq' does not fit family 'llama' \(written for fc1/fc2 "
    with pytest.raises(UserError, match=fits):
        experiment.load(c)
