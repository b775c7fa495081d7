"""Talking to Flower's ``flwr`` command for ``fedhead run`` and ``fedhead runs``:
connections (``$FLWR_HOME/config.toml``, default ``~/.flwr``), runs' status
(``flwr ls``), their logs (``flwr log``) and the report the ServerApp logs at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhead.common.errors import ConfigError, FederationError, SetupError

_FINISHED = "finished"
_COMPLETED = "finished:completed"
_FLOWER_FAILED = "ServerApp failed with exception:"  # flwr/superlink/runtime/run_serverapp.py


def flwr_program() -> str:
    """The flwr program beside this Python (a venv need not be activated)."""
    beside = Path(sys.executable).parent / "flwr"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("flwr")
    if found is None:
        raise SetupError("flwr is not installed", "install fedhead with deploy/install.sh")
    return found


def flwr_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(flwr_program()).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


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


def flwr_json(args: list[str]) -> dict[str, Any]:
    result = subprocess.run(
        [flwr_program(), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=flwr_env(),
        timeout=120,
    )
    start = result.stdout.find("{")
    try:
        data: dict[str, Any] = json.loads(result.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    if result.returncode != 0 or not data.get("success"):
        detail = last_line(data.get("error-message") or result.stderr + result.stdout)
        raise FederationError(f"flwr {args[0]} failed: {detail}", "check the connection")
    return data


def last_line(text: str) -> str:
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

    @property
    def reason(self) -> str:
        """Why it failed, without Flower's wording around the ServerApp's own line."""
        return self.details.removeprefix(_FLOWER_FAILED).strip() or "no reason given"


def list_runs(connection: str, run_id: str | None = None) -> list[RunStatus]:
    args = ["ls", connection] + (["--run-id", run_id] if run_id else [])
    return [
        RunStatus(
            str(r.get("run-id", "")),
            str(r.get("status", "")),
            str(r.get("status-details", "")),
            float(r.get("elapsed", 0.0)),
        )
        for r in flwr_json(args).get("runs", [])
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


# Flower's banner for a ServerApp that raised (flwr/superlink/runtime/run_serverapp.py
# and flwr/supercore/exit/exit.py): "ServerApp raised an exception", the traceback, then
# "Exit Code: <n>", the code's help text and "For more information, visit: <url>". Any
# exception, a refusal of fedhead's included, gets it: ``fedhead run`` shows the reason
# once, in its own last line, instead.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"ServerApp raised an exception\s*$")
_EXIT_CODE = re.compile(r"Exit Code: \d+\s*$")
_MORE_INFO = "For more information, visit:"
_CHAINED = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)


class LogFilter:
    """Passes a run's streamed log through, keeping the report line and hiding Flower's
    crash banner and traceback of a failed ServerApp (the reason is printed once, at
    the end).

    The log also carries text that sites sent (their error reasons), so of the lines
    that look like the report only the last one counts (the ServerApp logs the report
    last), and only with the run's id, from a run that completed (``report_for``)."""

    def __init__(self) -> None:
        from fedhead.server.report import REPORT_LOG_PREFIX

        self.prefix = REPORT_LOG_PREFIX
        self.report: dict[str, Any] | None = None
        self._in_traceback = False
        self._in_banner = False
        self._hidden = False  # the last line was hidden

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
        plain = _ANSI.sub("", line)
        if self._hidden and not plain.strip():
            return None  # the blank lines between the parts of a banner
        self._hidden = False
        shown = self._show(plain)
        self._hidden = shown is None
        return line if shown else None

    def _show(self, plain: str) -> bool | None:
        """True to show the line, None to hide it (Flower's banner or a traceback)."""
        if self._in_banner:  # Exit Code: <n>, its help text, the link
            self._in_banner = not plain.strip().startswith(_MORE_INFO)
            return None
        if _EXIT_CODE.search(plain):
            self._in_banner = True
            return None
        if _RAISED.search(plain) or plain.strip() in _CHAINED:
            return None
        if plain.startswith("Traceback (most recent call last)"):
            self._in_traceback = True
            return None
        if self._in_traceback:
            if plain.startswith((" ", "\t")) or not plain.strip():
                return None
            self._in_traceback = False
            return None  # the exception line ends the traceback
        return True


@dataclass(frozen=True)
class StreamEnd:
    """How ``flwr log --stream`` ended: 0 when the run's log was complete."""

    returncode: int
    error: str  # flwr's last line on stderr (e.g. that the SuperLink is unavailable)


def stream_log(connection: str, run_id: str, keep: LogFilter) -> StreamEnd:
    """``flwr log RUN_ID CONNECTION --stream`` until the run ends, lines through ``keep``;
    flwr's own errors are returned, not printed."""
    proc = subprocess.Popen(
        [flwr_program(), "log", run_id, connection, "--stream"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=flwr_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(proc.stderr or []), daemon=True)
    reader.start()
    try:
        for line in proc.stdout:
            shown = keep(line.rstrip("\n"))
            if shown is not None:
                print(shown, flush=True)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)
        reader.join(timeout=5)
    return StreamEnd(proc.returncode, last_line("".join(errors)))


def superlink_answers(address: str, timeout: float = 5.0) -> bool:
    """Whether something accepts connections at the SuperLink's ``HOST:PORT``."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return True  # not HOST:PORT: undecided, assume it does
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


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


def drain_log(connection: str, run_id: str, keep: LogFilter) -> None:
    """Read a finished run's log without printing it (only the report is kept)."""
    result = subprocess.run(
        [flwr_program(), "log", run_id, connection, "--stream"],
        capture_output=True,
        text=True,
        env=flwr_env(),
        timeout=300,
    )
    for line in result.stdout.splitlines():
        keep(line)
