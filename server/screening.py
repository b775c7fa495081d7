"""Checking what sites send before anything else reads it.

Sites are untrusted: a reply may lack keys, carry values of the wrong type, tensors of
the wrong shape, or claim more examples than the site has. Each function here either
returns the decoded reply or raises ``ExcludedReply`` naming the node and the reason
(a bounded label from ``REJECT_REASONS``). The round loop then treats that site like
one that dropped out, and the strategy counts and names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import RecordDict
from flwr.common import EvaluateRes, FitRes, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedhead.common.model import TrainableSet
from fedhead.common.protocol import FIT_EVAL_ACCURACY, FIT_EVAL_EXAMPLES, FIT_EVAL_LOSS


class ExcludedReply(Exception):
    """A site's reply that is left out of the round (like a dropout) and why."""

    def __init__(self, node_id: int, reason: str, detail: str) -> None:
        self.node_id = node_id
        self.reason = reason  # one of fedhead.common.rounds.REJECT_REASONS
        self.detail = detail
        super().__init__(f"node {node_id}: {reason}: {detail}")


def _decode(node_id: int, what: str, decode: Any, content: RecordDict) -> Any:
    try:
        return decode(content)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ExcludedReply(node_id, "malformed", f"unreadable {what} reply ({err!r})") from err


def _claim(node_id: int, num_examples: object, cap: int, what: str) -> int:
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
    res: FitRes = _decode(
        node_id, "train", lambda c: compat.recorddict_to_fitres(c, keep_input=False), content
    )
    arrays = _decode(node_id, "train", lambda _: parameters_to_ndarrays(res.parameters), content)
    if problems := trainable.problems(arrays):
        raise ExcludedReply(node_id, "malformed", "; ".join(problems[:3]))
    _claim(node_id, res.num_examples, cap, "training")
    return res


def decode_evaluate(node_id: int, content: RecordDict, cap: int) -> EvaluateRes:
    """An evaluation reply: a finite loss, an accuracy in [0, 1], a believable count."""
    res: EvaluateRes = _decode(node_id, "evaluate", compat.recorddict_to_evaluateres, content)
    return _checked_evaluation(node_id, res, cap)


def evaluation_in_fit(node_id: int, res: FitRes, cap: int) -> EvaluateRes | None:
    """The evaluation a training reply carries of the head it was sent (None: none),
    as an evaluation reply, with the same checks."""
    metrics = dict(res.metrics)
    keys = (FIT_EVAL_LOSS, FIT_EVAL_ACCURACY, FIT_EVAL_EXAMPLES)
    if not any(k in metrics for k in keys):
        return None
    loss, accuracy, examples = (metrics.pop(k, None) for k in keys)
    metrics.pop("train-loss", None)
    evaluation = EvaluateRes(
        res.status,
        loss,  # type: ignore[arg-type]  # checked next
        examples,  # type: ignore[arg-type]
        {**metrics, "accuracy": accuracy},  # type: ignore[dict-item]
    )
    return _checked_evaluation(node_id, evaluation, cap)


def _checked_evaluation(node_id: int, res: EvaluateRes, cap: int) -> EvaluateRes:
    accuracy = res.metrics.get("accuracy")
    if not isinstance(res.loss, float | int) or not math.isfinite(res.loss) or res.loss < 0:
        raise ExcludedReply(node_id, "malformed", f"evaluation loss {res.loss!r}")
    if not isinstance(accuracy, float | int) or not 0.0 <= accuracy <= 1.0:
        raise ExcludedReply(node_id, "malformed", f"evaluation accuracy {accuracy!r}")
    _claim(node_id, res.num_examples, cap, "validation")
    return res


# --- SecAgg+ stages ----------------------------------------------------------------------
def _secagg_record(node_id: int, content: RecordDict) -> Mapping[str, Any]:
    if RECORD_KEY_CONFIGS not in content.config_records:
        raise ExcludedReply(node_id, "malformed", f"no {RECORD_KEY_CONFIGS!r} record")
    return content.config_records[RECORD_KEY_CONFIGS]


def _list_of(node_id: int, rec: Mapping[str, Any], key: str, kind: type) -> list[Any]:
    value = rec.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    ):
        raise ExcludedReply(node_id, "malformed", f"{key!r} is not a list of {kind.__name__}")
    return value


def check_public_keys(node_id: int, content: RecordDict) -> None:
    """SecAgg+ setup: two public keys."""
    rec = _secagg_record(node_id, content)
    for key in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2):
        if not isinstance(rec.get(key), bytes):
            raise ExcludedReply(node_id, "malformed", f"public key {key!r} missing")


