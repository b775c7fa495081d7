"""Who controls the federation, with real processes on 127.0.0.1.

`fedhead superlink --public-address` keeps the SuperLink (Fleet, Control and runtime
APIs on one port) on loopback and puts nginx in front of it for the sites, forwarding
only the Fleet API. A stranger holding ca.crt cannot list or register nodes, start,
list or stop runs, or call the runtime API through that address; the operator can, on
the SuperLink's own address. Sites started with `fedhead node --trusted-entities` run
the app the operator signed with `fedhead app sign` (served by `--signed-app`), refuse
the same app uploaded unsigned with `flwr run <folder>`, and a site trusting another
key refuses the signed one too.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedhead.common.protocol import MSG_VALIDATE
from tests.e2e import procs as e2e
from tests.reports import read_report

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

REPO = Path(__file__).resolve().parents[2]
SITES = ("hospital-a", "hospital-b", "hospital-c")  # c trusts another signing key


def refused(result: subprocess.CompletedProcess[str]) -> bool:
    """The flwr CLI failed, and because the proxy answered 403."""
    return result.returncode != 0 and "403" in result.stdout + result.stderr


def sent(tmp_path: Path, site: str) -> str:
    """What a site's audit log holds so far (it appears with the first reply it sends)."""
    path = tmp_path / site / "sent.jsonl"
    return path.read_text() if path.exists() else ""


