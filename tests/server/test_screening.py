"""Reply checks and the SecAgg+ total-weight check, without a federation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from fedhead.common.model import TensorSpec, TrainableSet
from fedhead.server.screening import (
    ExcludedReply,
    aggregate_has_weight,
    check_key_shares,
    check_unmask_shares,
    decode_evaluate,
    decode_fit,
    quantized_weight,
)

TS = TrainableSet((TensorSpec("head.w", (2, 3), "float32"), TensorSpec("head.b", (2,), "float32")))
C, Q = 8.0, 2**22


def _fit(arrays: list[np.ndarray], n: int) -> object:
    return compat.fitres_to_recorddict(
        FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {}), False
    )


def test_train_replies_are_checked_for_layout_and_count() -> None:
    good = [np.zeros((2, 3), np.float32), np.zeros(2, np.float32)]
    assert decode_fit(7, _fit(good, 50), 50, TS).num_examples == 50  # type: ignore[arg-type]
    cases = [
        (_fit(good[:1], 50), 50, "malformed"),
        (_fit([good[0].T, good[1]], 50), 50, "malformed"),
        (_fit(good, 51), 50, "weight"),
        (_fit(good, -1), 50, "malformed"),
    ]
    for content, cap, reason in cases:
        with pytest.raises(ExcludedReply) as err:
            decode_fit(7, content, cap, TS)  # type: ignore[arg-type]
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


def _secure_mean(
    updates: list[tuple[int, list[np.ndarray]]], max_weight: float, masked_extra: int = 0
) -> list[np.ndarray]:
    """What Flower's SecAgg+ hands the strategy, computed with Flower's own helpers
    (masks cancel in the sum, so they are left out here)."""
    total = None
    for n, arrays in updates:
        q = quantized_weight(n, max_weight, Q)
        vec = factor_combine(q, quantize([a * (q / Q) for a in arrays], C, Q))
        total = vec if total is None else [a + b for a, b in zip(total, vec, strict=True)]
    assert total is not None
    total[0] = total[0] + masked_extra  # a site adds to the weight it masks
    q_total, summed = factor_extract(total)
    mean = dequantize(summed, C, Q)
    return [(m - (len(updates) - 1) * C) * (Q / q_total) for m in mean]


@pytest.mark.parametrize("extra", [0, 50 * Q, Q // 3, -Q, -(3 * Q) // 2])
def test_the_total_weight_of_a_secure_mean_is_recognised(extra: int) -> None:
    """An honest mean passes; one whose masked weight was raised or lowered does not
    (2Q declared in all, so -Q doubles the mean and -1.5Q quadruples it)."""
    rng = np.random.default_rng(0)
    updates = [(n, [rng.normal(0, 0.05, (8, 16)), rng.normal(0, 0.05, 16)]) for n in (120, 80, 40)]
    mean = _secure_mean(updates, max_weight=120, masked_extra=extra)
    declared = sum(quantized_weight(n, 120, Q) for n, _ in updates)
    assert declared == 2 * Q
    assert aggregate_has_weight(mean, declared, 3, C, Q) == (extra == 0)


def test_an_honest_mean_with_few_changed_values_is_not_taken_for_a_scaled_one() -> None:
    """A head whose only change is its biases (a trunk that outputs zeros) sums to a few
    values that can share a factor by chance: no evidence of a lowered weight."""
    updates = [(n, [np.zeros((8, 16)), np.array([0.01, -0.01] * 8)]) for n in (120, 120)]
    mean = _secure_mean(updates, max_weight=120, masked_extra=0)
    declared = sum(quantized_weight(n, 120, Q) for n, _ in updates)
    assert aggregate_has_weight(mean, declared, 2, C, Q)


@pytest.mark.parametrize(
    ("check", "nodes_key", "shares_key"),
    [
        (check_key_shares, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST),
        (check_unmask_shares, Key.NODE_ID_LIST, Key.SHARE_LIST),
    ],
    ids=["share-keys", "unmask"],
)
def test_key_shares_pair_up_and_name_neighbours_only(
    check: Callable[[int, RecordDict, set[int]], None], nodes_key: str, shares_key: str
) -> None:
    def reply(nodes: list[int], shares: list[bytes]) -> RecordDict:
        record = ConfigRecord({nodes_key: nodes, shares_key: shares})
        return RecordDict({RECORD_KEY_CONFIGS: record})

    check(7, reply([2, 3], [b"a", b"b"]), {2, 3, 4})  # accepted
    for content in (reply([2, 9], [b"a", b"b"]), reply([2, 3], [b"a"]), RecordDict()):
        with pytest.raises(ExcludedReply) as err:
            check(7, content, {2, 3, 4})
        assert err.value.reason == "malformed"
