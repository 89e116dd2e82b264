"""What every driver does first: validate the config, join the processes, build the mesh and
the data; the console line of process 0 and the model meta written beside checkpoints."""

from __future__ import annotations

import dataclasses
import sys

import jax

from qtx import quant
from qtx.data import make_pipeline
from qtx.data.availability import missing_resources
from qtx.data.config import resolve_spec
from qtx.errors import MissingResources, UserError
from qtx.run import experiment as experiment_lib
from qtx.train import distributed
from qtx.train.mesh import make_mesh


def model_meta(exp: experiment_lib.Experiment) -> dict:
    return {"task": exp.task, "model": dataclasses.asdict(exp.model), "config": exp.raw}


def say(msg: str) -> None:
    """A line on the console from process 0."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def report_points(model, variables, inputs, plan) -> quant.MatchReport:
    points = quant.list_points(model.apply, variables, **inputs)
    report = quant.match_report(plan, {k: v[0] for k, v in points.items()})
    if plan.rules:
        say(f"quantization: {report}")
    return report


def prepare(config, devices=None):
    """``(experiment, mesh, pipeline)``: validates the whole config first (no compute before
    every field is known good), then joins the processes and builds the mesh and data."""
    exp = experiment_lib.load(config)
    spec = resolve_spec(exp.data, exp.task)
    missing = missing_resources(spec)
    if missing:
        raise MissingResources(missing)
    distributed.join(float(exp.train["distributed_timeout_s"]))
    if jax.process_index() == 0:
        for line in exp.warnings:
            print(f"warning: {line}", file=sys.stderr, flush=True)
    mesh = make_mesh(exp.mesh, devices)
    for field, rows in (
        ("data.batch_size", spec.batch_size),
        ("data.eval_batch_size", spec.eval_batch_size),
        ("train.calib_batch_size", exp.train["calib_batch_size"]),
        ("eval.calib_batch_size", exp.eval["calib_batch_size"]),
    ):
        if rows and int(rows) % mesh.size:
            raise UserError(
                f"config.{field}={rows} does not split over the {mesh.size} devices of the "
                f"mesh; allowed: a multiple of {mesh.size}."
            )
    pipe = make_pipeline(
        exp.data,
        task=exp.task,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return exp, mesh, pipe
