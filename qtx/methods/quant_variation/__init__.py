"""Quantization Variation (Huang et al., TMLR 2024; docs/methods.md §3), on top of LSQ QAT.

* module-dependent LSQ: the ``qv_lsq`` preset (:mod:`qtx.quant.presets`);
* variation-aware distillation: ``config.train.distill_loss='soft_ce'`` with
  ``task_loss_weight=0`` (soft cross-entropy against the teacher, no hard labels) and
  multi-crop batches (``config.data.repeated_aug=4`` with a ``crop_scale``);
* oscillation-aware bin regularization: :mod:`.obr` (``config.train.obr``);
* oscillation tracking: :mod:`.oscillation` (``config.train.track_oscillation``);
* binary mode: the ``binary`` preset;
* variation analysis (module / head sensitivity, outliers, oscillation): :mod:`.analysis`
  (``config.eval.variation``).

:func:`train_hooks` gives the training loop what these add to its step (the loss term and the
tracker's update), through :class:`qtx.train.steps.StepHooks`, and :func:`train_state` the
tracker it keeps; both make ``QAT_TERM``, QV's term in :mod:`qtx.methods.registry`.
"""

from __future__ import annotations

import jax

from qtx import quant
from qtx.methods.kinds import QATTerm
from qtx.methods.quant_variation.obr import bin_regularizer, obr_lambda, obr_penalty
from qtx.methods.quant_variation.oscillation import (
    COLLECTION,
    codes_of,
    init_tracker,
    oscillating_fractions,
    update_tracker,
    weight_codes,
)
from qtx.train.steps import StepHooks

__all__ = [
    "COLLECTION",
    "QAT_TERM",
    "bin_regularizer",
    "codes_of",
    "init_tracker",
    "obr_lambda",
    "obr_penalty",
    "oscillating_fractions",
    "train_hooks",
    "tracker_for",
    "train_state",
    "update_tracker",
    "weight_codes",
]


def train_hooks(train: dict, total_steps: int):
    """The :class:`~qtx.train.steps.StepHooks` of ``config.train``'s OBR and oscillation
    tracking, or None when both are off.

    * OBR: ``lambda(step) * sum_m L_m`` over every quantized weight, metrics ``obr`` (the sum
      of ``L_m``) and ``obr_lambda``;
    * tracking: the tracker in ``state.extra['oscillation']`` sees each step's integer codes
      (of the weights the step's forward pass used); metrics ``oscillating`` and
      ``oscillating/<module>``.
    """
    peak, track = float(train["obr"]), bool(train["track_oscillation"])
    if not peak and not track:
        return None
    start = float(train["obr_start"])
    momentum = float(train["oscillation_momentum"])
    threshold = float(train["oscillation_threshold"])

    def loss(params, out, collected, batch, step):
        total, _ = obr_penalty(quant.weight_records(collected.get(quant.WEIGHTS, {})))
        lam = obr_lambda(step, total_steps, peak, start)
        return lam * total, {"obr": total, "obr_lambda": lam}

    def observe(collected):
        return codes_of(quant.weight_records(collected.get(quant.WEIGHTS, {})))

    def update(extra, codes, step):
        tracker = update_tracker(extra[COLLECTION], codes, momentum)
        return {**extra, COLLECTION: tracker}, oscillating_fractions(tracker, threshold)

    return StepHooks(
        collections=(quant.WEIGHTS,),
        loss=loss if peak else None,
        observe=observe if track else None,
        update=update if track else None,
    )


def tracker_for(apply_fn, variables: dict, inputs: dict) -> dict:
    """A fresh oscillation tracker for every weight point the model quantizes
    (``apply_fn`` = ``model.apply`` of the QAT model; shapes only, no compute)."""

    def records(v):
        _, coll = apply_fn(v, **inputs, mutable=[quant.WEIGHTS])
        return codes_of(quant.weight_records(coll.get(quant.WEIGHTS, {})))

    return init_tracker(jax.eval_shape(records, variables))


def train_state(train: dict, apply_fn, variables: dict, inputs: dict) -> dict:
    """``{COLLECTION: a fresh tracker}`` when ``config.train.track_oscillation``, else ``{}``
    (what QV keeps in ``TrainState.extra``)."""
    if not train["track_oscillation"]:
        return {}
    return {COLLECTION: tracker_for(apply_fn, variables, inputs)}


# OBR and oscillation tracking, a QAT term of the registry (qtx.methods.registry)
QAT_TERM = QATTerm(
    "quant_variation",
    "Quantization Variation (Huang et al., TMLR 2024; docs/methods.md §3)",
    train_hooks,
    train_state,
)
