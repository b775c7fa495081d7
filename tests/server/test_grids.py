"""PromptGrid collects replies through its inner grid's push and pull calls, asking again
only for the messages still unanswered, until all are in or the timeout passes."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

from fedhead.server.grids import PromptGrid
from tests.loopback import LoopbackGrid


class ScriptedGrid(LoopbackGrid):
    """Message ``i`` is answered at the ``answer_at[i]``-th pull (None: never)."""

    def __init__(self, answer_at: list[int | None]) -> None:
        super().__init__(ClientApp(), node_configs={})
        self.answer_at = answer_at
        self.pushed: list[Message] = []
        self.pulls: list[set[str]] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed = list(messages)
        for i, msg in enumerate(self.pushed):  # the id a SuperLink gives (as Flower's grids do)
            msg.metadata.__dict__["_message_id"] = f"m{i}"
        return [msg.metadata.message_id for msg in self.pushed]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        asked = set(message_ids)
        self.pulls.append(asked)
        n = len(self.pulls)
        return [
            Message(RecordDict(), reply_to=msg)
            for msg, at in zip(self.pushed, self.answer_at, strict=True)
            if at == n and msg.metadata.message_id in asked
        ]


def _messages(n: int) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=i, message_type="train") for i in range(n)]


def _answered(replies: Iterable[Message]) -> list[str]:
    return sorted(r.metadata.reply_to_message_id for r in replies)


def test_collects_every_reply_asking_only_for_the_missing_ones() -> None:
    inner = ScriptedGrid([1, 3, 2])
    replies = PromptGrid(inner, interval=0.01).send_and_receive(_messages(3), timeout=60)
    assert _answered(replies) == ["m0", "m1", "m2"]
    assert inner.pulls == [{"m0", "m1", "m2"}, {"m1", "m2"}, {"m1"}]


def test_a_silent_site_ends_the_wait_at_the_timeout_with_the_others_replies() -> None:
    inner = ScriptedGrid([1, None])
    replies = PromptGrid(inner, interval=0.01).send_and_receive(_messages(2), timeout=0.2)
    assert _answered(replies) == ["m0"]
    assert len(inner.pulls) > 1 and all(p == {"m1"} for p in inner.pulls[1:])


def test_no_timeout_waits_and_a_zero_timeout_pulls_once() -> None:
    inner = ScriptedGrid([5])
    assert _answered(PromptGrid(inner, interval=0.01).send_and_receive(_messages(1))) == ["m0"]
    once = ScriptedGrid([None])
    assert list(PromptGrid(once).send_and_receive(_messages(1), timeout=0)) == []
    assert len(once.pulls) == 1


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        PromptGrid(ScriptedGrid([]), interval=0)
