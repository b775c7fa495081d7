"""Checking what sites send before anything else reads it.

Sites are untrusted: a reply may lack keys, carry values of the wrong type, tensors of
the wrong shape, or claim more examples than the site has. Each function here either
returns the decoded reply or raises ``ExcludedReply`` naming the node and the reason
(a bounded label from ``REJECT_REASONS``). The round loop then treats that site like
one that dropped out, and the strategy counts and names it.
"""

from __future__ import annotations

import math
from typing import Any

import flwr.compat.common.recorddict_compat as compat
from flwr.app import RecordDict
from flwr.common import EvaluateRes, FitRes, parameters_to_ndarrays

from fedhead.common.model import TrainableSet


class ExcludedReply(Exception):
    """A site's reply that is left out of the round (like a dropout) and why."""

    def __init__(self, node_id: int, reason: str, detail: str) -> None:
        self.node_id = node_id
        self.reason = reason  # one of fedhead.common.rounds.REJECT_REASONS
        self.detail = detail
        super().__init__(f"node {node_id}: {reason}: {detail}")


def decoded(node_id: int, what: str, decode: Any, content: RecordDict) -> Any:
    try:
        return decode(content)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ExcludedReply(node_id, "malformed", f"unreadable {what} reply ({err!r})") from err


def claimed_count(node_id: int, num_examples: object, cap: int, what: str) -> int:
    """A self-reported example count, refused when above what the site declared."""
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 0:
        raise ExcludedReply(node_id, "malformed", f"{what} example count {num_examples!r}")
    if num_examples > cap:
        raise ExcludedReply(
            node_id,
            "weight",
            f"claims {num_examples} {what} examples, more than the {cap} it may count "
            "(its count when the run started, at most max-site-examples)",
        )
    return num_examples


def decode_fit(node_id: int, content: RecordDict, cap: int, trainable: TrainableSet) -> FitRes:
    """A plain training reply: readable, the run's tensor layout, a believable count."""
    res: FitRes = decoded(
        node_id, "train", lambda c: compat.recorddict_to_fitres(c, keep_input=False), content
    )
    arrays = decoded(node_id, "train", lambda _: parameters_to_ndarrays(res.parameters), content)
    if problems := trainable.problems(arrays):
        raise ExcludedReply(node_id, "malformed", "; ".join(problems[:3]))
    claimed_count(node_id, res.num_examples, cap, "training")
    return res


def decode_evaluate(node_id: int, content: RecordDict, cap: int) -> EvaluateRes:
    """An evaluation reply: a finite loss, an accuracy in [0, 1], a believable count."""
    res: EvaluateRes = decoded(node_id, "evaluate", compat.recorddict_to_evaluateres, content)
    return checked_evaluation(node_id, res, cap)


def checked_evaluation(node_id: int, res: EvaluateRes, cap: int) -> EvaluateRes:
    """An evaluation (of its own or inside a train reply): a finite loss, an accuracy in
    [0, 1], a believable count."""
    accuracy = res.metrics.get("accuracy")
    if not isinstance(res.loss, float | int) or not math.isfinite(res.loss) or res.loss < 0:
        raise ExcludedReply(node_id, "malformed", f"evaluation loss {res.loss!r}")
    if not isinstance(accuracy, float | int) or not 0.0 <= accuracy <= 1.0:
        raise ExcludedReply(node_id, "malformed", f"evaluation accuracy {accuracy!r}")
    claimed_count(node_id, res.num_examples, cap, "validation")
    return res
