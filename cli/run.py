"""``fedhead run`` and ``fedhead runs``: the operator's commands for a federation's runs.

``fedhead run`` checks the run configuration here first (every unknown key and bad
value named at once), submits the run through Flower (``flwr run APP CONNECTION``),
streams its log (``flwr log``), keeps the report the ServerApp logs at the end, and
exits with the run's real outcome (``flwr ls``): Flower's own ``flwr run --stream``
exits 0 also for a failed run. Connections are Flower's, in ``$FLWR_HOME/config.toml``
(default ``~/.flwr``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhead.cli.types import Subparsers, add_command
from fedhead.common.errors import ConfigError, FederationError, SetupError

# flwr's --run-config syntax: space-separated key=value pairs, values TOML
# (flwr.common.config.parse_config_args uses the same pattern).
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
_FINISHED = "finished"
_COMPLETED = "finished:completed"


def _flwr() -> str:
    """The flwr program beside this Python (a venv need not be activated)."""
    beside = Path(sys.executable).parent / "flwr"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("flwr")
    if found is None:
        raise SetupError("flwr is not installed", "install fedhead with deploy/install.sh")
    return found


def _flwr_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(_flwr()).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


# --- the run configuration ---------------------------------------------------------
def app_defaults(app: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the Flower App at ``app`` (what a run starts from)."""
    path = app / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text())
        config = data["tool"]["flwr"]["app"]["config"]
    except FileNotFoundError as err:
        raise SetupError(
            f"{app} is not a Flower App (no pyproject.toml)",
            "run this in fedhead's folder, or point --app at it",
        ) from err
    except (tomllib.TOMLDecodeError, KeyError) as err:
        raise SetupError(
            f"{path} has no [tool.flwr.app.config]", "point --app at fedhead's folder"
        ) from err
    return dict(config)


def signed_app_name(app: Path) -> str:
    """``@publisher/name`` of the Flower App at ``app``: what sites that trust only the
    operator's signed app run (the SuperLink fetches it, with its signature, from the
    app store ``fedhead superlink --signed-app`` serves)."""
    data = tomllib.loads((app / "pyproject.toml").read_text())
    return f"@{data['tool']['flwr']['app']['publisher']}/{data['project']['name']}"


def parse_overrides(texts: list[str]) -> tuple[dict[str, Any], list[str], set[str]]:
    """``k=v`` pairs as ``flwr run --run-config`` reads them -> (values, problems, keys
    whose value is no TOML value: kept as text, which flwr would refuse unquoted)."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    unquoted: set[str] = set()
    for text in texts:
        if text.endswith(".toml"):
            try:
                values |= tomllib.loads(Path(text).expanduser().read_text())
            except (OSError, tomllib.TOMLDecodeError) as err:
                problems.append(f"--run-config {text}: cannot read it as TOML ({err})")
            continue
        rest = _PAIR.sub("", text).strip()
        if rest:
            problems.append(f"--run-config: {rest!r} is not KEY=VALUE")
        for key, raw in _PAIR.findall(text):
            try:
                values |= tomllib.loads(f"{key} = {raw}")
            except tomllib.TOMLDecodeError:
                values[key] = raw
                unquoted.add(key)
    return values, problems, unquoted


def check_run_config(app: Path, texts: list[str]) -> dict[str, Any]:
    """The run's full configuration (app defaults + overrides), or ConfigError naming
    every unknown key and bad value at once."""
    from fedhead.common.config import RunConfig

    defaults = app_defaults(app)
    overrides, problems, unquoted = parse_overrides(texts)
    text_keys = {k for k, v in RunConfig().to_mapping().items() if isinstance(v, str)}
    for key in sorted(unquoted & text_keys):
        problems.append(f"{key}: text needs quotes: {key}='{overrides[key]}'")
    for key, value in overrides.items():
        if isinstance(value, dict):  # dotted keys: flwr flattens them
            problems.append(f"{key}: not a run configuration key (no dotted keys here)")
    mapping = {**defaults, **{k: v for k, v in overrides.items() if not isinstance(v, dict)}}
    try:
        cfg = RunConfig.from_mapping(mapping)
    except ConfigError as err:
        problems.extend(err.problems)
    else:
        if not problems:
            return cfg.to_mapping()
    raise ConfigError(problems, "run configuration")


# --- connections -------------------------------------------------------------------
def connection_address(name: str | None) -> tuple[str, str]:
    """(connection name, address) from ``$FLWR_HOME/config.toml``."""
    path = flwr_home() / "config.toml"
    how = (
        f'add it to {path}: [superlink.{name or "NAME"}] address = "HOST:8000" and '
        'root-certificates = "/path/to/ca.crt" (or insecure = true for a test setup)'
    )
    try:
        links = tomllib.loads(path.read_text()).get("superlink", {})
    except FileNotFoundError as err:
        raise ConfigError(
            [f"connection: {name or 'default'!r} is not set up ({path} does not exist); {how}"]
        ) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"connection: {path} is not valid TOML ({err})"]) from err
    known = sorted(k for k, v in links.items() if isinstance(v, dict))
    name = name or links.get("default")
    if not name:
        raise ConfigError([f"connection: none named and no default in {path}; {how}"])
    if name not in known:
        raise ConfigError(
            [f"connection: {name!r} is not in {path} (known: {', '.join(known) or 'none'}); {how}"]
        )
    return name, str(links[name].get("address", ""))


def wait_for_superlink(address: str, seconds: float) -> None:
    """Wait up to ``seconds`` for the SuperLink to accept connections (it may be starting)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return  # not HOST:PORT: let flwr say what it makes of it
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise SetupError(
                    f"no SuperLink answers at {address} ({err.strerror or err})",
                    "start it (fedhead superlink), or check the connection's address",
                ) from err
            time.sleep(0.5)


