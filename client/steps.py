"""What a train or an evaluate message does on a site, once the ClientApp has checked
it (the ledger): in the ClientApp's own process, or in the node's warm worker
(``client.worker``), which keeps torch, the data and the features loaded between
messages. Imports torch: the ClientApp imports this module only when it works in
process."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fedhead.client.site import Site
from fedhead.client.worker import Trained
from fedhead.common.heads import head_sha256
from fedhead.common.protocol import (
    FIT_EVAL_ACCURACY,
    FIT_EVAL_EXAMPLES,
    FIT_EVAL_LOSS,
    FitSettings,
    StatisticsRequest,
)

log = logging.getLogger(__name__)


class LocalSite:
    """The site's work, done in this process (as ``client.worker.RemoteSite`` has the
    node's worker do it)."""

    def __init__(self, site: Site, run_id: int) -> None:
        self.site = site
        self.run_id = run_id

    def train(self, arrays: list[np.ndarray], settings: FitSettings, evaluates: bool) -> Trained:
        return train(self.site, self.run_id, arrays, settings, evaluates)

    def evaluate(
        self, arrays: list[np.ndarray], statistics: bool
    ) -> tuple[float, int, dict[str, Any]]:
        return evaluate(self.site, arrays, statistics)

    def statistics(self, request: StatisticsRequest) -> tuple[np.ndarray, int]:
        return self.site.statistics(request)


def evaluate(
    site: Site, arrays: list[np.ndarray], statistics: bool
) -> tuple[float, int, dict[str, Any]]:
    """Loss, example count and metrics of ``arrays`` on the site's validation split: the
    accuracy, and when the run asks and the site's node config allows it, the count
    tables the server pools into clinical metrics (never per-image scores)."""
    result = site.evaluate(arrays)
    metrics: dict[str, Any] = {"accuracy": result.accuracy}
    if statistics and site.node.evaluation_statistics:
        metrics.update(site.evaluation_statistics(arrays).to_metrics())
    return result.loss, result.examples, metrics


def train(
    site: Site, run_id: int, arrays: list[np.ndarray], settings: FitSettings, evaluates: bool
) -> Trained:
    """Train from ``arrays``; with ``evaluates``, evaluate them first (they are the
    previous round's global head, and that evaluation rides along with the update)."""
    metrics: dict[str, Any] = {}
    if evaluates:
        loss, examples, evaluated = evaluate(site, arrays, settings.statistics)
        metrics = {
            FIT_EVAL_LOSS: loss,
            FIT_EVAL_EXAMPLES: examples,
            **{FIT_EVAL_ACCURACY if k == "accuracy" else k: v for k, v in evaluated.items()},
        }
    outcome = site.train(arrays, settings)
    # The run is on record: its spec, and the head trained from (the site's proof, should
    # it miss the run's model and ask for it later).
    site.models.trained(
        run_id, site.spec, settings.server_round, head_sha256(site.trainable.names, arrays)
    )
    stats = outcome.extraction
    log.info(
        "round %d: trained on %d examples in %.2fs, loss %.4f (features: %d cached, %d new)",
        settings.server_round,
        outcome.result.examples,
        outcome.result.seconds,
        outcome.result.loss,
        stats.cache_hits,
        stats.cache_misses,
    )
    # Under DP every site weighs the same, which bounds each site's influence; otherwise
    # a site counts its examples up to the run's cap (the server refuses more).
    weight = (
        1 if settings.uniform_weight else min(outcome.result.examples, settings.max_site_examples)
    )
    return Trained(outcome.arrays, weight, {"train-loss": outcome.result.loss, **metrics})
