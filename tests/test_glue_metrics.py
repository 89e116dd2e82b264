"""GLUE's per-task scores against scikit-learn / SciPy, and the headline metric per task."""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

from qtx.evaluate.metrics import glue_scores, headline_metric, run_eval


def test_glue_scores_match_scikit_learn_and_scipy():
    r = np.random.default_rng(0)
    label = r.integers(0, 2, 200)
    pred = np.where(r.random(200) < 0.8, label, 1 - label)
    assert glue_scores("mrpc", pred, label)["f1"] == pytest.approx(f1_score(label, pred))
    assert glue_scores("cola", pred, label)["mcc"] == pytest.approx(matthews_corrcoef(label, pred))
    assert glue_scores("cola", np.zeros(5), np.array([0, 1, 0, 1, 1]))["mcc"] == 0.0
    score = np.round(r.uniform(0, 5, 300), 1)  # ties, as STS-B's labels have
    guess = score + r.normal(0, 1, 300)
    s = glue_scores("stsb", guess, score)
    assert s["pearson"] == pytest.approx(stats.pearsonr(guess, score)[0])
    assert s["spearman"] == pytest.approx(stats.spearmanr(guess, score)[0])
    assert glue_scores("sst2", pred, label) == {}


def test_headline_metric_per_task():
    assert [headline_metric("classification", t) for t in ("cola", "mrpc", "stsb", "sst2")] == [
        "mcc",
        "f1",
        "pearson",
        "accuracy",
    ]
    assert headline_metric("clm") == "perplexity" and headline_metric("image") == "accuracy"


def test_run_eval_collects_predictions_without_padding_rows():
    """Padding rows (weight 0) of the last batch stay out of the scores."""

    def step(_, batch):
        return batch, {}

    def batch(pred, label, weight):
        n = float(sum(weight))
        correct = float(sum(w * (p == q) for p, q, w in zip(pred, label, weight, strict=True)))
        return {
            "loss_sum": n, "count": n, "correct": correct, "pred": np.array(pred),
            "label": np.array(label), "weight": np.array(weight, np.float32),
        }  # fmt: skip

    batches = [batch([1, 0, 1], [1, 0, 0], [1, 1, 1]), batch([1, 1], [1, 0], [1, 0])]
    out = run_eval(step, None, batches, "classification", glue_task="mrpc")
    assert out["accuracy"] == pytest.approx(3 / 4)
    assert out["f1"] == pytest.approx(f1_score([1, 0, 0, 1], [1, 0, 1, 1]))
