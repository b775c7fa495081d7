"""``fedhead exporter`` and the metrics exporter it runs: ``/metrics`` from the
statistics events fedhead's ServerApp and ClientApps write to a spool folder.

``fedhead superlink`` and ``fedhead node`` keep an exporter beside their Flower process
(``fedhead.cli.supervisor``), across all its runs; ``fedhead exporter`` runs one alone,
for a SuperLink or SuperNode started the Flower way. An exporter that cannot start
(address taken or unparsable) says so in one line and training goes on without it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from fedhead.cli.metrics import ServerMetrics, SiteMetrics, build_info
from fedhead.cli.preflight import parse_address
from fedhead.cli.types import Subparsers, add_command
from fedhead.common.errors import FedheadError, SetupError
from fedhead.common.telemetry import (
    DEFAULT_SERVER_ADDRESS,
    DEFAULT_SITE_ADDRESS,
    SERVER_EVENTS,
    SPOOL_ENV,
    SpoolReader,
)

log = logging.getLogger(__name__)


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
        for batch in self.reader.poll_writers():
            for event in batch.events:
                if type(event).__name__ in SERVER_EVENTS:
                    if self.server is not None:
                        self.server.apply(event, batch.writer)
                elif self.site is not None:
                    self.site.apply(event)
            if batch.ended and self.server is not None:
                self.server.writer_ended(batch.writer)

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


def _exporter(args: argparse.Namespace) -> int:
    """serve metrics for a SuperLink or SuperNode started the Flower way"""
    spool = prepare_spool(Path(args.spool).expanduser())
    exporter = Exporter([args.role], spool)
    default = DEFAULT_SERVER_ADDRESS if args.role == "server" else DEFAULT_SITE_ADDRESS
    args.address = args.address or default
    exporter.serve(args.address)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"metrics for the {args.role} on http://{args.address}/metrics; events from {spool}")
    stop.wait()
    exporter.stop()
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead exporter``."""
    e = add_command(
        sub,
        "exporter",
        _exporter,
        description=f"Reads the statistics events that fedhead's ServerApp or ClientApp "
        f"write to the spool folder named by {SPOOL_ENV} (set it for flower-superlink "
        "or flower-supernode) and serves them as Prometheus metrics.",
    )
    e.add_argument("--role", choices=["server", "site"], required=True)
    e.add_argument("--spool", required=True, help=f"the folder {SPOOL_ENV} points to")
    e.add_argument("--address", default=None, help="HOST:PORT (default: the role's port)")
