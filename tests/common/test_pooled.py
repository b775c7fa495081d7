"""Clinical metrics pooled from the sites' count tables (common.pooled)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedhead.common.evaluation import ECE_BINS, point_metrics
from fedhead.common.pooled import (
    KEY_CALIBRATION,
    KEY_CONFUSION,
    KEY_SCORES,
    MIN_CELL,
    SCORE_BINS,
    EvalStatistics,
    pool,
)
from tests.common.test_evaluation import _predictions as predictions


@pytest.mark.parametrize("k", [2, 3])
def test_pooled_tables_give_sklearns_metrics_on_the_union(k: int) -> None:
    y, proba = predictions(600, k, seed=k)
    # three sites of unequal size; their summed tables stand for the pooled examples
    parts = [slice(0, 100), slice(100, 350), slice(350, 600)]
    pooled = pool(EvalStatistics.from_predictions(y[p], proba[p]) for p in parts)
    assert pooled is not None and pooled.examples == 600
    whole = EvalStatistics.from_predictions(y, proba)
    assert (pooled.confusion == whole.confusion).all() and (pooled.scores == whole.scores).all()

    got = pooled.metrics()
    exact = point_metrics(y, proba, [f"c{i}" for i in range(k)])
    # AUROC: exact up to the 100-bin histograms; the others from exact counts
    assert got["auroc"] == pytest.approx(exact["auroc"], abs=1e-2)
    assert got["balanced_accuracy"] == pytest.approx(exact["balanced_accuracy"], abs=1e-12)
    assert got["ece"] == pytest.approx(exact["ece"], abs=1e-9)
    if k == 2:
        assert got["sensitivity"] == pytest.approx(exact["sensitivity"], abs=1e-12)
        assert got["specificity"] == pytest.approx(exact["specificity"], abs=1e-12)
    else:
        assert "sensitivity" not in got


def test_auroc_is_undefined_without_both_kinds_of_label() -> None:
    y, proba = predictions(50, 2, seed=0)
    only_one = EvalStatistics.from_predictions(np.zeros(50, np.int64), proba)
    assert np.isnan(only_one.metrics()["auroc"])
    assert not np.isnan(EvalStatistics.from_predictions(y, proba).metrics()["auroc"])


def test_tables_survive_the_wire_format() -> None:
    y, proba = predictions(80, 3, seed=1)
    stats = EvalStatistics.from_predictions(y, proba)
    back = EvalStatistics.from_metrics(stats.to_metrics(), 3, 80)
    assert (back.confusion == stats.confusion).all() and (back.scores == stats.scores).all()
    assert np.allclose(back.calibration, stats.calibration)


def _tampered(key: str, change: Callable[[np.ndarray], object]) -> dict[str, object]:
    y, proba = predictions(80, 2, seed=2)
    tables = EvalStatistics.from_predictions(y, proba).to_metrics()
    dtype = "<f8" if key == KEY_CALIBRATION else "<i8"
    changed = change(np.frombuffer(tables[key], dtype=dtype).copy())
    metrics: dict[str, object] = dict(tables)
    metrics[key] = changed.tobytes() if isinstance(changed, np.ndarray) else changed
    return metrics


def _add(i: int, v: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(a: np.ndarray) -> np.ndarray:
        a[i] += v
        return a

    return change


@pytest.mark.parametrize(
    ("key", "change", "reason"),
    [
        (KEY_CONFUSION, lambda a: a[:-1], "expected 4 8-byte numbers"),
        (KEY_CONFUSION, lambda a: a.tolist(), "expected 4 8-byte numbers"),
        (KEY_CONFUSION, _add(0, 5), "counts 85 examples"),
        (KEY_CONFUSION, _add(0, -1000), "negative"),
        (KEY_CONFUSION, _add(0, 2**62), "above the 80 examples"),
        (KEY_SCORES, _add(0, 1), "every example once"),
        (KEY_CALIBRATION, _add(0, float("nan")), "non-finite"),
        (KEY_CALIBRATION, _add(0, 1), "calibration table"),
    ],
)
def test_a_sites_malformed_tables_are_refused(
    key: str, change: Callable[[np.ndarray], object], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        EvalStatistics.from_metrics(_tampered(key, change), 2, 80)


def test_tables_of_another_class_count_are_refused() -> None:
    y, proba = predictions(40, 3, seed=3)
    metrics = EvalStatistics.from_predictions(y, proba).to_metrics()
    with pytest.raises(ValueError, match="expected 4 8-byte numbers"):
        EvalStatistics.from_metrics(metrics, 2, 40)


# --- coarsened tables: no score position describes fewer than MIN_CELL images ----------
def _positions(stats: EvalStatistics) -> np.ndarray:
    """Images per reported position: each class's two histograms together, and the
    calibration counts."""
    return np.concatenate([stats.scores.sum(axis=1).ravel(), stats.calibration[0]])


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("n", [3, 12, 40, 300])
def test_no_coarsened_position_holds_fewer_than_min_cell_images(k: int, n: int) -> None:
    y, proba = predictions(n, k, seed=n + k)
    exact = EvalStatistics.from_predictions(y, proba)
    coarse = exact.coarsened()
    cells = _positions(coarse)
    if n >= MIN_CELL:
        assert ((cells == 0) | (cells >= MIN_CELL)).all()
    else:  # too few in all: every class and the calibration table in one middle bin
        per_class = coarse.scores.sum(axis=1)
        assert (per_class.max(axis=1) == n).all()
        assert set(np.flatnonzero(per_class.sum(axis=0))) <= {SCORE_BINS // 2 - 1, SCORE_BINS // 2}
        assert coarse.calibration[0, ECE_BINS // 2] == n
    # the totals the server checks stay: the site's tables are accepted as before
    back = EvalStatistics.from_metrics(coarse.to_metrics(), k, n)
    assert (back.confusion == exact.confusion).all()
    assert (back.scores.sum(axis=2) == exact.scores.sum(axis=2)).all()
    assert back.calibration.sum(axis=1) == pytest.approx(exact.calibration.sum(axis=1))
    if k == 2:  # the first class's histograms mirror the second's
        assert (coarse.scores[0, ::-1, ::-1] == coarse.scores[1]).all()


def test_a_head_that_sets_one_image_apart_finds_it_merged() -> None:
    """The probe: a head scoring one image 0.99 "pneumonia" and the others low. The exact
    histogram holds that image alone in a bin; the coarsened one never shows a cell of
    one, with the image there or not."""
    rng = np.random.default_rng(0)
    y = np.zeros(30, np.int64)
    p1 = rng.uniform(0.01, 0.1, 30)
    with_x = p1.copy()
    with_x[0] = 0.99
    for p in (with_x, p1):
        proba = np.stack([1 - p, p], axis=1)
        exact = EvalStatistics.from_predictions(y, proba)
        coarse = exact.coarsened()
        assert ((_positions(coarse) == 0) | (_positions(coarse) >= MIN_CELL)).all()
        assert coarse.scores[1, 0, 90:].sum() == 0  # nothing reported near 0.99
    assert (
        EvalStatistics.from_predictions(y, np.stack([1 - with_x, with_x], 1)).scores[1, 0, 98] == 1
    )  # the exact table shows it


@pytest.mark.parametrize("k", [2, 3])
def test_coarsened_site_tables_keep_the_pooled_metrics_close(k: int) -> None:
    """Ten sites of 60 validation images: pooled AUROC and ECE from coarsened tables
    against the exact figures on the union (BENCHMARKS.md measures the bundled data)."""
    y, proba = predictions(600, k, seed=10 + k)
    parts = [slice(i, i + 60) for i in range(0, 600, 60)]
    pooled = pool(EvalStatistics.from_predictions(y[p], proba[p]).coarsened() for p in parts)
    assert pooled is not None
    got = pooled.metrics()
    exact = point_metrics(y, proba, [f"c{i}" for i in range(k)])
    assert got["auroc"] == pytest.approx(exact["auroc"], abs=0.02)
    assert got["balanced_accuracy"] == pytest.approx(exact["balanced_accuracy"], abs=1e-12)
    assert exact["ece"] - 0.03 <= got["ece"] <= exact["ece"] + 1e-9  # grouping only lowers it
