from __future__ import annotations

import numpy as np
import pytest

from fedhead.common.heads import global_norm
from fedhead.common.model import TensorSpec, TrainableSet
from fedhead.server.aggregation import (
    apply_delta,
    check_update,
    weighted_mean,
    weighted_metric,
)

TS = TrainableSet((TensorSpec("head.w", (2, 3), "float32"), TensorSpec("head.b", (2,), "float32")))


def arrays(v: float) -> list[np.ndarray]:
    return [np.full((2, 3), v, np.float32), np.full((2,), v, np.float32)]


def test_weighted_mean_weights_by_examples() -> None:
    out = weighted_mean([(1, arrays(0.0)), (3, arrays(4.0))])
    assert np.allclose(out[0], 3.0) and out[0].dtype == np.float32


def test_fedavg_of_deltas_equals_fedavg_of_weights() -> None:
    rng = np.random.default_rng(0)
    glob = [rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=2).astype(np.float32)]
    trained = [[g + rng.normal(size=g.shape).astype(np.float32) for g in glob] for _ in range(3)]
    n = [10, 30, 60]
    deltas = [[t - g for t, g in zip(tr, glob, strict=True)] for tr in trained]
    via_delta = apply_delta(glob, weighted_mean(list(zip(n, deltas, strict=True))))
    direct = weighted_mean(list(zip(n, trained, strict=True)))
    for a, b in zip(via_delta, direct, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _reason(update: list[np.ndarray], max_norm: float = 0.0) -> str:
    """Why ``check_update`` rejects ``update`` ("" when it accepts it)."""
    problem = check_update(update, TS, max_norm=max_norm)
    return "" if problem is None else problem[0]


def test_check_update_reasons() -> None:
    assert check_update(arrays(0.1), TS) is None
    assert _reason(arrays(0.1)[:1]) == "structure"
    bad_shape = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
    assert _reason(bad_shape) == "structure"
    bad_dtype = [a.astype(np.float64) for a in arrays(0.1)]
    assert _reason(bad_dtype) == "structure"
    nan = arrays(0.1)
    nan[1][0] = np.nan
    problem = check_update(nan, TS)
    assert problem is not None
    reason, detail = problem
    assert reason == "non_finite" and "head.b" in detail
    assert _reason(arrays(10.0), max_norm=5.0) == "norm"
    assert check_update(arrays(10.0), TS, max_norm=0.0) is None


def test_global_norm() -> None:
    assert global_norm(arrays(1.0)) == pytest.approx(np.sqrt(8))


def test_weighted_metric_ignores_nan() -> None:
    assert weighted_metric([(1, 1.0), (3, 0.0), (5, float("nan"))]) == 0.25
    assert np.isnan(weighted_metric([]))


def test_weighted_mean_needs_examples() -> None:
    with pytest.raises(ValueError):
        weighted_mean([])
    with pytest.raises(ValueError):
        weighted_mean([(0, arrays(1.0))])
