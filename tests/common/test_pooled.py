"""Clinical metrics pooled from the sites' count tables (common.pooled)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedhead.common.evaluation import point_metrics
from fedhead.common.pooled import (
    KEY_CALIBRATION,
    KEY_CONFUSION,
    KEY_SCORES,
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
    metrics: dict[str, object] = dict(EvalStatistics.from_predictions(y, proba).to_metrics())
    dtype = "<f8" if key == KEY_CALIBRATION else "<i8"
    value = np.frombuffer(metrics[key], dtype=dtype).copy()  # type: ignore[arg-type]
    changed = change(value)
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
