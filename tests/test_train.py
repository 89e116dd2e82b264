"""Training: resume after kill -9, the 2x4 mesh against one device, gradient accumulation,
NaN fail-fast, bad configs rejected before compute, init_from with a change of attention
variant or task, QAT with learned LSQ steps."""

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from tiny_runs import opt_train_cmd, paused_train_cmd

from configs import common
from qtx.evaluate.metrics import run_eval
from qtx.models import build, dummy_inputs, model_config
from qtx.nn import AttentionConfig, Gate
from qtx.quant import STATS, QuantPoint
from qtx.quant.primitives import grid_bounds
from qtx.run import experiment
from qtx.run.prepare import model_meta, prepare
from qtx.run.train import train
from qtx.train.checkpoint import Checkpointer
from qtx.train.losses import sane_for_checkpoint
from qtx.train.pretrained import load_pretrained, merge_pretrained
from qtx.train.steps import TrainState, create_state, make_eval_step, make_train_step

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


def read_params(workdir, step) -> dict:
    """``{path: array}`` of the parameters saved at ``step`` in ``workdir``."""
    ck = Checkpointer(str(workdir), async_save=False)
    shapes = ck.stored_params_shapes(step)
    abstract = unflatten_dict(
        {tuple(k.split("/")): jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}
    )
    flat = flatten_dict(ck.restore_params(abstract, step))
    return {"/".join(k): np.asarray(v) for k, v in flat.items()}


def tree(flat: dict):
    return unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def zeros_like_init(exp):
    """The parameter tree of an experiment's model, all zeros (no compute)."""
    model = build(exp.model, exp.plan)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(exp.model)))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])


def module_io(model, variables, cls=QuantPoint, mutable=False, **inputs) -> dict:
    """``{module path: (first input, output)}`` of the ``cls`` modules in one model call."""

    def run(variables, inputs):
        seen = {}

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, cls) and context.method_name == "__call__":
                seen["/".join(context.module.path)] = (args[0], out)
            return out

        with nn.intercept_methods(record):
            model.apply(variables, **inputs, mutable=mutable)
        return seen

    return jax.tree.map(np.asarray, jax.jit(run)(variables, inputs))


def test_mesh_2x4_matches_one_device(tmp_path):
    """Sharded over data x fsdp = 2 x 4 (with 2 micro-batches) a run has the losses and
    gradient norms of the same run on one device."""
    c = tiny_opt(steps=3)
    c.optim.grad_accum = 2
    c.mesh.update(data=2, fsdp=4)
    train(c, str(tmp_path / "mesh"))
    c.mesh.update(data=1, fsdp=1)
    train(c, str(tmp_path / "one"), devices=jax.devices()[:1])
    a, b = read_metrics(tmp_path / "mesh"), read_metrics(tmp_path / "one")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        np.testing.assert_allclose(a[s]["loss"], b[s]["loss"], rtol=2e-5)
        np.testing.assert_allclose(a[s]["grad_norm"], b[s]["grad_norm"], rtol=1e-4)
    assert a[3]["loss"] < a[1]["loss"]
    ea, eb = read_metrics(tmp_path / "mesh", "eval"), read_metrics(tmp_path / "one", "eval")
    np.testing.assert_allclose(ea[3]["perplexity"], eb[3]["perplexity"], rtol=2e-5)


