"""A site's warm worker: torch, the data and the features stay loaded between messages.

A SuperNode handles every message in a fresh ClientApp process; for a train or an
evaluate message that process would import torch and, on its first optimizer step,
torch's compiler stack: seconds of CPU per message, where the head's work itself
takes milliseconds on cached features. ``fedhead node`` therefore runs this worker in
its own long-lived process and names its socket in the node config (``worker-socket``).
The ClientApp keeps every check of its own (the ledger, the update checks, SecAgg+
masking, the audit log) and hands the worker only the site's work: train from a head,
or evaluate one (``client.steps``, the same code it runs in process otherwise).

Trust boundary: a Unix socket in a folder only the node's user may enter (0700), and
the standard library's authenticated connection (``multiprocessing.connection``, an
HMAC challenge on a 32-byte key that ``fedhead node`` draws at start and writes, 0600,
beside the socket; the ClientApps find it through the node config's
``worker-key-file``): the worker serves only processes of that user that hold the key,
which can read the site's data anyway. It answers with what a ClientApp would compute
(a head's tensors, scalars and count tables), to that process only: nothing it holds
goes anywhere else. A worker that fails or stops ends that message with an error
reply naming the problem (the details stay in the node's log), never a wait; an error
it raises arrives as the same fedhead error, with the same fields.

Wire format: after the challenge, a request and a reply are each two messages of the
connection: a JSON header and the arrays (``.npz``, read without pickles). Nothing
crossing the socket is unpickled.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhead.common import errors
from fedhead.common.errors import FederationError, FedheadError
from fedhead.common.protocol import FitSettings, RunSpec, StatisticsRequest

if TYPE_CHECKING:
    from fedhead.client.site import Site

log = logging.getLogger(__name__)

SOCKET_NAME = "worker.sock"
KEY_NAME = "worker.key"
MAX_MESSAGE = 1 << 30  # a head and its count tables are kilobytes to megabytes
REQUEST_SECONDS = 60.0  # how long the worker waits for a connected process's request
_BYTES = "bytes/"  # npz entries holding a metric's bytes (count tables)
_ARRAY = "array/"  # npz entries holding the head's tensors, in order


@dataclass(frozen=True)
class Trained:
    """A train message's answer: the trained tensors, the site's weight, the metrics."""

    arrays: list[np.ndarray]
    weight: int
    metrics: dict[str, Any]


# --- messages ----------------------------------------------------------------------
def _send(conn: Connection, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(buf.getbuffer())


def _recv(conn: Connection) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A header and its arrays; OSError (also for a message over MAX_MESSAGE bytes),
    EOFError or ValueError when they cannot be read."""
    header = json.loads(conn.recv_bytes(MAX_MESSAGE))
    if not isinstance(header, dict):
        raise ValueError("a header that is not a JSON object")
    with np.load(io.BytesIO(conn.recv_bytes(MAX_MESSAGE)), allow_pickle=False) as npz:
        return header, {k: npz[k] for k in npz.files}


