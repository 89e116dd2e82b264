"""Calibration driver: run batches through a model in ``calibrate`` mode, jitted.

``forward(variables, batch)`` must call ``model.apply(variables, ..., mutable=[STATS])`` on a
model whose plan is in ``calibrate`` mode and return ``(output, mutated_collections)``. After
every batch the statistics are checked for NaN/Inf and the offending points are named.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from qtx.errors import UserError
from qtx.quant.quantizer import STATS, find_nonfinite, load_learnable_from_stats


def calibrate(forward: Callable, variables: dict, batches: Iterable) -> dict:
    """Accumulates ``quant_stats`` over ``batches``; returns the updated variables.

    Raises:
      ValueError: when a point saw NaN/Inf, naming the point and the batch.
    """
    variables = dict(variables)
    variables.pop(STATS, None)

    @jax.jit
    def step(variables, batch):
        _, mutated = forward(variables, batch)
        return mutated.get(STATS, {})  # {}: no point has anything to calibrate

    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise UserError("calibration got no batches; give at least one calibration batch.")
    # Zero statistics (count 0) of the right structure: every batch then runs one program.
    shapes = jax.eval_shape(step, variables, first)
    variables[STATS] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    for n, batch in enumerate(itertools.chain([first], batches), start=1):
        stats = step(variables, batch)
        bad = find_nonfinite(stats)
        if bad:
            raise UserError(
                f"calibration batch {n - 1} produced NaN/Inf at quantization point(s) "
                f"{', '.join(bad)}; check the inputs and the model in full precision."
            )
        variables[STATS] = stats
    return variables


def init_learnable(variables: dict) -> dict:
    """Moves calibrated LSQ/LSQ+ initial steps and offsets into ``params``."""
    variables = dict(variables)
    variables["params"] = load_learnable_from_stats(variables["params"], variables[STATS])
    return variables
