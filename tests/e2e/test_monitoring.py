"""Metrics for real: exporters beside a SuperLink and SuperNodes, a real Prometheus.

Every PromQL expression of the shipped dashboard and alert rules must parse in
Prometheus, and every dashboard expression must return data for the run. One site's
metrics address is taken on purpose: its exporter does not start, it says so in one
line, and the site trains anyway.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedhead.common import demo_data
from tests.conftest import REPO
from tests.e2e import procs as e2e
from tests.reports import read_report

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

MONITORING = REPO / "deploy" / "monitoring"


def query(port: int, expr: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as err:  # 400 bad_data: the expression does not parse
        answer = json.loads(err.read())
    return answer


def grafana_to_promql(expr: str, window: str) -> str:
    return expr.replace("$__rate_interval", window).replace("$__interval", window)


def has_finite_value(result: dict[str, Any]) -> bool:
    data = result["data"]
    values = data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]
    return any(np.isfinite(float(v["value"][1])) for v in values)


def test_exporters_prometheus_dashboard_and_alerts(tmp_path: Path, mobilenet_weights: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is missing: bash deploy/install.sh --dev installs it")
    link_port, link_metrics, site_metrics, prom_port = (e2e.free_port() for _ in range(4))
    flwr_home = tmp_path / "flwr-home"
    e2e.write_flwr_connection(flwr_home, "watched", link_port)
    server_cache = e2e.server_cache(tmp_path, mobilenet_weights)
    val = demo_data.load("val")
    server_test = tmp_path / "server-test.npz"
    np.savez(server_test, images=val.images[:60], labels=val.labels[:60])

    # Prometheus: the shipped config and rules, pointed at this test's ports
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(MONITORING / "alerts.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["fedhead-server"]["static_configs"][0]["targets"] = [f"127.0.0.1:{link_metrics}"]
    jobs["fedhead-site"]["static_configs"][0]["targets"] = [f"127.0.0.1:{site_metrics}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))

    with e2e.processes(tmp_path / "logs") as procs, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        procs.start(
            "prometheus",
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            e2e.base_env(tmp_path / "prom-home"),
        )
        procs.start_listening(
            "superlink",
            [
                *e2e.FEDHEAD,
                "superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--metrics-address",
                f"127.0.0.1:{link_metrics}",
            ],
            e2e.base_env(tmp_path / "link-home", FEDHEAD_CACHE=str(server_cache)),
            link_port,
        )
        e2e.wait_for_port(link_metrics)
        e2e.wait_for_port(prom_port)
        for i, metrics_port in enumerate((site_metrics, taken_port)):
            procs.start(
                f"site{i}",
                [
                    *e2e.FEDHEAD,
                    "node",
                    "--allow-unsigned-apps",
                    "--threads",
                    str(e2e.site_threads(2)),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--data",
                    str(e2e.npz_site(tmp_path / f"site{i}" / "data.npz", i, 2)),
                    "--port",
                    str(e2e.free_port()),
                    "--cache-dir",
                    str(tmp_path / f"site{i}"),
                    "--metrics-address",
                    f"127.0.0.1:{metrics_port}",
                ],
                e2e.base_env(tmp_path / f"site{i}-home"),
            )
        started = time.time()
        run = e2e.flwr(
            flwr_home,
            "run",
            str(REPO),
            "watched",
            "--stream",
            "--run-config",
            f"strategy='fedavg' num-server-rounds=2 input-size=64 min-sites=2 join-timeout=120.0 "
            f"round-timeout=300.0 server-test-data='{server_test}' out-dir='{tmp_path / 'out'}' "
            "dp-noise-multiplier=0.1 dp-clipping-norm=5.0",
        )
        assert run.returncode == 0, run.stdout + run.stderr + procs.log("superlink")[-3000:]
        # Prometheus has scraped the end of the run (the last round and the run's end)
        e2e.poll_until(
            lambda: bool(
                query(
                    prom_port, "fedhead_round_last_completed == 2 and fedhead_round_current == 0"
                )["data"]["result"]
            ),
            "scraped the run's last round",
            timeout=60,
            interval=1,
        )
        window = f"{int(time.time() - started) + 30}s"

        results = {}
        for expr in _dashboard_exprs():
            results[expr] = query(prom_port, grafana_to_promql(expr, window))
        alert_results = {e: query(prom_port, e) for e in _alert_exprs()}
        rules = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=10).read()
        )
        targets = json.loads(
            urllib.request.urlopen(
                f"http://127.0.0.1:{prom_port}/api/v1/targets", timeout=10
            ).read()
        )
        site1_log = procs.log("site1")

    # every expression parses in Prometheus
    for expr, res in {**results, **alert_results}.items():
        assert res["status"] == "success", (expr, res)
    # and every dashboard expression has data for the run
    empty = [e for e, r in results.items() if not has_finite_value(r)]
    assert not empty, empty
    # the rules loaded and evaluate without errors; both exporters were scraped
    health = [r["health"] for g in rules["data"]["groups"] for r in g["rules"]]
    assert health and set(health) == {"ok"}
    assert {t["health"] for t in targets["data"]["activeTargets"]} == {"up"}
    # the site whose metrics address was taken said so in one line, and trained
    assert "metrics exporter not started" in site1_log
    report = read_report(tmp_path / "out")
    assert report["clients"] == 2 and all(r["aggregated"] for r in report["rounds"])


def _dashboard_exprs() -> list[str]:
    panels = json.loads((MONITORING / "grafana" / "dashboards" / "fedhead.json").read_text())
    return [t["expr"] for p in panels["panels"] for t in p["targets"]]


def _alert_exprs() -> list[str]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for g in groups for rule in g["rules"]]
