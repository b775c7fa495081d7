"""Grids around Flower's: one that passes everything on (the base of grids that watch the
traffic), one that collects replies promptly and one that counts the bytes."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
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


def message_bytes(msg: Message) -> int:
    """Serialized size of a message's whole object tree (what crosses the network)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


class MeteredGrid(DelegatingGrid):
    """A Grid that counts the bytes of every message sent to and received from sites."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._mark = (0, 0)

    def take(self) -> tuple[int, int]:
        """Bytes (sent, received) since the previous call."""
        now = (self.bytes_sent, self.bytes_received)
        since = (now[0] - self._mark[0], now[1] - self._mark[1])
        self._mark = now
        return since

    def _count_out(self, messages: list[Message]) -> None:
        self.bytes_sent += sum(message_bytes(m) for m in messages)

    def _count_in(self, messages: list[Message]) -> None:
        self.bytes_received += sum(message_bytes(m) for m in messages if m.has_content())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._count_out(messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._count_in(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self._count_out(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._count_in(replies)
        return replies
