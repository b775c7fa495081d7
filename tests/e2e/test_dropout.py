"""SecAgg+ survives a site that dies mid-round: 5 real SuperNodes, threshold 3."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e import procs as e2e
from tests.reports import read_report

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

SITES = 5
VICTIM = 4


def _train_messages_sent(audit: Path, server_round: int) -> int:
    if not audit.exists():
        return 0
    return sum(
        1
        for line in audit.read_text().splitlines()
        if (e := json.loads(line))["message_type"] == "train" and e["group_id"] == str(server_round)
    )


def test_a_site_killed_during_a_secagg_round_does_not_stop_it(
    tmp_path: Path, mobilenet_weights: Path
) -> None:
    port, flwr_home = e2e.new_connection(tmp_path, "five")
    server_cache = e2e.server_cache(tmp_path, mobilenet_weights)
    out = tmp_path / "out"
    victim_audit = tmp_path / f"site{VICTIM}" / "sent.jsonl"

    with e2e.processes(tmp_path / "logs") as procs:
        procs.start_listening(
            "superlink",
            e2e.plain_superlink(port),
            e2e.base_env(tmp_path / "link-home", FEDHEAD_CACHE=str(server_cache)),
            port,
        )
        for i in range(SITES):
            data = e2e.npz_site(tmp_path / f"site{i}" / "data.npz", i, SITES, n_train=80, n_val=20)
            node_config = (
                f'data-path="{data}" cache-dir="{tmp_path / f"site{i}" / "cache"}" '
                f'audit-log="{tmp_path / f"site{i}" / "sent.jsonl"}" device="cpu" '
                f"threads={e2e.site_threads(SITES)}"
            )
            procs.start(
                f"site{i}",
                e2e.plain_supernode(port, node_config),
                e2e.base_env(tmp_path / f"site{i}-home"),
            )
        run = subprocess.Popen(
            [
                str(e2e.BIN / "flwr"),
                "run",
                str(REPO),
                "five",
                "--stream",
                "--run-config",
                f"strategy='fedavg' num-server-rounds=2 input-size=64 min-sites=4 "
                f"join-timeout=120.0 round-timeout=45.0 secagg-threshold=3 fraction-evaluate=0.2 "
                f"out-dir='{out}'",
            ],
            env=e2e.base_env(flwr_home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Kill the victim once it has shared its keys in round 2 (setup + share keys
        # answered): its masks are then in everyone's vectors and must be removed.
        deadline = time.monotonic() + 600
        while _train_messages_sent(victim_audit, 2) < 2:
            assert run.poll() is None, run.stdout.read() if run.stdout else ""
            assert time.monotonic() < deadline, "round 2 never reached the victim"
            time.sleep(0.2)
        procs.stop(f"site{VICTIM}")
        output, _ = run.communicate(timeout=900)
    assert run.returncode == 0, output

    report = read_report(out)
    assert report["secure_aggregation"] == "secagg+"
    params = report["secure_aggregation_params"]
    assert params["reconstruction_threshold"] == 3 and params["expected_sites"] == 5
    first, second = report["rounds"]
    assert first["sites_replied"] == 5 and first["aggregated"]
    assert second["sites_selected"] == 5 and second["sites_replied"] == 4
    assert second["sites_dropped"] == 1 and second["aggregated"], second
    assert _train_messages_sent(victim_audit, 2) == 2  # it never sent its masked vector
