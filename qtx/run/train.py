"""The training loop: build, restore or initialise, step, log, evaluate, checkpoint.

One code path from one CPU device to many GPU hosts: the state is created abstractly,
sharded over the mesh, and restored from ``<workdir>/checkpoints`` whenever one exists (runs
always resume). A NaN/Inf loss or gradient stops the run before the broken state can be
saved, naming the step.
"""

from __future__ import annotations

import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from qtx import quant
from qtx.errors import UserError
from qtx.evaluate.metrics import glue_task_of, headline_metric, make_evaluate
from qtx.evaluate.ptq import calibrate_setup
from qtx.methods import registry as methods
from qtx.models import build, dummy_inputs
from qtx.models.family import family_record
from qtx.run import experiment as experiment_lib
from qtx.run.prepare import model_meta, prepare, report_points, say
from qtx.train import distributed
from qtx.train.checkpoint import Checkpointer, newest_complete_step
from qtx.train.losses import finite_or_raise, sane_for_checkpoint
from qtx.train.mesh import (
    batch_sharding,
    fetch,
    global_batch,
    replicated,
    tree_shardings,
)
from qtx.train.metrics import MetricWriter
from qtx.train.optim import make_optimizer
from qtx.train.preemption import StopOnSignal
from qtx.train.pretrained import (
    check_teacher,
    load_pretrained,
    merge_pretrained,
    teacher_config,
)
from qtx.train.steps import TEACHER, Distillation, TrainState, make_train_step


