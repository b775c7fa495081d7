"""`fedhead runs`: states from the files the server writes, and exit codes for scripts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedhead.common.errors import ConfigError, FederationError
from fedhead.server.checkpoints import CheckpointStore
from fedhead.server.rundir import RUNNING, RunDir, RunState
from tests.cli.test_cli import fedhead, one_line_error


def _run_dir(
    root: Path, run_id: int, rounds_done: int, state: str = RUNNING, pid: int | None = None
) -> Path:
    out = root / f"run-{run_id}"
    store = CheckpointStore(out / "checkpoints")
    results: list[dict[str, object]] = []
    for rnd in range(rounds_done + 1):
        results.append({"round": rnd, "eval_accuracy": 0.5})
        meta = {"run_id": run_id, "model": {}, "privacy": None, "results": results}
        store.save(rnd, ["w"], [np.zeros(3, np.float32)], meta)
    status = RunState(run_id, str(out), 5, state=state, rounds_done=rounds_done)
    if pid is not None:  # else this process's
        status = dataclasses.replace(status, pid=pid)
    RunDir(out).begin(status)
    return out


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_runs_lists_states_and_exits_non_zero_for_a_failed_run(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _run_dir(root, 11, 5, state="finished")
    failed = _run_dir(root, 12, 2)
    run_dir = RunDir(failed)
    run_dir.begin(RunState(12, str(failed), 5, rounds_done=2))
    run_dir.failed(FederationError("only 1 of the 2 required site(s) connected", "start more"))
    _run_dir(root, 13, 3, pid=_dead_pid())  # said running, its process is gone
    _run_dir(root, 14, 1, pid=os.getpid())  # running (this process is alive)
    (root / "empty").mkdir()

    listing = fedhead("status", "--runs-dir", str(root), "--json")
    assert listing.returncode == 0, listing.stderr
    runs = {r["run_id"]: r for r in json.loads(listing.stdout)}
    assert {k: r["state"] for k, r in runs.items()} == {
        "11": "finished",
        "12": "failed",
        "13": "interrupted",
        "14": "running",
    }
    assert runs["13"]["rounds_done"] == 3 and runs["13"]["num_rounds"] == 5
    assert runs["13"]["last_checkpoint"].endswith("round-0003.safetensors")
    assert "only 1 of the 2" in runs["12"]["reason"]

    table = fedhead("status", "--runs-dir", str(root))
    assert table.returncode == 0 and "interrupted" in table.stdout and "3/5" in table.stdout

    assert fedhead("status", "--runs-dir", str(root), "--run", "11").returncode == 0
    assert fedhead("status", "--runs-dir", str(root), "--run", "14").returncode == 0
    one_line_error(
        fedhead("status", "--runs-dir", str(root), "--run", "12"),
        FederationError.exit_code,
        "run 12 failed",
        "only 1 of the 2",
        "resume-from=",
    )
    one_line_error(
        fedhead("status", "--run", str(root / "run-13")),  # an out-dir works too
        FederationError.exit_code,
        "run 13 interrupted",
    )
    one_line_error(
        fedhead("status", "--runs-dir", str(root), "--run", "99"), ConfigError.exit_code, "99"
    )
