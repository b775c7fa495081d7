"""The first phase of a run: wait for the sites, tell them the run, send the backbone.

1. ``query.prepare`` to every connected node: the RunSpec (backbone name + sha256 and
   the model's shape). Each node checks its data and its backbone copy.
2. ``query.weights`` to nodes whose copy is missing or does not match: the weights
   file's bytes, once. The node verifies the sha256 before caching them.
Nodes that fail either step are left out of the run, with the reason logged. What the
phase returns, the ``Roster``, is fixed for the rest of the run: who takes part, how
each is shown, and how many examples each may count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
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
from fedhead.server.exchange import exchange, to_each

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Roster:
    """The sites of a run once prepared: who is ready, who failed and why, the labels
    sites are shown by, and what each may count (its prepare-time example counts, capped
    by max-site-examples and, in training, by max-site-share of the total; 1 each under
    uniform weighting). Sites report their counts themselves each round; a claim above
    their cap is refused, not believed."""

    ready: Mapping[int, PrepareReply]
    failed: Mapping[int, str] = field(default_factory=dict)
    names: Mapping[int, str] = field(default_factory=dict)  # node id -> label
    weights_sent_to: tuple[int, ...] = ()
    train_caps: Mapping[int, int] = field(default_factory=dict)
    val_caps: Mapping[int, int] = field(default_factory=dict)
    # how much a site's evaluation weighs at most (its val cap, lowered to the share cap)
    val_weights: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("ready", "failed", "names", "train_caps", "val_caps", "val_weights"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def nodes(self) -> list[int]:
        return sorted(self.ready)

    @property
    def train_examples(self) -> int:
        return sum(r.train_examples for r in self.ready.values())

    def name(self, node: int) -> str:
        return self.names.get(node, f"node {node}")


class Exclusions:
    """Sites left out of the rest of a run, with why: those that spoiled a round in a way
    only a malicious site can (SecAgg+ key shares that do not rebuild the keys). The round
    loop adds to it; sampling leaves these sites out."""

    def __init__(self, earlier: Mapping[int, str] | None = None) -> None:
        self._why: dict[int, str] = dict(earlier or {})

    def add(self, node: int, why: str) -> bool:
        """Leave ``node`` out from now on; False if it already was."""
        if node in self._why:
            return False
        self._why[node] = why
        return True

    def __contains__(self, node: object) -> bool:
        return node in self._why

    def of(self, nodes: set[int]) -> set[int]:
        """``nodes`` without the excluded ones."""
        return {n for n in nodes if n not in self._why}

    def to_json(self) -> dict[str, str]:
        return {str(n): why for n, why in sorted(self._why.items())}


def site_label(node: int, chosen: str, taken: set[str]) -> str:
    """The label a site is shown by: the name it chose when valid and not taken by an
    earlier site (then suffixed with its node id), else ``node <id>``."""
    if not valid_site_name(chosen):
        if chosen:
            log.warning("node %d sent an invalid site name; using its node id", node)
        return f"node {node}"
    return chosen if chosen not in taken else f"{chosen}#{node}"


def _read_reply(content: RecordDict) -> PrepareReply | None:
    """A site's prepare reply, or None when it is not one fedhead's sites send."""
    record = content.config_records.get(RECORD_PREPARE)
    if record is None:
        return None
    try:
        reply = PrepareReply.from_mapping(record)
    except FederationError:
        return None
    if reply.train_examples < 0 or reply.val_examples < 0:
        return None
    return reply


def capped_shares(counts: Mapping[int, int], max_share: float) -> dict[int, int]:
    """``counts`` with the largest ones lowered until none is more than ``max_share`` of
    the total (as far as whole numbers allow; 1 = unchanged; a share below 1/n of n sites
    makes them weigh the same). With a share of 0.5 no site
    weighs more than all the others together; honest sites of different sizes keep their
    counts as long as none holds more than that share."""
    caps = dict(counts)
    if max_share >= 1 or len(caps) < 2:
        return caps
    max_share = max(max_share, 1 / len(caps))  # below 1/n: every site weighs the same
    for _ in range(len(caps)):
        total = sum(caps.values())
        node = max(caps, key=lambda n: caps[n])
        if caps[node] <= max_share * total:
            break
        # the largest may weigh max_share of the new total: c = s (others + c)
        others = total - caps[node]
        lowered = int(max_share * others / (1 - max_share))
        caps.update({n: min(c, max(1, lowered)) for n, c in caps.items()})
    return caps


@dataclass(frozen=True)
class SiteCaps:
    """How many examples a site may count: what it declared, at most
    ``max_site_examples``, lowered so no site holds more than ``max_share`` of the total
    weight; 1 each in training when every site weighs the same (differential privacy)."""

    max_site_examples: int
    uniform: bool = False
    max_share: float = 1.0

    def train(self, ready: Mapping[int, PrepareReply]) -> dict[int, int]:
        if self.uniform:
            return dict.fromkeys(ready, 1)
        counts = {n: min(r.train_examples, self.max_site_examples) for n, r in ready.items()}
        return capped_shares(counts, self.max_share)

    def val(self, ready: Mapping[int, PrepareReply]) -> dict[int, int]:
        """The validation examples a site may claim (what it declared, at most
        max-site-examples)."""
        return {n: min(r.val_examples, self.max_site_examples) for n, r in ready.items()}

    def val_weights(self, ready: Mapping[int, PrepareReply]) -> dict[int, int]:
        """The most a site's evaluation weighs in the pooled loss and accuracy."""
        return capped_shares(self.val(ready), self.max_share)


