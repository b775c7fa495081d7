"""``fedhead status``: the runs under a runs folder, with their state, for people and scripts.

Each run's out-dir (``server.rundir.RunDir``) holds the run's state (written by the
server as the run goes: running, finished or failed with the reason), its report once
it finished and its checkpoints. A run whose state still says running but whose server
process is gone (on this machine) was cut off: it is shown as interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from fedhead.cli.types import Subparsers, add_command
from fedhead.common.errors import ConfigError, FederationError
from fedhead.server.checkpoints import CheckpointStore
from fedhead.server.rundir import DEFAULT_RUNS_DIR, RunDir

BAD_STATES = ("failed", "interrupted")


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    state: str  # running, finished, failed, interrupted, unknown
    rounds_done: int
    num_rounds: int
    last_checkpoint: str
    out_dir: str
    reason: str = ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    try:  # a killed process its parent has not reaped yet (Linux: state Z) is gone too
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def inspect(out: Path) -> RunInfo | None:
    """A run's state from its out-dir; None when the folder holds no run."""
    run_dir = RunDir(out)
    status, report = run_dir.read_state(), run_dir.read_report()
    held = CheckpointStore(run_dir.checkpoints).rounds()
    last = str(held[max(held)]) if held else ""
    if status is None and not report and not last:
        return None
    if status is None:  # written before status files existed, or by hand
        run_id = str(report.get("run_id", out.name.removeprefix("run-")))
        num_rounds = int(report.get("config", {}).get("num-server-rounds", 0))
        state = "finished" if report else "unknown"
        return RunInfo(
            run_id, state, len(report.get("rounds", [])), num_rounds, last, str(run_dir.path)
        )
    state, reason = status.state, status.reason
    if state == "running" and status.host == socket.gethostname() and not _alive(status.pid):
        state, reason = "interrupted", f"the server process {status.pid} is gone"
    return RunInfo(
        str(status.run_id),
        state,
        status.rounds_done,
        status.num_rounds,
        status.last_checkpoint or last,
        str(run_dir.path),
        reason,
    )


def find_runs(runs_dir: Path) -> list[RunInfo]:
    if not runs_dir.is_dir():
        return []
    found = [inspect(p) for p in sorted(runs_dir.iterdir()) if p.is_dir()]
    return [r for r in found if r is not None]


def _line(r: RunInfo) -> str:
    rounds = f"{r.rounds_done}/{r.num_rounds or '?'}"
    checkpoint = Path(r.last_checkpoint).name if r.last_checkpoint else "-"
    text = f"{r.run_id:<20}  {r.state:<11}  {rounds:>7}  {checkpoint:<22}  {r.out_dir}"
    return text + (f"\n{'':<20}  reason: {r.reason}" if r.reason and r.state in BAD_STATES else "")


HEADER = f"{'run':<20}  {'state':<11}  {'rounds':>7}  {'last checkpoint':<22}  out-dir"


def _runs(args: argparse.Namespace) -> int:
    """on the SuperLink's host: runs' state from their out-dirs (checkpoints, status)"""
    runs_dir = Path(args.runs_dir).expanduser()
    if args.run is None:
        runs = find_runs(runs_dir)
    else:
        as_path = Path(args.run).expanduser()
        one = inspect(as_path) if as_path.is_dir() else None
        if one is None:
            one = next((r for r in find_runs(runs_dir) if r.run_id == args.run), None)
        if one is None:
            raise ConfigError(
                [f"--run: no run {args.run!r} in {runs_dir} (give a run id or an out-dir)"],
                "arguments",
            )
        runs = [one]
    if args.json:
        print(json.dumps([asdict(r) for r in runs], indent=2))
    elif runs:
        print(HEADER)
        for r in runs:
            print(_line(r))
    else:
        print(f"no runs in {runs_dir}")
    if args.run is not None and runs[0].state in BAD_STATES:
        raise FederationError(
            f"run {runs[0].run_id} {runs[0].state}: {runs[0].reason or 'no reason recorded'}",
            f"continue it with resume-from='{runs[0].out_dir}'",
        )
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead status``."""
    r = add_command(
        sub,
        "status",
        _runs,
        description="Lists the runs whose out-dirs are under --runs-dir on this host (the "
        "SuperLink's): state (running, finished, failed, interrupted), rounds "
        "done, last checkpoint and out-dir. With --run, shows one run and exits "
        f"{FederationError.exit_code} if it failed or was interrupted (0 if it is running "
        "or finished).",
    )
    r.add_argument(
        "--runs-dir",
        default=DEFAULT_RUNS_DIR,
        help=f"folder holding the runs' out-dirs ({DEFAULT_RUNS_DIR})",
    )
    r.add_argument("--run", help="one run: its id or its out-dir")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