def http_status(url: str, ca: Path) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(
            request, context=ssl.create_default_context(cafile=str(ca)), timeout=30
        ) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def test_only_the_operator_controls_and_sites_run_only_signed_apps(
    tmp_path: Path, mobilenet_weights: Path
) -> None:
    certs, other = tmp_path / "certs", tmp_path / "other-signer"
    site_args = [a for site in (*SITES, "stranger") for a in ("--site", site)]
    made = e2e.fedhead(
        "certs", "--out", str(certs), "--host", "127.0.0.1", *site_args, "--app-signer"
    )
    assert made.returncode == 0, made.stderr
    assert (certs / "app-signer.key").stat().st_mode & 0o777 == 0o600
    assert e2e.fedhead("certs", "--out", str(other), "--app-signer").returncode == 0
    signed = tmp_path / "signed-app"
    sign = e2e.fedhead(
        "app", "sign", "--key", str(certs / "app-signer.key"), "--app", str(REPO), "--out",
        str(signed),
    )  # fmt: skip
    assert sign.returncode == 0, sign.stderr
    app_id = json.loads((signed / "signature.json").read_text())["app_id"]

    link_port, public_port = e2e.free_port(), e2e.free_port()
    ca = certs / "ca.crt"
    operator, stranger = tmp_path / "operator-home", tmp_path / "stranger-home"
    e2e.write_flwr_connection(operator, "federation", link_port, root_certificates=ca)
    e2e.write_flwr_connection(stranger, "federation", public_port, root_certificates=ca)
    server_cache = e2e.server_cache(tmp_path, mobilenet_weights)
    empty_torch = str(tmp_path / "empty-torch")

    with e2e.processes(tmp_path / "logs") as procs:
        link = procs.start(
            "superlink",
            [
                *e2e.FEDHEAD, "superlink", "--certs-dir", str(certs), "--port", str(link_port),
                "--public-address", f"127.0.0.1:{public_port}", "--signed-app", str(signed),
                "--metrics-address", "none",
            ],
            e2e.base_env(
                tmp_path / "link-home", FEDHEAD_CACHE=str(server_cache), TORCH_HOME=empty_torch
            ),
        )  # fmt: skip
        e2e.wait_for_port(link_port, proc=link)
        e2e.wait_for_port(public_port, proc=link)

        # A stranger with ca.crt, through the address the sites use.
        public = f"https://127.0.0.1:{public_port}"
        stranger_ls = e2e.flwr(stranger, "supernode", "ls", "federation", timeout=120)
        stranger_register = e2e.flwr(
            stranger, "supernode", "register", str(certs / "sites" / "stranger.pub"),
            "federation", timeout=120,
        )  # fmt: skip
        stranger_run = e2e.flwr(stranger, "run", str(REPO), "federation", timeout=120)
        stranger_runs = e2e.flwr(stranger, "ls", "federation", timeout=120)
        runtime = http_status(f"{public}/v1/runtime/pull-messages", ca)
        health = http_status(f"{public}/health", ca)
        fleet = http_status(f"{public}/v1/fleet/get-run", ca)  # reaches the SuperLink

        for site in SITES:
            reg = e2e.flwr(
                operator, "supernode", "register", str(certs / "sites" / f"{site}.pub"),
                "federation", timeout=120,
            )  # fmt: skip
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for i, site in enumerate(SITES):
            trusted = (other if site == "hospital-c" else certs) / "trusted-entities.yaml"
            procs.start(
                site,
                [
                    *e2e.FEDHEAD, "node", "--superlink", f"127.0.0.1:{public_port}",
                    "--data", str(e2e.npz_site(tmp_path / site / "data.npz", i, 3)),
                    "--port", str(e2e.free_port()), "--cache-dir", str(tmp_path / site / "cache"),
                    "--audit-log", str(tmp_path / site / "sent.jsonl"),
                    "--root-certificates", str(ca),
                    "--auth-key", str(certs / "sites" / f"{site}.key"),
                    "--trusted-entities", str(trusted), "--metrics-address", "none",
                    "--threads", str(e2e.site_threads(len(SITES))),
                ],
                e2e.base_env(tmp_path / f"{site}-home", TORCH_HOME=empty_torch),
            )  # fmt: skip

        signed_run = e2e.flwr(
            operator, "run", app_id, "federation", "--stream", "--run-config",
            f"input-size=64 min-sites=2 join-timeout=180.0 "
            f"round-timeout=300.0 out-dir='{tmp_path / 'signed-out'}'",
        )  # fmt: skip
        sent_before = {site: sent(tmp_path, site) for site in SITES}
        unsigned_run = e2e.flwr(
            operator, "run", str(REPO), "federation", "--stream", "--run-config",
            f"input-size=64 min-sites=2 join-timeout=60.0 "
            f"out-dir='{tmp_path / 'unsigned-out'}'",
        )  # fmt: skip
        runs = e2e.flwr(operator, "ls", "federation", "--format", "json", timeout=120)
        run_ids = [r["run-id"] for r in json.loads(runs.stdout)["runs"]]
        stranger_stop = e2e.flwr(stranger, "stop", str(run_ids[0]), "federation", timeout=120)
        nodes = e2e.flwr(operator, "supernode", "ls", "federation", "--format", "json", timeout=120)
        logs = {name: procs.log(name) for name in ("superlink", *SITES)}

    assert refused(stranger_ls), stranger_ls.stdout + stranger_ls.stderr
    assert refused(stranger_register), stranger_register.stdout + stranger_register.stderr
    assert refused(stranger_run), stranger_run.stdout + stranger_run.stderr
    assert refused(stranger_runs), stranger_runs.stdout + stranger_runs.stderr
    assert refused(stranger_stop), stranger_stop.stdout + stranger_stop.stderr
    assert runtime == 403 and health == 403
    assert fleet not in (403, 404, 502), fleet  # forwarded: the SuperLink itself answered
    # only the operator's three sites ever became nodes, all through the proxy
    assert len(json.loads(nodes.stdout)["nodes"]) == 3, nodes.stdout

    # The signed app ran on the two sites that trust its key ...
    assert signed_run.returncode == 0, signed_run.stdout + signed_run.stderr
    report = read_report(tmp_path / "signed-out")
    assert report["clients"] == 2 and report["rounds"][0]["aggregated"], report
    for site in ("hospital-a", "hospital-b"):
        sent_by_site = e2e.check_audit(tmp_path / site / "sent.jsonl", [[2, 1280], [2]], True)
        assert sent_by_site >= {"train", MSG_VALIDATE}
    # ... and not on the one that trusts another key: no app code ran there.
    assert "FAB verification failed" in logs["hospital-c"]
    assert not (tmp_path / "hospital-c" / "sent.jsonl").exists()

    # The same app uploaded unsigned: every site refused it before running any of it.
    assert not (tmp_path / "unsigned-out" / "report.json").exists(), unsigned_run.stdout
    for site in SITES:
        assert "App verification is not supported" in logs[site], site
        assert sent(tmp_path, site) == sent_before[site], site