class BackboneDistributor:
    """Prepares the connected nodes for the run and sends the backbone to those lacking it."""

    def __init__(
        self,
        spec: RunSpec,
        weights_path: Path,
        timeout: float,
        caps: SiteCaps,
        site_labels: bool = True,
    ) -> None:
        self.spec = spec
        self.weights_path = weights_path
        self.timeout = timeout
        self.caps = caps
        self.site_labels = site_labels  # False: sites are shown by node id only

    def prepare(self, grid: Grid, nodes: list[int], joining: Roster | None = None) -> Roster:
        """Prepare ``nodes``; with ``joining``, nodes that join a run under way: the
        roster returned is that run's with them (labels kept unique, caps recomputed)."""
        earlier = joining or Roster(ready={})
        ready: dict[int, PrepareReply] = dict(earlier.ready)
        failed: dict[int, str] = dict(earlier.failed)
        names: dict[int, str] = dict(earlier.names)

        def name(node: int) -> str:
            return names.get(node, f"node {node}")

        content = RecordDict({RECORD_RUN: self.spec.to_record()})
        replies = exchange(grid, to_each(nodes, content), MSG_PREPARE, "prepare", self.timeout)
        needs_weights: list[int] = []
        for node, why in replies.failed.items():
            failed[node] = why
            log.error("%s cannot take part: %r", name(node), why)
        for node, answer in replies.ok.items():
            reply = _read_reply(answer)
            if reply is None:
                failed[node] = "malformed prepare reply"
                log.error(
                    "%s cannot take part: its prepare reply is malformed "
                    "(missing or mistyped fields, or negative counts)",
                    name(node),
                )
                continue
            if self.site_labels:
                names[node] = site_label(node, reply.site_name, set(names.values()))
            log.info(
                "%s: %d training / %d validation images on %s, backbone %s",
                name(node),
                reply.train_examples,
                reply.val_examples,
                reply.device,
                reply.weights,
            )
            ready[node] = reply
            if reply.weights != WEIGHTS_OK:
                if reply.detail:
                    log.warning("%s: %s", name(node), reply.detail)
                needs_weights.append(node)
        for node, why in replies.dropped.items():
            failed[node] = why
            log.error("%s did not answer the prepare message: %s", name(node), why)
        sent_to: list[int] = list(earlier.weights_sent_to)
        if needs_weights:
            for node, why in self._send_weights(grid, needs_weights, name).items():
                if why:
                    failed[node] = why
                    del ready[node]
                else:
                    sent_to.append(node)
        for node, reply in sorted(ready.items()):
            if node in earlier.ready:
                continue
            if max(reply.train_examples, reply.val_examples) > self.caps.max_site_examples:
                log.warning(
                    "%s declares %d training / %d validation examples; it counts as %d "
                    "(max-site-examples)",
                    name(node),
                    reply.train_examples,
                    reply.val_examples,
                    self.caps.max_site_examples,
                )
        return Roster(
            ready=ready,
            failed=failed,
            names=names,
            weights_sent_to=tuple(sent_to),
            train_caps=self.caps.train(ready),
            val_caps=self.caps.val(ready),
            val_weights=self.caps.val_weights(ready),
        )

    def _send_weights(
        self, grid: Grid, nodes: list[int], name: Callable[[int], str]
    ) -> dict[int, str]:
        """Send the backbone file to ``nodes``: node -> "" if it took it, else why not."""
        data = np.fromfile(self.weights_path, dtype=np.uint8)
        log.info(
            "sending backbone %s (%.1f MB) to %d site(s) that lack it",
            self.spec.backbone,
            data.nbytes / 1e6,
            len(nodes),
        )
        content = RecordDict({RECORD_WEIGHTS: ArrayRecord({"file": Array(data)})})
        replies = exchange(grid, to_each(nodes, content), MSG_WEIGHTS, "prepare", self.timeout)
        outcome = dict.fromkeys(replies.ok, "")
        for node, why in replies.failed.items():
            outcome[node] = why
            log.error("%s refused the backbone: %r", name(node), why)
        for node, why in replies.dropped.items():
            outcome[node] = f"backbone transfer: {why}"
        return outcome
