"""deploy/compose without containers: every variable a compose file uses is set in its
.env and every .env setting is used, long-running services restart on failure, and each
trial site has its own key, volumes and ports. The stack itself runs in
test_containers.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "deploy" / "compose"
PROJECTS = {
    "operator": (COMPOSE / ".env", [COMPOSE / "compose.yaml", COMPOSE / "alerting.yaml"]),
    "site": (
        COMPOSE / "site" / ".env",
        [COMPOSE / "site" / "compose.yaml", COMPOSE / "site" / "compose.gpu.yaml"],
    ),
}
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)\}")


def _env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {p[0]: p[1] for p in pairs if len(p) == 2 and not p[0].startswith("#")}


def _services(path: Path) -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(path.read_text())["services"]
    return services


@pytest.mark.parametrize("project", PROJECTS)
def test_env_and_compose_files_agree(project: str) -> None:
    env_file, files = PROJECTS[project]
    used = {v for f in files for v in VARIABLE.findall(f.read_text())}
    assert used <= set(_env(env_file)), used - set(_env(env_file))
    assert set(_env(env_file)) <= used, set(_env(env_file)) - used


@pytest.mark.parametrize("path", [COMPOSE / "compose.yaml", COMPOSE / "site" / "compose.yaml"])
def test_long_running_services_restart_share_the_host_network_and_check_health(
    path: Path,
) -> None:
    one_shot = {"setup", "register"}
    for name, service in _services(path).items():
        assert service["network_mode"] == "host", name
        if name in one_shot:
            assert "restart" not in service, name
            continue
        assert service["restart"] == "on-failure", name
        if service["image"] == "${FEDHEAD_IMAGE}":
            assert service["healthcheck"]["test"] == ["CMD-SHELL", "fedhead health"], name
            assert "FEDHEAD_HEALTH_URL" in service["environment"], name


def test_each_trial_site_has_its_own_key_volumes_and_ports() -> None:
    services = _services(COMPOSE / "compose.yaml")
    sites = sorted(n for n in services if n.startswith("site-"))
    assert sites == ["site-1", "site-2"]
    setup_volumes = services["setup"]["volumes"]
    seen: set[str] = set()
    for site in sites:
        mounts = services[site]["volumes"]
        assert f"{site}-certs:/etc/fedhead/certs:ro" in mounts
        assert f"{site}-certs:/kits/{site}" in setup_volumes  # setup fills it
        assert "demo-data:/data:ro" in mounts
        own = {m.split(":")[0] for m in mounts} - {"demo-data"}
        assert not own & seen, own & seen
        seen |= own
        args = " ".join(services[site]["command"])
        number = site.split("-")[1]
        assert f"--port=${{SITE_{number}_PORT}}" in args
        assert f"--metrics-address=${{SITE_{number}_METRICS_ADDRESS}}" in args
        assert f"--data=/data/{site}/data.npz" in args
    # the SuperLink never sees the CA's private key: it gets its own kit
    assert "superlink-certs:/etc/fedhead/certs:ro" in services["superlink"]["volumes"]
    assert not any("SECRETS_DIR" in v for v in services["superlink"]["volumes"])
    # and keeps its state on disk
    assert "--database=/var/lib/fedhead/superlink.db" in services["superlink"]["command"]


def test_sites_reach_only_the_fleet_api_and_run_only_the_signed_app() -> None:
    """The SuperLink's own port (Control API) stays on loopback for the register step and
    the operator; the sites connect to nginx's public address and trust the app signer."""
    services = _services(COMPOSE / "compose.yaml")
    link = services["superlink"]["command"]
    assert "--host=127.0.0.1" in link
    assert "--public-address=${SUPERLINK_PUBLIC_ADDRESS}" in link
    assert "--signed-app=/etc/fedhead/certs/signed-app" in link
    assert services["register"]["environment"]["SUPERLINK_ADDRESS"].startswith("127.0.0.1:")
    setup = (COMPOSE / "setup.sh").read_text()
    assert "fedhead certs --out /secrets --app-signer" in setup
    assert "fedhead app sign" in setup
    for site in ("site-1", "site-2"):
        args = services[site]["command"]
        assert "--superlink=${SITES_SUPERLINK_ADDRESS}" in args
        assert "--trusted-entities=/etc/fedhead/certs/trusted-entities.yaml" in args
        assert "--allow-unsigned-apps" not in args
    (node,) = _services(COMPOSE / "site" / "compose.yaml").values()
    assert "--trusted-entities=/etc/fedhead/certs/trusted-entities.yaml" in node["command"]
    assert _env(COMPOSE / "site" / ".env")["SUPERLINK_ADDRESS"].endswith(":9443")
