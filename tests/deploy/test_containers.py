"""The shipped container image and compose stack, for real: the image is built from
deploy/container/Containerfile on a Debian base made with debootstrap, the stack of
deploy/compose (setup, a TLS SuperLink with node authentication and its database behind
nginx, registration, two sites that run only the signed app, Prometheus with the shipped
rules) comes up with podman-compose on 127.0.0.1 ports, `flwr run @fedhead/fedhead` trains
through it under SecAgg+, Prometheus scrapes every
exporter, and the SuperLink's state survives `down` and `up`. Grafana's image cannot be
pulled here; everything else of the stack runs.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.deploy import podman as pm
from tests.e2e.procs import (
    check_audit,
    flwr,
    free_port,
    poll_until,
    wait_for_port,
    write_flwr_connection,
)

pytestmark = [pytest.mark.slow, pytest.mark.deployment, pytest.mark.containers]

STACK = ["setup", "superlink", "register", "site-1", "site-2", "prometheus"]
TRAINABLE_SHAPES = [[2, 1280], [2]]


@pytest.fixture(scope="session")
def images() -> Iterator[None]:
    """This session's images, removed at its end (several GB: torch and its libraries)."""
    missing = pm.missing_tools()
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: bash deploy/install.sh --dev installs them")
    try:
        pm.ensure_base_image()
        # torch from PyPI (its default build), which this machine can reach; users build
        # with the default TORCH_INDEX, PyTorch's CPU index
        pm.build(
            pm.FEDHEAD_IMAGE,
            REPO / "deploy" / "container" / "Containerfile",
            REPO,
            "TORCH_INDEX=https://pypi.org/simple",
        )
        monitoring = REPO / "deploy" / "monitoring"
        pm.build(pm.PROMETHEUS_IMAGE, monitoring / "prometheus.Containerfile", monitoring)
        yield
    finally:
        pm.remove_images(pm.FEDHEAD_IMAGE, pm.PROMETHEUS_IMAGE, pm.BASE_IMAGE)
        assert not [i for i in (pm.FEDHEAD_IMAGE, pm.PROMETHEUS_IMAGE) if pm.image_exists(i)]


def _env_file(path: Path, values: dict[str, str]) -> None:
    """The shipped .env with this test's values, as a user edits it."""
    lines: list[str] = []
    seen: set[str] = set()
    for line in path.read_text().splitlines():
        key = line.split("=", 1)[0]
        if "=" in line and not line.startswith("#") and key in values:
            line = f"{key}={values[key]}"
            seen.add(key)
        lines.append(line)
    assert seen == set(values), set(values) - seen  # every key the test sets is a shipped one
    path.write_text("\n".join(lines) + "\n")


