"""Every fedhead Prometheus metric, and how statistics events update them.

Naming follows prometheus.io/docs/practices/naming: prefix ``fedhead_``, base units
(seconds, bytes, ratios 0..1), counters end in ``_total``, ``_info`` for metadata.
Labels take only small fixed value sets (stage, reason, outcome, direction, scope);
counters are pre-initialised so every series exists at 0 before the first event, while
a gauge with no value yet (an accuracy before the run's first evaluated round, a
server-scope accuracy without a server test set) has no series rather than a 0. Server metrics
are per federation (one exporter beside the SuperLink); site metrics are per site (one
exporter beside each SuperNode, on the site's own network).
"""

from __future__ import annotations

import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from fedhead.common import __version__
from fedhead.common.rounds import CLINICAL_METRICS, REJECT_REASONS, SECAGG_STAGES, RoundResult
from fedhead.common.telemetry import (
    Event,
    RoundStarted,
    RunFinished,
    RunPrepared,
    RunStarted,
    SiteDevice,
    SiteFeatures,
    SiteMessage,
    SiteRefusedHead,
    SiteRefusedUpdate,
    SitesOutcome,
    SiteTrained,
)

# Rounds take seconds (a head on cached features, in simulation) to many minutes (sites
# extracting features for the first time, slow links, SecAgg+ with many sites).
ROUND_SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# SecAgg+ stages are a fraction of a round.
SECAGG_STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
# Local training of a head on cached features: well under a second to a few minutes
# (with unfrozen trunk blocks, or large sites).
SITE_TRAIN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
# A ClientApp message includes process start-up and the first feature extraction.
SITE_MESSAGE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

SITE_STATES = ("selected", "replied", "failed", "dropped")
# client.mods.MESSAGE_KINDS (a test checks they agree); a SecAgg+ round sends a site
# four train messages: only collect_masked_vectors trains
SITE_MESSAGE_KINDS = (
    "train",
    "evaluate",
    "prepare",
    "weights",
    "model",
    "models",
    "outcome",
    "validate",
    "secagg_setup",
    "secagg_share_keys",
    "secagg_unmask",
    "other",
)
SITE_REFUSALS = ("non_finite", "norm", "clipping_range")
# client.guard.REFUSALS (a test checks they agree)
SITE_HEAD_REFUSALS = (
    "shape",
    "initial",
    "step",
    "stale",
    "settings",
    "unbounded",
    "non_finite",
    "candidates",
)
SCOPES = ("federated", "server")


def build_info(registry: CollectorRegistry, roles: list[str]) -> Info:
    """fedhead_build_info{version, roles}: one per exporter."""
    info = Info("fedhead_build", "fedhead version and roles of this exporter.", registry=registry)
    info.info({"version": __version__, "roles": ",".join(sorted(roles))})
    return info


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


