"""export.py's driver: a trained workdir -> a Hugging Face directory.

``export_workdir(config, workdir, out)`` restores the newest intact checkpoint (or ``step``)
of ``workdir``, and writes into ``out``:

* ``config.json`` + ``model.safetensors`` (:func:`qtx.hf.export`; attention variants with
  qtx's PyTorch modeling code and ``auto_map``);
* the tokenizer of ``config.data.tokenizer`` (text models);
* for a model trained with quantizers (QAT), or with ``quantize=SETUP`` (calibrated here as
  ``eval.py`` does), the quantization sidecar (:mod:`qtx.hf.quant_sidecar`) and
  ``quantization_qtx.py``, which applies it to the PyTorch model.

Every check (config, checkpoint, output directory) runs before anything is written.
"""

from __future__ import annotations

import os
import re

import jax
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx import quant
from qtx.data.config import resolve_spec
from qtx.data.tokenizers import load_tokenizer
from qtx.errors import UserError
from qtx.evaluate import integer
from qtx.evaluate.ptq import calibrate_setup
from qtx.hf import quant_sidecar, remote
from qtx.hf.export import export, export_problems
from qtx.models import build, dummy_inputs
from qtx.models.family import family_record
from qtx.run import experiment as experiment_lib
from qtx.run.prepare import prepare, say
from qtx.train.checkpoint import Checkpointer
from qtx.train.mesh import global_batch


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.isfile(out):
        raise UserError(f"--out={out} is a file; allowed: a new or empty directory.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(
            f"--out={out} exists and is not empty; pass --overwrite to replace its contents, "
            "or choose a new directory."
        )


# what an export writes (removed by --overwrite; other files in --out are left alone)
EXPORT_FILES = re.compile(
    r"config\.json|model\.safetensors|quantization\.(json|safetensors)|\w+_qtx\.py|"
    r"tokenizer(_config)?\.json|special_tokens_map\.json|vocab\.(txt|json)|merges\.txt"
)


def _remove_export_files(out: str) -> None:
    for name in os.listdir(out):
        if EXPORT_FILES.fullmatch(name) and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def _restore(exp, workdir: str, step: int | None, trained_quant: bool):
    """``(step, params, extra)`` of the checkpoint, parameters on one device."""
    cfg = exp.model
    plan = exp.plan if trained_quant else exp.plan.with_mode("off")
    model = build(cfg, plan)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(cfg)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ck = Checkpointer(workdir, async_save=False)
    try:
        steps = ck.steps()
        if not steps:
            raise UserError(
                f"no checkpoint in {ck.directory}; train first with the same --workdir "
                "(python train.py --config=... --workdir=...)."
            )
        if step is not None and step not in steps:
            raise UserError(f"--step={step} is not in {ck.directory}; allowed: {steps}.")
        restored = ck.restore_newest(
            abstract["params"],
            lambda _: device,
            extra=trained_quant,
            move_aside=False,
            step=step,
        )
    finally:
        ck.close()
    return restored.step, restored.tree, restored.extra


def _model_params(cfg, params) -> dict:
    """``params`` without the quantizers' steps and offsets (the FP model's tree)."""
    fp = build(cfg, quant.QuantPlan())
    shapes = jax.eval_shape(lambda: fp.init(jax.random.key(0), **dummy_inputs(cfg)))["params"]
    keep = set(flatten_dict(shapes))
    return unflatten_dict({k: v for k, v in flatten_dict(params).items() if k in keep})


def _calibrated(exp, config, params, setup: str) -> tuple[quant.QuantPlan, dict]:
    """``(plan, variables)`` of the PTQ ``setup`` calibrated on the config's training data, as
    ``eval.py`` calibrates it (``config.eval.calib_batches`` x ``calib_batch_size``)."""
    _, mesh, pipe = prepare(config)
    ev = exp.eval
    rules = quant.setup_rules(setup, **dict(ev["options"] or {}))
    plan = quant.QuantPlan(rules, mode="quantize", calibration=ev["calibration"])
    batches = pipe.calib_batches(int(ev["calib_batches"]), int(ev["calib_batch_size"]))
    calib = [global_batch(mesh, b) for b in batches]
    return plan, calibrate_setup(exp.model, plan, params, calib)


