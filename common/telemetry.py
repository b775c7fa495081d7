"""Statistics events, and the spool that carries them to a long-lived metrics exporter.

Flower runs the ServerApp in a process per run and every site message in a fresh
``flwr-clientapp`` process, so no metric can live in those processes. They *emit*
plain statistics events instead: each is appended as one JSON line to
``$FEDHEAD_METRICS_SPOOL/<role>-<pid>.jsonl``. The exporter started beside the
SuperLink or SuperNode (``fedhead.cli.exporter``) reads complete lines, turns them
into Prometheus metrics (``fedhead.cli.metrics``) and deletes the files of writers
that have exited, so the spool stays small however many processes come and go. A
line cut short by a crash is never read. Without ``FEDHEAD_METRICS_SPOOL`` events are
dropped: metrics are optional, training never depends on them.

Why not prometheus_client's multiprocess mode: it keeps a set of mmap files per
process until the exporter restarts; with a process per Flower message that grows
without bound on a long-lived SuperNode, and it restricts gauges to fixed modes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fedhead.common.files import append_line
from fedhead.common.rounds import RoundResult

log = logging.getLogger(__name__)

SPOOL_ENV = "FEDHEAD_METRICS_SPOOL"
DEFAULT_SERVER_ADDRESS = "127.0.0.1:9400"  # the federation's exporter, beside the SuperLink
DEFAULT_SITE_ADDRESS = "127.0.0.1:9401"  # a site's exporter, beside its SuperNode


# --- server events ----------------------------------------------------------------
@dataclass(frozen=True)
class RunStarted:
    """Emitted first, before anything can fail, so started = completed + failed."""

    backbone: str
    secure_aggregation: str  # "secagg+" or "none"


@dataclass(frozen=True)
class RunPrepared:
    sha256: str
    sites: int  # sites that joined and were prepared
    trainable_params: int


@dataclass(frozen=True)
class RunFinished:
    ok: bool


@dataclass(frozen=True)
class RoundStarted:
    round: int


@dataclass(frozen=True)
class SitesOutcome:
    """The per-site outcome of the last run (``query.outcome``), as counts only."""

    reported: int  # sites that sent a valid outcome
    negative_transfer: int  # of which federated < local-only beyond the interval
    failed: int  # sites asked that sent none (error, timeout, invalid values)


# --- site events ------------------------------------------------------------------
@dataclass(frozen=True)
class SiteMessage:
    """One message handled by the site's ClientApp."""

    kind: str  # one of client.mods.MESSAGE_KINDS (train, evaluate, prepare, ...)
    ok: bool
    seconds: float


@dataclass(frozen=True)
class SiteTrained:
    seconds: float
    examples: int


@dataclass(frozen=True)
class SiteFeatures:
    """One pass of the feature extractor over a part of the site's data."""

    images: int
    extracted: int
    extract_seconds: float
    cache_hits: int
    cache_misses: int
    skipped: int


@dataclass(frozen=True)
class SiteDevice:
    kind: str  # cpu or cuda
    name: str
    peak_memory_bytes: int  # CUDA only; 0 on CPU


@dataclass(frozen=True)
class SiteRefusedUpdate:
    reason: str  # non_finite, norm, clipping_range


@dataclass(frozen=True)
class SiteRefusedHead:
    """A head from the server the site refused (``client.guard``)."""

    reason: str  # one of client.guard.REFUSALS


Event = (
    RunStarted
    | RunPrepared
    | RunFinished
    | RoundStarted
    | RoundResult
    | SitesOutcome
    | SiteMessage
    | SiteTrained
    | SiteFeatures
    | SiteDevice
    | SiteRefusedUpdate
    | SiteRefusedHead
)
EVENTS: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        RunStarted,
        RunPrepared,
        RunFinished,
        RoundStarted,
        RoundResult,
        SitesOutcome,
        SiteMessage,
        SiteTrained,
        SiteFeatures,
        SiteDevice,
        SiteRefusedUpdate,
        SiteRefusedHead,
    )
}
SERVER_EVENTS = frozenset(
    {"RunStarted", "RunPrepared", "RunFinished", "RoundStarted", "RoundResult", "SitesOutcome"}
)


def encode(event: Event) -> str:
    return json.dumps({"event": type(event).__name__, **dataclasses.asdict(event)})


def decode(line: str) -> Event:
    data = json.loads(line)
    cls = EVENTS[data.pop("event")]
    return cls(**data)


def emit(event: Event) -> None:
    """Append the event to this process's spool file; never raises."""
    spool = os.environ.get(SPOOL_ENV)
    if not spool:
        return
    role = "server" if type(event).__name__ in SERVER_EVENTS else "site"
    path = Path(spool) / f"{role}-{os.getpid()}.jsonl"
    try:
        append_line(path, encode(event))
    except OSError as err:  # metrics are optional: training goes on
        log.debug("metrics event not written to %s: %s", path, err)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class WriterEvents:
    """What one writer process added to the spool since the last poll."""

    writer: str  # the spool file's name: <role>-<pid>
    events: list[Event]
    ended: bool  # the writer has exited and everything it wrote was read


class SpoolReader:
    """Reads new complete lines from every spool file; deletes finished writers' files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.offsets: dict[Path, int] = {}
        self.bad_lines = 0

    def poll(self) -> list[Event]:
        return [e for w in self.poll_writers() for e in w.events]

    def poll_writers(self) -> list[WriterEvents]:
        """New events by writer, and which writers have ended (a ServerApp whose run
        started but never finished was cut off: killed, or its SuperLink died)."""
        found = [self._read(path) for path in sorted(self.directory.glob("*.jsonl"))]
        return [w for w in found if w.events or w.ended]

    def _read(self, path: Path) -> WriterEvents:
        # Liveness first: if the writer had already exited, everything it wrote is in
        # the file now, so the file can go once read.
        suffix = path.stem.rsplit("-", 1)[-1]
        pid = int(suffix) if suffix.isdigit() else -1
        finished = pid != os.getpid() and not _alive(pid)
        offset = self.offsets.get(path, 0)
        try:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            self.offsets.pop(path, None)
            return WriterEvents(path.stem, [], False)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offsets[path] = offset + len(complete)
        events = []
        for raw in complete.splitlines():
            try:
                events.append(decode(raw.decode()))
            except (ValueError, KeyError, TypeError) as err:
                self.bad_lines += 1
                log.warning("skipping a malformed metrics event in %s: %s", path.name, err)
        if finished:
            if len(complete) != len(chunk):  # the writer died in the middle of a line
                self.bad_lines += 1
            path.unlink(missing_ok=True)  # its writer is gone and every line was read
            self.offsets.pop(path, None)
        return WriterEvents(path.stem, events, finished)
