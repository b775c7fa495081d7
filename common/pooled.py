"""Clinical metrics pooled over sites from small sufficient statistics.

Under federated evaluation no site sends per-image scores. Each sends, besides loss
and accuracy, three count tables over its validation split:

- ``confusion``: C x C counts (rows: true class, columns: predicted class);
- ``scores``: for every class k, a histogram with ``SCORE_BINS`` equal-width bins over
  [0, 1] of the predicted probability of k, split by whether k is the true class
  (C x 2 x SCORE_BINS counts); one-vs-rest AUROC of class k needs only these;
- ``calibration``: for the top-label confidence, per ``ECE_BINS`` bin, the number of
  predictions, how many were right, and the sum of their confidences (3 x ECE_BINS).

Each travels as the bytes of a little-endian int64 (counts) or float64 array.

Tables from several sites add up to the table of their pooled examples, so the server
sums them and computes from the sum, with scikit-learn:

- AUROC (one-vs-rest, macro over classes for more than two) from the summed score
  histograms: each bin counts as its centre, weighted by its count. It is exact up to
  binning: scores that fall in the same bin count as tied;
- sensitivity and specificity (two classes; positive class: the second), balanced
  accuracy and the confusion matrix from the summed confusion counts: exact;
- the top-label expected calibration error from the calibration table: exact, and the
  same as ``common.evaluation.expected_calibration_error`` on the pooled examples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhead.common.evaluation import ECE_BINS

SCORE_BINS = 100
MAX_CLASSES = 1000  # the run's class list is bounded well below this
# The metric names the statistics travel under in an evaluation reply.
KEY_CONFUSION = "stats-confusion"
KEY_SCORES = "stats-scores"
KEY_CALIBRATION = "stats-calibration"
STAT_KEYS = (KEY_CONFUSION, KEY_SCORES, KEY_CALIBRATION)


def _bin(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins over [0, 1]: bin i holds (i/bins, (i+1)/bins], 0 in the first."""
    which: np.ndarray = np.clip(np.ceil(values * bins).astype(np.int64) - 1, 0, bins - 1)
    return which