def _split(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scalars for the header; bytes (count tables) as uint8 arrays."""
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, bytes)}
    blobs = {
        _BYTES + k: np.frombuffer(v, np.uint8) for k, v in metrics.items() if isinstance(v, bytes)
    }
    return scalars, blobs


def _join(scalars: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    blobs = {k[len(_BYTES) :]: v.tobytes() for k, v in arrays.items() if k.startswith(_BYTES)}
    return {**scalars, **blobs}


def _head(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{_ARRAY}{i}": a for i, a in enumerate(arrays)}


def _unhead(arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    keys = sorted((k for k in arrays if k.startswith(_ARRAY)), key=lambda k: int(k[len(_ARRAY) :]))
    return [arrays[k] for k in keys]


# --- the ClientApp's side ----------------------------------------------------------------
class RemoteSite:
    """The site's work, done by the node's worker at ``path`` (with the key in ``key_file``)."""

    def __init__(
        self, path: str, key_file: str, node_config: dict[str, Any], spec: RunSpec, run_id: int
    ) -> None:
        self.path = path
        self.key_file = key_file
        self.base = {"node": node_config, "spec": spec.to_dict(), "run_id": run_id}

    def train(self, arrays: list[np.ndarray], settings: FitSettings, evaluates: bool) -> Trained:
        header, out = self._call(
            {"op": "train", "settings": settings.to_dict(), "evaluates": evaluates}, arrays
        )
        return Trained(_unhead(out), int(header["weight"]), _join(header["metrics"], out))

    def evaluate(
        self, arrays: list[np.ndarray], statistics: bool
    ) -> tuple[float, int, dict[str, Any]]:
        header, out = self._call({"op": "evaluate", "statistics": statistics}, arrays)
        return float(header["loss"]), int(header["examples"]), _join(header["metrics"], out)

    def statistics(self, request: StatisticsRequest) -> tuple[np.ndarray, int]:
        header, out = self._call({"op": "statistics", "request": request.to_dict()}, [])
        return _unhead(out)[0], int(header["weight"])

    def _call(
        self, request: dict[str, Any], arrays: list[np.ndarray]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        try:
            key = Path(self.key_file).read_bytes()
        except OSError as err:
            raise FederationError(
                f"this node's worker key {self.key_file} cannot be read ({err.strerror})",
                "restart the node (fedhead node)",
            ) from err
        try:
            conn = Client(self.path, family="AF_UNIX", authkey=key)
        except (OSError, EOFError) as err:
            raise FederationError(
                f"this node's worker does not answer at {self.path} "
                f"({getattr(err, 'strerror', None) or type(err).__name__})",
                "restart the node (fedhead node)",
            ) from err
        except AuthenticationError as err:
            raise FederationError(
                f"this node's worker refused this process's key ({err})",
                "restart the node (fedhead node)",
            ) from err
        with conn:
            try:
                _send(conn, {**self.base, **request}, _head(arrays))
                header, out = _recv(conn)
            except (OSError, EOFError, ValueError) as err:
                raise FederationError(
                    f"this node's worker stopped while working ({type(err).__name__}: {err})",
                    "see the node's log; restart the node (fedhead node)",
                ) from err
        if not header.get("ok"):
            raise _error(header.get("error", {}))
        return header, out


def _error_types() -> dict[str, type[FedheadError]]:
    """fedhead's error classes, by name: the only types an error from the worker takes."""
    found: dict[str, type[FedheadError]] = {}
    todo: list[type[FedheadError]] = [FedheadError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == errors.__name__:
            found[cls.__name__] = cls
        todo += cls.__subclasses__()
    return found


def _describe_error(err: FedheadError) -> dict[str, Any]:
    """An error's type and fields (its attributes: what, hint, title, and those of its
    class, such as a ConfigError's problems), as JSON."""
    fields = {k: v for k, v in vars(err).items() if _is_json(v)}
    return {"type": type(err).__name__, "fields": fields}


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _error(info: dict[str, Any]) -> Exception:
    """The worker's error, raised here as the same kind of error with the same fields."""
    kind = _error_types().get(str(info.get("type", "")))
    fields = info.get("fields")
    if kind is None or not isinstance(fields, dict):
        return RuntimeError("the node's worker failed unexpectedly (details in the node's log)")
    err = kind.__new__(kind)
    err.__dict__.update(fields)
    Exception.__init__(err, FedheadError.__str__(err))
    return err


# --- the worker's side -------------------------------------------------------------------
class SiteWorker:
    """Answers the ClientApps' requests with this node's warm sites (one a run)."""

    def __init__(self) -> None:
        self.sites: dict[tuple[int, str], Site] = {}
        self.lock = threading.Lock()

    def handle(
        self, header: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        try:
            with self.lock:  # a SuperNode sends one message at a time; be sure of it
                return self._handle(header, arrays)
        except FedheadError as err:
            log.error("%s: %s", err.title, err)
            return {"ok": False, "error": _describe_error(err)}, {}
        except Exception:
            log.exception("the worker failed on a %s request", header.get("op"))
            return {"ok": False, "error": {"type": "unexpected"}}, {}

    def _handle(
        self, header: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        from fedhead.client import steps

        site = self._site(int(header["run_id"]), header["node"], header["spec"])
        head = _unhead(arrays)
        if header["op"] == "train":
            settings = FitSettings.from_mapping(header["settings"])
            trained = steps.train(
                site, int(header["run_id"]), head, settings, bool(header["evaluates"])
            )
            scalars, blobs = _split(trained.metrics)
            reply = {"ok": True, "weight": trained.weight, "metrics": scalars}
            return reply, {**_head(trained.arrays), **blobs}
        if header["op"] == "evaluate":
            loss, examples, metrics = steps.evaluate(site, head, bool(header["statistics"]))
            scalars, blobs = _split(metrics)
            return {"ok": True, "loss": loss, "examples": examples, "metrics": scalars}, blobs
        if header["op"] == "statistics":
            vector, weight = site.statistics(StatisticsRequest.from_mapping(header["request"]))
            return {"ok": True, "weight": weight}, _head([vector])
        raise FederationError(f"the worker does not know the request {header['op']!r}")

    def _site(self, run_id: int, node: dict[str, Any], spec: dict[str, Any]) -> Site:
        from fedhead.client.site import Site
        from fedhead.common.config import NodeConfig

        key = (run_id, json.dumps([node, spec], sort_keys=True))
        if key not in self.sites:
            self.sites = {k: v for k, v in self.sites.items() if k[0] == run_id}
            self.sites[key] = Site(NodeConfig.from_mapping(node), RunSpec.from_mapping(spec))
        return self.sites[key]


class WorkerService:
    """The worker listening on a socket in a fresh private folder, with a fresh key,
    served by a thread of this process until ``stop``."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fedhead-worker-"))  # 0700
        self.path = str(self.folder / SOCKET_NAME)
        self.key_file = str(self.folder / KEY_NAME)
        self._key = secrets.token_bytes(32)
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self._key)
        self.worker = SiteWorker()
        self.listener = Listener(self.path, family="AF_UNIX", authkey=self._key)
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="fedhead-worker", daemon=True)

    def start(self) -> WorkerService:
        self.thread.start()
        return self

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn = self.listener.accept()  # the key's challenge happens here
            except AuthenticationError as err:
                log.warning("the worker refused a connection without its key: %s", err)
                continue
            except (OSError, EOFError) as err:
                if self._stopping.is_set():
                    break
                log.warning("the worker dropped a connection: %s", err)
                continue
            with conn:
                if self._stopping.is_set():
                    break
                self._answer(conn)

    def _answer(self, conn: Connection) -> None:
        try:
            if not conn.poll(REQUEST_SECONDS):
                log.warning("the worker dropped a connection that sent no request")
                return
            header, arrays = _recv(conn)
        except (OSError, EOFError, ValueError) as err:
            log.warning("the worker dropped a request it could not read: %s", err)
            return
        try:
            _send(conn, *self.worker.handle(header, arrays))
        except (OSError, EOFError) as err:
            log.warning("the worker could not answer (the process left?): %s", err)

    def stop(self) -> None:
        self._stopping.set()
        if self.thread.is_alive():
            # Wake the accepting thread: its challenge to this connection fails, and it
            # sees the stop; a plain connect never waits for a thread that already left.
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
                sock.connect(self.path)
            self.thread.join(timeout=10)
        self.listener.close()
        shutil.rmtree(self.folder, ignore_errors=True)