def test_grad_accum_2_equals_one_whole_batch():
    """Two micro-batches with different token counts give the whole batch's loss and
    gradient (SGD, so the update is the gradient itself; no dropout)."""
    cfg = model_config(
        "opt-tiny",
        dict(
            num_layers=1,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            vocab_size=97,
            max_positions=32,
            dropout=0.0,
            attention_dropout=0.0,
        ),
    )
    model = build(cfg)
    params = jax.jit(model.init)(jax.random.key(0), **dummy_inputs(cfg, 1, 12))["params"]
    ids = np.random.default_rng(0).integers(3, 97, (8, 12)).astype(np.int32)
    mask = np.ones((8, 12), np.int32)
    mask[:4, 5:] = 0  # the first micro-batch has 13 predicted tokens, the second 44
    mask[0, 2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    tx, lr = optax.sgd(1.0), optax.constant_schedule(1.0)
    out = {}
    for accum in (1, 2):
        step = make_train_step(model, "opt", "clm", tx, lr, jax.random.key(1), accum)
        out[accum] = jax.jit(step)(create_state(params, tx), batch)
    (whole, m1), (split, m2) = out[1], out[2]
    assert float(m1["count"]) == float(m2["count"]) == 57.0
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    assert int(split.step) == int(whole.step) == 1
    flat0, flat1, flat2 = (flatten_dict(p) for p in (params, whole.params, split.params))
    for k in flat0:
        update = np.asarray(flat1[k] - flat0[k])
        tol = max(1e-5 * np.abs(update).max(), 1e-8)
        np.testing.assert_allclose(np.asarray(flat2[k] - flat0[k]), update, atol=tol, err_msg=k)
    assert max(np.abs(np.asarray(flat1[k] - flat0[k])).max() for k in flat0) > 0.1


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
    assert all(np.abs(x).max() < 1e3 for x in read_params(tmp_path, step).values())


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
    """Exit status 2, one line on stderr, nothing from the loop and no workdir."""
    wd = tmp_path / "wd"
    r = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/opt125m_gated.py:tiny",
            f"--workdir={wd}",
            "--config.optim.lr=-0.1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "error: config.optim.lr=-0.1 is invalid; allowed: a positive number."
    ]
    assert r.stdout == ""
    assert not wd.exists() and os.listdir(tmp_path) == []


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
    """The new run starts from the pretrained weights; only gates (MLM) or the classifier
    and pooler (classification) start fresh, and the fine-tuning gates start near 1."""
    pre = common.bert_mlm("vanilla", "tiny")
    pre.model.update(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128)
    pre.data.update(seq_len=32, batch_size=8, max_eval_batches=2)
    pre.train.update(log_every=1, max_eval_batches=2, tensorboard=False)
    # a qtx checkpoint (step 1) of the vanilla model with random weights, as the loop saves
    exp = experiment.load(pre)
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda z: (0.05 * rng.standard_normal(z.shape)).astype(z.dtype), zeros_like_init(exp)
    )
    ck = Checkpointer(str(tmp_path / "pre"), async_save=False)
    ck.save(TrainState(jnp.ones((), jnp.int32), params, {}, {}), model_meta(exp))
    ck.close()
    source = read_params(tmp_path / "pre", 1)
    # continue MLM with gated attention in fine-tuning mode; its first update has lr 0
    # (warmup), so checkpoint 1 holds the initial parameters
    cont = pre.copy_and_resolve_references()
    cont.train.update(steps=1, checkpoint_every=1)
    cont.model.attention = {
        "gate": "mlp",
        "pi_init": 0.25,
        "gate_finetune": True,
        "gate_init_std": 0.01,
    }
    cont.init_from = str(tmp_path / "pre")
    out = train(cont, str(tmp_path / "gated"))
    assert np.isfinite(out["eval"]["perplexity"])
    assert read_metrics(tmp_path / "gated")[1]["lr"] == 0.0
    start = read_params(tmp_path / "gated", 1)
    fresh = set(start) - set(source)
    assert set(source) <= set(start)
    assert fresh and all("/attn/gate/" in k for k in fresh), fresh
    for k in source:
        np.testing.assert_array_equal(start[k], source[k], err_msg=k)
    np.testing.assert_allclose(start["layer_0/attn/gate/bias"], np.log(0.25 / 0.75), rtol=1e-6)
    assert 0.005 < start["layer_0/attn/gate/hidden_kernel"].std() < 0.02
    # the loaded gate outputs pi / pi_init: near 1 (the model starts almost unchanged) but
    # not identically 1
    gate = Gate(2, experiment.load(cont).model.attention)
    x = np.random.default_rng(0).standard_normal((2, 16, 64)).astype(np.float32)
    pi = np.asarray(jax.jit(gate.apply)({"params": tree(start)["layer_0"]["attn"]["gate"]}, x))
    assert pi.shape == (2, 16, 2)
    assert np.abs(pi - 1).max() < 0.05 and np.any(pi != 1.0)

    # classification from the same checkpoint (the loop's init path): the MLM head is
    # dropped, the classifier and pooler start fresh, everything else is the source
    cls = pre.copy_and_resolve_references()
    cls.task = "classification"
    cls.model.update(num_labels=2, pooler=True)
    cls.data.update(name="sst2_local", tokenizer="qtx:wordpiece")
    cls.init_from = str(tmp_path / "pre")
    exp = experiment.load(cls)
    init = zeros_like_init(exp)
    merged = merge_pretrained(init, load_pretrained(exp.init_from, exp.model))
    merged = {"/".join(k): np.asarray(v) for k, v in flatten_dict(merged).items()}
    new = set(merged) - set(source)
    assert any(k.startswith("classifier/") for k in new)
    assert all(k.startswith(("classifier/", "pooler/")) for k in new), new
    assert set(source) - set(merged) == {k for k in source if k.startswith("mlm_head/")}
    for k in merged:
        np.testing.assert_array_equal(merged[k], 0.0 if k in new else source[k], err_msg=k)
    # a different size is an error naming the mismatched keys, not a silent re-init
    cls.model.intermediate_size = 96
    exp = experiment.load(cls)
    with pytest.raises(ValueError, match=r"config.init_from does not fit.*shape mismatches"):
        merge_pretrained(zeros_like_init(exp), load_pretrained(exp.init_from, exp.model))


