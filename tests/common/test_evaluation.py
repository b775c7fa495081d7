"""Evaluation metrics: scikit-learn's values, bootstrap intervals, ECE by its definition."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
)

from fedhead.common.evaluation import evaluate_predictions, expected_calibration_error


def _predictions(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax outputs of a noisy classifier that is right more often than not."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 1.2
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


def test_binary_metrics_are_sklearns() -> None:
    y, p = _predictions(300, 2, seed=1)
    pred = p.argmax(1)
    ev = evaluate_predictions(y, p, ["normal", "pneumonia"], resamples=50)
    v = ev.values
    assert v["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert v["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert v["auroc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert v["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert v["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert v["precision/pneumonia"] == pytest.approx(precision_score(y, pred, pos_label=1))
    assert ev.confusion == confusion_matrix(y, pred).tolist()
    assert ev.positive == "pneumonia"
    for name, (lo, hi) in ev.intervals.items():
        assert lo <= hi, name
        assert lo - 1e-9 <= v[name] <= hi + 1e-9 or name == "ece", (name, lo, v[name], hi)


def test_positive_class_can_be_the_first() -> None:
    y, p = _predictions(200, 2, seed=2)
    ev = evaluate_predictions(y, p, ["a", "b"], positive=0, resamples=0)
    assert ev.positive == "a"
    assert ev.values["sensitivity"] == pytest.approx(recall_score(y, p.argmax(1), pos_label=0))
    assert ev.values["auroc"] == pytest.approx(roc_auc_score(y == 0, p[:, 0]))


def test_multiclass_auroc_is_one_vs_rest() -> None:
    y, p = _predictions(400, 3, seed=3)
    ev = evaluate_predictions(y, p, ["a", "b", "c"], resamples=30)
    assert ev.values["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert "sensitivity" not in ev.values and ev.positive is None
    recall = recall_score(y, p.argmax(1), average=None)
    for i, c in enumerate("abc"):
        assert ev.values[f"recall/{c}"] == pytest.approx(recall[i])
    doc = json.loads(json.dumps(ev.to_json()))
    assert doc["per_class"]["b"]["support"] == int((y == 1).sum())
    assert doc["bootstrap"]["resamples"] == 30


def test_intervals_come_from_the_seeded_resamples() -> None:
    y, p = _predictions(150, 2, seed=4)
    a = evaluate_predictions(y, p, ["x", "y"], resamples=40, seed=9)
    b = evaluate_predictions(y, p, ["x", "y"], resamples=40, seed=9)
    c = evaluate_predictions(y, p, ["x", "y"], resamples=40, seed=10)
    assert a.intervals == b.intervals
    assert a.intervals != c.intervals
    # a manual percentile bootstrap of accuracy gives the same interval
    rng = np.random.default_rng(9)
    accs = []
    for _ in range(40):
        idx = rng.integers(0, len(y), len(y))
        accs.append(accuracy_score(y[idx], p[idx].argmax(1)))
    lo, hi = np.percentile(accs, [2.5, 97.5])
    assert a.intervals["accuracy"] == pytest.approx((lo, hi))


def test_ece_by_its_definition() -> None:
    # 4 predictions at confidence 0.8 (2 right) and 2 at 0.6 (both right):
    # ECE = 4/6 * |0.5 - 0.8| + 2/6 * |1.0 - 0.6|
    p = np.array([[0.8, 0.2]] * 4 + [[0.4, 0.6]] * 2)
    y = np.array([0, 0, 1, 1, 1, 1])
    assert expected_calibration_error(y, p) == pytest.approx(4 / 6 * 0.3 + 2 / 6 * 0.4)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(np.array([0, 1]), perfect) == pytest.approx(0.0)


def test_undefined_metrics_are_null_not_invented() -> None:
    y = np.zeros(20, np.int64)  # one class only: AUROC and the other recall are undefined
    p = np.tile([0.7, 0.3], (20, 1))
    ev = evaluate_predictions(y, p, ["a", "b"], resamples=10)
    assert math.isnan(ev.values["auroc"]) and math.isnan(ev.values["sensitivity"])
    doc = ev.to_json()
    assert doc["metrics"]["auroc"]["value"] is None
    assert doc["metrics"]["auroc"]["ci95"] == [None, None]
    assert doc["metrics"]["accuracy"]["value"] == 1.0
    assert "n/a" in ev.table()


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        evaluate_predictions(np.array([0, 1]), np.ones((2, 3)) / 3, ["a", "b"])
