"""Malicious sites for tests: Flower mods that rewrite what fedhead's real ClientApp sends.

An attacking site is ``fedhead.client.app.build_app(outer=[...])`` or
``build_app(inner_train=[...])``: the production app, every handler and mod of it, with
one of these mods added. ``outer`` mods wrap everything (they rewrite the reply that
leaves the site, after masking); ``inner_train`` mods sit just inside Flower's SecAgg+
client mod, so what they change is what the site masks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from fedhead.common.protocol import (
    FIT_EVAL_ACCURACY,
    FIT_EVAL_EXAMPLES,
    FIT_EVAL_LOSS,
    RECORD_PREPARE,
)


def _rewrite(kind: str, change: Callable[[Message], None]) -> Mod:
    """A mod that lets ``change`` rewrite successful replies to messages of ``kind``."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if reply.has_error() or msg.metadata.message_type != kind:
            return reply
        change(reply)
        return reply

    return mod


def empty_reply(kind: str) -> Mod:
    """Answer every ``kind`` message with an empty record."""

    def change(reply: Message) -> None:
        reply.content = RecordDict()

    return _rewrite(kind, change)


def prepare_claims(train_examples: int) -> Mod:
    """Declare ``train_examples`` training images when the run starts."""

    def change(reply: Message) -> None:
        reply.content.config_records[RECORD_PREPARE]["train_examples"] = train_examples

    return _rewrite("query.prepare", change)


def fit_claims(num_examples: int) -> Mod:
    """Claim ``num_examples`` in every training reply (inner: also what gets masked)."""

    def change(reply: Message) -> None:
        if "fitres.num_examples" in reply.content.metric_records:  # not in key exchanges
            reply.content.metric_records["fitres.num_examples"]["num_examples"] = num_examples

    return _rewrite(MessageType.TRAIN, change)


def evaluation_claims(accuracy: float, num_examples: int | None = None) -> Mod:
    """Report ``accuracy`` (and optionally ``num_examples``) whatever the head does."""

    def change(reply: Message) -> None:
        res = compat.recorddict_to_evaluateres(reply.content)
        res.metrics["accuracy"] = accuracy
        if num_examples is not None:
            res.num_examples = num_examples
        reply.content = compat.evaluateres_to_recorddict(res)

    return _rewrite(MessageType.EVALUATE, change)


def evaluation_in_fit_claims(accuracy: float) -> Mod:
    """Report ``accuracy`` for the head a train message asked the site to evaluate."""

    def change(reply: Message) -> None:
        record = reply.content.config_records.get("fitres.metrics")
        if record is not None and FIT_EVAL_ACCURACY in record:
            record[FIT_EVAL_ACCURACY] = accuracy

    return _rewrite(MessageType.TRAIN, change)


def unasked_evaluation(accuracy: float, examples: int) -> Mod:
    """Put an evaluation into every train reply, asked for or not."""

    def change(reply: Message) -> None:
        record = reply.content.config_records.get("fitres.metrics")
        if record is not None and FIT_EVAL_ACCURACY not in record:
            record[FIT_EVAL_LOSS] = 0.01
            record[FIT_EVAL_ACCURACY] = accuracy
            record[FIT_EVAL_EXAMPLES] = examples

    return _rewrite(MessageType.TRAIN, change)


def masked_vector(change: Callable[[list[np.ndarray]], list[np.ndarray] | None]) -> Mod:
    """Rewrite the masked vector a SecAgg+ site sends (None: remove it)."""

    def rewrite(reply: Message) -> None:
        rec = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if rec is None or Key.MASKED_PARAMETERS not in rec:
            return
        new = change([bytes_to_ndarray(b) for b in _bytes_list(rec, Key.MASKED_PARAMETERS)])
        values = dict(rec)
        if new is None:
            del values[Key.MASKED_PARAMETERS]
        else:
            values[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in new]
        reply.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(values)

    return _rewrite(MessageType.TRAIN, rewrite)


def unmask_shares(change: Callable[[list[bytes]], list[bytes]]) -> Mod:
    """Rewrite the key shares a SecAgg+ site sends in the unmask stage."""

    def rewrite(reply: Message) -> None:
        rec = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if rec is None or Key.SHARE_LIST not in rec:
            return
        values = dict(rec)
        values[Key.SHARE_LIST] = change(_bytes_list(rec, Key.SHARE_LIST))
        reply.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(values)

    return _rewrite(MessageType.TRAIN, rewrite)


def _bytes_list(record: ConfigRecord, key: str) -> list[bytes]:
    """A SecAgg+ value that is a list of byte strings (the masked vector, key shares)."""
    value = record[key]
    assert isinstance(value, list) and all(isinstance(b, bytes) for b in value), key
    return [b for b in value if isinstance(b, bytes)]
