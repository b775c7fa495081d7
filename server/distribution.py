"""Telling sites which backbone the run uses, and sending it to those that lack it.

1. ``query.prepare`` to every connected node: the RunSpec (backbone name + sha256 and
   the model's shape). Each node checks its data and its backbone copy.
2. ``query.weights`` to nodes whose copy is missing or does not match: the weights
   file's bytes, once. The node verifies the sha256 before caching them.
Nodes that fail either step are left out of the run, with the reason logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedhead.common.errors import FederationError
from fedhead.common.protocol import (
    MSG_PREPARE,
    MSG_WEIGHTS,
    RECORD_PREPARE,
    RECORD_RUN,
    RECORD_WEIGHTS,
    WEIGHTS_OK,
    PrepareReply,
    RunSpec,
    valid_site_name,
)

log = logging.getLogger(__name__)


@dataclass
class PrepareOutcome:
    ready: dict[int, PrepareReply] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    weights_sent_to: list[int] = field(default_factory=list)
    bytes_to_sites: int = 0  # the prepare and backbone messages, both ways
    bytes_from_sites: int = 0
    names: dict[int, str] = field(default_factory=dict)  # node id -> label for logs, report

    @property
    def train_examples(self) -> int:
        return sum(r.train_examples for r in self.ready.values())

    def name(self, node: int) -> str:
        return self.names.get(node, f"node {node}")


def site_label(node: int, chosen: str, taken: set[str]) -> str:
    """The label a site is shown by: the name it chose when valid and not taken by an
    earlier site (then suffixed with its node id), else ``node <id>``."""
    if not valid_site_name(chosen):
        if chosen:
            log.warning("node %d sent an invalid site name; using its node id", node)
        return f"node {node}"
    return chosen if chosen not in taken else f"{chosen}#{node}"


def _read_reply(msg: Message) -> PrepareReply | None:
    """A site's prepare reply, or None when it is not one fedhead's sites send."""
    record = msg.content.config_records.get(RECORD_PREPARE)
    if record is None:
        return None
    try:
        reply = PrepareReply.from_mapping(record)
    except FederationError:
        return None
    if reply.train_examples < 0 or reply.val_examples < 0:
        return None
    return reply


class BackboneDistributor:
    def __init__(
        self, spec: RunSpec, weights_path: Path, timeout: float, site_labels: bool = True
    ) -> None:
        self.spec = spec
        self.weights_path = weights_path
        self.timeout = timeout
        self.site_labels = site_labels  # False: sites are shown by node id only

    def _send(
        self, grid: Grid, content: RecordDict, msg_type: str, nodes: list[int]
    ) -> list[Message]:
        out = [
            Message(content=content, dst_node_id=n, message_type=msg_type, group_id="prepare")
            for n in nodes
        ]
        return list(grid.send_and_receive(out, timeout=self.timeout))

    def prepare(self, grid: Grid, nodes: list[int]) -> PrepareOutcome:
        outcome = PrepareOutcome()
        content = RecordDict({RECORD_RUN: self.spec.to_record()})
        needs_weights: list[int] = []
        replies = self._send(grid, content, MSG_PREPARE, nodes)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                outcome.failed[node] = msg.error.reason or f"error code {msg.error.code}"
                log.error("%s cannot take part: %r", outcome.name(node), msg.error.reason)
                continue
            reply = _read_reply(msg)
            if reply is None:
                outcome.failed[node] = "malformed prepare reply"
                log.error(
                    "%s cannot take part: its prepare reply is malformed "
                    "(missing or mistyped fields, or negative counts)",
                    outcome.name(node),
                )
                continue
            if self.site_labels:
                outcome.names[node] = site_label(node, reply.site_name, set(outcome.names.values()))
            log.info(
                "%s: %d training / %d validation images on %s, backbone %s",
                outcome.name(node),
                reply.train_examples,
                reply.val_examples,
                reply.device,
                reply.weights,
            )
            if reply.weights == WEIGHTS_OK:
                outcome.ready[node] = reply
            else:
                if reply.detail:
                    log.warning("%s: %s", outcome.name(node), reply.detail)
                needs_weights.append(node)
                outcome.ready[node] = reply  # provisionally; removed below on failure
        for node in set(nodes) - {m.metadata.src_node_id for m in replies}:
            outcome.failed[node] = f"no reply within {self.timeout:.0f}s"
            log.error("%s did not answer the prepare message in time", outcome.name(node))
        if needs_weights:
            self._send_weights(grid, needs_weights, outcome)
        return outcome

    def _send_weights(self, grid: Grid, nodes: list[int], outcome: PrepareOutcome) -> None:
        data = np.fromfile(self.weights_path, dtype=np.uint8)
        log.info(
            "sending backbone %s (%.1f MB) to %d site(s) that lack it",
            self.spec.backbone,
            data.nbytes / 1e6,
            len(nodes),
        )
        content = RecordDict({RECORD_WEIGHTS: ArrayRecord({"file": Array(data)})})
        replies = self._send(grid, content, MSG_WEIGHTS, nodes)
        answered = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error():
                outcome.failed[node] = msg.error.reason or f"error code {msg.error.code}"
                outcome.ready.pop(node, None)
                log.error("%s refused the backbone: %r", outcome.name(node), msg.error.reason)
            else:
                outcome.weights_sent_to.append(node)
        for node in set(nodes) - answered:
            outcome.failed[node] = f"no reply to the backbone transfer within {self.timeout:.0f}s"
            outcome.ready.pop(node, None)
