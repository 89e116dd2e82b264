"""Training: resume after kill -9, the 2x4 mesh against one device, NaN fail-fast, bad
configs rejected before compute, init_from with a change of attention variant, QAT."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax.traverse_util import unflatten_dict
from tiny_runs import opt_train_cmd

from configs import common
from qtx.train import experiment
from qtx.train.checkpoint import Checkpointer
from qtx.train.loop import train
from qtx.train.losses import sane_for_checkpoint
from qtx.train.pretrained import merge_pretrained

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_opt(**train_over):
    c = common.opt_clm("gated", "tiny")
    c.model.update(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128)
    c.data.update(seq_len=32, batch_size=8, max_eval_batches=2)
    c.train.update(steps=6, log_every=1, checkpoint_every=3, max_eval_batches=2, tensorboard=False)
    c.train.update(**train_over)
    c.optim.update(warmup_steps=0, lr=3e-3)
    return c


def read_metrics(workdir, split="train"):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if r["split"] == split}


def test_mesh_2x4_matches_one_device(tmp_path):
    c = tiny_opt(steps=4)
    c.optim.grad_accum = 2
    c.mesh.update(data=2, fsdp=4)
    train(c, str(tmp_path / "mesh"))
    c.mesh.update(data=1, fsdp=1)
    train(c, str(tmp_path / "one"), devices=jax.devices()[:1])
    a, b = read_metrics(tmp_path / "mesh"), read_metrics(tmp_path / "one")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        np.testing.assert_allclose(a[s]["loss"], b[s]["loss"], rtol=2e-5)
        np.testing.assert_allclose(a[s]["grad_norm"], b[s]["grad_norm"], rtol=1e-4)
    assert a[4]["loss"] < a[1]["loss"]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_sane_checkpoint(tmp_path, capsys):
    c = tiny_opt(steps=8, checkpoint_every=1, async_checkpoint=False)
    c.optim.update(lr=1e9, clip_norm=0.0, warmup_steps=4, schedule="constant")
    with pytest.raises(FloatingPointError, match=r"at step (\d+); training stopped") as err:
        train(c, str(tmp_path))
    bad_step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    losses = {s: r["loss"] for s, r in read_metrics(tmp_path).items()}
    ck = Checkpointer(str(tmp_path), async_save=False)
    step = ck.latest_step()
    assert step is not None and step < bad_step
    # the state saved after the blow-up step was vouched against by the next (NaN) loss:
    # it is moved aside, never deleted, and the kept one is the newest whose next loss was sane
    diverged = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints_diverged"))
    assert diverged == [bad_step - 1] and step == bad_step - 2
    assert "is not sane" in capsys.readouterr().out
    assert np.isfinite(losses[step + 1]) and losses[step + 1] < 20
    shapes = ck.stored_params_shapes(step)
    abstract = unflatten_dict(
        {tuple(k.split("/")): jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}
    )
    params = ck.restore_params(abstract, step)
    assert all(np.abs(np.asarray(x)).max() < 1e3 for x in jax.tree.leaves(params))


def test_sane_for_checkpoint_rule():
    assert sane_for_checkpoint(5.0, [], 10.0)
    assert not sane_for_checkpoint(float("nan"), [], 10.0)
    assert sane_for_checkpoint(9.9, [0.2, 0.3, 0.1], 10.0)  # the floor of 1 for small losses
    assert not sane_for_checkpoint(31.0, [3.0, 2.9, 3.1], 10.0)
    assert sane_for_checkpoint(29.0, [3.0, 2.9, 3.1], 10.0)


@pytest.mark.parametrize(
    "path,value,match",
    [
        ("task", "'translation'", r"config.task='translation' is invalid; allowed: clm"),
        ("model.name", "'opt-7b'", r"config.model.name='opt-7b' is unknown"),
        ("model.num_heads", "3", r"config.model.num_heads=3 is invalid"),
        ("model.attention.gate", "'conv'", r"config.model.attention.gate='conv'"),
        ("optim.lr", "-1.0", r"config.optim.lr=-1.0 is invalid; allowed: a positive number"),
        ("optim.schedule", "'step'", r"config.optim.schedule='step' is invalid"),
        ("optim.grad_accum", "3", r"config.optim.grad_accum=3 does not divide"),
        ("train.steps", "0", r"config.train.steps=0 is invalid"),
        ("data.name", "'imagenet9k'", r"config.data.name"),
        ("data.mlm_probability", "1.5", r"config.data.mlm_probability"),
        ("quant.preset", "'w2a2_magic'", r"preset 'w2a2_magic' is unknown"),
        ("quant.bits", "'W8'", r"bits 'W8' are invalid"),
        ("eval.setups", "('W8A8', 'W9')", r"config.eval.setups\['W9'\]"),
        ("mesh.tensor", "2", r"config.mesh has unknown field"),
    ],
)
def test_bad_config_values_are_rejected_before_compute(path, value, match):
    c = common.opt_clm("gated", "tiny")
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = eval(value)
    with pytest.raises(ValueError, match=match):
        experiment.load(c)


def test_cli_bad_config_fails_fast_with_one_sentence(tmp_path):
    t0 = time.time()
    r = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/opt125m_gated.py:tiny",
            f"--workdir={tmp_path}",
            "--config.optim.lr=-0.1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "config.optim.lr=-0.1 is invalid" in r.stderr
    assert not (tmp_path / "checkpoints").exists()
    assert time.time() - t0 < 60


def test_merge_pretrained_rules():
    fresh = {"embed": {"w": np.zeros(3)}, "layer_0": {"attn": {"gate": {"k": np.ones(2)}}}}
    loaded = {"embed": {"w": np.arange(3.0)}}
    out = merge_pretrained(fresh, loaded)
    np.testing.assert_array_equal(out["embed"]["w"], np.arange(3.0))
    np.testing.assert_array_equal(out["layer_0"]["attn"]["gate"]["k"], np.ones(2))
    with pytest.raises(ValueError, match=r"no pretrained value for \['embed/v'\]"):
        merge_pretrained({"embed": {"w": np.zeros(3), "v": np.zeros(1)}}, loaded)
    with pytest.raises(ValueError, match=r"no place in the model \['embed/x'\]"):
        merge_pretrained(
            {"embed": {"w": np.zeros(3)}}, {"embed": {"w": np.zeros(3), "x": np.zeros(1)}}
        )
    with pytest.raises(ValueError, match=r"shape mismatches"):
        merge_pretrained({"embed": {"w": np.zeros(4)}}, loaded)


def test_init_from_qtx_checkpoint_into_gated_finetuning_and_classification(tmp_path):
    pre = common.bert_mlm("vanilla", "tiny")
    pre.model.update(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128)
    pre.data.update(seq_len=32, batch_size=8, max_eval_batches=2)
    pre.train.update(
        steps=2, log_every=1, checkpoint_every=2, max_eval_batches=2, tensorboard=False
    )
    train(pre, str(tmp_path / "pre"))
    # continue MLM with gated attention in fine-tuning mode: only gate params are new
    cont = pre.copy_and_resolve_references()
    cont.model.attention = {
        "gate": "mlp",
        "pi_init": 0.25,
        "gate_finetune": True,
        "gate_init_std": 0.01,
    }
    cont.init_from = str(tmp_path / "pre")
    out = train(cont, str(tmp_path / "gated"))
    assert np.isfinite(out["eval"]["perplexity"])
    # a different size is an error naming the mismatched keys, not a silent re-init
    bad = cont.copy_and_resolve_references()
    bad.model.intermediate_size = 96
    with pytest.raises(ValueError, match=r"config.init_from does not fit.*shape mismatches"):
        train(bad, str(tmp_path / "bad"))


def test_qat_learns_lsq_steps(tmp_path):
    c = common.vit_image("vanilla", "tiny")
    c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64)
    c.data.update(batch_size=16, max_eval_batches=2)
    c.train.update(
        steps=3,
        log_every=1,
        checkpoint_every=3,
        max_eval_batches=2,
        calib_batches=1,
        tensorboard=False,
    )
    c.quant = {"preset": "qv_lsq", "bits": "W4A4", "mode": "learn"}
    out = train(c, str(tmp_path))
    assert np.isfinite(out["train"]["loss"]) and 0.0 <= out["eval"]["accuracy"] <= 1.0
    ck = Checkpointer(str(tmp_path), async_save=False)
    keys = ck.stored_params_shapes(ck.latest_step())
    assert "layer_0/attn/softmax/step" in keys and "layer_0/ffn/act/offset" in keys


def _train_cmd(workdir):
    return opt_train_cmd(workdir, 60)


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    full = tmp_path / "full"
    subprocess.run(
        _train_cmd(full), cwd=ROOT, env=env, check=True, capture_output=True, timeout=600
    )
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "20").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before step 20"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = read_metrics(killed)
    assert max(done) < 60, "the kill came too late to test a resume"
    r = subprocess.run(
        _train_cmd(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    a, b = read_metrics(full), read_metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, 61))
    for s in range(1, 61):
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-6, abs=1e-7), s
    ea, eb = read_metrics(full, "eval"), read_metrics(killed, "eval")
    assert ea[60]["perplexity"] == pytest.approx(eb[60]["perplexity"], rel=1e-6)


def test_init_from_hf_checkpoint_continues_with_clipped_softmax(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(
        vocab_size=8192,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    transformers.BertForMaskedLM(hf_cfg).save_pretrained(tmp_path / "hf")
    c = common.bert_mlm("clipped", "tiny")
    c.model.update(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128)
    c.data.update(seq_len=32, batch_size=8, max_eval_batches=2)
    c.train.update(steps=2, log_every=1, checkpoint_every=2, max_eval_batches=2, tensorboard=False)
    c.init_from = str(tmp_path / "hf")
    out = train(c, str(tmp_path / "run"))
    assert np.isfinite(out["eval"]["perplexity"])
    c.model.num_layers = 2
    with pytest.raises(
        ValueError,
        match=r"another architecture: config.model.num_layers=2 "
        r"\(checkpoint: 1\)",
    ):
        train(c, str(tmp_path / "run2"))
