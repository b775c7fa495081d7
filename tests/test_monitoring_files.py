"""deploy/monitoring: valid for promtool, and every metric it names exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fedhead.cli.metrics import ServerMetrics, SiteMetrics, build_info
from tests.conftest import REPO

MONITORING = REPO / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "fedhead.json"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool is missing: bash deploy/install.sh --dev installs Debian's prometheus"
        )
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_config_and_the_rules() -> None:
    for args in (
        ("check", "config", str(MONITORING / "prometheus.yml")),
        ("check", "rules", str(MONITORING / "alerts.yml")),
    ):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def alert_exprs() -> list[str]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for g in groups for rule in g["rules"]]


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    ServerMetrics(registry)
    SiteMetrics(registry)
    build_info(registry, ["server", "site"])
    from prometheus_client import generate_latest

    names = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        names.add(family.name)  # also families with no series yet (fedhead_dp_epsilon)
        names.update(s.name for s in family.samples)
    return names


def test_every_metric_named_in_the_dashboard_and_alerts_is_exported() -> None:
    names = exported_names() | {"up"}
    for expr in dashboard_exprs() + alert_exprs():
        for name in re.findall(r"\b(fedhead_[a-z_]+|up)\b", expr):
            assert name in names, f"{name} (in {expr!r}) is not exported"


def test_dashboard_panels_are_described() -> None:
    dash = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dash["panels"]}
    for needed in (
        "Accuracy by round",
        "Loss by round",
        "Participation and dropouts",
        "Round duration p50 / p95",
        "Bytes per round",
        "SecAgg+ stage time",
        "Site training time",
        "Site feature extraction rate",
        "Rejected updates",
    ):
        assert needed in titles
    for p in dash["panels"]:
        assert len(p["description"]) > 30 and p["targets"], p["title"]


def test_a_cut_off_run_fires_both_alerts_and_an_absent_accuracy_fires_none(
    tmp_path: Path,
) -> None:
    """promtool's rule unit test: a run cut off with its SuperLink (the exporter counts
    it failed and cut off) fires FedheadRunFailed and FedheadRunCutOff; an accuracy
    series that is absent (no round evaluated yet) fires no accuracy alert."""
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    rules = {r["alert"]: r for g in groups for r in g["rules"]}

    def annotations(name: str) -> dict[str, str]:
        return {
            k: v.replace("{{ $labels.instance }}", "link")
            for k, v in rules[name]["annotations"].items()
        }

    tests = tmp_path / "alerts_test.yml"
    tests.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(MONITORING / "alerts.yml")],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [
                            {
                                "series": 'fedhead_runs_failed_total{instance="link"}',
                                "values": "0 0 1 1 1",
                            },
                            {
                                "series": 'fedhead_runs_cut_off_total{instance="link"}',
                                "values": "0 0 1 1 1",
                            },
                        ],
                        "alert_rule_test": [
                            {
                                "eval_time": "4m",
                                "alertname": name,
                                "exp_alerts": [
                                    {
                                        "exp_labels": {"severity": "warning", "instance": "link"},
                                        "exp_annotations": annotations(name),
                                    }
                                ],
                            }
                            for name in ("FedheadRunFailed", "FedheadRunCutOff")
                        ]
                        + [{"eval_time": "4m", "alertname": "FedheadAccuracyFalling"}],
                    }
                ],
            }
        )
    )
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
