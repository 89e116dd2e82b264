"""Evaluation loop shared by training and eval.py: perplexity or accuracy, plus outliers.

Perplexity follows Quantizable Transformers: ``exp(mean over batches of the batch's mean
token cross-entropy)``. Accuracy is the fraction of correct examples (padding rows of the
last batch excluded). GLUE tasks also get their own scores (:func:`glue_scores`): F1 of the
positive class (MRPC, QQP), Matthews correlation (CoLA), Pearson and Spearman correlations
(STS-B); :data:`GLUE_HEADLINE` names the one each task reports first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import jax
import numpy as np

from qtx.data.glue import glue_task
from qtx.errors import UserError
from qtx.evaluate.decoder_outliers import COLLECTION as DECODER
from qtx.evaluate.decoder_outliers import with_decoder_statistics
from qtx.evaluate.outliers import OutlierAccumulator
from qtx.models.family import family_record
from qtx.train.mesh import fetch
from qtx.train.steps import make_eval_step

GLUE_HEADLINE = {"cola": "mcc", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}  # else accuracy


def headline_metric(task: str, glue_task: str | None = None) -> str:
    """The metric a run reports first: perplexity (LM), accuracy, or the GLUE task's own."""
    if task in ("clm", "mlm"):
        return "perplexity"
    return GLUE_HEADLINE.get(glue_task or "", "accuracy")


SCORES = ("perplexity", "accuracy", "f1", "mcc", "pearson", "spearman")


def scores(result: dict) -> dict:
    """The quality scores present in a :func:`run_eval` result."""
    return {k: result[k] for k in SCORES if k in result}


def glue_task_of(exp) -> str | None:
    """The GLUE task an experiment evaluates (``sst2_local`` -> ``sst2``), or None."""
    name = str(exp.data.get("name") or "")
    if exp.task != "classification" or not (name.startswith("glue/") or name == "sst2_local"):
        return None

    return glue_task(name)


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks (0-based), ties sharing their mean rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def _pearson(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def glue_scores(task: str, pred: np.ndarray, label: np.ndarray) -> dict:
    """GLUE's scores of one task from predictions (class ids, or scores for ``stsb``).

    ``f1``: ``2 tp / (2 tp + fp + fn)`` of class 1; ``mcc``: ``(tp tn - fp fn) /
    sqrt((tp + fp)(tp + fn)(tn + fp)(tn + fn))`` (0 when a factor is 0); ``pearson`` and
    ``spearman`` (Pearson of the tie-averaged ranks).
    """
    pred, label = np.asarray(pred, np.float64), np.asarray(label, np.float64)
    if task == "stsb":
        return {"pearson": _pearson(pred, label), "spearman": _pearson(_rank(pred), _rank(label))}
    out = {}
    if task in ("mrpc", "qqp", "cola"):
        tp = float(np.sum((pred == 1) & (label == 1)))
        tn = float(np.sum((pred == 0) & (label == 0)))
        fp = float(np.sum((pred == 1) & (label == 0)))
        fn = float(np.sum((pred == 0) & (label == 1)))
        if task == "cola":
            den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            out["mcc"] = (tp * tn - fp * fn) / den if den > 0 else 0.0
        else:
            out["f1"] = 2 * tp / max(2 * tp + fp + fn, 1.0)
    return out


def run_eval(
    eval_step: Callable,
    variables,
    batches: Iterable[dict],
    task: str,
    to_device: Callable = lambda b: b,
    outliers: OutlierAccumulator | None = None,
    glue_task: str | None = None,
) -> dict:
    """Runs ``eval_step(variables, batch) -> (metrics, collected)`` over ``batches``; with
    ``glue_task`` also that task's :func:`glue_scores`."""
    batch_means, loss_sum, count, correct, n = [], 0.0, 0.0, 0.0, 0
    preds, labels = [], []
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
        if "pred" in metrics:
            keep = np.asarray(metrics["weight"]) > 0
            preds.append(np.asarray(metrics["pred"])[keep])
            labels.append(np.asarray(metrics["label"])[keep])
        n += 1
        if outliers is not None:
            mask = dev.get("example_mask")
            weights = None if mask is None else fetch(mask)  # real (non-padding) rows
            if "intermediates" in collected:
                outliers.update(fetch(collected["intermediates"]), weights)
            if DECODER in collected:
                outliers.update_decoder(fetch(collected[DECODER]), weights)
    if n == 0:
        raise UserError("evaluation got no batches; check config.data and max_eval_batches.")
    out = {"loss": float(np.mean(batch_means)) if batch_means else float("nan"), "batches": n}
    if task in ("clm", "mlm"):
        out["perplexity"] = math.exp(out["loss"]) if out["loss"] < 700 else float("inf")
    if task in ("classification", "image"):
        out["accuracy"] = correct / max(count, 1.0)
    if glue_task and preds:
        out.update(glue_scores(glue_task, np.concatenate(preds), np.concatenate(labels)))
        if glue_task == "stsb":  # a regression: no classes to be correct about
            out.pop("accuracy", None)
    return out


def make_evaluate(
    model,
    family: str,
    task: str,
    batches: Callable[[], Iterable[dict]],
    to_device: Callable = lambda b: b,
    glue_task: str | None = None,
    outliers: bool = False,
) -> Callable[..., dict]:
    """``evaluate(variables, accumulator=None) -> metrics``: :func:`run_eval` of ``model``'s
    jitted eval step (``qtx.train.steps.make_eval_step``, compiled once) over a fresh
    ``batches()`` per call. ``outliers``: the step also returns the ``intermediates`` the
    model sows, fed to the ``accumulator`` (an :class:`OutlierAccumulator`); for a causal
    family also the decoder statistics (``qtx.evaluate.decoder_outliers``), reduced in the step."""
    if outliers and family_record(family).causal:
        model = with_decoder_statistics(model)
    step = jax.jit(make_eval_step(model, family, task, ("intermediates",) if outliers else ()))

    def evaluate(variables, accumulator: OutlierAccumulator | None = None) -> dict:
        return run_eval(step, variables, batches(), task, to_device, accumulator, glue_task)

    return evaluate
