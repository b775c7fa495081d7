"""Classification metrics with bootstrap confidence intervals, from scikit-learn.

``evaluate_predictions`` takes true labels and predicted class probabilities and
returns accuracy, balanced accuracy, per-class precision and recall, AUROC
(one-vs-rest for more than two classes), sensitivity and specificity (two classes),
the expected calibration error and the confusion matrix. Every metric but the
confusion matrix has a percentile bootstrap interval: the examples are resampled
with replacement, the metric recomputed on each resample, and the interval read from
the resulting distribution. Resamples where a metric is undefined (AUROC without
both classes, precision of a class never predicted) are left out for that metric.

scikit-learn is imported where it is used: a site's train message, which only counts
the tables the server pools (``common.pooled``), does not pay its import.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ECE_BINS = 15


def expected_calibration_error(
    y_true: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Top-label expected calibration error (Guo et al., 2017).

    The confidence of a prediction is its largest class probability. Predictions are
    grouped into ``bins`` equal-width confidence bins over (0, 1]; the ECE is the
    example-weighted mean over bins of |accuracy in the bin - mean confidence in the
    bin|. scikit-learn has no function for it (its ``calibration_curve`` is binary).
    """
    if len(y_true) == 0:
        return math.nan
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(
        np.bincount(which, weights=correct, minlength=bins)
        - np.bincount(which, weights=confidence, minlength=bins)
    )
    return float(gap.sum() / count.sum())


def point_metrics(
    y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str], positive: int = 1
) -> dict[str, float]:
    """Every scalar metric, by name (``precision/<class>``, ``recall/<class>`` per class).

    A metric that is undefined on these examples (AUROC without both classes, the
    precision of a class never predicted) is NaN.
    """
    from sklearn.exceptions import UndefinedMetricWarning

    with warnings.catch_warnings():
        # scikit-learn warns about undefined metrics; they are NaN here, and reported so.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
        return _point_metrics(y_true, proba, classes, positive)


def _point_metrics(
    y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str], positive: int
) -> dict[str, float]:
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    k = len(classes)
    labels = list(range(k))
    pred = proba.argmax(axis=1)
    out: dict[str, float] = {
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
    }
    present = np.unique(y_true)
    if k == 2 and len(present) == 2:
        out["auroc"] = float(roc_auc_score(y_true == positive, proba[:, positive]))
    elif k > 2 and len(present) == k:
        out["auroc"] = float(roc_auc_score(y_true, proba, multi_class="ovr", labels=labels))
    else:
        out["auroc"] = math.nan  # needs every class among the true labels
    precision, recall, _, _ = precision_recall_fscore_support(
        y_true, pred, labels=labels, average=None, zero_division=np.nan
    )
    if k == 2:
        # sensitivity: recall of the positive class; specificity: recall of the other
        out["sensitivity"] = float(recall[positive])
        out["specificity"] = float(recall[1 - positive])
    out["ece"] = expected_calibration_error(y_true, proba)
    for i, name in enumerate(classes):
        out[f"precision/{name}"] = float(precision[i])
        out[f"recall/{name}"] = float(recall[i])
    return out


@dataclass
class Evaluation:
    classes: list[str]
    examples: int
    positive: str | None  # two classes: the class sensitivity refers to
    values: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    support: list[int]
    resamples: int
    confidence: float
    seed: int
    defined_resamples: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def entry(name: str) -> dict[str, Any]:
            lo, hi = self.intervals[name]
            return {
                "value": _json_float(self.values[name]),
                "ci95": [_json_float(lo), _json_float(hi)],
                "resamples_defined": self.defined_resamples.get(name, 0),
            }

        scalar = [n for n in self.values if "/" not in n]
        return {
            "classes": self.classes,
            "examples": self.examples,
            "positive_class": self.positive,
            "bootstrap": {
                "resamples": self.resamples,
                "confidence": self.confidence,
                "seed": self.seed,
                "method": "percentile",
            },
            "metrics": {n: entry(n) for n in scalar},
            "per_class": {
                c: {
                    "support": self.support[i],
                    "precision": entry(f"precision/{c}"),
                    "recall": entry(f"recall/{c}"),
                }
                for i, c in enumerate(self.classes)
            },
            "confusion_matrix": {
                "rows": "true class",
                "columns": "predicted class",
                "labels": self.classes,
                "counts": self.confusion,
            },
            "ece_bins": ECE_BINS,
        }

    def table(self) -> str:
        """A readable summary: metric, value, interval; then the confusion matrix."""
        pct = f"{self.confidence:.0%}"
        lines = [f"{'metric':<28}{'value':>8}   {pct} interval", "-" * 52]
        for name, v in self.values.items():
            lo, hi = self.intervals[name]
            label = name.replace("/", " ")
            if name in ("sensitivity", "specificity") and self.positive:
                label += f" ({self.positive})" if name == "sensitivity" else ""
            lines.append(f"{label:<28}{_fmt(v):>8}   [{_fmt(lo)}, {_fmt(hi)}]")
        width = max(8, *(len(c) + 1 for c in self.classes))
        lines += ["", "confusion matrix (rows: true, columns: predicted)"]
        lines.append(" " * width + "".join(f"{c:>{width}}" for c in self.classes))
        for c, row in zip(self.classes, self.confusion, strict=True):
            lines.append(f"{c:<{width}}" + "".join(f"{n:>{width}}" for n in row))
        return "\n".join(lines)