def train(config, workdir: str, devices=None) -> dict:
    """Trains per ``config`` in ``workdir``; returns the last train and eval metrics.

    ``devices`` restricts the mesh to a subset of ``jax.devices()`` (tests use one device).
    """
    exp, mesh, pipe = prepare(config, devices)
    experiment_lib.check_workdir(workdir)
    cfg, plan, tr = exp.model, exp.plan, exp.train
    text = not family_record(cfg.family).images
    if text and pipe.vocab_size and pipe.vocab_size > cfg.vocab_size:
        raise UserError(
            f"config.model.vocab_size={cfg.vocab_size} is smaller than the "
            f"tokenizer's {pipe.vocab_size}; allowed: >= {pipe.vocab_size}."
        )
    if exp.task in ("classification", "image") and pipe.num_classes not in (None, cfg.num_labels):
        raise UserError(
            f"config.model.num_labels={cfg.num_labels} does not match the "
            f"{pipe.num_classes} classes of config.data.name; allowed: "
            f"{pipe.num_classes}."
        )
    steps = int(tr["steps"])
    model = build(cfg, plan)
    tx, schedule = make_optimizer(exp.optim, steps)
    rng = jax.random.key(int(tr["seed"]))
    init_rng, base_rng = jax.random.split(rng)
    inputs = dummy_inputs(cfg, batch=1, seq_len=int(exp.data.get("seq_len", 128)))

    def init_variables(r):
        return model.init(r, **inputs)

    abstract_vars = jax.eval_shape(init_variables, init_rng)
    abstract_state = jax.eval_shape(
        lambda v: TrainState(
            jnp.zeros((), jnp.int32),
            v["params"],
            tx.init(v["params"]),
            {k: x for k, x in v.items() if k != "params"},
        ),
        abstract_vars,
    )
    ckpt = Checkpointer(workdir, int(tr["keep_checkpoints"]), bool(tr["async_checkpoint"]))
    distributed.watch_checkpoints(ckpt.directory, newest_complete_step)

    teacher_cfg = teacher_config(tr["teacher"], cfg) if tr["teacher"] else cfg
    teacher_model = build(teacher_cfg, quant.QuantPlan())  # full precision, eval mode
    if tr["teacher"]:
        fp_student = build(cfg, quant.QuantPlan())
        s_logits = jax.eval_shape(
            lambda v: fp_student.apply({"params": v["params"]}, **inputs), abstract_vars
        )["logits"]
        t_logits = jax.eval_shape(
            lambda: teacher_model.apply(teacher_model.init(init_rng, **inputs), **inputs)
        )["logits"]
        check_teacher(s_logits, t_logits, tr["teacher"])

    # extra collections (quant_stats) exist only after calibration: take them as stored
    restored = ckpt.restore_newest(
        abstract_state, lambda a: tree_shardings(mesh, a), extra=plan.needs_calibration
    )
    if restored is not None:
        start, state, sharding = restored.step, restored.tree, restored.shardings
        say(f"resumed from {ckpt.directory}/{start}")
    else:
        start = 0
        var_sharding = tree_shardings(mesh, abstract_vars)
        variables = jax.jit(init_variables, out_shardings=var_sharding)(init_rng)
        variables = fetch(variables)
        if exp.init_from:
            loaded = load_pretrained(exp.init_from, cfg)
            variables["params"] = merge_pretrained(variables["params"], loaded)
            for rep in methods.applied_reparametrisations(cfg):  # e.g. gamma_migrated=True
                if not rep.source_applied(exp.init_from):
                    say(rep.log_line)
                    variables["params"] = rep.params_for(cfg, variables["params"])
        teacher = None
        if tr["teacher"]:
            teacher = load_pretrained(tr["teacher"], teacher_cfg)
        elif tr["distill"]:
            teacher = jax.tree.map(np.array, variables["params"])
        if plan.needs_calibration:
            n, bs = int(tr["calib_batches"]), tr["calib_batch_size"] or pipe.batch_size
            calib = [global_batch(mesh, b) for b in pipe.calib_batches(n, int(bs))]
            variables = fetch(calibrate_setup(cfg, plan, variables["params"], calib))
            init = methods.qat_init(tr["qat_init"])
            if init.refine is not None:
                variables, line = init.refine(cfg, plan, variables, calib)
                variables = fetch(variables)
                say(line)
        if teacher is not None:
            variables[TEACHER] = teacher
        variables.update(methods.train_state(tr, model.apply, variables, inputs))
        params = variables.pop("params")
        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), variables)
        sharding = tree_shardings(mesh, jax.eval_shape(lambda: state))
        state = jax.device_put(state, sharding)
    report_points(model, {"params": state.params, **state.extra}, inputs, plan)

    distill = None
    if tr["distill"]:
        distill = Distillation(
            teacher_model,
            float(tr["distill"]),
            float(tr["distill_temperature"]),
            tr["distill_loss"],
            float(tr["task_loss_weight"]),
        )
    train_step = make_train_step(
        model,
        cfg.family,
        exp.task,
        tx,
        schedule,
        base_rng,
        int(exp.optim["grad_accum"]),
        hooks=methods.step_hooks(tr, steps),
        distill=distill,
    )
    p_train = jax.jit(
        train_step,
        in_shardings=(sharding, batch_sharding(mesh)),
        out_shardings=(sharding, replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_model = build(cfg, plan.with_mode("quantize") if plan.needs_calibration else plan)
    evaluate_model = make_evaluate(
        eval_model,
        cfg.family,
        exp.task,
        lambda: pipe.eval_batches(tr["max_eval_batches"]),
        lambda b: global_batch(mesh, b),
        glue_task_of(exp),
    )
    say(f"workdir: {workdir}")  # from here on the run writes there
    writer = MetricWriter(workdir, steps, start, bool(tr["tensorboard"]))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(model_meta(exp), f, indent=1, default=str)
    units = float(
        pipe.batch_size * (1 if exp.task == "image" else int(exp.data.get("seq_len", 128)))
    )
    unit_name = "images" if exp.task == "image" else "tokens"
    last = {}

    def evaluate(step):
        res = evaluate_model({"params": state.params, **state.extra})
        return writer.write(step, "eval", res)

    # Divergence: the loss of step k measures the state saved after step k-1. A save is
    # skipped while the loss is not sane (losses.sane_for_checkpoint), and a saved state
    # whose next loss is not sane (or NaN) is moved to checkpoints_diverged/, so the
    # checkpoint a NaN stop leaves is the newest sane one.
    recent: collections.deque[float] = collections.deque(maxlen=100)
    factor = float(tr["sane_loss_factor"])
    unverified = None  # the step saved last, until the next loss vouches for it

    def save_if_sane(step: int, loss: float, sane: bool) -> None:
        nonlocal unverified
        if sane:
            ckpt.save(state, model_meta(exp))
            unverified = step
        else:
            say(f"step {step}: loss {loss:.4g} is not sane; no checkpoint saved.")

    try:
        with StopOnSignal() as stop:
            for step, batch in zip(range(start, steps), pipe.train_iterator(start), strict=False):
                state, metrics = p_train(state, global_batch(mesh, batch))
                metrics = jax.device_get(metrics)
                done, loss = step + 1, float(metrics["loss"])
                sane = sane_for_checkpoint(loss, list(recent), factor)
                if unverified is not None and not sane:
                    where = ckpt.set_aside_diverged(unverified)
                    say(
                        f"step {done}: loss {loss:.4g} is not sane (> {factor:g}x the running "
                        f"median); the checkpoint of step {unverified} is moved to {where}."
                    )
                unverified = None
                finite_or_raise(loss, done)
                finite_or_raise(float(metrics["grad_norm"]), done, "the gradient norm")
                if done % int(tr["log_every"]) == 0 or done == steps:
                    last["train"] = writer.write(done, "train", metrics)
                    writer.progress(done, last["train"], units, unit_name)
                if int(tr["eval_every"]) and done % int(tr["eval_every"]) == 0 and done != steps:
                    last["eval"] = evaluate(done)
                saved = done % int(tr["checkpoint_every"]) == 0 or done == steps
                if saved:
                    save_if_sane(done, loss, sane)
                if done < steps and stop.requested(done, ckpt.manager):
                    if not saved:
                        save_if_sane(done, loss, sane)
                    ckpt.wait()
                    say(
                        f"stopped by {stop.name} after step {done}: checkpoint saved in "
                        f"{ckpt.directory}/{ckpt.latest_step()}; rerun the same command to "
                        "continue."
                    )
                    return {**last, "stopped_at": ckpt.latest_step()}
                recent.append(loss)
        if steps > start:
            last["eval"] = evaluate(steps)
    finally:  # also on NaN/Inf or an interrupt: the saves under way reach the disk
        ckpt.close()
        writer.close()
    say(summary_line(exp, last, steps, start, ckpt, writer.path))
    return last


def summary_line(exp, last: dict, steps: int, start: int, ckpt: Checkpointer, metrics: str):
    """The line a finished run ends with: final train loss, eval metric, checkpoint, files."""
    if steps <= start:
        head = f"nothing to train: the run is at step {start} of {steps}"
    else:
        parts = [f"trained to step {steps}"]
        if "train" in last:
            parts.append(f"train loss {last['train']['loss']:.4g}")
        metric = headline_metric(exp.task, glue_task_of(exp))
        if metric in last.get("eval", {}):
            parts.append(f"eval {metric} {last['eval'][metric]:.4g}")
        head = ", ".join(parts)
    newest = newest_complete_step(ckpt.directory)  # the manager is closed by now
    where = f"checkpoint {ckpt.directory}/{newest}" if newest is not None else "no checkpoint"
    return f"done: {head}; {where}; metrics {metrics}."
