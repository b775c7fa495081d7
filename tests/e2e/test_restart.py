"""Real processes going down: the ServerApp killed mid-run and resumed from its
checkpoint; the SuperLink killed and restarted with its state on disk while the site
nodes stay up. Everything on 127.0.0.1, every process stopped by PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedhead.server.checkpoints import CheckpointStore
from tests.conftest import REPO
from tests.e2e import procs as e2e
from tests.reports import read_report

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

# Plain FedAvg with a fixed seed: the rounds are deterministic, so a resumed run must
# end with the same head as an uninterrupted one.
RUN = (
    "strategy='fedavg' num-server-rounds=3 input-size=64 min-sites=2 join-timeout=120.0 "
    "round-timeout=300.0 secure-aggregation=false seed=7 local-epochs=2"
)


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: the parent's pid
    return False


def _serverapp_pids(superlink: int) -> list[int]:
    """The ServerApp processes started under the SuperLink we started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "flwr-serverapp" in cmdline and _descends_from(int(entry.name), superlink):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _wait(
    what: str,
    check: Callable[[], object],
    timeout: float = 900.0,
    procs: e2e.Processes | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            logs = procs.log("superlink")[-3000:] if procs else ""
            raise AssertionError(f"gave up waiting for {what}\n{logs}")
        time.sleep(0.2)


def _superlink_and_two_sites(
    procs: e2e.Processes, tmp_path: Path, port: int, server_cache: Path
) -> subprocess.Popen[bytes]:
    """A SuperLink on ``port`` and two sites of 80 training images each (their data,
    cache and audit log under ``tmp_path/site<i>``); returns the SuperLink's process."""
    link = procs.start_listening(
        "superlink",
        e2e.plain_superlink(port),
        e2e.base_env(tmp_path / "link-home", FEDHEAD_CACHE=str(server_cache)),
        port,
    )
    for i in range(2):
        data = e2e.npz_site(tmp_path / f"site{i}" / "data.npz", i, 2, n_train=80, n_val=30)
        node_config = (
            f'data-path="{data}" cache-dir="{tmp_path / f"site{i}" / "cache"}" '
            f'audit-log="{tmp_path / f"site{i}" / "sent.jsonl"}" device="cpu"'
        )
        procs.start(
            f"site{i}", e2e.plain_supernode(port, node_config), e2e.base_env(tmp_path / f"h{i}")
        )
    return link


def _flwr_run(flwr_home: Path, name: str, run_config: str, stream: bool = True) -> str:
    args = ["run", str(REPO), name, "--run-config", run_config]
    result = e2e.flwr(flwr_home, *([*args, "--stream"] if stream else args))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_serverapp_killed_after_round_2_resumes_to_the_uninterrupted_head(
    tmp_path: Path, mobilenet_weights: Path
) -> None:
    port, flwr_home = e2e.new_connection(tmp_path, "e2e")
    server_cache = e2e.server_cache(tmp_path, mobilenet_weights)
    cut, whole = tmp_path / "cut", tmp_path / "whole"

    with e2e.processes(tmp_path / "logs") as procs:
        link = _superlink_and_two_sites(procs, tmp_path, port, server_cache)

        # 1. submit the run, kill its ServerApp as soon as round 2 is checkpointed
        _flwr_run(flwr_home, "e2e", f"{RUN} out-dir='{cut}'", stream=False)
        store = CheckpointStore(cut / "checkpoints")
        _wait("the round-2 checkpoint", lambda: 2 in store.rounds(), procs=procs)
        victims = _serverapp_pids(link.pid)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        assert 3 not in store.rounds()  # it really was cut off before round 3 ended
        assert store.load().round == 2
        status = subprocess.run(
            [*e2e.FEDHEAD, "status", "--run", str(cut)], capture_output=True, text=True, timeout=120
        )
        assert status.returncode == 6 and "interrupted" in status.stdout, status

        # 2. starting it again without resume-from is refused, nothing is overwritten
        refused = e2e.flwr(
            flwr_home, "run", str(REPO), "e2e", "--stream", "--run-config", f"{RUN} out-dir='{cut}'"
        )
        assert 3 not in store.rounds() and not (cut / "report.json").exists(), refused.stdout

        # 3. resume: rounds 3 only, then the model goes to both sites
        _flwr_run(flwr_home, "e2e", f"{RUN} out-dir='{cut}' resume-from='{cut}'")
        # 4. the same run without interruption, for comparison
        _flwr_run(flwr_home, "e2e", f"{RUN} out-dir='{whole}'")
        logs = {name: procs.log(name) for name in ("superlink", "site0", "site1")}

    report = read_report(cut)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3], logs["superlink"][-3000:]
    assert report["resumed_from"]["round"] == 2
    resumed = CheckpointStore(cut / "checkpoints").load()
    uninterrupted = CheckpointStore(whole / "checkpoints").load()
    assert resumed.round == uninterrupted.round == 3
    for a, b in zip(resumed.arrays, uninterrupted.arrays, strict=True):
        assert float(abs(a - b).max()) < 1e-5
    assert json.loads((cut / "status.json").read_text())["state"] == "finished"
    assert subprocess.run([*e2e.FEDHEAD, "status", "--run", str(cut)], timeout=120).returncode == 0

    # delivery: both sites verified and kept exactly the server's final head
    sha = report["model"]["head_sha256"]
    assert sha == resumed.meta["head_sha256"]
    assert len(report["delivery"]["delivered_to"]) == 2
    for i in range(2):
        kept = tmp_path / f"site{i}" / "cache" / "models" / str(report["run_id"])
        assert hashlib.sha256((kept / "head.safetensors").read_bytes()).hexdigest() == sha
        assert json.loads((kept / "model.json").read_text())["tensors_sha256"] == sha
        sent = [json.loads(line) for line in (tmp_path / f"site{i}" / "sent.jsonl").open()]
        assert any(e["message_type"] == "query.model" for e in sent)  # the audit log has it
        assert sha in logs[f"site{i}"]
    assert "Traceback" not in logs["site0"] + logs["site1"]


