"""One round's outcome: built once by the server, read by the report, the console table,
the metrics exporter and any other observer of the run.

It lives in common because it also travels as a statistics event (``telemetry``) from
the ServerApp's process to the long-lived exporter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Why the server rejects an update or leaves a site's reply out (a bounded set: it is a
# metrics label). malformed: unreadable or wrongly shaped reply; weight: more examples
# claimed than the site may count; range: a SecAgg+ mean no clipped inputs can produce;
# shares: SecAgg+ key shares that do not rebuild the keys they belong to.
REJECT_REASONS = (
    "structure",
    "non_finite",
    "norm",
    "no_examples",
    "malformed",
    "weight",
    "range",
    "shares",
)
# Flower's SecAgg+ stages, in order (a bounded set: a metrics label).
SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
# Clinical metrics of an evaluation, pooled over sites or on the server's test set
# (a bounded set: a metrics label). Sensitivity and specificity: two classes only.
CLINICAL_METRICS = ("auroc", "balanced_accuracy", "sensitivity", "specificity", "ece")


@dataclass
class RoundResult:
    """What happened in one round (round 0: the initial head's evaluation).

    Filled in as the round goes: the strategy counts sites, rejections and metrics;
    the round loop adds time and traffic at the end.
    """

    round: int
    seconds: float = 0.0
    aggregated: bool = False  # False: too few valid updates, the global head is unchanged
    train_loss: float = math.nan  # example-weighted over sites, last local epoch
    eval_loss: float = math.nan  # federated evaluation, example-weighted over sites
    eval_accuracy: float = math.nan
    eval_examples: int = 0
    # pooled clinical metrics from the sites' summed statistics (common.pooled): auroc,
    # balanced_accuracy, ece, and for two classes sensitivity and specificity
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_confusion: list[list[int]] = field(default_factory=list)  # rows: true class
    eval_statistics_examples: int = 0  # examples behind eval_metrics (sites that sent them)
    eval_statistics_refused: int = 0  # sites whose statistics failed the checks
    server_eval_loss: float = math.nan  # the server's own test set, when configured
    server_eval_accuracy: float = math.nan
    server_eval_metrics: dict[str, float] = field(default_factory=dict)  # exact, same names
    sites_selected: int = 0
    sites_replied: int = 0
    sites_failed: int = 0  # answered with an error
    sites_dropped: int = 0  # selected but never delivered an update (died or timed out)
    updates_rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    rejected_sites: dict[str, str] = field(default_factory=dict)  # node id -> reason
    bytes_to_sites: int = 0
    bytes_from_sites: int = 0
    secagg_seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    secagg_halted: str = ""  # the SecAgg+ stage at which the round stopped ...
    secagg_reason: str = ""  # ... and why (too few live sites, shares that do not combine)
    dp_epsilon: float | None = None  # cumulative privacy spent (DP runs only) ...
    dp_delta: float = 0.0  # ... at this delta

    def reject(self, node_id: int, reason: str) -> None:
        """Count a rejected update (node 0: the secure aggregate, no single site)."""
        self.updates_rejected[reason] = self.updates_rejected.get(reason, 0) + 1
        self.rejected_sites[str(node_id)] = reason
