"""TLS and node authentication with real processes on 127.0.0.1.

One TLS SuperLink started through `fedhead superlink --certs-dir`; two registered sites
join through `fedhead node` and train under SecAgg+; an unregistered key, a node with
the wrong CA, a node with no CA and a plaintext node are all refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedhead.common.protocol import MSG_VALIDATE
from tests.e2e import procs as e2e
from tests.reports import read_report

pytestmark = [pytest.mark.slow, pytest.mark.deployment]


def test_tls_node_auth_and_refusals(tmp_path: Path, mobilenet_weights: Path) -> None:
    certs, other = tmp_path / "certs", tmp_path / "other-federation"
    made = e2e.fedhead(
        "certs",
        "--out",
        str(certs),
        "--host",
        "127.0.0.1",
        "--host",
        "localhost",
        "--site",
        "hospital-a",
        "--site",
        "hospital-b",
        "--site",
        "stranger",
    )
    assert made.returncode == 0, made.stderr
    assert (certs / "sites" / "hospital-a.key").stat().st_mode & 0o777 == 0o600
    assert e2e.fedhead("certs", "--out", str(other), "--host", "127.0.0.1").returncode == 0

    port, flwr_home = e2e.new_connection(tmp_path, "secure", root_certificates=certs / "ca.crt")
    server_cache = e2e.server_cache(tmp_path, mobilenet_weights)
    empty_torch = str(tmp_path / "empty-torch")
    out = tmp_path / "out"

    with e2e.processes(tmp_path / "logs") as procs:
        procs.start_listening(
            "superlink",
            e2e.tls_superlink(certs, port),
            e2e.base_env(
                tmp_path / "link-home", FEDHEAD_CACHE=str(server_cache), TORCH_HOME=empty_torch
            ),
            port,
        )
        for site in ("hospital-a", "hospital-b"):
            reg = e2e.flwr(
                flwr_home,
                "supernode",
                "register",
                str(certs / "sites" / f"{site}.pub"),
                "secure",
                timeout=120,
            )
            assert reg.returncode == 0, reg.stdout + reg.stderr

        for i, site in enumerate(("hospital-a", "hospital-b")):
            procs.start(
                site,
                [
                    *e2e.FEDHEAD,
                    "node",
                    "--allow-unsigned-apps",
                    "--threads",
                    str(e2e.site_threads(2)),
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--data",
                    str(e2e.npz_site(tmp_path / site / "data.npz", i, 2)),
                    "--port",
                    str(e2e.free_port()),
                    "--metrics-address",
                    "none",
                    "--cache-dir",
                    str(tmp_path / site / "cache"),
                    "--audit-log",
                    str(tmp_path / site / "sent.jsonl"),
                    "--root-certificates",
                    str(certs / "ca.crt"),
                    "--auth-key",
                    str(certs / "sites" / f"{site}.key"),
                ],
                e2e.base_env(tmp_path / f"{site}-home", TORCH_HOME=empty_torch),
            )

        def refused(name: str, *extra: str) -> str:
            """Start a node that must not get in; return its output once it gives up."""
            cmd = [
                str(e2e.BIN / "flower-supernode"),
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(e2e.free_port()),
                "--max-retries",
                "2",
                "--node-config",
                f'data-path="{tmp_path / "hospital-b" / "data.npz"}"',
                *extra,
            ]
            proc = procs.start(name, cmd, e2e.base_env(tmp_path / f"{name}-home"))
            proc.wait(timeout=120)
            assert proc.returncode != 0, name
            return procs.log(name)

        key = str(certs / "sites" / "stranger.key")
        unregistered = refused(
            "unregistered",
            "--root-certificates",
            str(certs / "ca.crt"),
            "--auth-supernode-private-key",
            key,
        )
        wrong_ca = refused(
            "wrong-ca",
            "--root-certificates",
            str(other / "ca.crt"),
            "--auth-supernode-private-key",
            key,
        )
        no_ca = refused("no-ca", "--auth-supernode-private-key", key)
        plaintext = refused("plaintext", "--insecure")

        run = e2e.flwr(
            flwr_home,
            "run",
            str(Path(__file__).resolve().parents[2]),
            "secure",
            "--stream",
            "--run-config",
            f"input-size=64 min-sites=2 join-timeout=120.0 round-timeout=300.0 out-dir='{out}'",
        )
        nodes = e2e.flwr(flwr_home, "supernode", "ls", "secure", "--format", "json", timeout=120)
        link_log = procs.log("superlink")
    assert run.returncode == 0, run.stdout + run.stderr + link_log[-3000:]

    assert "Failed to activate SuperNode" in unregistered
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca
    assert "Exit Code: 305" in plaintext
    # only the two registered sites ever became nodes
    listed = json.loads(nodes.stdout)
    assert len(listed["nodes"]) == 2, listed

    report = read_report(out)
    assert report["clients"] == 2 and report["secure_aggregation"] == "secagg+"
    assert report["rounds"][0]["aggregated"]
    for site in ("hospital-a", "hospital-b"):
        sent_by_site = e2e.check_audit(tmp_path / site / "sent.jsonl", [[2, 1280], [2]], True)
        assert sent_by_site >= {"train", MSG_VALIDATE}
    assert "WITHOUT TLS" not in link_log
