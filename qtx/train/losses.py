"""Task losses and the model inputs each task reads from a batch.

Every loss returns ``(loss_sum, count, metrics)`` so that micro-batches and eval batches
combine exactly: the mean loss is ``loss_sum / count``.

* ``clm``: next-token cross-entropy, ``logits[:, :-1]`` against ``input_ids[:, 1:]`` where
  both tokens are real (``attention_mask``);
* ``mlm``: cross-entropy at the selected positions (``weights``) against ``targets``;
* ``classification``: cross-entropy against ``label`` (MSE when the model has one output);
* ``image``: cross-entropy against ``label_soft`` (mixup / label smoothing) or ``label``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax

from qtx.models.family import family_record

TASKS = ("clm", "mlm", "classification", "image")  # the families that run each: Family.tasks
HEAD_OF_TASK = {
    "clm": "clm",
    "mlm": "mlm",
    "classification": "classification",
    "image": "classification",
}


def model_inputs(family: str, batch: dict) -> dict:
    """Keyword arguments of the ``family``'s model call for a batch (``Family.model_inputs``)."""
    return family_record(family).model_inputs(batch)


def _xent(logits, labels, weights):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(ce * weights), jnp.sum(weights)


def task_loss(task: str, logits, batch: dict):
    """``(loss_sum, count, metrics)`` for one batch; metrics hold sums as well."""
    if task == "clm":
        # position t predicts token t + 1; the last position has no target (weight 0). The
        # labels are shifted rather than the logits, so the (B, T, V) logits and their
        # gradient are never sliced or padded.
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", jnp.ones_like(ids)).astype(jnp.float32)
        zero = jnp.zeros_like(mask[:, :1])
        w = jnp.concatenate([mask[:, 1:] * mask[:, :-1], zero], axis=1)
        labels = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        loss, n = _xent(logits, labels, w)
        return loss, n, {}
    if task == "mlm":
        w = batch["weights"].astype(jnp.float32)
        loss, n = _xent(logits, batch["targets"], w)
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * w)
        return loss, n, {"correct": correct}
    w = batch.get("example_mask")
    w = jnp.ones(logits.shape[:1], jnp.float32) if w is None else w.astype(jnp.float32)
    if task == "classification" and logits.shape[-1] == 1:
        err = (logits[:, 0].astype(jnp.float32) - batch["label"].astype(jnp.float32)) ** 2
        return jnp.sum(err * w), jnp.sum(w), {}
    labels = batch["label"].astype(jnp.int32)
    soft = batch.get("label_soft")
    if soft is not None:
        ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), soft)
        loss = jnp.sum(ce * w)
    else:
        loss, _ = _xent(logits, labels, w)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * w)
    return loss, jnp.sum(w), {"correct": correct}


def finite_or_raise(value: float, step: int, what: str = "loss") -> None:
    """Fails fast on a NaN/Inf value, naming the step."""
    if not jnp.isfinite(value):
        raise FloatingPointError(
            f"{what} is {value} at step {step}; training stopped and the last good checkpoint "
            "is kept. Lower config.optim.lr, check the data, or use config.model.dtype="
            "'float32'."
        )


def sane_for_checkpoint(loss: float, recent: list[float], factor: float) -> bool:
    """Whether a state with training ``loss`` is good enough to be kept as a checkpoint:
    finite and at most ``factor * max(median(recent), 1)``, ``recent`` being the losses of the
    steps before it (any finite loss passes when there are none). A diverging run (loss far
    above its running median) then never replaces a good checkpoint, so the NaN stop that
    follows finds one."""
    if not math.isfinite(loss):
        return False
    if not recent:
        return True
    return loss <= factor * max(float(np.median(recent)), 1.0)