# --- talking to flwr -------------------------------------------------------------
def _flwr_json(args: list[str]) -> dict[str, Any]:
    result = subprocess.run(
        [_flwr(), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=_flwr_env(),
        timeout=120,
    )
    start = result.stdout.find("{")
    try:
        data: dict[str, Any] = json.loads(result.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    if result.returncode != 0 or not data.get("success"):
        detail = _last_line(data.get("error-message") or result.stderr + result.stdout)
        raise FederationError(f"flwr {args[0]} failed: {detail}", "check the connection")
    return data


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    status: str  # flwr's: pending, starting, running, finished:completed|failed|stopped
    details: str
    elapsed: float

    @property
    def finished(self) -> bool:
        return self.status.startswith(_FINISHED)

    @property
    def ok(self) -> bool:
        return self.status == _COMPLETED


def list_runs(connection: str, run_id: str | None = None) -> list[RunStatus]:
    args = ["ls", connection] + (["--run-id", run_id] if run_id else [])
    return [
        RunStatus(
            str(r.get("run-id", "")),
            str(r.get("status", "")),
            str(r.get("status-details", "")),
            float(r.get("elapsed", 0.0)),
        )
        for r in _flwr_json(args).get("runs", [])
    ]


def wait_finished(connection: str, run_id: str, seconds: float = 60.0) -> RunStatus:
    deadline = time.monotonic() + seconds
    while True:
        runs = list_runs(connection, run_id)
        if runs and (runs[0].finished or time.monotonic() >= deadline):
            return runs[0]
        if not runs and time.monotonic() >= deadline:
            raise FederationError(f"run {run_id} is not known to the SuperLink")
        time.sleep(1.0)


class LogFilter:
    """Passes a run's streamed log through, keeping the report line and hiding Flower's
    traceback of a failed ServerApp (the reason is printed once, at the end).

    The log also carries text that sites sent (their error reasons), so of the lines
    that look like the report only the last one counts (the ServerApp logs the report
    last), and only with the run's id, from a run that completed (``report_for``)."""

    def __init__(self) -> None:
        from fedhead.server.report import REPORT_LOG_PREFIX

        self.prefix = REPORT_LOG_PREFIX
        self.report: dict[str, Any] | None = None
        self._in_traceback = False

    def report_for(self, status: RunStatus) -> dict[str, Any] | None:
        report = self.report
        if not status.ok or report is None or str(report.get("run_id")) != status.run_id:
            return None
        return report

    def __call__(self, line: str) -> str | None:
        if self.prefix in line:
            self.report = None  # only the last such line counts
            # a cut line leaves the report on the SuperLink's host only
            with contextlib.suppress(json.JSONDecodeError):
                report = json.loads(line.split(self.prefix, 1)[1])
                self.report = report if isinstance(report, dict) else None
            return None
        if line.startswith("Traceback (most recent call last)"):
            self._in_traceback = True
            return None
        if self._in_traceback:
            if line.startswith((" ", "\t")) or not line.strip():
                return None
            self._in_traceback = False
            return None  # the exception line ends the traceback
        return line


def stream_log(connection: str, run_id: str, keep: LogFilter) -> None:
    """``flwr log RUN_ID CONNECTION --stream`` until the run ends, lines through ``keep``."""
    proc = subprocess.Popen(
        [_flwr(), "log", run_id, connection, "--stream"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_flwr_env(),
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            shown = keep(line.rstrip("\n"))
            if shown is not None:
                print(shown, flush=True)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)


def save_report(report: dict[str, Any], out: Path) -> Path:
    """Write the collected report; an existing different file is kept, not overwritten."""
    from fedhead.common.files import atomic_writer

    data = (json.dumps(report, indent=2) + "\n").encode()
    path = out / "report.json"
    if path.exists() and path.read_bytes() != data:
        raise SetupError(
            f"{path} exists with other content", "choose another --out, or move that file"
        )
    if not path.exists():
        with atomic_writer(path) as f:
            f.write(data)
    return path


def _summary(status: RunStatus, report: dict[str, Any] | None, saved: Path | None) -> None:
    print(f"\nrun {status.run_id}: {status.status} after {status.elapsed:.0f} s")
    if report is not None:
        rounds = report.get("rounds") or []
        final = report.get("final_eval_accuracy")
        server = report.get("final_server_eval_accuracy")
        print(
            f"final accuracy: federated {_acc(final)}"
            + (f", server test set {_acc(server)}" if server is not None else "")
            + f" ({len(rounds)} rounds, {report.get('clients')} sites)"
        )
        sites = report.get("sites")
        if isinstance(sites, list):
            from fedhead.server.report import sites_table

            print("per site, validation accuracy on the site's own split (report.json: sites):")
            print("\n".join(sites_table(sites, report.get("sites_failed") or {})))
    if saved is not None and report is not None:
        print(f"report: {saved} (collected from the run's log)")
        where = report.get("config", {}).get("out-dir") or f"fedhead-runs/run-{status.run_id}"
        print(f"on the SuperLink's host it is in {where} (relative to where the SuperLink runs)")


def _acc(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) else "-"


# --- commands ----------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    """start a federated run, watch it, collect its report

    Checks the run configuration, starts the run on the SuperLink of a Flower connection
    ($FLWR_HOME/config.toml, default ~/.flwr), streams its log and exits with its outcome
    (non-zero when the run fails). The report the ServerApp writes on the SuperLink's host
    is also collected from the run's log into --out.
    """
    app = Path(args.app).expanduser().resolve()
    config = check_run_config(app, args.run_config)
    connection, address = connection_address(args.connection)
    wait_for_superlink(address, args.wait_superlink)
    cmd = ["run", signed_app_name(app) if args.signed else str(app), connection]
    for text in args.run_config:
        cmd += ["--run-config", text]
    run_id = str(_flwr_json(cmd)["run-id"])
    print(
        f"run {run_id} started on {connection} ({address}): {config['num-server-rounds']} "
        f"rounds, backbone {config['backbone']}, classes {config['classes']}",
        flush=True,
    )
    keep = LogFilter()
    try:
        stream_log(connection, run_id, keep)
    except KeyboardInterrupt:
        print(
            f"\nfedhead: stopped watching; run {run_id} goes on (stop it with "
            f"`.venv/bin/flwr stop {run_id} {connection}`)",
            file=sys.stderr,
        )
        return 130
    status = wait_finished(connection, run_id)
    out = Path(args.out or f"fedhead-runs/run-{run_id}")
    report = keep.report_for(status)
    saved = save_report(report, out) if report is not None else None
    _summary(status, report, saved)
    if not status.ok:
        raise FederationError(
            f"run {run_id} {status.status}: {status.details or 'no reason given'}",
            f"see `.venv/bin/flwr log {run_id} {connection} --show`",
        )
    return 0


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
        _drain(connection, run.run_id, keep)
        report = keep.report_for(run)
        if report is None:
            raise FederationError(
                f"run {run.run_id} ({run.status}) has no report in its log",
                "only completed runs have one",
            )
        out = Path(args.out or f"fedhead-runs/run-{run.run_id}")
        print(f"report: {save_report(report, out)}")
    if not runs[0].ok:
        raise FederationError(
            f"run {runs[0].run_id} {runs[0].status}: {runs[0].details or 'no reason given'}"
        )
    return 0


def _drain(connection: str, run_id: str, keep: LogFilter) -> None:
    """Read a finished run's log without printing it (only the report is kept)."""
    result = subprocess.run(
        [_flwr(), "log", run_id, connection, "--stream"],
        capture_output=True,
        text=True,
        env=_flwr_env(),
        timeout=300,
    )
    for line in result.stdout.splitlines():
        keep(line)


def add_parser(sub: Subparsers) -> None:
    """``fedhead run`` and ``fedhead runs``."""
    r = add_command(sub, "run", _run)
    r.add_argument("connection", nargs="?", help="the connection's name (default: its default)")
    r.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="'K=V ...'",
        help="run configuration overrides, as flwr run takes them (repeatable; or a .toml file)",
    )
    r.add_argument("--app", default=".", help="fedhead's folder, the Flower App (.)")
    r.add_argument(
        "--signed",
        action="store_true",
        help="run the operator's signed app (@fedhead/fedhead, served by `fedhead superlink "
        "--signed-app`) instead of uploading --app unsigned; sites with --trusted-entities "
        "run only that",
    )
    r.add_argument("--out", help="where the report goes here (fedhead-runs/run-<id>)")
    r.add_argument(
        "--wait-superlink",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait this long for the SuperLink to accept connections (30)",
    )

    s = add_command(sub, "runs", _runs)
    s.add_argument("connection", nargs="?", help="the connection's name (default: its default)")
    s.add_argument("--run-id", help="one run")
    s.add_argument("--fetch-report", action="store_true", help="collect the run's report.json")
    s.add_argument("--out", help="where the report goes here (fedhead-runs/run-<id>)")
