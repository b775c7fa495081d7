"""The operator's and the site's commands against real SuperLinks on 127.0.0.1: a failed
run exits non-zero with its reason; a node whose TLS choice does not match the
SuperLink's, or whose key is not registered, is told what to do and stops."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from fedhead.common.errors import ConfigError, FederationError, SetupError
from tests.conftest import REPO
from tests.e2e import procs as e2e

pytestmark = [pytest.mark.slow, pytest.mark.deployment]


def fedhead(
    env: dict[str, str], *args: str, timeout: float = 300, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*e2e.FEDHEAD, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
    )


def test_a_failed_run_exits_non_zero_with_its_reason(tmp_path: Path) -> None:
    port, flwr_home = e2e.new_connection(tmp_path, "e2e")
    env = e2e.base_env(flwr_home)
    with e2e.processes(tmp_path / "logs") as procs:
        procs.start_listening(
            "superlink", e2e.plain_superlink(port), e2e.base_env(tmp_path / "link"), port
        )
        # no site ever joins: the ServerApp gives up after join-timeout
        result = fedhead(
            env,
            "run",
            "e2e",
            "--app",
            str(REPO),
            "--run-config",
            "join-timeout=2.0 min-sites=2",
            cwd=tmp_path,
        )
        assert result.returncode == FederationError.exit_code, result.stdout + result.stderr
        assert "only 0 of the 2 required site(s) connected" in result.stderr.splitlines()[-1]
        assert "Traceback" not in result.stdout + result.stderr
        match = re.search(r"run (\d+) started", result.stdout)
        assert match, result.stdout
        run_id = match.group(1)
        assert f"run {run_id}: finished:failed" in result.stdout

        listed = fedhead(env, "runs", "e2e")
        assert listed.returncode == 0 and run_id in listed.stdout and "failed" in listed.stdout
        one = fedhead(env, "runs", "e2e", "--run-id", run_id)
        assert one.returncode == FederationError.exit_code, one.stdout + one.stderr
        fetch = fedhead(env, "runs", "e2e", "--run-id", run_id, "--fetch-report", cwd=tmp_path)
        assert fetch.returncode == FederationError.exit_code, fetch.stdout + fetch.stderr
        assert "has no report" in fetch.stderr and not list(tmp_path.glob("**/report.json"))


def test_nodes_with_the_wrong_tls_choice_or_an_unregistered_key_are_told(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    made = fedhead(
        e2e.base_env(tmp_path / "h"),
        "certs",
        "--out",
        str(certs),
        "--host",
        "127.0.0.1",
        "--site",
        "stranger",
    )
    assert made.returncode == 0, made.stderr
    port = e2e.free_port()
    data = e2e.npz_site(tmp_path / "site.npz", 0, 2)

    def node(link_port: int) -> list[str]:
        """``fedhead node`` on ``data`` against the SuperLink on ``link_port``."""
        return [
            "node",
            "--superlink",
            f"127.0.0.1:{link_port}",
            "--data",
            str(data),
            "--metrics-address",
            "none",
            "--allow-unsigned-apps",
            "--port",
            str(e2e.free_port()),
        ]

    # TLS with the federation's CA, and a key the operator never registered
    ca, stranger_key = str(certs / "ca.crt"), str(certs / "sites" / "stranger.key")
    stranger_tls = ("--root-certificates", ca, "--auth-key", stranger_key)

    with e2e.processes(tmp_path / "logs") as procs:
        procs.start_listening(
            "superlink",
            e2e.tls_superlink(certs, port, "--metrics-address", "none"),
            e2e.base_env(tmp_path / "link"),
            port,
        )

        # a plaintext node against the TLS SuperLink: one line, well within 30 s
        plain = fedhead(e2e.base_env(tmp_path / "n1"), *node(port), "--insecure", timeout=30)
        assert plain.returncode == ConfigError.exit_code, plain.stderr
        last = plain.stderr.splitlines()[-1]
        assert "uses TLS" in last and "--root-certificates" in last, last

        # a TLS node whose key the operator never registered
        stranger = fedhead(
            e2e.base_env(tmp_path / "n2"),
            *node(port),
            *stranger_tls,
            timeout=400,  # it tries again for REFUSED_GRACE_SECONDS first
        )
        assert stranger.returncode == SetupError.exit_code, stranger.stderr
        last = stranger.stderr.splitlines()[-1]
        assert "not registered" in last and "flwr supernode register" in last, last

    # and a TLS node against a plaintext SuperLink
    port = e2e.free_port()
    with e2e.processes(tmp_path / "logs2") as procs:
        procs.start_listening(
            "superlink", e2e.plain_superlink(port), e2e.base_env(tmp_path / "link2"), port
        )
        tls = fedhead(
            e2e.base_env(tmp_path / "n3"),
            *node(port),
            *stranger_tls,
            timeout=30,
        )
        assert tls.returncode == ConfigError.exit_code, tls.stderr
        assert "does not use TLS" in tls.stderr.splitlines()[-1]
