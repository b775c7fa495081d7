"""The long-lived metrics exporter, and the supervisor that keeps it beside a Flower process.

``fedhead superlink`` and ``fedhead node`` run Flower's process as a child, give it a
spool folder (``FEDHEAD_METRICS_SPOOL``) and serve ``/metrics`` for as long as it runs,
across all its runs. ``fedhead exporter`` runs the same exporter alone, for a SuperLink
or SuperNode started the Flower way. An exporter that cannot start (address taken or
unparsable) says so in one line and training goes on without it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, start_http_server

from fedhead.cli.metrics import ServerMetrics, SiteMetrics, build_info
from fedhead.common.errors import ConfigError, FedheadError, SetupError
from fedhead.common.telemetry import SERVER_EVENTS, SPOOL_ENV, SpoolReader

log = logging.getLogger(__name__)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError([f"{text!r} is not HOST:PORT (for example 127.0.0.1:9400)"], "address")
    return host, int(port)


class Exporter:
    """Serves ``/metrics`` for the given roles and applies the spool's events to them."""

    def __init__(self, roles: Sequence[str], spool: Path, poll_seconds: float = 0.5) -> None:
        self.registry = CollectorRegistry()
        build_info(self.registry, list(roles))
        self.server = ServerMetrics(self.registry) if "server" in roles else None
        self.site = SiteMetrics(self.registry) if "site" in roles else None
        self.spool = spool
        self.reader = SpoolReader(spool)
        self.poll_seconds = poll_seconds
        self.address: tuple[str, int] | None = None
        self._httpd: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, address: str) -> bool:
        """Start serving; on failure print one line and return False (training goes on)."""
        try:
            self.serve(address)
        except FedheadError as err:
            print(
                f"fedhead: metrics exporter not started: {err.what}; continuing without "
                "metrics (choose another --metrics-address, or none)",
                file=sys.stderr,
            )
            return False
        return True

    def serve(self, address: str) -> None:
        """Start serving; ConfigError for a bad address, SetupError for a taken one."""
        host, port = parse_address(address)
        try:
            self._httpd, _ = start_http_server(port, host, registry=self.registry)
        except OSError as err:
            raise SetupError(
                f"metrics address {address} is not available ({err.strerror or err})",
                "choose another address, or stop what uses it",
            ) from err
        self.address = (host, self._httpd.server_port)
        self._thread = threading.Thread(target=self._loop, name="fedhead-metrics", daemon=True)
        self._thread.start()
        log.info("serving metrics on http://%s:%d/metrics", *self.address)

    def poll(self) -> None:
        for event in self.reader.poll():
            target = self.server if type(event).__name__ in SERVER_EVENTS else self.site
            if target is not None:
                target.apply(event)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:  # a metrics bug must not take the exporter down
                log.exception("metrics exporter: failed to read the spool")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll()  # the last events
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


