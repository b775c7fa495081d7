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


class ChildWatcher(Protocol):
    """Runs beside a supervised child (``__call__``) and sees each line of its output."""

    def __call__(self, child: subprocess.Popen[bytes]) -> None: ...

    def line(self, text: str) -> None: ...


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
    watcher: ChildWatcher | None = None,
) -> int:
    """Run ``cmd`` with an exporter beside it (none for address ``none``); forward
    signals; return its exit code."""
    spool = prepare_spool()
    exporter = Exporter(roles, spool)
    if address != "none":
        exporter.start(address)
    child = subprocess.Popen(
        cmd,
        env={**(env or os.environ), SPOOL_ENV: str(spool)},
        stdout=subprocess.PIPE if watcher else None,
        stderr=subprocess.STDOUT if watcher else None,
    )
    reader = None
    if watcher is not None:  # checks beside the child (may stop it); sees its output
        threading.Thread(target=watcher, args=(child,), name="fedhead-watch", daemon=True).start()
        reader = threading.Thread(target=_relay, args=(child, watcher), daemon=True)
        reader.start()

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        code = child.wait()
        if reader is not None:
            reader.join(timeout=5)  # the child's helpers may hold its output open longer
    finally:
        exporter.stop()
        for path in spool.glob("*"):
            path.unlink(missing_ok=True)
        spool.rmdir()
    return code
