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

from flwr.app import Array, ArrayRecord, RecordDict
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
from fedhead.server.exchange import exchange, to_each

log = logging.getLogger(__name__)


@dataclass
class SiteOutcomes:
    """The sites' answers: report.json's ``sites`` and ``sites_failed``."""

    sites: list[dict[str, Any]] = field(default_factory=list)
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


def read_outcome(content: RecordDict, max_examples: int) -> SiteOutcome:
    """A site's reply, validated (FederationError says what is wrong)."""
    record = content.config_records.get(RECORD_OUTCOME_REPLY)
    if record is None:
        raise FederationError("the reply holds no outcome")
    return SiteOutcome.from_mapping(record, max_examples)


def ask_outcomes(
    grid: Grid,
    nodes: list[int],
    content: RecordDict,
    timeout: float,
    max_examples: Mapping[int, int],
    name: Callable[[int], str],
) -> SiteOutcomes:
    """Ask ``nodes`` for their outcome; ``max_examples``: node -> the validation examples
    it declared (capped), which its answer cannot exceed."""
    outcomes = SiteOutcomes()
    replies = exchange(grid, to_each(nodes, content), MSG_OUTCOME, "outcome", timeout)
    for node, answer in sorted(replies.ok.items(), key=lambda item: name(item[0])):
        try:
            outcome = read_outcome(answer, max(1, max_examples.get(node, 0)))
        except FederationError as err:
            outcomes.failed[name(node)] = err.what[:200]
            continue
        entry = outcome.to_report(name(node))
        outcomes.sites.append(entry)
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
    for node, why in [*replies.failed.items(), *replies.dropped.items()]:
        outcomes.failed[name(node)] = why[:200]
    for site, why in sorted(outcomes.failed.items()):
        log.warning("%s reported no outcome: %s", site, why)
    emit(SitesOutcome(len(outcomes.sites), len(outcomes.negative_transfer), len(outcomes.failed)))
    return outcomes