def test_qat_learns_lsq_steps(tmp_path):
    """LSQ steps start at their calibrated values, get gradients, and quantize the forward
    pass. With one warmup step the first update has lr 0, so checkpoint 1 holds the
    initial parameters exactly."""
    c = common.vit_image("vanilla", "tiny")
    c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64)
    c.data.update(batch_size=16, max_eval_batches=2)
    c.train.update(
        steps=2,
        log_every=1,
        checkpoint_every=1,
        max_eval_batches=2,
        calib_batches=1,
        tensorboard=False,
    )
    c.optim.update(warmup_steps=1)
    c.quant = {"preset": "qv_lsq", "bits": "W4A4", "mode": "learn"}
    out = train(c, str(tmp_path))
    assert np.isfinite(out["train"]["loss"]) and 0.0 <= out["eval"]["accuracy"] <= 1.0
    assert read_metrics(tmp_path)[1]["lr"] == 0.0
    p0, p2 = read_params(tmp_path, 1), read_params(tmp_path, 2)
    learned = sorted(k for k in p0 if k.endswith(("/step", "/offset")))
    assert "layer_0/attn/softmax/step" in learned and "layer_0/ffn/act/offset" in learned

    # 1. the initial steps are the calibrated ones (quant_stats keeps what calibration gave)
    stats = flatten_dict(Checkpointer(str(tmp_path), async_save=False).restore_extra(1))
    for k in learned:
        point, leaf = k.rsplit("/", 1)
        calibrated = stats[("quant_stats", *point.split("/"), "learn_" + leaf)]
        np.testing.assert_array_equal(p0[k], np.asarray(calibrated), err_msg=k)
    # ... computed from the calibration batch: LSQ's 2 mean|x| / sqrt(Qp) of what the point
    # sees in calibration (sequential: the points before it already quantize) for activations,
    exp, _, pipe = prepare(c)
    (batch,) = pipe.calib_batches(1, 16)
    cal = build(exp.model, exp.plan.with_mode("calibrate"))
    seen = module_io(cal, {"params": tree(p0)}, images=batch["image"], mutable=[STATS])
    x = seen["layer_0/attn_ln/out"][0]
    np.testing.assert_allclose(
        p0["layer_0/attn_ln/out/step"], 2 * np.abs(x).mean() / np.sqrt(7), rtol=1e-5
    )
    # ... and the least-squares fixed point from max|w| / Qp for weights
    w = p0["layer_0/ffn/fc1/kernel"]
    s = np.abs(w).max() / 7
    for _ in range(30):
        q = np.clip(np.round(w / s), -8, 7)
        s = (w * q).sum() / (q * q).sum()
    np.testing.assert_allclose(p0["layer_0/ffn/fc1/weight/step"], s, rtol=1e-5)

    # 2. every step and offset moves with training
    for k in learned:
        assert p2[k] != p0[k], f"{k} did not move"

    # 3. the training model's points output values on their (learned) grids
    io = module_io(build(exp.model, exp.plan), {"params": tree(p2)}, images=batch["image"])
    for k in learned:
        if not k.endswith("/step"):
            continue
        name = k[: -len("/step")]
        spec, mode = exp.plan.resolve(name, "weight" if name.endswith("/weight") else "act")
        assert mode == "learn", name
        qmin, qmax = grid_bounds(spec.bits, spec.scheme)
        x, y = io[name]
        grid = (y - p2.get(name + "/offset", 0.0)) / max(float(p2[k]), spec.min_scale)
        np.testing.assert_allclose(grid, np.round(grid), atol=1e-3, err_msg=name)
        levels = np.unique(np.round(grid))
        assert qmin <= levels.min() and levels.max() <= qmax, name
        assert len(levels) <= 2**spec.bits and np.abs(x - y).max() > 0, name


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    """A run SIGKILLed in step 16 (steps 1-15 logged, checkpoint 10 on disk) resumes from
    step 10, repeats steps 11-15 with the losses the killed run logged, and finishes."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    steps, wd, marker = 20, tmp_path / "run", tmp_path / "paused"
    proc = subprocess.Popen(
        paused_train_cmd(wd, steps, 16, marker),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (marker.exists() and (wd / "checkpoints" / "10").is_dir()):
        assert proc.poll() is None and time.time() < deadline, "the run did not pause"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_metrics(wd)
    assert sorted(before) == list(range(1, 16))
    r = subprocess.run(
        opt_train_cmd(wd, steps), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {wd}/checkpoints/10" in r.stdout
    after = read_metrics(wd)
    assert sorted(after) == list(range(1, steps + 1))
    for s in range(1, 16):
        assert after[s]["loss"] == pytest.approx(before[s]["loss"], rel=1e-6, abs=1e-7), s
    assert np.isfinite(read_metrics(wd, "eval")[steps]["perplexity"])


def test_init_from_hf_checkpoint_continues_with_clipped_softmax(tmp_path):
    """An HF BERT starts a clipped-softmax run with every converted weight (only the pooler,
    which BertForMaskedLM lacks, starts fresh) and evaluates with the clipped softmax."""
    torch = pytest.importorskip("torch")
    import transformers

    import qtx.hf

    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(
        vocab_size=8192,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        initializer_range=0.2,  # peaked attention: the softmax variant shows in the loss
    )
    hf = transformers.BertForMaskedLM(hf_cfg)
    hf.save_pretrained(tmp_path / "hf")
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    c = common.bert_mlm("clipped", "tiny")
    c.model.update(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128)
    c.data.update(seq_len=32, batch_size=8, max_eval_batches=2)
    c.train.update(steps=1, log_every=1, checkpoint_every=1, max_eval_batches=2, tensorboard=False)
    c.init_from = str(tmp_path / "hf")
    out = train(c, str(tmp_path / "run"))
    # the only update has lr 0 (warmup): checkpoint 1 and the final eval see the start
    assert read_metrics(tmp_path / "run")[1]["lr"] == 0.0
    start = read_params(tmp_path / "run", 1)
    exp, _, pipe = prepare(c)
    want = flatten_dict(qtx.hf.pretrained_params(c.init_from, exp.model))
    # BertForMaskedLM has no pooler: the only parameters that start fresh
    assert set(start) - {"/".join(k) for k in want} == {"pooler/dense/kernel", "pooler/dense/bias"}
    for k, v in want.items():
        np.testing.assert_array_equal(start["/".join(k)], np.asarray(v), err_msg=str(k))
    q = "bert.encoder.layer.0.attention.self.query.weight"
    np.testing.assert_array_equal(start["layer_0/attn/q_proj/kernel"], sd[q].T)
    word = "bert.embeddings.word_embeddings.weight"
    np.testing.assert_array_equal(start["embed/word/embedding"], sd[word])

    # the run evaluated these weights with the clipped softmax: the vanilla model's
    # perplexity on the same batches is about 1 % away
    vanilla = dataclasses.replace(exp.model, attention=AttentionConfig())
    step = jax.jit(make_eval_step(build(vanilla, exp.plan), "bert", exp.task, collections=()))
    ppl = run_eval(step, {"params": tree(start)}, pipe.eval_batches(2), exp.task)["perplexity"]
    assert exp.model.attention.softmax == "clipped"
    assert abs(out["eval"]["perplexity"] - ppl) > 1e-3 * ppl

    c.model.num_layers = 2
    with pytest.raises(
        ValueError,
        match=r"another architecture: config.model.num_layers=2 "
        r"\(checkpoint: 1\)",
    ):
        load_pretrained(c.init_from, experiment.load(c).model)
