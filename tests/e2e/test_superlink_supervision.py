"""`fedhead superlink` supervises Flower's SuperLink with real processes on 127.0.0.1:
a SuperLink that dies mid-run is started again with its exporter's counters kept, the
run's ServerApp is not left behind, `fedhead run` ends with one line saying how to
resume, the run is counted failed, and SIGTERM stops everything in seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedhead.common.errors import FederationError
from tests.conftest import REPO
from tests.e2e import procs as e2e

pytestmark = [pytest.mark.slow, pytest.mark.deployment]


def scrape(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def children(pid: int, program: str) -> list[int]:
    """Live processes running ``program`` among the descendants of ``pid``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if program in cmd and state != "Z" and _descends(int(proc.name), pid):
            found.append(int(proc.name))
    return found


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


def test_a_superlink_that_dies_mid_run_is_restarted_and_leaves_nothing(tmp_path: Path) -> None:
    port, flwr_home = e2e.new_connection(tmp_path, "e2e")
    metrics = e2e.free_port()
    wrapper = [*e2e.FEDHEAD, "superlink", "--insecure", "--port", str(port)]
    wrapper += ["--metrics-address", f"127.0.0.1:{metrics}"]
    started: list[int] = []
    run: subprocess.Popen[str] | None = None
    with e2e.processes(tmp_path / "logs") as procs:
        link = procs.start_listening("superlink", wrapper, e2e.base_env(tmp_path / "link"), port)
        # no site ever joins: the ServerApp waits for them until it is cut off
        settings = f"join-timeout=900.0 min-sites=2 out-dir='{tmp_path / 'out'}'"
        run = subprocess.Popen(
            [*e2e.FEDHEAD, "run", "e2e", "--app", str(REPO), "--run-config", settings],
            cwd=tmp_path,
            env=e2e.base_env(flwr_home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            e2e.poll_until(
                lambda: scrape(metrics).get("fedhead_runs_started_total") == 1,
                "the run's ServerApp started",
                timeout=300,
                proc=run,
            )
            (first,) = children(link.pid, "flower-superlink")
            serverapps = children(link.pid, "flwr-serverapp")
            started += [first, *serverapps, *children(link.pid, "flower-superexec")]
            assert serverapps
            os.kill(first, signal.SIGKILL)  # the SuperLink crashes mid-run

            out, err = run.communicate(timeout=300)
            assert run.returncode == FederationError.exit_code, out + err
            last = err.strip().splitlines()[-1]
            assert last.startswith("fedhead: federation problem: the SuperLink went away; run ")
            assert f'resume-from="{tmp_path / "out"}"' in last and "fedhead run e2e" in last
            assert "flwr ls failed" not in err and "Traceback" not in out + err

            # started again, its exporter (and counters) kept, the ServerApp not left behind
            e2e.poll_until(lambda: children(link.pid, "flower-superlink") != [], "restarted")
            e2e.wait_for_port(port, proc=link)
            started += children(link.pid, "flower-superlink") + children(link.pid, "superexec")
            e2e.poll_until(lambda: not any(e2e.alive(p) for p in serverapps), "no ServerApp left")
            e2e.poll_until(
                lambda: scrape(metrics).get("fedhead_runs_failed_total") == 1, "counted failed"
            )
            assert scrape(metrics)["fedhead_runs_started_total"] == 1
            log = procs.log("superlink")
            assert "fedhead: flower-superlink was killed by SIGKILL; starting it again" in log

            link.send_signal(signal.SIGTERM)  # to the wrapper only: it stops the rest
            link.wait(timeout=60)  # a bound against hanging, not a timing
            assert link.returncode == 0, procs.log("superlink")[-3000:]
            assert "SIGTERM: stopping flower-superlink" in procs.log("superlink")
            assert not e2e.port_open(port) and not e2e.port_open(metrics)
            assert not [p for p in started if e2e.alive(p)]
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
            for pid in started:
                if e2e.alive(pid):
                    os.kill(pid, signal.SIGKILL)