def _shares_of_neighbours(
    node_id: int, content: RecordDict, neighbours: set[int], nodes_key: str, shares_key: str
) -> bool:
    """One share (bytes) per node id in ``nodes_key``, and neighbours' ids only."""
    rec = _secagg_record(node_id, content)
    nodes = _list_of(node_id, rec, nodes_key, int)
    shares = _list_of(node_id, rec, shares_key, bytes)
    return len(nodes) == len(shares) and set(nodes) <= neighbours


def check_key_shares(node_id: int, content: RecordDict, neighbours: set[int]) -> None:
    """SecAgg+ share keys: one encrypted share per neighbour."""
    keys = (Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST)
    if not _shares_of_neighbours(node_id, content, neighbours, *keys):
        raise ExcludedReply(node_id, "malformed", "key shares for nodes that are not neighbours")


def check_masked_vector(
    node_id: int,
    content: RecordDict,
    trainable: TrainableSet,
    mod_range: int,
    cap: int,
) -> int:
    """SecAgg+ collect: a masked vector that Flower can sum, and a believable count.

    The vector is the quantized weight (shape (1,)) followed by one integer array per
    trainable tensor, each value in [0, mod_range). Returns the claimed example count.
    """
    rec = _secagg_record(node_id, content)
    blobs = _list_of(node_id, rec, Key.MASKED_PARAMETERS, bytes)
    shapes = [(1,), *(spec.shape for spec in trainable.tensors)]
    if len(blobs) != len(shapes):
        raise ExcludedReply(
            node_id, "malformed", f"masked vector has {len(blobs)} parts, {len(shapes)} expected"
        )
    for i, (blob, shape) in enumerate(zip(blobs, shapes, strict=True)):
        try:
            arr = bytes_to_ndarray(blob)
        except (ValueError, TypeError, EOFError) as err:
            raise ExcludedReply(node_id, "malformed", f"masked part {i} unreadable") from err
        if tuple(arr.shape) != tuple(shape) or arr.dtype.kind not in "iu":
            raise ExcludedReply(
                node_id,
                "malformed",
                f"masked part {i} is {arr.dtype}{list(arr.shape)}, integers{list(shape)} expected",
            )
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= mod_range):
            raise ExcludedReply(node_id, "malformed", f"masked part {i} outside the modulus")
    res: FitRes = _decode(
        node_id, "train", lambda c: compat.recorddict_to_fitres(c, keep_input=True), content
    )
    return _claim(node_id, res.num_examples, cap, "training")


def check_unmask_shares(node_id: int, content: RecordDict, neighbours: set[int]) -> None:
    """SecAgg+ unmask: key shares of neighbours only."""
    keys = (Key.NODE_ID_LIST, Key.SHARE_LIST)
    if not _shares_of_neighbours(node_id, content, neighbours, *keys):
        raise ExcludedReply(node_id, "malformed", "key shares of nodes that are not neighbours")


GCD_EVIDENCE = 16  # nonzero coordinates needed before a common factor counts as scaling


def quantized_weight(num_examples: int, max_weight: float, quantization_range: int) -> int:
    """The integer weight a site's SecAgg+ client adds for ``num_examples``."""
    return round(num_examples / max_weight * quantization_range)


def aggregate_has_weight(
    aggregate: Sequence[np.ndarray],
    total_weight: int,
    sites: int,
    clipping_range: float,
    quantization_range: int,
    tolerance: float = 1e-3,
) -> bool:
    """Whether a securely aggregated mean was divided by ``total_weight``.

    The unmasked sum is an integer vector ``s`` and the mean is
    ``(2c*s - n*c*Q) / T`` for n sites, clipping range c, quantization range Q and true
    total quantized weight T. So ``d = mean*W/(2c)`` is ``(s - n*Q/2) * W/T``: whole in
    every coordinate for W = T, and for a wrong W only if W is a multiple of T (the
    sum's unknown honest part leaves no other way). A site that masked a larger weight
    than it declared breaks wholeness; one that masked a smaller weight, scaling the
    mean up by m = W/T, leaves every ``d`` divisible by m, which the gcd reveals.
    """
    whole: list[np.ndarray] = []
    for arr in aggregate:
        d = arr.astype(np.float64) * total_weight / (2 * clipping_range)
        d += sites * quantization_range / 2  # exact for whole n*Q/2; the sum's offset
        if arr.size and float(np.abs(d - np.round(d)).max()) > tolerance:
            return False
        whole.append(np.round(d).astype(np.int64).ravel() - round(sites * quantization_range / 2))
    flat = np.concatenate(whole) if whole else np.zeros(0, np.int64)
    nonzero = np.abs(flat[flat != 0])
    # The gcd is evidence only over enough coordinates: an honest sum with a handful of
    # nonzero values (say, a head whose only change is its biases) can share a factor
    # by chance. Below GCD_EVIDENCE coordinates a smaller masked weight goes unnoticed.
    return nonzero.size < GCD_EVIDENCE or int(np.gcd.reduce(nonzero)) == 1
