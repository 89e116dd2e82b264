"""Integer models of a model config: conversion, the int8 directory, the fake-quant twin.

The int8 directory (``export.py --int8``) holds::

    int8_config.json        {"format": "qtx-int8", "version": 1, "model": {ModelConfig},
                             "quant": {"rules": [...], "calibration": ...},
                             "report": {integer_matmuls, float_matmuls, weight_bytes, ...},
                             "source": {...}}
    int8_model.safetensors  every variable as "<collection>/<module path>/<name>":
                            quant_int/.../weight/codes   int8 (uint8: two 4-bit codes a byte)
                            quant_int/.../weight/code_sums  int32 column sums (1, N)
                            quant_int/.../weight/scale   float32 (per tensor or channel)
                            quant_int/.../weight/zero    int32 (asymmetric grids)
                            quant_int/.../weight/offset  float32 (LSQ+ weights)
                            quant_stats/<point>/lo, hi   float32 activation ranges
                            params/...                   the rest (embeddings, LayerNorms,
                                                         biases, learned activation steps)

:func:`load` rebuilds the integer model and its variables, which reproduce the outputs of the
exported model bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx import quant
from qtx.errors import UserError
from qtx.evaluate.metrics import scores
from qtx.models import ModelConfig, build, dummy_inputs
from qtx.models.config import model_config_from_dict
from qtx.quant.convert import IntegerReport, convert
from qtx.train.losses import model_inputs

FORMAT = "qtx-int8"
VERSION = 1
CONFIG_FILE = "int8_config.json"
WEIGHTS_FILE = "int8_model.safetensors"


def integer_plan(plan: quant.QuantPlan) -> quant.QuantPlan:
    """The integer plan of a fake-quant plan (frozen quantizers, int8 matmuls)."""
    return plan.with_mode("quantize").with_integer()


def to_integer(
    cfg: ModelConfig, plan: quant.QuantPlan, variables: dict
) -> tuple[quant.QuantPlan, dict, IntegerReport]:
    """``(integer plan, integer variables, report)`` of frozen fake-quant ``variables``."""
    iplan = integer_plan(plan)
    int_vars, report = convert(build(cfg, iplan), variables, **dummy_inputs(cfg))
    return iplan, int_vars, report


def fake_twin(plan: quant.QuantPlan) -> quant.QuantPlan:
    """The plan that runs integer variables as fake quant: float matmuls on the dequantized
    inputs, which are fake quant's matmul inputs bit for bit."""
    return plan.with_integer(float_matmuls=True)


def max_output_difference(cfg, model_a, vars_a, model_b, vars_b, batches, to_dev) -> float:
    """Largest ``|logits_a - logits_b|`` over ``batches``."""

    @jax.jit
    def diff(va, vb, batch):
        inputs = model_inputs(cfg.family, batch)
        ya = model_a.apply(va, **inputs)["logits"].astype(jnp.float32)
        yb = model_b.apply(vb, **inputs)["logits"].astype(jnp.float32)
        return jnp.max(jnp.abs(ya - yb))

    worst = 0.0
    for batch in batches:
        worst = max(worst, float(diff(vars_a, vars_b, to_dev(batch))))
    return worst


def evaluate_integer(cfg, plan, variables, run, batches, to_dev, metric: str) -> dict:
    """Converts frozen fake-quant ``variables`` and evaluates the integer model with ``run``
    (``run(model, variables) -> metrics``); its metric, the largest logit difference to the
    fake-quant model over ``batches``, the weight bytes and the matmul report."""
    iplan, int_vars, report = to_integer(cfg, plan, variables)
    int_model = build(cfg, iplan)
    r = run(int_model, int_vars)
    fq = build(cfg, plan.with_mode("quantize"))
    diff = max_output_difference(cfg, fq, variables, int_model, int_vars, batches, to_dev)
    return {
        metric: r[metric],
        **scores(r),
        "loss": r["loss"],
        "max_logit_diff": diff,
        "weight_bytes": report.weight_bytes,
        "float_weight_bytes": report.float_weight_bytes,
        "integer_matmuls": len(report.integer_matmuls),
        "float_matmuls": report.float_matmuls,
    }


