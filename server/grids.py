"""Grids around Flower's: one that passes everything on (the base of grids that watch the
traffic) and one that collects replies promptly."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class DelegatingGrid(Grid):
    """Forwards every Grid call to ``inner``; subclasses override what they watch."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


class PromptGrid(DelegatingGrid):
    """``send_and_receive`` over the inner grid's ``push_messages`` and ``pull_messages``,
    asking for replies every ``interval`` seconds.

    Flower 1.41's deployment Grid waits 3 s between two pulls, so every exchange with the
    sites (a SecAgg+ round has five) ends up to 3 s after its last reply arrived; its
    in-memory Grid (the Simulation Engine) asks every 0.1 s. A pull that finds nothing
    is one small local call to the SuperLink.
    """

    def __init__(self, inner: Grid, interval: float = 0.1) -> None:
        super().__init__(inner)
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.interval = interval

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies
