"""export.py's driver: a trained workdir -> a Hugging Face directory.

``export_workdir(config, workdir, out)`` restores the newest intact checkpoint (or ``step``)
of ``workdir``, and writes into ``out``:

* ``config.json`` + ``model.safetensors`` (:func:`qtx.hf.export`; attention variants with
  qtx's PyTorch modeling code and ``auto_map``);
* the tokenizer of ``config.data.tokenizer`` (text models);
* for a model trained with quantizers (QAT), or with ``quantize=SETUP`` (calibrated here as
  ``eval.py`` does, with the post-training ``method`` when given: e.g. ``smoothquant+gptq``,
  whose transformed parameters are the ones exported), the quantization sidecar
  (:mod:`qtx.hf.quant_sidecar`) and ``quantization_qtx.py``, which applies it to the PyTorch
  model.

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
from qtx.methods import registry as methods
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


def _calibrated(exp, config, params, setup: str, method: str | None = None):
    """``(model config, plan, variables)`` of the PTQ ``setup`` calibrated on the config's
    training data as ``eval.py`` calibrates it (``config.eval.calib_batches`` x
    ``calib_batch_size``), with the post-training ``method`` when given (its model config
    and parameters: a transform such as a rotation changes them)."""
    _, mesh, pipe = prepare(config)
    ev = exp.eval
    batches = pipe.calib_batches(int(ev["calib_batches"]), int(ev["calib_batch_size"]))
    calib = [global_batch(mesh, b) for b in batches]
    if method is not None:
        ptq = methods.ptq_method(method, "--method")
        candidates = list(
            ptq.calibrate(
                exp.model, setup, params, calib, ev["options"], ev["calibration"],
                ev["ptq_options"],
            )
        )  # fmt: skip
        c = candidates[0]
        say(f"{method}: calibrated in {c.seconds:.1f} s")
        return c.cfg, c.plan, c.variables
    rules = quant.setup_rules(setup, **dict(ev["options"] or {}))
    plan = quant.QuantPlan(rules, mode="quantize", calibration=ev["calibration"])
    return exp.model, plan, calibrate_setup(exp.model, plan, params, calib)


def _check_method(exp, quantize: str | None, method: str | None):
    """The model config ``method`` gives (checked before any compute; None: no method)."""
    if method is None:
        return exp.model
    if quantize is None:
        raise UserError(
            f"--method={method} needs --quantize=SETUP (the setup it calibrates, e.g. "
            "w8a8_dynamic)."
        )
    ptq = methods.ptq_method(method, "--method")
    ptq.rules(quantize, exp.eval["options"])
    if getattr(ptq, "check", None) is not None:
        ptq.check(exp.model, exp.eval["ptq_options"])
    if ptq.reparametrisation is not None and ptq.reparametrisation.applied(exp.model):
        raise UserError(
            f"--method={method} applies {ptq.reparametrisation.name}, which this model config "
            f"already has (config.model.{ptq.reparametrisation.config_field}=True)."
        )
    if method == "percentile" or getattr(ptq, "estimator", None) == "percentile":
        pcts = exp.eval["ptq_options"].get("percentiles") if exp.eval["ptq_options"] else None
        if pcts is None or len(pcts) != 1:
            raise UserError(
                f"--method={method} calibrates one candidate per percentile; set "
                "config.eval.ptq_options.percentiles to one value (e.g. (99.99,))."
            )
    out = getattr(ptq, "out_config", None)
    if out is not None:
        return out(exp.model)
    rep = ptq.reparametrisation  # a registered method: the rewrite its config records
    return exp.model if rep is None else exp.model.replace(**{rep.config_field: True})


def export_workdir(
    config,
    workdir: str,
    out: str,
    step: int | None = None,
    overwrite: bool = False,
    quantize: str | None = None,
    method: str | None = None,
) -> dict:
    """Writes the Hugging Face directory ``out``; returns a summary (step, files, points).
    ``method``: the post-training method that calibrates ``quantize`` (its transformed
    parameters are exported)."""
    exp = experiment_lib.load(config)
    cfg = exp.model
    if quantize is not None:
        quant.setup_rules(quantize, **dict(exp.eval["options"] or {}))  # validates the setup
    problems = export_problems(_check_method(exp, quantize, method))
    if problems:
        via = f" (given by --method={method})" if method else ""
        raise UserError(
            f"{', '.join(problems)}{via} cannot be represented in a Hugging Face checkpoint; "
            "the workdir's own (orbax) checkpoints keep the model."
        )
    _check_out(out, overwrite)
    trained_quant = exp.plan.needs_calibration
    step, params, extra = _restore(exp, workdir, step, trained_quant)
    say(f"exporting step {step} of {workdir} to {out}")
    model_params = _model_params(cfg, params)
    calibrated = None
    if quantize is not None:  # a method may transform the parameters: calibrate first
        calibrated = _calibrated(exp, config, jax.device_get(model_params), quantize, method)
        cfg = calibrated[0]
        model_params = _model_params(cfg, calibrated[2]["params"])
        late = export_problems(cfg)  # caught above for every registered method
        if late:
            raise UserError(f"--method={method} gave {', '.join(late)}.")
    if os.path.isdir(out) and overwrite:
        _remove_export_files(out)
    export(out, cfg, {"params": model_params})
    if not family_record(cfg.family).images:
        spec = resolve_spec(exp.data, exp.task)
        if spec.tokenizer:
            load_tokenizer(spec.tokenizer).save_pretrained(out)
    points = 0
    if calibrated is not None:
        cfg, plan, variables = calibrated
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
    method: str | None = None,
) -> dict:
    """``export.py --int8``: the integer model (int8 weights, scales, zero points and
    activation ranges, see :mod:`qtx.evaluate.integer`) of the PTQ setup ``quantize`` (with
    the post-training ``method`` when given) or of a QAT-trained workdir, written to ``out``."""

    exp = experiment_lib.load(config)
    trained_quant = exp.plan.needs_calibration
    if quantize is not None:
        quant.setup_rules(quantize, **dict(exp.eval["options"] or {}))  # validates the setup
    _check_method(exp, quantize, method)
    if quantize is None and not trained_quant:
        raise UserError(
            "--int8 needs --quantize=SETUP (e.g. W8A8) or a workdir trained with quantizers "
            "(config.quant); this config trains in full precision."
        )
    _check_out(out, overwrite)
    step, params, extra = _restore(exp, workdir, step, trained_quant)
    cfg = exp.model
    if quantize is not None:
        model_params = jax.device_get(_model_params(exp.model, params))
        cfg, plan, variables = _calibrated(exp, config, model_params, quantize, method)
    else:
        plan, variables = exp.plan, {"params": params, **extra}
    iplan, int_vars, report = integer.to_integer(cfg, plan, variables)
    if os.path.isdir(out) and overwrite:
        for name in (integer.CONFIG_FILE, integer.WEIGHTS_FILE, "eval.json"):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    source = {"workdir": workdir, "step": int(step), "setup": quantize or "trained"}
    if method is not None:
        source["method"] = method
    files = integer.save(out, cfg, plan, int_vars, report, source)
    ratio = report.float_weight_bytes / max(report.weight_bytes, 1)
    say(
        f"wrote {', '.join(files)} to {out}: {report.weights} int8 weights, "
        f"{report.weight_bytes / 2**20:.2f} MiB ({ratio:.2f}x smaller than float32), "
        f"{len(report.integer_matmuls)} integer matmuls, {len(report.float_matmuls)} in float"
    )
    return {"step": int(step), "out": out, "files": files, **report.summary()}