def test_a_superlink_restart_keeps_the_sites_and_a_new_run_completes(
    tmp_path: Path, mobilenet_weights: Path
) -> None:
    port, flwr_home = e2e.new_connection(tmp_path, "e2e")
    server_cache = e2e.server_cache(tmp_path, mobilenet_weights)
    link_cmd = [
        *e2e.FEDHEAD,
        "superlink",
        "--insecure",
        "--port",
        str(port),
        "--state-dir",
        str(tmp_path / "state"),
        "--metrics-address",
        "none",
    ]
    link_env = e2e.base_env(tmp_path / "link-home", FEDHEAD_CACHE=str(server_cache))
    with e2e.processes(tmp_path / "logs") as procs:
        procs.start_listening("superlink", link_cmd, link_env, port)
        nodes = []
        for i in range(2):
            data = e2e.npz_site(tmp_path / f"site{i}" / "data.npz", i, 2, n_train=60, n_val=20)
            nodes.append(
                procs.start(
                    f"site{i}",
                    [
                        *e2e.FEDHEAD,
                        "node",
                        "--insecure",
                        "--allow-unsigned-apps",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--data",
                        str(data),
                        "--port",
                        str(e2e.free_port()),
                        "--cache-dir",
                        str(tmp_path / f"site{i}" / "cache"),
                        "--device",
                        "cpu",
                        "--metrics-address",
                        "none",
                    ],
                    e2e.base_env(tmp_path / f"h{i}"),
                )
            )
        # the cheapest complete run: the subject is the SuperLink's state, not training
        one_round = (
            "strategy='fedavg' num-server-rounds=1 secure-aggregation=false input-size=64 "
            "min-sites=2 join-timeout=120.0"
        )
        _flwr_run(flwr_home, "e2e", f"{one_round} out-dir='{tmp_path / 'before'}'")
        assert (tmp_path / "state" / "superlink.db").is_file()

        procs.stop("superlink", signal.SIGKILL)  # no clean shutdown
        # its SuperLink goes with it (the supervisor's child dies with it): the port
        # frees, so the run after this is served by the restarted one
        e2e.poll_until(lambda: not e2e.port_open(port), "the killed SuperLink's port freed")
        procs.start_listening("superlink-again", link_cmd, link_env, port)
        _flwr_run(flwr_home, "e2e", f"{one_round} out-dir='{tmp_path / 'after'}'")
        assert all(n.poll() is None for n in nodes)  # the site nodes stayed up
        runs = e2e.flwr(flwr_home, "ls", "e2e", "--format", "json")
        logs = {name: procs.log(name) for name in ("site0", "site1", "superlink-again")}

    report = read_report(tmp_path / "after")
    assert report["clients"] == 2 and len(report["rounds"]) == 1, logs["superlink-again"][-3000:]
    assert report["rounds"][0]["aggregated"]
    # the run from before the restart is still known to the SuperLink
    before = read_report(tmp_path / "before")
    assert str(before["run_id"]) in runs.stdout, runs.stdout + runs.stderr


def test_a_serverapp_killed_after_its_last_round_is_finished_by_resuming(
    tmp_path: Path, mobilenet_weights: Path
) -> None:
    """The ServerApp dies once the last round is checkpointed (during the final
    evaluation, before any site holds the model): `fedhead status` calls the run
    interrupted, and resuming it finishes it without training again: the model package,
    the report, the status, and the model at both sites under the run they trained in."""
    port, flwr_home = e2e.new_connection(tmp_path, "e2e")
    server_cache = e2e.server_cache(tmp_path, mobilenet_weights)
    cut = tmp_path / "cut"
    two = RUN.replace("num-server-rounds=3", "num-server-rounds=2")
    with e2e.processes(tmp_path / "logs") as procs:
        link = _superlink_and_two_sites(procs, tmp_path, port, server_cache)
        _flwr_run(flwr_home, "e2e", f"{two} out-dir='{cut}'", stream=False)
        store = CheckpointStore(cut / "checkpoints")
        _wait("the last round's checkpoint", lambda: 2 in store.rounds(), procs=procs)
        victims = _serverapp_pids(link.pid)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        assert not (cut / "report.json").exists()
        status = subprocess.run(
            [*e2e.FEDHEAD, "status", "--run", str(cut)], capture_output=True, text=True, timeout=120
        )
        assert status.returncode == 6 and "resume-from" in status.stderr, status
        cut_run = json.loads((cut / "status.json").read_text())["run_id"]

        _flwr_run(flwr_home, "e2e", f"{two} out-dir='{cut}' resume-from='{cut}'")
        logs = procs.log("superlink")

    report = json.loads((cut / "report.json").read_text())
    assert report["run_id"] == cut_run, logs[-3000:]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert json.loads((cut / "status.json").read_text())["state"] == "finished"
    sha = report["model"]["head_sha256"]
    assert len(report["delivery"]["delivered_to"]) == 2  # neither site held it
    for i in range(2):
        kept = tmp_path / f"site{i}" / "cache" / "models" / str(cut_run) / "head.safetensors"
        assert hashlib.sha256(kept.read_bytes()).hexdigest() == sha
