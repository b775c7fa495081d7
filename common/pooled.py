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

No score a site reports and no calibration bin describes fewer than ``MIN_CELL`` of
its images (``EvalStatistics.coarsened``): a server that sends a head crafted to score
one image apart from all others (to learn whether that image is in the site's
validation split) finds it reported together with at least ``MIN_CELL - 1`` others.
For each class, the bins of its two histograms (class true, class not true) are grouped
together, in score order, until a group holds ``MIN_CELL`` images of either kind (a
last group of fewer joins the one before); both histograms then report the group's
counts in the bin of the group's median image. So every reported score position holds
at least ``MIN_CELL`` images, and the order between groups, which is what AUROC
measures, stays exact; only images within a group count as tied. A class's histograms
of fewer than ``MIN_CELL`` images in all are reported in the middle bin (a position
that says nothing). With two classes the first class's histograms are the mirror of
the second's, grouped once. The calibration table's bins are grouped the same way by
their counts. The confusion counts stay exact (they are the accuracy's and the class
counts' own figures).

Tables from several sites add up to the table of their pooled examples, so the server
sums them and computes from the sum, with scikit-learn:

- AUROC (one-vs-rest, macro over classes for more than two) from the summed score
  histograms: each bin counts as its centre, weighted by its count. It is exact up to
  binning and grouping: scores that fall in the same reported cell count as tied (on
  the bundled data, BENCHMARKS.md ``pooled_auroc_error_*``);
- sensitivity and specificity (two classes; positive class: the second), balanced
  accuracy and the confusion matrix from the summed confusion counts: exact;
- the top-label expected calibration error from the calibration table: the same as
  ``common.evaluation.expected_calibration_error`` on the pooled examples up to the
  grouping of sparse confidence bins (a grouped bin's gap is at most the sum of its
  bins' gaps, so the ECE can only come out lower).
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
# The fewest of a site's images any cell of its score histograms and calibration table
# describes (SECURITY.md): a crafted head cannot set one image apart in them.
MIN_CELL = 5
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

    def coarsened(self, min_cell: int = MIN_CELL) -> EvalStatistics:
        """These tables with no cell of a score histogram or of the calibration table
        counting fewer than ``min_cell`` images (see the module docstring); the
        confusion counts, the class counts and every total stay as they are."""
        k = self.num_classes
        scores = np.zeros_like(self.scores)
        for c in [1] if k == 2 else range(k):
            scores[c] = _grouped(self.scores[c], self.scores[c].sum(axis=0), min_cell)
        if k == 2:  # p0 = 1 - p1: the first class's histograms mirror the second's
            scores[0] = scores[1, ::-1, ::-1]
        calibration = _grouped(self.calibration, self.calibration[0], min_cell)
        return EvalStatistics(self.confusion.copy(), scores, calibration)

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


def _groups(counts: np.ndarray, min_cell: int) -> list[tuple[tuple[int, int], int]]:
    """Consecutive bins grouped in order until each group counts >= ``min_cell`` (a
    last group of fewer joins the one before): ((first, last) bin, the bin of the
    group's median count) for every group; fewer than ``min_cell`` in all: one group,
    reported in the middle bin. No group when there is nothing to count."""
    total = float(counts.sum())
    if total <= 0:
        return []
    if total < min_cell:
        return [((0, len(counts) - 1), len(counts) // 2)]
    spans: list[tuple[int, int]] = []
    first, held = 0, 0.0
    for i, c in enumerate(counts):
        held += float(c)
        if held >= min_cell:
            spans.append((first, i))
            first, held = i + 1, 0.0
    if held > 0:  # the rest, fewer than min_cell: joins the last group
        spans[-1] = (spans[-1][0], len(counts) - 1)
    out = []
    for lo, hi in spans:
        part = np.cumsum(counts[lo : hi + 1])
        median = int(np.searchsorted(part, part[-1] / 2))  # the bin holding the median
        out.append(((lo, hi), lo + median))
    return out


def _grouped(table: np.ndarray, counts: np.ndarray, min_cell: int) -> np.ndarray:
    """``table`` (rows over the same bins) with its bins grouped by the images they hold
    (``counts``) to ``min_cell`` a group (``_groups``); every row reports a group's sum
    in the group's median bin."""
    out = np.zeros_like(table)
    for (first, last), at in _groups(counts, min_cell):
        out[:, at] = table[:, first : last + 1].sum(axis=1)
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
