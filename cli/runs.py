"""``fedhead runs``: the runs of a connection with their status, as Flower's SuperLink
knows them (``flwr ls``); one run's report collected from its log."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedhead.cli.flwr_cli import LogFilter, connection_address, drain_log, list_runs, save_report
from fedhead.cli.types import Subparsers, add_command
from fedhead.common.errors import FederationError


def _runs(args: argparse.Namespace) -> int:
    """list the runs of a connection with their status

    Lists runs (flwr ls). With --run-id: that run only, exiting non-zero when it failed;
    --fetch-report collects its report from the run's log.
    """
    connection, _ = connection_address(args.connection)
    runs = list_runs(connection, args.run_id)
    print(f"{'run id':>20}  {'status':<20}  {'seconds':>8}  details")
    for r in runs:
        print(f"{r.run_id:>20}  {r.status:<20}  {r.elapsed:>8.0f}  {r.details}")
    if args.run_id is None:
        return 0
    if args.fetch_report:
        keep = LogFilter()
        run = runs[0]
        if not run.finished:
            raise FederationError(f"run {run.run_id} is {run.status}", "fetch its report when done")
        drain_log(connection, run.run_id, keep)
        report = keep.report_for(run)
        if report is None:
            raise FederationError(
                f"run {run.run_id} ({run.status}) has no report in its log",
                "only completed runs have one",
            )
        out = Path(args.out or f"fedhead-runs/run-{run.run_id}")
        print(f"report: {save_report(report, out)}")
    if not runs[0].ok:
        raise FederationError(f"run {runs[0].run_id} {runs[0].status}: {runs[0].reason}")
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead runs``."""
    s = add_command(sub, "runs", _runs)
    s.add_argument("connection", nargs="?", help="the connection's name (default: its default)")
    s.add_argument("--run-id", help="one run")
    s.add_argument("--fetch-report", action="store_true", help="collect the run's report.json")
    s.add_argument("--out", help="where the report goes here (fedhead-runs/run-<id>)")