# ------------------------------------------------------------------------ serialization


def _rule_dict(r: quant.QuantRule) -> dict:
    d = {"pattern": r.pattern, "kind": r.kind, "label": r.label}
    if r.optional:  # a preset's rule for points only some models have
        d["optional"] = True
    if r.spec is None:
        return {**d, "off": True}
    return {**d, **dataclasses.asdict(r.spec)}


def _rule_from_dict(d: dict) -> quant.QuantRule:
    """Inverse of :func:`_rule_dict` (a stored preset rule keeps its ``optional`` flag)."""
    d = dict(d)
    optional = bool(d.pop("optional", False))
    return dataclasses.replace(quant.rule_from_dict(d), optional=optional)


def _model_dict(cfg: ModelConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _model_from_dict(d: dict) -> ModelConfig:
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return model_config_from_dict(d, ModelConfig())


def process_umask() -> int:
    """The process umask, read from /proc where it can be (changing it is not thread safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save(
    out: str,
    cfg: ModelConfig,
    plan: quant.QuantPlan,
    int_vars: dict,
    report: IntegerReport,
    source: dict | None = None,
) -> list[str]:
    """Writes the int8 directory ``out`` (see module docstring); returns the file names."""
    from safetensors.numpy import save_file

    os.makedirs(out, exist_ok=True)
    tensors = {
        "/".join(k): np.array(v, order="C")
        for k, v in flatten_dict(jax.device_get(int_vars)).items()
    }
    weights_path = os.path.join(out, WEIGHTS_FILE)
    save_file(tensors, weights_path, metadata={"format": FORMAT})
    os.chmod(weights_path, 0o666 & ~process_umask())  # save_file creates it 0600
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": _model_dict(cfg),
        "quant": {
            "rules": [_rule_dict(r) for r in plan.rules],
            "calibration": plan.calibration,
        },
        "report": report.summary(),
        "source": source or {},
    }
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return [CONFIG_FILE, WEIGHTS_FILE]


def load(path: str) -> tuple[ModelConfig, quant.QuantPlan, dict, dict]:
    """``(model config, integer plan, integer variables, metadata)`` of an int8 directory."""
    from safetensors.numpy import load_file

    cfg_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise UserError(
                f"{path} is not an int8 model directory (no {os.path.basename(p)}); allowed: "
                "a directory written by export.py --int8."
            )
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(
            f"{cfg_path} has format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"allowed: {FORMAT!r} version {VERSION}."
        )
    cfg = _model_from_dict(meta["model"])
    rules = [_rule_from_dict(r) for r in meta["quant"]["rules"]]
    plan = integer_plan(quant.QuantPlan(rules, calibration=meta["quant"]["calibration"]))
    flat = {tuple(k.split("/")): jnp.asarray(v) for k, v in load_file(weights_path).items()}
    variables = unflatten_dict(flat)
    try:
        jax.eval_shape(lambda v: build(cfg, plan).apply(v, **dummy_inputs(cfg)), variables)
    except UserError:
        raise
    except Exception as e:  # a missing or mis-shaped tensor
        msg = str(e).splitlines()[0]
        raise UserError(f"{weights_path} does not match {cfg_path}: {msg}") from None
    return cfg, plan, variables, meta


# how a model runs, not what it computes: free to differ between an int8 directory and a config
RUN_FIELDS = (
    "dtype",
    "remat",
    "remat_policy",
    "scan_layers",
    "attention_kernel",
    "dropout",
    "attention_dropout",
    "drop_path",
)


def check_same_model(cfg: ModelConfig, expected: ModelConfig, where: str) -> None:
    """One sentence naming the first differing field of two model configs."""
    for f in dataclasses.fields(ModelConfig):
        if f.name in RUN_FIELDS:
            continue
        a, b = getattr(cfg, f.name), getattr(expected, f.name)
        if a != b:
            raise UserError(
                f"{where} holds a model with {f.name}={a!r}; the config has "
                f"config.model.{f.name}={b!r}."
            )
