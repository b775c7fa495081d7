"""Checks of what sites send (plain train and evaluate replies), without a federation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fedhead.common.model import TensorSpec, TrainableSet
from fedhead.server.screening import ExcludedReply, decode_evaluate, decode_fit

TS = TrainableSet((TensorSpec("head.w", (2, 3), "float32"), TensorSpec("head.b", (2,), "float32")))
C, Q = 8.0, 2**22


def _fit(arrays: list[np.ndarray], n: int) -> RecordDict:
    return compat.fitres_to_recorddict(
        FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {}), False
    )


def test_train_replies_are_checked_for_layout_and_count() -> None:
    good = [np.zeros((2, 3), np.float32), np.zeros(2, np.float32)]
    assert decode_fit(7, _fit(good, 50), 50, TS).num_examples == 50
    cases = [
        (_fit(good[:1], 50), 50, "malformed"),
        (_fit([good[0].T, good[1]], 50), 50, "malformed"),
        (_fit(good, 51), 50, "weight"),
        (_fit(good, -1), 50, "malformed"),
    ]
    for content, cap, reason in cases:
        with pytest.raises(ExcludedReply) as err:
            decode_fit(7, content, cap, TS)
        assert err.value.reason == reason and err.value.node_id == 7


@pytest.mark.parametrize(
    ("loss", "accuracy", "n", "reason"),
    [(float("nan"), 0.5, 10, "malformed"), (0.3, 1.5, 10, "malformed"), (0.3, 1.0, 11, "weight")],
)
def test_evaluation_replies_are_bounded(loss: float, accuracy: float, n: int, reason: str) -> None:
    content = compat.evaluateres_to_recorddict(
        EvaluateRes(Status(Code.OK, ""), loss, n, {"accuracy": accuracy})
    )
    with pytest.raises(ExcludedReply, match=reason):
        decode_evaluate(3, content, 10)
