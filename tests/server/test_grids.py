"""PromptGrid collects replies through its inner grid's push and pull calls, asking again
only for the messages still unanswered, until all are in or the timeout passes."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest

from fedhead.server.grids import PromptGrid
from tests.loopback import LoopbackGrid


class ScriptedGrid(LoopbackGrid):
    """Message ``i`` is answered at the ``answer_at[i]``-th pull (None: never)."""

    def __init__(self, answer_at: list[int | None]) -> None:
        super().__init__(client_app=None, node_configs={})  # type: ignore[arg-type]
        self.answer_at = answer_at
        self.pulls: list[set[str]] = []

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        asked = set(message_ids)
        self.pulls.append(asked)
        n = len(self.pulls)
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"), i=i)
            for i, at in enumerate(self.answer_at)
            if at == n and f"m{i}" in asked
        ]


def test_collects_every_reply_asking_only_for_the_missing_ones() -> None:
    inner = ScriptedGrid([1, 3, 2])
    replies = PromptGrid(inner, interval=0.01).send_and_receive([object()] * 3, timeout=60)
    assert sorted(r.i for r in replies) == [0, 1, 2]
    assert inner.pulls == [{"m0", "m1", "m2"}, {"m1", "m2"}, {"m1"}]


def test_a_silent_site_ends_the_wait_at_the_timeout_with_the_others_replies() -> None:
    inner = ScriptedGrid([1, None])
    replies = PromptGrid(inner, interval=0.01).send_and_receive([object()] * 2, timeout=0.2)
    assert [r.i for r in replies] == [0]
    assert len(inner.pulls) > 1 and all(p == {"m1"} for p in inner.pulls[1:])


def test_no_timeout_waits_and_a_zero_timeout_pulls_once() -> None:
    inner = ScriptedGrid([5])
    assert [r.i for r in PromptGrid(inner, interval=0.01).send_and_receive([object()])] == [0]
    once = ScriptedGrid([None])
    assert list(PromptGrid(once).send_and_receive([object()], timeout=0)) == []
    assert len(once.pulls) == 1


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        PromptGrid(ScriptedGrid([]), interval=0)
