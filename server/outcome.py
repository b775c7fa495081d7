"""Asking each site what the federation did for it (``query.outcome``), after delivery.

One message per site and run, sent only to sites that verified and kept the final
model (they evaluate no other final head). Replies are checked as untrusted input
(``SiteOutcome.from_mapping``); a site that fails, times out or answers nonsense is
named in the report's ``sites_failed`` and left out of ``sites``. A site whose
federated accuracy lies below its local-only one beyond the paired interval is
flagged ``negative_transfer`` in the report, logged as a warning and counted in the
``fedhead_sites_negative_transfer`` gauge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedhead.common.errors import FederationError
from fedhead.common.outcome import SiteOutcome
from fedhead.common.protocol import (
    MSG_OUTCOME,
    RECORD_OUTCOME,
    RECORD_OUTCOME_FIT,
    RECORD_OUTCOME_HEAD,
    RECORD_OUTCOME_REPLY,
    FitSettings,
    OutcomeRequest,
)
from fedhead.common.telemetry import SitesOutcome, emit
from fedhead.server.aggregation import Arrays

log = logging.getLogger(__name__)


@dataclass
class OutcomeResults:
    sites: list[dict[str, Any]] = field(default_factory=list)  # report.json's ``sites``
    failed: dict[str, str] = field(default_factory=dict)  # site label -> why

    @property
    def negative_transfer(self) -> list[str]:
        return [s["site"] for s in self.sites if s["negative_transfer"]]


def outcome_content(request: OutcomeRequest, settings: FitSettings, initial: Arrays) -> RecordDict:
    head = ArrayRecord({str(i): Array(a) for i, a in enumerate(initial)})
    return RecordDict(
        {
            RECORD_OUTCOME: request.to_record(),
            RECORD_OUTCOME_FIT: settings.to_record(),
            RECORD_OUTCOME_HEAD: head,
        }
    )


def read_outcome(msg: Message, max_examples: int) -> SiteOutcome:
    """A site's reply, validated (FederationError says what is wrong)."""
    if msg.has_error():
        raise FederationError(msg.error.reason or f"error code {msg.error.code}")
    record = msg.content.config_records.get(RECORD_OUTCOME_REPLY)
    if record is None:
        raise FederationError("the reply holds no outcome")
    return SiteOutcome.from_mapping(record, max_examples)


class OutcomeQuery:
    def __init__(self, timeout: float, max_examples: Mapping[int, int]) -> None:
        self.timeout = timeout
        self.max_examples = max_examples  # node -> validation examples it declared (capped)

    def ask(
        self,
        grid: Grid,
        nodes: list[int],
        content: RecordDict,
        name: Callable[[int], str],
    ) -> OutcomeResults:
        results = OutcomeResults()
        out = [
            Message(content=content, dst_node_id=n, message_type=MSG_OUTCOME, group_id="outcome")
            for n in nodes
        ]
        replies = list(grid.send_and_receive(out, timeout=self.timeout)) if out else []
        answered = set()
        for msg in sorted(replies, key=lambda m: name(m.metadata.src_node_id)):
            node = msg.metadata.src_node_id
            if node not in nodes or node in answered:
                continue
            answered.add(node)
            try:
                outcome = read_outcome(msg, max(1, self.max_examples.get(node, 0)))
            except FederationError as err:
                results.failed[name(node)] = err.what[:200]
                continue
            entry = outcome.to_report(name(node))
            results.sites.append(entry)
            if outcome.negative_transfer:
                log.warning(
                    "%s: negative transfer: federated accuracy %.4f is below local-only %.4f "
                    "(difference %+.4f, 95%% interval [%+.4f, %+.4f])",
                    name(node),
                    outcome.federated.accuracy,
                    outcome.local.accuracy if outcome.local else float("nan"),
                    outcome.gain,
                    outcome.gain_lo,
                    outcome.gain_hi,
                )
        for node in sorted(set(nodes) - answered):
            results.failed[name(node)] = f"no reply within {self.timeout:.0f}s"
        for site, why in sorted(results.failed.items()):
            log.warning("%s reported no outcome: %s", site, why)
        emit(SitesOutcome(len(results.sites), len(results.negative_transfer), len(results.failed)))
        return results
