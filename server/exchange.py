"""Talking to sites: send each one its message, wait, sort the replies; wait for sites.

Every phase of a run (preparing the sites, the rounds' plain exchanges, delivering the
model, asking for the per-site outcome) talks to sites the same way: ``exchange`` sends
one message per site, waits up to a timeout and sorts the replies into ``ok`` (content
to read), ``failed`` (the site answered with an error) and ``dropped`` (no reply in
time, or the SuperLink answered for a site that is gone), each with one uniform reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

# Flower error codes meaning the node or its reply is gone (not that its app failed).
UNREACHABLE_CODES = frozenset(
    {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE}
)


def error_reason(error: Error) -> str:
    """One line for a Flower error reply."""
    return error.reason or f"error code {error.code}"


@dataclass
class Replies:
    """What came back from one exchange, by node id (every asked node is in exactly one
    of the three)."""

    ok: dict[int, RecordDict] = field(default_factory=dict)  # in the order they arrived
    failed: dict[int, str] = field(default_factory=dict)  # answered with an error
    dropped: dict[int, str] = field(default_factory=dict)  # no reply, or gone
    errors: dict[int, Error] = field(default_factory=dict)  # the error replies, as sent

    @property
    def asked(self) -> int:
        return len(self.ok) + len(self.failed) + len(self.dropped)


def exchange(
    grid: Grid,
    contents: Mapping[int, RecordDict],
    message_type: str,
    group_id: str,
    timeout: float,
) -> Replies:
    """Send node ``n`` the content ``contents[n]``, wait up to ``timeout`` seconds and
    sort the replies (a reply from a node not asked is ignored)."""
    out = [
        Message(content=content, dst_node_id=node, message_type=message_type, group_id=group_id)
        for node, content in contents.items()
    ]
    replies = Replies()
    for msg in grid.send_and_receive(out, timeout=timeout) if out else []:
        node = msg.metadata.src_node_id
        if node not in contents or node in replies.ok or node in replies.errors:
            continue
        if not msg.has_error():
            replies.ok[node] = msg.content
            continue
        replies.errors[node] = msg.error
        if msg.error.code in UNREACHABLE_CODES:
            replies.dropped[node] = f"gone ({error_reason(msg.error)})"
        else:
            replies.failed[node] = error_reason(msg.error)
    for node in contents:
        if node not in replies.ok and node not in replies.errors:
            replies.dropped[node] = f"no reply within {timeout:.0f}s"
    return replies


def to_each(nodes: Iterable[int], content: RecordDict) -> dict[int, RecordDict]:
    """The same content for every node in ``nodes``."""
    return dict.fromkeys(nodes, content)


def wait_for_sites(grid: Grid, wanted: int, timeout: float, poll: float = 0.5) -> list[int]:
    """The connected nodes, once ``wanted`` of them are there or ``timeout`` is up
    (then whoever is connected: the caller decides whether that is enough)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() >= deadline:
            return nodes
        time.sleep(poll)