def _prometheus(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    series: list[dict[str, Any]] = body["data"]["result"]
    return series


def _nodes(flwr_home: Path) -> list[dict[str, Any]]:
    result = flwr(flwr_home, "supernode", "list", "stack", "--format", "json", timeout=60)
    if result.returncode != 0:
        return []
    listed: list[dict[str, Any]] = json.loads(result.stdout).get("nodes", [])
    return listed


@pytest.mark.timeout(3600)
def test_compose_stack_trains_and_is_scraped(tmp_path: Path, images: None) -> None:
    deploy = tmp_path / "deploy"
    shutil.copytree(REPO / "deploy" / "compose", deploy / "compose")
    shutil.copytree(REPO / "deploy" / "monitoring", deploy / "monitoring")
    folder = deploy / "compose"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    link, public, link_metrics, site1, site2, site1_metrics, site2_metrics, prom = (
        free_port() for _ in range(8)
    )
    _env_file(
        folder / ".env",
        {
            "FEDHEAD_IMAGE": pm.FEDHEAD_IMAGE,
            "PROMETHEUS_IMAGE": pm.PROMETHEUS_IMAGE,
            "SUPERLINK_PORT": str(link),
            "SUPERLINK_PUBLIC_ADDRESS": f"127.0.0.1:{public}",
            "SITES_SUPERLINK_ADDRESS": f"127.0.0.1:{public}",
            "SUPERLINK_METRICS_ADDRESS": f"127.0.0.1:{link_metrics}",
            "SITE_1_PORT": str(site1),
            "SITE_1_METRICS_ADDRESS": f"127.0.0.1:{site1_metrics}",
            "SITE_2_PORT": str(site2),
            "SITE_2_METRICS_ADDRESS": f"127.0.0.1:{site2_metrics}",
            "SITE_DEVICE": "cpu",
            "SECRETS_DIR": str(secrets),
            "PROMETHEUS_ADDRESS": f"127.0.0.1:{prom}",
        },
    )
    flwr_home = tmp_path / "flwr-home"
    out = "/var/lib/fedhead/runs/compose-test"
    projects: list[pm.ComposeProject] = []

    with pm.compose_project(folder, f"fedhead-test-{uuid.uuid4().hex[:8]}") as stack:
        projects.append(stack)
        try:
            stack.up(STACK)
            wait_for_port(link, timeout=180)
            wait_for_port(public, timeout=60)
            # the app setup signed, which the sites (--trusted-entities) accept
            app_id = json.loads((secrets / "signed-app" / "signature.json").read_text())["app_id"]
            write_flwr_connection(flwr_home, "stack", link, root_certificates=secrets / "ca.crt")
            # both sites registered (node authentication) and connected
            poll_until(
                lambda: sum(n.get("status") == "online" for n in _nodes(flwr_home)) == 2,
                "two online sites",
                timeout=180,
                interval=2,
            )
            run = flwr(
                flwr_home,
                "run",
                app_id,
                "stack",
                "--stream",
                "--run-config",
                "strategy='fedavg' num-server-rounds=2 input-size=64 local-epochs=2 min-sites=2 "
                f"join-timeout=120.0 round-timeout=600.0 out-dir='{out}'",
                timeout=1800,
            )
            assert run.returncode == 0, run.stdout + run.stderr + stack.logs("superlink")[-4000:]
            report = json.loads(stack.exec("superlink", "cat", f"{out}/report.json").stdout)
            audit = tmp_path / "audit-site-1.jsonl"
            audit.write_text(stack.exec("site-1", "cat", "/var/lib/fedhead/audit.jsonl").stdout)

            # Prometheus scraped every exporter and evaluates the shipped rules
            def scraped() -> bool:
                up = _prometheus(prom, 'up{job=~"fedhead-.*"} == 1')
                runs = _prometheus(prom, "fedhead_runs_completed_total >= 1")
                trained = _prometheus(prom, "fedhead_site_train_examples_total > 0")
                return len(up) == 3 and len(runs) == 1 and len(trained) == 2

            poll_until(scraped, "Prometheus scraping the run's metrics", timeout=120, interval=2)
            trained_sites = {
                r["metric"]["site"]
                for r in _prometheus(prom, "fedhead_site_train_examples_total > 0")
            }
            with urllib.request.urlopen(
                f"http://127.0.0.1:{prom}/api/v1/rules", timeout=10
            ) as resp:
                rules = json.loads(resp.read())["data"]["groups"]
            health = {
                name: pm.podman("healthcheck", "run", stack.container(name), check=False)
                for name in ("superlink", "site-1")
            }
            restart_policy = pm.podman(
                "inspect",
                stack.container("site-1"),
                "--format",
                "{{.HostConfig.RestartPolicy.Name}}",
            ).stdout.strip()
            user = stack.exec("superlink", "id", "-u").stdout.strip()

            # state survives down and up: the run and the registered sites are still known
            runs_before = flwr(flwr_home, "list", "stack", "--format", "json", timeout=60)
            nodes_before = {n["node-id"] for n in _nodes(flwr_home)}
            stack.down()
            stack.up(STACK)
            wait_for_port(link, timeout=180)
            # a bound against hanging, not a timing: the sites start with the SuperLink
            # now (setup and register have nothing left to do) and retry until it answers
            poll_until(
                lambda: sum(n.get("status") == "online" for n in _nodes(flwr_home)) == 2,
                "the sites back online after down/up",
                timeout=420,
                interval=2,
            )
            runs_after = flwr(flwr_home, "list", "stack", "--format", "json", timeout=60)
            nodes_after = {n["node-id"] for n in _nodes(flwr_home)}
        except BaseException:
            for service in STACK:
                print(f"----- {service}\n{stack.logs(service)[-3000:]}")
            raise

    assert projects[0].leftovers() == []  # every container and volume removed
    assert app_id == "@fedhead/fedhead"
    assert report["clients"] == 2
    assert len(report["rounds"]) == 2
    assert all(r["aggregated"] and r["sites_replied"] == 2 for r in report["rounds"])
    assert report["secure_aggregation"] == "secagg+"
    assert check_audit(audit, TRAINABLE_SHAPES) >= {"train", "evaluate"}
    assert trained_sites == {"site-1", "site-2"}
    assert rules and {r["health"] for g in rules for r in g["rules"]} == {"ok"}
    assert {name: r.returncode for name, r in health.items()} == {"superlink": 0, "site-1": 0}
    assert restart_policy == "on-failure"
    assert user == "10001"  # not root
    ids_before = {r["run-id"] for r in json.loads(runs_before.stdout)["runs"]}
    ids_after = {r["run-id"] for r in json.loads(runs_after.stdout)["runs"]}
    assert ids_before and ids_before <= ids_after, (runs_before.stdout, runs_after.stdout)
    # the same two registered nodes came back: nothing was registered again
    assert len(nodes_before) == 2 and nodes_after == nodes_before