def export_workdir(
    config,
    workdir: str,
    out: str,
    step: int | None = None,
    overwrite: bool = False,
    quantize: str | None = None,
) -> dict:
    """Writes the Hugging Face directory ``out``; returns a summary (step, files, points)."""
    exp = experiment_lib.load(config)
    cfg = exp.model
    problems = export_problems(cfg)
    if problems:
        raise UserError(
            f"{', '.join(problems)} cannot be represented in a Hugging Face checkpoint; "
            "the workdir's own (orbax) checkpoints keep the model."
        )
    if quantize is not None:
        quant.setup_rules(quantize, **dict(exp.eval["options"] or {}))  # validates the setup
    _check_out(out, overwrite)
    trained_quant = exp.plan.needs_calibration
    step, params, extra = _restore(exp, workdir, step, trained_quant)
    say(f"exporting step {step} of {workdir} to {out}")
    model_params = _model_params(cfg, params)
    if os.path.isdir(out) and overwrite:
        _remove_export_files(out)
    export(out, cfg, {"params": model_params})
    if not family_record(cfg.family).images:
        spec = resolve_spec(exp.data, exp.task)
        if spec.tokenizer:
            load_tokenizer(spec.tokenizer).save_pretrained(out)
    points = 0
    if quantize is not None:
        plan, variables = _calibrated(exp, config, jax.device_get(model_params), quantize)
        points = quant_sidecar.write_sidecar(out, cfg, plan, variables)
    elif trained_quant:
        variables = {"params": params, **extra}
        points = quant_sidecar.write_sidecar(out, cfg, exp.plan, variables)
    if points:
        remote.copy_all(out)
    files = sorted(os.listdir(out))
    say(f"wrote {', '.join(files)}" + (f" ({points} quantized points)" if points else ""))
    return {"step": int(step), "out": out, "files": files, "quantized_points": points}


def export_integer(
    config,
    workdir: str,
    out: str,
    step: int | None = None,
    overwrite: bool = False,
    quantize: str | None = None,
) -> dict:
    """``export.py --int8``: the integer model (int8 weights, scales, zero points and
    activation ranges, see :mod:`qtx.evaluate.integer`) of the PTQ setup ``quantize`` or of
    a QAT-trained workdir, written to ``out``."""

    exp = experiment_lib.load(config)
    trained_quant = exp.plan.needs_calibration
    if quantize is not None:
        quant.setup_rules(quantize, **dict(exp.eval["options"] or {}))  # validates the setup
    elif not trained_quant:
        raise UserError(
            "--int8 needs --quantize=SETUP (e.g. W8A8) or a workdir trained with quantizers "
            "(config.quant); this config trains in full precision."
        )
    _check_out(out, overwrite)
    step, params, extra = _restore(exp, workdir, step, trained_quant)
    if quantize is not None:
        model_params = jax.device_get(_model_params(exp.model, params))
        plan, variables = _calibrated(exp, config, model_params, quantize)
    else:
        plan, variables = exp.plan, {"params": params, **extra}
    iplan, int_vars, report = integer.to_integer(exp.model, plan, variables)
    if os.path.isdir(out) and overwrite:
        for name in (integer.CONFIG_FILE, integer.WEIGHTS_FILE, "eval.json"):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    source = {"workdir": workdir, "step": int(step), "setup": quantize or "trained"}
    files = integer.save(out, exp.model, plan, int_vars, report, source)
    ratio = report.float_weight_bytes / max(report.weight_bytes, 1)
    say(
        f"wrote {', '.join(files)} to {out}: {report.weights} int8 weights, "
        f"{report.weight_bytes / 2**20:.2f} MiB ({ratio:.2f}x smaller than float32), "
        f"{len(report.integer_matmuls)} integer matmuls, {len(report.float_matmuls)} in float"
    )
    return {"step": int(step), "out": out, "files": files, **report.summary()}