@dataclass
class EvalStatistics:
    """One site's (or the pooled) count tables, as described in the module docstring."""

    confusion: np.ndarray  # int64 (C, C)
    scores: np.ndarray  # int64 (C, 2, SCORE_BINS): [class][0: not true, 1: true][bin]
    calibration: np.ndarray  # float64 (3, ECE_BINS): count, correct, confidence sum

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    @property
    def examples(self) -> int:
        return int(self.confusion.sum())

    @classmethod
    def from_predictions(cls, y_true: np.ndarray, proba: np.ndarray) -> EvalStatistics:
        """The tables of predicted probabilities ``proba`` (N x C) for labels ``y_true``."""
        y = np.asarray(y_true, dtype=np.int64)
        p = np.asarray(proba, dtype=np.float64)
        n, k = p.shape
        confusion = np.zeros((k, k), dtype=np.int64)
        np.add.at(confusion, (y, p.argmax(axis=1)), 1)
        scores = np.zeros((k, 2, SCORE_BINS), dtype=np.int64)
        truth = (y[:, None] == np.arange(k)[None, :]).astype(np.int64)  # N x C
        np.add.at(scores, (np.tile(np.arange(k), n), truth.ravel(), _bin(p, SCORE_BINS).ravel()), 1)
        confidence = p.max(axis=1)
        which = _bin(confidence, ECE_BINS)
        correct = (p.argmax(axis=1) == y).astype(np.float64)
        calibration = np.stack(
            [
                np.bincount(which, minlength=ECE_BINS).astype(np.float64),
                np.bincount(which, weights=correct, minlength=ECE_BINS),
                np.bincount(which, weights=confidence, minlength=ECE_BINS),
            ]
        )
        return cls(confusion, scores, calibration)

    def to_metrics(self) -> dict[str, bytes]:
        """Little-endian int64 / float64 bytes for a Flower reply (legacy metrics hold
        scalars, bytes among them, but no lists)."""
        return {
            KEY_CONFUSION: self.confusion.astype("<i8").tobytes(),
            KEY_SCORES: self.scores.astype("<i8").tobytes(),
            KEY_CALIBRATION: self.calibration.astype("<f8").tobytes(),
        }

    @classmethod
    def from_metrics(
        cls, metrics: Mapping[str, Any], num_classes: int, examples: int
    ) -> EvalStatistics:
        """Read and check a site's tables; ValueError names what is wrong.

        Sites are untrusted: every table must have the run's shape, hold non-negative
        whole counts, and count exactly the ``examples`` the reply claims.
        """
        k = num_classes
        if not 2 <= k <= MAX_CLASSES:
            raise ValueError(f"{k} classes")
        confusion = _counts(metrics, KEY_CONFUSION, (k, k))
        scores = _counts(metrics, KEY_SCORES, (k, 2, SCORE_BINS))
        calibration = _floats(metrics, KEY_CALIBRATION, (3, ECE_BINS))
        if max(confusion.max(), scores.max(), calibration[0].max()) > examples:
            raise ValueError(f"a count above the {examples} examples the reply claims")
        if int(confusion.sum()) != examples:
            raise ValueError(f"confusion counts {int(confusion.sum())} examples, not {examples}")
        per_class = scores.sum(axis=2)  # (C, 2): every example once per class
        if not (per_class.sum(axis=1) == examples).all():
            raise ValueError("score histograms do not count every example once per class")
        if not (per_class[:, 1] == confusion.sum(axis=1)).all():
            raise ValueError("score histograms and confusion disagree on the class counts")
        count, correct, conf_sum = calibration
        if (
            not np.all(count == np.round(count))
            or int(count.sum()) != examples
            or not np.all((correct >= 0) & (correct <= count) & (correct == np.round(correct)))
            or int(correct.sum()) != int(np.trace(confusion))
            or not np.all((conf_sum >= 0) & (conf_sum <= count))
        ):
            raise ValueError("calibration table inconsistent with the examples and confusion")
        return cls(confusion, scores, calibration)

    def __add__(self, other: EvalStatistics) -> EvalStatistics:
        return EvalStatistics(
            self.confusion + other.confusion,
            self.scores + other.scores,
            self.calibration + other.calibration,
        )

    def metrics(self, positive: int = 1) -> dict[str, float]:
        """Pooled metrics (NaN where undefined, e.g. AUROC without both kinds of label)."""
        from sklearn.metrics import balanced_accuracy_score, roc_auc_score

        k = self.num_classes
        out: dict[str, float] = {}
        true_idx, pred_idx = np.nonzero(self.confusion)
        weight = self.confusion[true_idx, pred_idx]
        if len(weight) == 0:
            return {"auroc": math.nan, "balanced_accuracy": math.nan, "ece": math.nan}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # classes absent from y_true
            out["balanced_accuracy"] = float(
                balanced_accuracy_score(true_idx, pred_idx, sample_weight=weight)
            )
        centres = (np.arange(SCORE_BINS) + 0.5) / SCORE_BINS
        aurocs = []
        for c in range(k if k > 2 else 1):
            cls_ = c if k > 2 else positive
            neg, pos = self.scores[cls_]
            if pos.sum() == 0 or neg.sum() == 0:
                aurocs.append(math.nan)
                continue
            y = np.concatenate([np.zeros(SCORE_BINS), np.ones(SCORE_BINS)])
            s = np.concatenate([centres, centres])
            w = np.concatenate([neg, pos]).astype(np.float64)
            keep = w > 0
            aurocs.append(float(roc_auc_score(y[keep], s[keep], sample_weight=w[keep])))
        # more than two classes: macro one-vs-rest, defined when every class is present
        out["auroc"] = float(np.mean(aurocs)) if all(math.isfinite(a) for a in aurocs) else math.nan
        if k == 2:
            rows = self.confusion.sum(axis=1)
            out["sensitivity"] = _ratio(self.confusion[positive, positive], rows[positive])
            other = 1 - positive
            out["specificity"] = _ratio(self.confusion[other, other], rows[other])
        count, correct, conf_sum = self.calibration
        out["ece"] = float(np.abs(correct - conf_sum).sum() / count.sum())
        return out


def pool(statistics: Iterable[EvalStatistics]) -> EvalStatistics | None:
    """The sum of the sites' tables (None when there is none)."""
    total: EvalStatistics | None = None
    for s in statistics:
        total = s if total is None else total + s
    return total


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else math.nan


def _array(metrics: Mapping[str, Any], key: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    value = metrics.get(key)
    size = int(np.prod(shape))
    if not isinstance(value, bytes) or len(value) != 8 * size:
        raise ValueError(f"{key}: expected {size} 8-byte numbers")
    arr = np.frombuffer(value, dtype=dtype).reshape(shape)
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{key}: negative or non-finite values")
    return arr


def _counts(metrics: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    return _array(metrics, key, shape, "<i8").astype(np.int64)


def _floats(metrics: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    return _array(metrics, key, shape, "<f8").astype(np.float64)
