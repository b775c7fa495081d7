"""report.json as tests read it: typed, so a wrong key is a type error, not a KeyError.

One TypedDict per record the report writes: ``ReportJson`` names every field of
``fedhead.server.report.RunReport`` (but the final tensors, never written), ``RoundJson``
every field of ``fedhead.common.rounds.RoundResult``; tests/server/test_report.py fails
when they drift apart, and a federation test compares them with a written report.

Values the report writes as null when missing (a metric of a round that has none, a
section of a run without that feature: DP, resume, delivery, a server optimizer ...)
are typed as present: tests read them where the run has them, and a null there fails
the test at that line. Sections whose contents other modules own (the config, DP, the
delivery ...) are plain mappings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict, cast


class BackboneJson(TypedDict):
    name: str
    sha256: str
    weights_file: str
    custom: bool
    trunk_params: int
    head_params: int
    head_bytes: int
    trainable_tensors: list[str]


class SetupSiteJson(TypedDict):
    """A site that took part, by the label it chose (or its node id)."""

    node_id: int
    name: str
    train_examples: int
    val_examples: int
    device: str
    joined: bool  # it joined the run under way (a node restarted, say)


class SetupJson(TypedDict):
    """Sites by their labels (``sites`` pairs each with its node id)."""

    sites_ready: list[str]
    sites_failed: dict[str, str]
    backbone_sent_to: list[str]
    bytes_to_sites: int
    bytes_from_sites: int
    train_examples: int
    sites: list[SetupSiteJson]


class RoundJson(TypedDict):
    round: int
    seconds: float
    aggregated: bool
    train_loss: float
    eval_loss: float
    eval_accuracy: float
    eval_examples: int
    eval_metrics: dict[str, float]
    eval_confusion: list[list[int]]
    eval_statistics_examples: int
    eval_statistics_refused: int
    server_eval_loss: float
    server_eval_accuracy: float
    server_eval_metrics: dict[str, float]
    sites_selected: int
    sites_replied: int
    sites_failed: int
    sites_dropped: int
    updates_rejected: dict[str, int]
    rejected_sites: dict[str, str]
    bytes_to_sites: int
    bytes_from_sites: int
    secagg_seconds: dict[str, float]
    secagg_halted: str
    secagg_reason: str
    dp_epsilon: float
    dp_delta: float


class ReportJson(TypedDict):
    run_id: int
    backbone: BackboneJson
    clients: int
    input_size: int
    config: dict[str, Any]
    setup: SetupJson
    initial_eval: RoundJson
    rounds: list[RoundJson]
    final_eval_accuracy: float
    final_eval_loss: float
    final_server_eval_accuracy: float
    final_server_eval_loss: float
    server_test_evaluation: dict[str, Any]
    centralized_accuracy: float
    centralized: dict[str, Any]
    secure_aggregation: str
    secure_aggregation_params: dict[str, Any]
    differential_privacy: dict[str, Any]
    server_optimizer: dict[str, Any]
    closed_form: dict[str, Any]
    resumed_from: dict[str, Any]
    model: dict[str, Any]
    delivery: dict[str, Any]
    earlier_models: dict[str, Any]
    sites: list[dict[str, Any]]
    sites_failed: dict[str, str]
    sites_excluded: dict[str, str]
    seconds: float


def read_report(out_dir: Path) -> ReportJson:
    return cast(ReportJson, json.loads((out_dir / "report.json").read_text()))
