"""Evaluation loop shared by training and eval.py: perplexity or accuracy, plus outliers.

Perplexity follows Quantizable Transformers: ``exp(mean over batches of the batch's mean
token cross-entropy)``. Accuracy is the fraction of correct examples (padding rows of the
last batch excluded).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from qtx.errors import UserError
from qtx.evaluate.outliers import OutlierAccumulator
from qtx.train.mesh import fetch


def run_eval(
    eval_step: Callable,
    variables,
    batches: Iterable[dict],
    task: str,
    to_device: Callable = lambda b: b,
    outliers: OutlierAccumulator | None = None,
) -> dict:
    """Runs ``eval_step(variables, batch) -> (metrics, collected)`` over ``batches``."""
    batch_means, loss_sum, count, correct, n = [], 0.0, 0.0, 0.0, 0
    for batch in batches:
        dev = to_device(batch)
        metrics, collected = eval_step(variables, dev)
        metrics = fetch(metrics)
        c = float(metrics["count"])
        if c > 0:
            batch_means.append(float(metrics["loss_sum"]) / c)
        loss_sum += float(metrics["loss_sum"])
        count += c
        correct += float(metrics.get("correct", 0.0))
        n += 1
        if outliers is not None and "intermediates" in collected:
            mask = dev.get("example_mask")
            outliers.update(
                fetch(collected["intermediates"]), None if mask is None else fetch(mask)
            )
    if n == 0:
        raise UserError("evaluation got no batches; check config.data and max_eval_batches.")
    out = {"loss": float(np.mean(batch_means)) if batch_means else float("nan"), "batches": n}
    if task in ("clm", "mlm"):
        out["perplexity"] = math.exp(out["loss"]) if out["loss"] < 700 else float("inf")
    if task in ("classification", "image"):
        out["accuracy"] = correct / max(count, 1.0)
    return out
