"""Aggregation maths and update validation: pure functions over lists of numpy arrays.

Sites send the change of the trainable tensors from the global ones ("delta"). The
server's new global tensors are the global ones plus the example-weighted mean delta,
which equals example-weighted FedAvg of the sites' trained tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedhead.common.heads import global_norm
from fedhead.common.model import TrainableSet

Arrays = list[np.ndarray]


@dataclass(frozen=True)
class Rejection:
    node_id: int
    reason: str  # one of fedhead.common.rounds.REJECT_REASONS
    detail: str


def check_update(
    arrays: Sequence[np.ndarray], trainable: TrainableSet, max_norm: float = 0.0
) -> tuple[str, str] | None:
    """``(reason, detail)`` if the update must be rejected, else None.

    Names are implied by position in the trainable set; shapes and dtypes must match,
    every value must be finite, and with ``max_norm > 0`` the global L2 norm must not
    exceed it.
    """
    if problems := trainable.problems(arrays):
        return "structure", "; ".join(problems[:3])
    for spec, arr in zip(trainable.tensors, arrays, strict=True):
        if not np.all(np.isfinite(arr)):
            return "non_finite", f"{spec.name} has NaN or infinite values"
    if max_norm > 0 and (norm := global_norm(arrays)) > max_norm:
        return "norm", f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


def weighted_mean(updates: Sequence[tuple[int, Sequence[np.ndarray]]]) -> Arrays:
    """Example-weighted mean of several updates, in float64, cast back per tensor."""
    if not updates:
        raise ValueError("no updates to average")
    total = sum(n for n, _ in updates)
    if total <= 0:
        raise ValueError("updates carry no examples")
    first = updates[0][1]
    out = [np.zeros(a.shape, dtype=np.float64) for a in first]
    for n, arrays in updates:
        for acc, arr in zip(out, arrays, strict=True):
            acc += (n / total) * arr.astype(np.float64)
    return [acc.astype(a.dtype) for acc, a in zip(out, first, strict=True)]


def apply_delta(global_arrays: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> Arrays:
    return [
        (g.astype(np.float64) + d.astype(np.float64)).astype(g.dtype)
        for g, d in zip(global_arrays, delta, strict=True)
    ]


def weighted_metric(pairs: Sequence[tuple[int, float]]) -> float:
    """Example-weighted mean of a scalar (NaN when nothing counts)."""
    total = sum(n for n, v in pairs if math.isfinite(v))
    if total == 0:
        return math.nan
    return sum(n * v for n, v in pairs if math.isfinite(v)) / total