class ServerMetrics:
    """The federation's health, as seen by the ServerApp."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.runs_started = Counter(
            "fedhead_runs_started_total", "Federated runs started on this SuperLink.", registry=r
        )
        self.runs_completed = Counter(
            "fedhead_runs_completed_total", "Federated runs that finished every round.", registry=r
        )
        self.runs_failed = Counter(
            "fedhead_runs_failed_total",
            "Federated runs that stopped with an error (see the SuperLink log), or that "
            "were cut off (fedhead_runs_cut_off_total).",
            registry=r,
        )
        self.runs_cut_off = Counter(
            "fedhead_runs_cut_off_total",
            "Federated runs whose ServerApp process ended without finishing them: killed, "
            "or stopped with its SuperLink. Continue one with run-config resume-from.",
            registry=r,
        )
        self.run_sites = Gauge(
            "fedhead_run_sites", "Sites that joined the current or last run.", registry=r
        )
        self.sites_outcome = Gauge(
            "fedhead_sites_outcome",
            "Sites of the last run by per-site outcome (local-baseline / personalize-epochs): "
            "reported, negative_transfer (federated accuracy below local-only beyond the "
            "paired 95% interval), failed (no valid outcome).",
            ["state"],
            registry=r,
        )
        self.round_current = Gauge(
            "fedhead_round_current",
            "Round whose training is in progress in the current run (0: none, or the run "
            "ended). It runs up to two ahead of fedhead_round_last_completed: a round is "
            "complete once its federated evaluation is in, which travels with the next "
            "round's training.",
            registry=r,
        )
        self.round_last = Gauge(
            "fedhead_round_last_completed",
            "Number of the last round that finished: trained, aggregated and evaluated.",
            registry=r,
        )
        self.progress_ts = Gauge(
            "fedhead_last_progress_timestamp_seconds",
            "Unix time of the last progress of a run: its start, its sites' preparation, "
            "or a finished round.",
            registry=r,
        )
        self.round_last_ts = Gauge(
            "fedhead_round_last_completed_timestamp_seconds",
            "Unix time at which the last round finished.",
            registry=r,
        )
        self.rounds = Counter(
            "fedhead_rounds_total",
            "Rounds finished, by whether they changed the global head.",
            ["outcome"],
            registry=r,
        )
        self.round_seconds = Histogram(
            "fedhead_round_duration_seconds",
            "Wall-clock time of a round: training, aggregation and evaluation.",
            buckets=ROUND_SECONDS_BUCKETS,
            registry=r,
        )
        self.sites = Counter(
            "fedhead_round_sites_total",
            "Sites per round: selected (asked to train), replied (delivered an update), "
            "failed (answered with an error), dropped (never answered).",
            ["state"],
            registry=r,
        )
        self.sites_last = Gauge(
            "fedhead_last_round_sites",
            "Sites in the last round, by state (as above).",
            ["state"],
            registry=r,
        )
        self.rejected = Counter(
            "fedhead_updates_rejected_total",
            "Updates (or secure aggregates) rejected before they counted, by reason.",
            ["reason"],
            registry=r,
        )
        self.traffic = Counter(
            "fedhead_traffic_bytes_total",
            "Serialized message bytes between server and sites, by direction.",
            ["direction"],
            registry=r,
        )
        self.secagg_stage = Histogram(
            "fedhead_secagg_stage_duration_seconds",
            "Duration of each SecAgg+ stage in a round.",
            ["stage"],
            buckets=SECAGG_STAGE_BUCKETS,
            registry=r,
        )
        self.eval_loss = Gauge(
            "fedhead_eval_loss",
            "Cross-entropy of the global head after the last round: federated (example-"
            "weighted over the sites' validation data) or on the server's test set.",
            ["scope"],
            registry=r,
        )
        self.eval_accuracy = Gauge(
            "fedhead_eval_accuracy_ratio",
            "Accuracy (0..1) of the global head after the last round, by scope (as above).",
            ["scope"],
            registry=r,
        )
        self.eval_accuracy_change = Gauge(
            "fedhead_eval_accuracy_change_ratio",
            "Change of accuracy from the previous round to the last (negative: falling).",
            ["scope"],
            registry=r,
        )
        self.eval_clinical = Gauge(
            "fedhead_eval_clinical_ratio",
            "Clinical metric (0..1) of the global head after the last round, by scope and "
            "metric: auroc, balanced_accuracy, sensitivity, specificity (two classes) and "
            "ece (calibration error). Federated: pooled from the sites' count tables; "
            "AUROC exact up to the 100-bin score histograms.",
            ["scope", "metric"],
            registry=r,
        )
        # Only DP runs create a series: an epsilon of 0 would read as "no privacy spent".
        self.dp_epsilon = Gauge(
            "fedhead_dp_epsilon",
            "Differential privacy spent so far in the run: epsilon at the run's delta.",
            ["delta"],
            registry=r,
        )
        self.backbone = Info("fedhead_backbone", "Backbone of the current or last run.", registry=r)
        self.backbone.info({"name": "", "sha256": "", "secure_aggregation": ""})
        for label, values in (
            (self.rounds, ("aggregated", "unchanged")),
            (self.sites, SITE_STATES),
            (self.sites_last, SITE_STATES),
            (self.rejected, REJECT_REASONS),
            (self.traffic, ("to_sites", "from_sites")),
            (self.secagg_stage, SECAGG_STAGES),
        ):
            for value in values:
                label.labels(value)
        self._previous_accuracy: dict[str, float] = {}
        self._run = {"name": "", "secure_aggregation": ""}
        self._open_runs: set[str] = set()  # spool writers (ServerApps) with a run going

    def apply(self, event: Event, writer: str = "") -> None:
        """Apply one event, written by the spool writer ``writer`` (its ServerApp)."""
        if isinstance(event, RunStarted):
            self._open_runs.add(writer)
            self.runs_started.inc()
            self.run_sites.set(0)
            self.round_current.set(0)
            self._previous_accuracy.clear()
            for gauge in (
                self.eval_loss,
                self.eval_accuracy,
                self.eval_accuracy_change,
                self.eval_clinical,
            ):
                gauge.clear()  # a new run has no evaluation until its first round
            self.progress_ts.set_to_current_time()
            self._run = {"name": event.backbone, "secure_aggregation": event.secure_aggregation}
            self.backbone.info({**self._run, "sha256": ""})
        elif isinstance(event, RunPrepared):
            self.progress_ts.set_to_current_time()
            self.run_sites.set(event.sites)
            self.backbone.info({**self._run, "sha256": event.sha256})
        elif isinstance(event, RunFinished):
            self._open_runs.discard(writer)
            (self.runs_completed if event.ok else self.runs_failed).inc()
            self.round_current.set(0)
        elif isinstance(event, RoundStarted):
            self.round_current.set(event.round)
        elif isinstance(event, RoundResult):
            self._round(event)
        elif isinstance(event, SitesOutcome):
            self.sites_outcome.labels("reported").set(event.reported)
            self.sites_outcome.labels("negative_transfer").set(event.negative_transfer)
            self.sites_outcome.labels("failed").set(event.failed)

    def writer_ended(self, writer: str) -> None:
        """The ServerApp process ``writer`` is gone: a run it started and never finished
        was cut off (it never got to say so)."""
        if writer in self._open_runs:
            self._open_runs.discard(writer)
            self.runs_failed.inc()
            self.runs_cut_off.inc()
            self.round_current.set(0)

    def _round(self, e: RoundResult) -> None:
        self.round_last.set(e.round)
        self.round_last_ts.set(time.time())
        self.progress_ts.set_to_current_time()
        self.rounds.labels("aggregated" if e.aggregated else "unchanged").inc()
        self.round_seconds.observe(e.seconds)
        counts = {
            "selected": e.sites_selected,
            "replied": e.sites_replied,
            "failed": e.sites_failed,
            "dropped": e.sites_dropped,
        }
        for state, n in counts.items():
            self.sites.labels(state).inc(n)
            self.sites_last.labels(state).set(n)
        for reason, n in e.updates_rejected.items():
            self.rejected.labels(reason).inc(n)
        self.traffic.labels("to_sites").inc(e.bytes_to_sites)
        self.traffic.labels("from_sites").inc(e.bytes_from_sites)
        for stage, seconds in e.secagg_seconds.items():
            self.secagg_stage.labels(stage).observe(seconds)
        for scope, loss, acc in (
            ("federated", e.eval_loss, e.eval_accuracy),
            ("server", e.server_eval_loss, e.server_eval_accuracy),
        ):
            values = e.eval_metrics if scope == "federated" else e.server_eval_metrics
            for metric in CLINICAL_METRICS:
                if _finite(values.get(metric)):
                    self.eval_clinical.labels(scope, metric).set(values[metric])
            if _finite(loss):
                self.eval_loss.labels(scope).set(loss)
            if _finite(acc):
                self.eval_accuracy.labels(scope).set(acc)
                if scope in self._previous_accuracy:
                    change = acc - self._previous_accuracy[scope]
                    self.eval_accuracy_change.labels(scope).set(change)
                self._previous_accuracy[scope] = acc
        if _finite(e.dp_epsilon):
            self.dp_epsilon.labels(f"{e.dp_delta:g}").set(e.dp_epsilon)  # type: ignore[arg-type]


class SiteMetrics:
    """One site's work, exported on the site's own network (nothing goes to the server)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.messages = Counter(
            "fedhead_site_messages_total",
            "Messages from the server handled by this site, by kind (train: local "
            "training; under SecAgg+ the key exchange stages are secagg_setup, "
            "secagg_share_keys and secagg_unmask) and outcome.",
            ["kind", "outcome"],
            registry=r,
        )
        self.message_seconds = Histogram(
            "fedhead_site_message_duration_seconds",
            "Time to handle one message in the site's ClientApp process.",
            ["kind"],
            buckets=SITE_MESSAGE_BUCKETS,
            registry=r,
        )
        self.train_seconds = Histogram(
            "fedhead_site_training_duration_seconds",
            "Local training time per round (head and unfrozen blocks, on cached features).",
            buckets=SITE_TRAIN_BUCKETS,
            registry=r,
        )
        self.train_examples = Counter(
            "fedhead_site_train_examples_total",
            "Training examples used, summed over rounds (an example trained in 10 rounds "
            "counts 10 times).",
            registry=r,
        )
        self.extracted = Counter(
            "fedhead_site_feature_extraction_images_total",
            "Images run through the frozen trunk (cache misses that decoded).",
            registry=r,
        )
        self.extract_seconds = Counter(
            "fedhead_site_feature_extraction_seconds_total",
            "Time spent running the frozen trunk; images / seconds is the extraction rate.",
            registry=r,
        )
        self.extract_rate = Gauge(
            "fedhead_site_feature_extraction_images_per_second",
            "Trunk throughput of the last extraction that computed any features.",
            registry=r,
        )
        self.cache = Counter(
            "fedhead_site_feature_cache_lookups_total",
            "Feature cache lookups by result: hit (read from the cache) or miss.",
            ["result"],
            registry=r,
        )
        self.skipped = Counter(
            "fedhead_site_images_skipped_total",
            "Images that could not be read or decoded and were left out.",
            registry=r,
        )
        self.refused = Counter(
            "fedhead_site_updates_refused_total",
            "Local updates this site refused to send, by reason.",
            ["reason"],
            registry=r,
        )
        self.heads_refused = Counter(
            "fedhead_site_heads_refused_total",
            "Heads from the server this site refused to train from or evaluate, by reason.",
            ["reason"],
            registry=r,
        )
        self.gpu_peak = Gauge(
            "fedhead_site_gpu_peak_memory_bytes",
            "Peak CUDA memory allocated while handling the last message (0 on CPU).",
            registry=r,
        )
        self.device = Info("fedhead_site_device", "Device this site trains on.", registry=r)
        self.device.info({"kind": "", "name": ""})
        for kind in SITE_MESSAGE_KINDS:
            self.message_seconds.labels(kind)
            for outcome in ("ok", "error"):
                self.messages.labels(kind, outcome)
        for result in ("hit", "miss"):
            self.cache.labels(result)
        for reason in SITE_REFUSALS:
            self.refused.labels(reason)
        for reason in SITE_HEAD_REFUSALS:
            self.heads_refused.labels(reason)

    def apply(self, event: Event) -> None:
        if isinstance(event, SiteMessage):
            self.messages.labels(event.kind, "ok" if event.ok else "error").inc()
            self.message_seconds.labels(event.kind).observe(event.seconds)
        elif isinstance(event, SiteTrained):
            self.train_seconds.observe(event.seconds)
            self.train_examples.inc(event.examples)
        elif isinstance(event, SiteFeatures):
            self.extracted.inc(event.extracted)
            self.extract_seconds.inc(event.extract_seconds)
            if event.extracted and event.extract_seconds > 0:
                self.extract_rate.set(event.extracted / event.extract_seconds)
            self.cache.labels("hit").inc(event.cache_hits)
            self.cache.labels("miss").inc(event.cache_misses)
            self.skipped.inc(event.skipped)
        elif isinstance(event, SiteDevice):
            self.device.info({"kind": event.kind, "name": event.name})
            self.gpu_peak.set(event.peak_memory_bytes)
        elif isinstance(event, SiteRefusedUpdate):
            self.refused.labels(event.reason).inc()
        elif isinstance(event, SiteRefusedHead):
            self.heads_refused.labels(event.reason).inc()