def _fmt(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else "n/a"


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def evaluate_predictions(
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    positive: int = 1,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Evaluation:
    """Metrics of ``proba`` (N x classes) against integer labels ``y_true``, with
    percentile bootstrap intervals over ``resamples`` resamples of the examples."""
    import sklearn
    from sklearn.metrics import confusion_matrix

    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    k = len(classes)
    if proba.ndim != 2 or proba.shape != (len(y_true), k):
        raise ValueError(f"proba must have shape ({len(y_true)}, {k}), got {proba.shape}")
    if len(y_true) == 0:
        raise ValueError("no examples to evaluate")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = point_metrics(y_true, proba, classes, positive)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in values}
    n = len(y_true)
    # The inputs were validated by the point estimates above: skip scikit-learn's
    # per-call checks, which dominate the time on resamples of this size.
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        for _ in range(resamples):
            idx = rng.integers(0, n, n)
            for name, v in point_metrics(y_true[idx], proba[idx], classes, positive).items():
                samples[name].append(v)
    tail = (1 - confidence) / 2 * 100
    intervals: dict[str, tuple[float, float]] = {}
    defined: dict[str, int] = {}
    for name, vs in samples.items():
        arr = np.asarray(vs, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        defined[name] = len(arr)
        if len(arr):
            lo, hi = np.percentile(arr, [tail, 100 - tail])
            intervals[name] = (float(lo), float(hi))
        else:
            intervals[name] = (math.nan, math.nan)
    cm = confusion_matrix(y_true, proba.argmax(axis=1), labels=list(range(k)))
    return Evaluation(
        classes=list(classes),
        examples=n,
        positive=classes[positive] if k == 2 else None,
        values=values,
        intervals=intervals,
        confusion=cm.tolist(),
        support=np.bincount(y_true, minlength=k).tolist(),
        resamples=resamples,
        confidence=confidence,
        seed=seed,
        defined_resamples=defined,
    )


def paired_difference(
    y_true: np.ndarray,
    proba_a: np.ndarray,
    proba_b: np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    metric: str = "accuracy",
) -> tuple[float, float, float]:
    """``metric`` (accuracy or balanced_accuracy) of ``proba_a`` minus that of ``proba_b``
    on the same examples, with a paired percentile bootstrap interval: each resample
    draws the examples once and scores both models on them, so the interval reflects
    the difference, not the two metrics' separate uncertainties."""
    import sklearn
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    scores = {"accuracy": accuracy_score, "balanced_accuracy": balanced_accuracy_score}
    if metric not in scores:
        raise ValueError(f"metric must be one of {sorted(scores)}, not {metric!r}")
    score = scores[metric]
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) == 0:
        raise ValueError("no examples to compare on")
    pred_a, pred_b = np.asarray(proba_a).argmax(axis=1), np.asarray(proba_b).argmax(axis=1)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    diffs = np.empty(resamples)
    with (
        warnings.catch_warnings(),
        sklearn.config_context(assume_finite=True, skip_parameter_validation=True),
    ):
        # balanced accuracy of a resample holding one class: scikit-learn warns, and
        # scores the classes present
        warnings.simplefilter("ignore", UserWarning)
        value = float(score(y_true, pred_a) - score(y_true, pred_b))
        for i in range(resamples):
            idx = rng.integers(0, n, n)
            diffs[i] = score(y_true[idx], pred_a[idx]) - score(y_true[idx], pred_b[idx])
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return value, float(min(lo, value)), float(max(hi, value))
