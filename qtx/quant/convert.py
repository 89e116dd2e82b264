"""Conversion of a frozen fake-quant model to its integer twin (pure functions).

:func:`convert` takes a model built with an integer plan (``plan.with_integer()``), the
fake-quant variables (``params`` with any learned steps, ``quant_stats`` from calibration or
token-wise clipping) and example inputs, and returns the integer variables:

* ``quant_int``: for each quantized weight that feeds a matmul, and each quantized
  embedding table of up to 8 bits (which replaces the float table), ``codes`` (int8 of the
  weight's shape, or two 4-bit codes per byte where ``bits <= 4``), ``code_sums`` (int32
  sums of the codes over the contracted input axis, for the activation zero point's term),
  ``scale`` (float32, the point's granularity), ``zero`` (int32, where not 0) and ``offset``
  (LSQ+ weights);
* ``params`` without those weights' float kernels and quantizer steps;
* ``quant_stats`` without the converted weights' ranges (activations keep theirs).

Everything is checked by tracing first (:func:`check`), so a point without calibration, a
bit-width the int8 path cannot hold or a model that was not built with an integer plan
fails with one sentence before any compute.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from qtx.errors import UserError
from qtx.quant.integer import record_matmuls
from qtx.quant.quantizer import INT, STATS

WEIGHT_PARAMS = ("kernel", "embedding")  # what a module's ``weight`` point quantizes


@dataclasses.dataclass
class IntegerReport:
    """Which matmuls run on integers (and why the others do not), and the weight bytes."""

    integer_matmuls: list[str]
    float_matmuls: dict[str, str]
    weights: int  # converted weight tensors
    weight_bytes: int  # params + quant_int of the integer model
    float_weight_bytes: int  # params of the fake-quant model

    def summary(self) -> dict:
        return dataclasses.asdict(self)


def tree_bytes(tree) -> int:
    """Bytes of all arrays in ``tree`` (arrays or ShapeDtypeStructs)."""
    leaves = jax.tree.leaves(tree)
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in leaves))


def weight_bytes(variables: dict) -> int:
    """Bytes of a model's weights: ``params`` plus integer weights (``quant_int``)."""
    return tree_bytes(variables.get("params", {})) + tree_bytes(variables.get(INT, {}))


def check(model, variables: dict, *args, **kwargs) -> list[tuple[str, str | None]]:
    """Traces the integer model without computing; returns the ``(matmul, reason)`` log.

    Raises the model's own one-sentence errors (a point without calibration statistics or
    learned step, a matmul input wider than 8 bits).
    """
    plan = getattr(model, "plan", None)
    if plan is None or not plan.integer:
        raise UserError(
            "convert needs a model built with an integer plan (plan.with_integer()); got a "
            f"{type(model).__name__} with integer={getattr(plan, 'integer', None)}."
        )
    with record_matmuls() as log:
        jax.eval_shape(lambda v: model.apply(v, *args, mutable=[INT], **kwargs), variables)
    return list(log)


def convert(model, variables: dict, *args, **kwargs) -> tuple[dict, IntegerReport]:
    """``(integer variables, report)`` of ``model`` (built with an integer plan) from its
    frozen fake-quant ``variables``; ``args`` / ``kwargs`` are example inputs (any shape)."""
    log = check(model, variables, *args, **kwargs)
    _, made = jax.jit(lambda v: model.apply(v, *args, mutable=[INT], **kwargs))(variables)
    stored = made.get(INT, {})
    points = sorted({path[:-1] for path in flatten_dict(stored)})
    params = flatten_dict(variables["params"])
    for point in points:
        kernel = next((k for k in (point[:-1] + (n,) for n in WEIGHT_PARAMS) if k in params), None)
        if kernel is None:
            raise UserError(
                f"integer weight '{'/'.join(point)}' has no float parameter to replace; "
                f"weight points named 'weight' quantize their module's "
                f"{' or '.join(repr(n) for n in WEIGHT_PARAMS)}."
            )
        del params[kernel]
        for name in [k for k in params if k[: len(point)] == point]:
            del params[name]  # the point's own steps / offsets
    out = {k: v for k, v in variables.items() if k not in ("params", STATS, INT)}
    out["params"] = unflatten_dict(params)
    if STATS in variables:
        stats = {
            k: v
            for k, v in flatten_dict(variables[STATS]).items()
            if not any(k[: len(p)] == p for p in points)
        }
        out[STATS] = unflatten_dict(stats)
    out[INT] = stored
    # the integer model must run on exactly these variables
    jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), out)
    report = IntegerReport(
        integer_matmuls=sorted({n for n, r in log if r is None}),
        float_matmuls=dict(sorted({n: r for n, r in log if r is not None}.items())),
        weights=len(points),
        weight_bytes=weight_bytes(out),
        float_weight_bytes=tree_bytes(variables["params"]),
    )
    return out, report