def prepare_spool(path: Path | None = None) -> Path:
    """A fresh spool folder (stale events from an earlier exporter are discarded)."""
    import tempfile

    if path is None:
        return Path(tempfile.mkdtemp(prefix="fedhead-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.jsonl"):
        old.unlink()
    return path


# Flower exit codes after which starting the same command again cannot help (bad
# arguments, keys, certificates or addresses): the supervisor gives up on these.
def _permanent_exits() -> frozenset[int]:
    from flwr.supercore.exit import ExitCode

    return frozenset(
        {
            2,  # argparse: bad command line
            ExitCode.SUPERNODE_NODE_AUTH_KEY_INVALID,
            ExitCode.SUPERNODE_STARTED_WITHOUT_TLS_BUT_NODE_AUTH_ENABLED,
            ExitCode.SUPERNODE_INVALID_TRUSTED_ENTITIES,
            ExitCode.COMMON_ADDRESS_INVALID,
            ExitCode.COMMON_TLS_NOT_SUPPORTED,
            ExitCode.COMMON_TLS_ROOT_CERTIFICATES_INCOMPATIBLE,
            ExitCode.COMMON_PATH_INVALID,
            ExitCode.COMMON_TLS_SERVER_CERTIFICATES_INVALID,
            ExitCode.RUNTIME_VERSION_INCOMPATIBLE,
        }
    )


class ChildWatcher(Protocol):
    """Runs beside a supervised child (``__call__``) and sees each line of its output."""

    def __call__(self, child: subprocess.Popen[bytes]) -> None: ...

    def line(self, text: str) -> None: ...

    def permanent(self) -> bool:
        """Whether what it saw means a restart cannot help."""
        ...


def _relay(child: subprocess.Popen[bytes], watcher: ChildWatcher) -> None:
    """Copy the child's output to stderr, line by line, showing each to the watcher."""
    assert child.stdout is not None
    for raw in child.stdout:
        sys.stderr.buffer.write(raw)
        sys.stderr.flush()
        watcher.line(raw.decode(errors="replace"))


def supervise(
    cmd: list[str],
    roles: Sequence[str],
    address: str,
    env: dict[str, str] | None = None,
    companion: list[str] | None = None,
    restart: bool = False,
    backoff: tuple[float, float] = (2.0, 60.0),
    watcher: ChildWatcher | None = None,
    spool: Path | None = None,
) -> int:
    """Run ``cmd`` with an exporter beside it (unless ``address`` is none); forward
    signals; return its exit code. ``spool``: the events folder (default: a fresh one).

    ``companion``: a process (the proxy in front of a SuperLink) that lives and dies
    with ``cmd``; if it ends first, ``cmd`` is stopped and its exit code returned.
    ``restart``: a child that exits on its own (a SuperNode whose SuperLink went away or
    forgot it) is started again after a growing pause (``backoff``: first and longest,
    in seconds), one line per attempt, until a signal stops the supervisor or the child
    fails in a way a restart cannot fix. The two do not go together.
    ``watcher``: runs beside each child (it may stop it) and sees each line of its
    output, which is relayed to stderr; it can tell that a restart cannot help.
    """
    if companion and restart:
        raise ValueError("supervise: a companion process and restarts do not go together")
    spool = spool or prepare_spool()
    exporter = Exporter(roles, spool) if address != "none" else None
    if exporter is not None:
        exporter.start(address)
    child_env = {**(env or os.environ), SPOOL_ENV: str(spool)}
    helper = subprocess.Popen(companion) if companion else None
    readers: list[threading.Thread] = []

    def start_child() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            cmd,
            env=child_env,
            stdout=subprocess.PIPE if watcher else None,
            stderr=subprocess.STDOUT if watcher else None,
        )
        if watcher is not None:  # checks beside the child (may stop it); sees its output
            threading.Thread(
                target=watcher, args=(proc,), name="fedhead-watch", daemon=True
            ).start()
            readers.append(threading.Thread(target=_relay, args=(proc, watcher), daemon=True))
            readers[-1].start()
        return proc

    child = start_child()
    stop = threading.Event()  # a signal asked us to stop (it reached the companion too)
    companion_ended_first = threading.Event()

    def forward(signum: int, _frame: FrameType | None) -> None:
        stop.set()
        if child.poll() is None:
            child.send_signal(signum)

    def stop_child_when(proc: subprocess.Popen[bytes], companion_name: str) -> None:
        proc.wait()
        if child.poll() is None and not stop.is_set():
            companion_ended_first.set()
            print(
                f"fedhead: {companion_name} exited with {proc.returncode}; "
                f"stopping {Path(cmd[0]).name}",
                file=sys.stderr,
            )
            child.terminate()

    previous = {
        sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    if helper is not None and companion is not None:
        threading.Thread(
            target=stop_child_when, args=(helper, Path(companion[0]).name), daemon=True
        ).start()
    name = Path(cmd[0]).name
    permanent = _permanent_exits() if restart else frozenset()
    delay, attempt = backoff[0], 0
    try:
        while True:
            started = time.monotonic()
            code = child.wait()
            for reader in readers:
                reader.join(timeout=5)  # the child's helpers may hold its output open longer
            readers.clear()
            given_up = watcher is not None and watcher.permanent()
            if stop.is_set() or not restart or code == 0 or code in permanent or given_up:
                break
            if time.monotonic() - started > backoff[1]:  # it ran well for a while
                delay, attempt = backoff[0], 0
            attempt += 1
            print(
                f"fedhead: {name} exited with code {code}; starting it again in "
                f"{delay:.0f}s (attempt {attempt})",
                file=sys.stderr,
                flush=True,
            )
            if stop.wait(delay):
                break
            child = start_child()
            delay = min(delay * 2, backoff[1])
    finally:
        if helper is not None and helper.poll() is None:
            helper.terminate()
            try:
                helper.wait(timeout=15)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if exporter is not None:
            exporter.stop()
        for path in spool.glob("*"):
            path.unlink(missing_ok=True)
        spool.rmdir()
    if helper is not None and companion_ended_first.is_set():
        return helper.returncode or 1
    return code
