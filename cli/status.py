"""``fedhead status``: the runs under a runs folder, with their state, for people and scripts.

Each run's out-dir holds ``status.json`` (written by the server as the run goes:
running, finished or failed with the reason), ``report.json`` once it finished and
``checkpoints/``. A run whose status still says running but whose server process is
gone (on this machine) was cut off: it is shown as interrupted.
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
from fedhead.common.files import read_json_object

DEFAULT_RUNS_DIR = "fedhead-runs"  # where runs without an out-dir go (./fedhead-runs/run-<id>)
STATUS_FILE, REPORT_FILE, CHECKPOINTS = "status.json", "report.json", "checkpoints"
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


def _last_checkpoint(out: Path) -> str:
    files = sorted((out / CHECKPOINTS).glob("round-*.safetensors"))
    return str(files[-1]) if files else ""


def inspect(out: Path) -> RunInfo | None:
    """A run's state from its out-dir; None when the folder holds no run."""
    status, report = read_json_object(out / STATUS_FILE), read_json_object(out / REPORT_FILE)
    last = _last_checkpoint(out)
    if not status and not report and not last:
        return None
    run_id = str(status.get("run_id", report.get("run_id", out.name.removeprefix("run-"))))
    num_rounds = int(status.get("num_rounds", report.get("config", {}).get("num-server-rounds", 0)))
    rounds_done = int(status.get("rounds_done") or len(report.get("rounds", [])))
    reason = str(status.get("reason", ""))
    if status:
        state = str(status.get("state", "unknown"))
        here = status.get("host") == socket.gethostname()
        if state == "running" and here and not _alive(int(status.get("pid", 0)) or -1):
            state = "interrupted"
            reason = f"the server process {status.get('pid')} is gone"
    else:  # written before status files existed, or by hand
        state = "finished" if report else "unknown"
    return RunInfo(
        run_id,
        state,
        rounds_done,
        num_rounds,
        str(status.get("last_checkpoint") or last),
        str(out.absolute()),
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
