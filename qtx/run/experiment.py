"""An experiment config, validated in full before any compute.

Sections of the ml_collections config (each documented where it is consumed)::

    task       'clm' | 'mlm' | 'classification' | 'image'
    model      name (size preset, qtx.models.SIZES) + ModelConfig overrides, attention {...}
    data       qtx.data (pipeline.py lists the fields)
    optim      qtx.train.optim
    train      TRAIN_DEFAULTS below
    quant      qtx.quant.plan_from_config; mode 'off' trains in full precision, 'learn' is QAT
    eval       EVAL_DEFAULTS below
    mesh       qtx.train.mesh
    init_from  '' | a qtx workdir | a local HF checkpoint directory | an original-format
               ViT/DeiT/Swin checkpoint (timm; fused qkv split)

Every invalid value raises ``qtx.errors.UserError`` (a ValueError) naming the field, the allowed
values and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from qtx.data.config import resolve_spec
from qtx.errors import UserError
from qtx.evaluate.outliers import track_patterns
from qtx.methods import registry as methods
from qtx.models import ModelConfig, model_config
from qtx.models.config import DTYPES
from qtx.models.family import families_of_task, family_record
from qtx.quant import QuantPlan, plan_from_config, setup_rules
from qtx.quant.presets import PRESETS
from qtx.quant.rules import CALIBRATIONS
from qtx.train.losses import HEAD_OF_TASK, TASKS
from qtx.train.mesh import AXES
from qtx.train.optim import optim_settings
from qtx.train.steps import DISTILL_LOSSES

TRAIN_DEFAULTS = dict(
    steps=1000,
    seed=0,
    log_every=50,
    eval_every=0,  # 0: evaluate only at the end
    checkpoint_every=500,
    keep_checkpoints=3,
    max_eval_batches=None,  # the eval during training; None: config.data.max_eval_batches
    async_checkpoint=True,
    calib_batches=4,  # QAT: batches that initialise quantizer ranges and LSQ steps
    calib_batch_size=None,  # None: the training batch size
    # QAT range init: 'calibrate' (the plan's estimators) or 'token_wise_clipping' (Outlier
    # Suppression: the coarse stage picks the ranges on the output MSE, LSQ+ starts there)
    qat_init="calibrate",
    distill=0.0,  # QAT: weight of distillation from the full-precision model (0: off)
    distill_temperature=1.0,
    distill_loss="kl",  # 'kl' (T^2 KL) or 'soft_ce' (Quantization Variation's soft CE)
    task_loss_weight=1.0,  # weight of the hard-label loss while distilling (QV: 0)
    teacher="",  # '' = the init_from model; or a qtx workdir / HF dir of the same task
    # Quantization Variation (qtx.methods.quant_variation), QAT only:
    obr=0.0,  # peak lambda of oscillation-aware bin regularization (paper 0.01; 0: off)
    obr_start=0.25,  # fraction of the steps before the OBR ramp starts
    track_oscillation=False,  # count weight oscillations (state.extra['oscillation'])
    oscillation_momentum=0.001,
    oscillation_threshold=0.005,
    tensorboard=True,
    # a checkpoint is skipped while the loss exceeds this factor times max(1, the median loss
    # of the last 100 steps): a diverging run never replaces its last good checkpoint
    sane_loss_factor=10.0,
    # several processes: how long a process may be silent (no heartbeat) or missing at the
    # start before the others stop with one line (qtx.train.distributed)
    distributed_timeout_s=120.0,
)
EVAL_DEFAULTS = dict(
    setups=("W8A8",),  # quantized setups: names of qtx.quant.setup_rules (or {name: setup})
    options={},  # preset options, e.g. {"weight_estimator": "mse"} for OPT
    calib_batches=16,
    calib_batch_size=32,
    calibration="sequential",  # or 'parallel' (see qtx.quant.QuantPlan)
    # post-training methods (names of qtx.methods.registry.PTQ): every setup is calibrated
    # with each, in cells named '<setup>/<method>'; () = the setups' own estimators
    ptq_methods=(),
    ptq_options={},  # token-wise clipping settings (TWCSettings fields) and 'percentiles'
    dtype="float32",  # compute dtype of evaluation (FP and quantized); None: the model's
    max_batches=None,  # eval.py's batches; None: config.data.max_eval_batches
    figures=True,
    # also convert every quantized setup to its integer model (int8 matmuls, see
    # qtx.quant.integer) and report its metric, the largest logit difference to fake quant
    # and the weight bytes
    integer=False,
    # Quantization Variation's analysis (qtx.methods.quant_variation.analysis): per-module and
    # per-head sensitivity at variation_bits, outliers, oscillation -> variation.json / .png
    variation=False,
    variation_bits=2,
    variation_heads=True,
)
SECTIONS = ("task", "model", "data", "optim", "train", "quant", "eval", "mesh", "init_from")


def _plain(x: Any) -> Any:
    """ConfigDict / FrozenConfigDict -> plain dicts, recursively."""
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _settings(section: str, given: Mapping | None, defaults: dict) -> dict:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UserError(
            f"config.{section} has unknown field(s) {unknown}; allowed: {sorted(defaults)}."
        )
    return {**defaults, **given}


@dataclasses.dataclass
class Experiment:
    task: str
    model: ModelConfig
    plan: QuantPlan
    data: dict
    optim: dict
    train: dict
    eval: dict
    mesh: dict
    init_from: str
    raw: dict
    warnings: tuple[str, ...] = ()  # settings accepted that have no effect in this run

    @property
    def family(self) -> str:
        return self.model.family

    def eval_cells(self) -> list[tuple[str, str, str | None]]:
        """``[(name, setup, method)]``: every setup, times every PTQ method when set."""
        methods = tuple(self.eval["ptq_methods"] or ())
        if not methods:
            return [(name, setup, None) for name, setup in self.eval_setups().items()]
        return [
            (f"{name}/{m}", setup, m) for name, setup in self.eval_setups().items() for m in methods
        ]

    def eval_setups(self) -> dict[str, str]:
        """``{display name: setup string}`` of the quantized evaluations."""
        setups = self.eval["setups"]
        if isinstance(setups, Mapping):
            return dict(setups)
        return {s: s for s in setups}


def load(config) -> Experiment:
    """Validates every section of ``config`` and returns the typed experiment."""
    raw = _plain(config)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UserError(f"config has unknown section(s) {unknown}; allowed: {list(SECTIONS)}.")
    task = raw.get("task")
    if task not in TASKS:
        raise UserError(f"config.task={task!r} is invalid; allowed: {', '.join(TASKS)}.")
    # None means "the size preset's value" (configs list every field as an unset placeholder)
    mcfg = {k: v for k, v in dict(raw.get("model") or {}).items() if v is not None}
    if isinstance(mcfg.get("attention"), Mapping):
        mcfg["attention"] = {k: v for k, v in mcfg["attention"].items() if v is not None}
    if "name" not in mcfg:
        raise UserError(
            "config.model.name is missing; allowed: a size preset such as "
            "'opt-125m', 'bert-base' or 'vit-s16'."
        )
    name = mcfg.pop("name")
    mcfg.setdefault("head", HEAD_OF_TASK[task])
    model = model_config(name, mcfg)
    if task not in family_record(model.family).tasks:
        raise UserError(
            f"config.model.name={name!r} (family {model.family}) cannot run config.task="
            f"{task!r}; allowed families: {', '.join(families_of_task(task))}."
        )
    if model.head != HEAD_OF_TASK[task]:
        raise UserError(
            f"config.model.head={model.head!r} does not fit config.task={task!r}; "
            f"allowed: {HEAD_OF_TASK[task]!r}."
        )
    quant = dict(raw.get("quant") or {})
    _check_preset_fits(model.family, "config.quant.preset", quant.get("preset"))
    plan = plan_from_config(quant)
    plan = plan.with_track(track_patterns(model.family))
    if plan.mode != "off" and not plan.rules:
        raise UserError(
            f"config.quant.mode={plan.mode!r} has nothing to quantize: config.quant has no "
            f"preset and no rules; allowed: a preset ({', '.join(sorted(PRESETS))}) or rules "
            "with it, or mode 'off'."
        )
    data = dict(raw.get("data") or {})
    resolve_spec(data, task)  # validates config.data without loading anything
    optim = optim_settings(raw.get("optim"))
    train = _settings("train", raw.get("train"), TRAIN_DEFAULTS)
    for f in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "calib_batches"):
        if int(train[f]) < 1:
            raise UserError(f"config.train.{f}={train[f]!r} is invalid; allowed: an integer >= 1.")
    methods.qat_init(train["qat_init"])  # one of qtx.methods.registry.QAT_INITS
    _number(train, "distill", lambda v: v >= 0, "a number >= 0")
    _number(train, "distributed_timeout_s", lambda v: v >= 1, "a number of seconds >= 1")
    _number(train, "distill_temperature", lambda v: v > 0, "a number > 0")
    _check_qat_methods(train)
    qat = plan.mode == "learn" or any(
        r.spec is not None and r.spec.mode == "learn" for r in plan.rules
    )
    qat_only = train["distill"] or train["qat_init"] != "calibrate" or train["obr"]
    if (qat_only or train["track_oscillation"]) and not qat:
        raise UserError(
            "config.train.distill, qat_init, obr and track_oscillation apply to "
            "quantization-aware training; allowed: config.quant.mode='learn' with them, or "
            "distill=0, qat_init='calibrate', obr=0 and track_oscillation=False."
        )
    _number(train, "sane_loss_factor", lambda v: v > 1, "a number > 1")
    if int(train["eval_every"]) < 0:
        raise UserError(
            f"config.train.eval_every={train['eval_every']!r} is invalid; allowed: "
            "0 (only at the end) or a positive integer."
        )
    batch = int(data.get("batch_size", 16))
    if batch % int(optim["grad_accum"]):
        raise UserError(
            f"config.optim.grad_accum={optim['grad_accum']} does not divide "
            f"config.data.batch_size={batch}; allowed: a divisor of the batch size."
        )
    ev = _settings("eval", raw.get("eval"), EVAL_DEFAULTS)
    if ev["dtype"] is not None and ev["dtype"] not in DTYPES:
        raise UserError(
            f"config.eval.dtype={ev['dtype']!r} is invalid; allowed: {', '.join(DTYPES)} or "
            "None (the model's dtype)."
        )
    if ev["calibration"] not in CALIBRATIONS:
        raise UserError(
            f"config.eval.calibration={ev['calibration']!r} is invalid; allowed: "
            f"{', '.join(CALIBRATIONS)}."
        )
    exp = Experiment(
        task,
        model,
        plan,
        data,
        optim,
        train,
        ev,
        dict(raw.get("mesh") or {}),
        str(raw.get("init_from") or ""),
        raw,
    )
    for f in ("calib_batches", "calib_batch_size"):
        if isinstance(ev[f], bool) or not isinstance(ev[f], int) or ev[f] < 1:
            raise UserError(f"config.eval.{f}={ev[f]!r} is invalid; allowed: an integer >= 1.")
    for f in ("variation", "variation_heads", "figures", "integer"):
        if not isinstance(ev[f], bool):
            raise UserError(f"config.eval.{f}={ev[f]!r} is invalid; allowed: True, False.")
    vb = ev["variation_bits"]
    if isinstance(vb, bool) or not isinstance(vb, int) or not 2 <= vb <= 8:
        raise UserError(
            f"config.eval.variation_bits={vb!r} is invalid; allowed: an integer in 2..8."
        )
    _check_ptq(exp)
    exp.warnings = _quant_warnings(quant, plan, ev)
    bad_mesh = sorted(set(exp.mesh) - set(AXES))
    if bad_mesh:
        raise UserError(f"config.mesh has unknown field(s) {bad_mesh}; allowed: {list(AXES)}.")
    return exp


def _quant_warnings(quant: dict, plan: QuantPlan, ev: dict) -> tuple[str, ...]:
    """A line when ``config.quant`` sets a preset, bits or options that neither training nor
    eval.py uses (quantization off: training stays full precision and eval.py evaluates
    ``config.eval.setups``)."""
    active = plan.needs_calibration
    unset = (None, "", "none", {})
    unused = [f for f in ("preset", "bits", "options") if quant.get(f) not in unset]
    if active or not unused:
        return ()
    given = ", ".join(f"config.quant.{f}={quant[f]!r}" for f in unused)
    bits = quant.get("bits")
    at_eval = (
        f", or --config.eval.setups=\"('{bits}',)\" (post-training quantization at eval)"
        if bits
        else ""
    )
    return (
        f"{given} {'has' if len(unused) == 1 else 'have'} no effect: config.quant.mode is "
        f"'off' (training stays full precision) and eval.py evaluates config.eval.setups="
        f"{tuple(ev['setups'])!r}; to use {'it' if len(unused) == 1 else 'them'}: "
        f"--config.quant.mode=learn with a preset (quantization-aware training){at_eval}.",
    )


def _number(train: dict, field: str, ok, allowed: str) -> None:
    v = train[field]
    if isinstance(v, bool) or not isinstance(v, int | float) or not ok(v):
        raise UserError(f"config.train.{field}={v!r} is invalid; allowed: {allowed}.")


def _check_qat_methods(train: dict) -> None:
    """Distillation and Quantization Variation settings of ``config.train``."""
    if train["distill_loss"] not in DISTILL_LOSSES:
        raise UserError(
            f"config.train.distill_loss={train['distill_loss']!r} is invalid; allowed: "
            f"{', '.join(DISTILL_LOSSES)}."
        )
    _number(train, "task_loss_weight", lambda v: v >= 0, "a number >= 0")
    _number(train, "obr", lambda v: v >= 0, "a number >= 0 (0: off)")
    _number(train, "obr_start", lambda v: 0 <= v < 1, "a fraction in [0, 1)")
    _number(train, "oscillation_momentum", lambda v: 0 < v <= 1, "a number in (0, 1]")
    _number(train, "oscillation_threshold", lambda v: 0 <= v < 1, "a number in [0, 1)")
    if not isinstance(train["track_oscillation"], bool):
        raise UserError(
            f"config.train.track_oscillation={train['track_oscillation']!r} is invalid; "
            "allowed: True or False."
        )
    if not isinstance(train["teacher"], str):
        raise UserError(
            f"config.train.teacher={train['teacher']!r} is invalid; allowed: '' (the init_from "
            "model) or the path of a qtx workdir or Hugging Face checkpoint directory."
        )
    if (train["teacher"] or train["task_loss_weight"] != 1.0) and not train["distill"]:
        raise UserError(
            "config.train.teacher and task_loss_weight apply to distillation; allowed: "
            "config.train.distill > 0 with them, or teacher='' and task_loss_weight=1."
        )


def _check_preset_fits(family: str, field: str, value) -> None:
    """A UserError when the preset of ``value`` (a preset name or a setup string) is one the
    family refuses (``Family.unfit_presets``)."""
    rec = family_record(family)
    preset = str(value or "").split(":")[0]
    if preset in rec.unfit_presets:
        fit = sorted(p for p in PRESETS if p not in rec.unfit_presets)
        raise UserError(
            f"{field}={value!r}: the preset {preset!r} does not fit family {family!r} "
            f"({rec.unfit_presets_reason}); allowed presets: {', '.join(fit)}."
        )


def _check_ptq(exp: Experiment) -> None:
    """Every eval setup, with every PTQ method, builds its rules (no compute); no method
    applies a reparametrisation the model config already has."""
    ev = exp.eval
    names = ev["ptq_methods"] or ()
    if isinstance(names, str):
        raise UserError(
            f"config.eval.ptq_methods={names!r} is invalid; allowed: a tuple of "
            f"{', '.join(methods.PTQ)}."
        )
    ptq = [methods.ptq_method(m) for m in names]
    methods.check_ptq_options(ev["ptq_options"])
    for label, setup in exp.eval_setups().items():
        _check_preset_fits(exp.model.family, "config.eval.setups", setup)
        try:
            setup_rules(setup, **dict(ev["options"] or {}))
            for m in ptq:
                m.rules(setup, ev["options"])
        except (ValueError, TypeError) as e:
            raise UserError(f"config.eval.setups[{label!r}]: {e}") from None
    for m in ptq:
        if getattr(m, "check", None) is not None:  # a composed method's stages
            m.check(exp.model, ev["ptq_options"])
        r = m.reparametrisation
        if r is not None and r.applied(exp.model):
            users = [n for n, p in methods.PTQ.items() if p.reparametrisation == r]
            raise UserError(
                f"config.model.{r.config_field}=True cannot take {r.name} again from the PTQ "
                f"method {m.name!r}; allowed: {r.config_field}=False with "
                f"{', '.join(users)}."
            )


def check_workdir(workdir: str) -> None:
    """One line when ``workdir`` cannot hold a run: it is a file, or lies where this process
    cannot create directories. Leaves nothing behind (the probe directory is removed)."""
    path = os.path.abspath(workdir)
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(
            f"--workdir={workdir} is a broken symbolic link (to {os.readlink(path)}); "
            "allowed: a directory path (new, or a run's)."
        )
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(
            f"--workdir={workdir} cannot be created: {existing} is a file; allowed: a "
            "directory path (new, or a run's) whose existing part is directories."
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qtx-probe-", dir=existing))
    except OSError as e:
        raise UserError(
            f"--workdir={workdir} cannot be written ({e.strerror} in {existing}); allowed: a "
            "directory this user can create and write."
        ) from e


def default_workdir(config_path: str) -> str:
    """``runs/<config file stem>[_<arg>]`` for ``configs/x.py[:arg]``."""
    name, _, arg = config_path.partition(":")
    stem = os.path.splitext(os.path.basename(name))[0]
    return os.path.join("runs", stem + (f"_{arg}" if arg else ""))
