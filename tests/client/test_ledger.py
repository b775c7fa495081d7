"""A site evaluates only heads it trains from: the server cannot probe its data."""

from __future__ import annotations

import numpy as np
import pytest

from fedhead.client.ledger import HeadLedger
from fedhead.common.errors import FederationError
from fedhead.common.heads import head_sha256

HEAD = [np.zeros((2, 4), np.float32), np.zeros(2, np.float32)]
NEXT = [np.ones((2, 4), np.float32), np.zeros(2, np.float32)]
PROBE = [np.eye(2, 4, dtype=np.float32), np.array([9.0, -9.0], np.float32)]


def test_digest_sees_values_shapes_and_dtypes() -> None:
    assert _sha(HEAD) == _sha([a.copy() for a in HEAD])
    assert _sha(HEAD) != _sha(NEXT)
    assert _sha(HEAD) != _sha([a.astype(np.float64) for a in HEAD])
    assert _sha(HEAD) != _sha([HEAD[0].reshape(4, 2), HEAD[1]])


def test_an_honest_run_is_accepted_and_survives_the_node_state() -> None:
    ledger = HeadLedger()
    ledger.start_evaluation(0, _sha(HEAD))  # the initial head
    for rnd, (start, end) in enumerate([(HEAD, NEXT), (NEXT, PROBE)], start=1):
        ledger = HeadLedger.from_record(ledger.to_record())  # a fresh process per message
        ledger.start_training(rnd, _sha(start))
        ledger.start_evaluation(rnd, _sha(end))


@pytest.mark.parametrize(
    ("steps", "match"),
    [
        ([("eval", 0, HEAD), ("eval", 0, PROBE)], "already evaluated"),
        ([("train", 1, HEAD), ("eval", 0, PROBE)], "already|after training started"),
        ([("eval", 1, PROBE)], "did not train in"),
        ([("train", 1, HEAD), ("eval", 1, NEXT), ("eval", 2, PROBE)], "did not train in"),
        ([("train", 1, HEAD), ("eval", 1, PROBE), ("train", 2, NEXT)], "not the one this site"),
        ([("eval", 0, PROBE), ("train", 1, HEAD)], "not the one this site"),
        ([("train", 2, HEAD), ("train", 1, HEAD)], "rounds only go forward"),
    ],
    ids=["twice", "initial-late", "untrained", "ahead", "probe-then-train", "probe-0", "back"],
)
def test_a_probing_server_is_refused_or_caught(
    steps: list[tuple[str, int, list[np.ndarray]]], match: str
) -> None:
    ledger = HeadLedger()
    with pytest.raises(FederationError, match=match):
        for kind, rnd, head in steps:
            if kind == "eval":
                ledger.start_evaluation(rnd, _sha(head))
            else:
                ledger.start_training(rnd, _sha(head))


def test_the_ledger_remembers_the_head_round_1_trained_from() -> None:
    from flwr.app import ConfigRecord

    ledger = HeadLedger()
    assert not ledger.is_initial_head("a")
    ledger.start_evaluation(0, "a")
    ledger.start_training(1, "a")
    ledger.start_evaluation(1, "b")
    ledger.start_training(2, "b")
    back = HeadLedger.from_record(ledger.to_record())
    assert back.is_initial_head("a") and not back.is_initial_head("b")
    # a site whose first round was not round 1 (not sampled, a resumed run) has none
    late = HeadLedger()
    late.start_training(3, "c")
    assert not late.is_initial_head("c")
    # a ledger written before this field existed reads back without one
    old = ConfigRecord({"trained_round": 2, "evaluated_round": 1, "evaluated_sha": "b"})
    assert not HeadLedger.from_record(old).is_initial_head("a")


def test_a_train_message_may_evaluate_the_head_it_trains_from_once() -> None:
    ledger = HeadLedger()
    assert ledger.start_training(1, _sha(HEAD), evaluate=True)  # round 0's head
    assert ledger.start_training(2, _sha(NEXT), evaluate=True)  # round 1's head
    with pytest.raises(FederationError, match="already evaluated"):
        ledger.start_evaluation(1, _sha(PROBE))  # and not a second head for round 1
    ledger.start_evaluation(2, _sha(PROBE))  # the last round's head, separately
    with pytest.raises(FederationError, match="not the one this site"):
        ledger.start_training(3, _sha(NEXT), evaluate=True)


def test_a_site_that_missed_a_round_trains_without_evaluating_its_head() -> None:
    ledger = HeadLedger()
    assert ledger.start_training(1, _sha(HEAD), evaluate=True)
    # not sampled, or dropped, in round 2: round 2's head is not one it trained in
    assert not ledger.start_training(3, _sha(NEXT), evaluate=True)
    assert ledger.trained_round == 3 and ledger.evaluated_round == 0


def _sha(arrays: list[np.ndarray]) -> str:
    return head_sha256(["w", "b"], arrays)
