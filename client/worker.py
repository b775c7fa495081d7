"""A site's warm worker: torch, the data and the features stay loaded between messages.

A SuperNode handles every message in a fresh ClientApp process; for a train or an
evaluate message that process would import torch and, on its first optimizer step,
torch's compiler stack: seconds of CPU per message, where the head's work itself
takes milliseconds on cached features. ``fedhead node`` therefore runs this worker in
its own long-lived process and names its socket in the node config (``worker-socket``).
The ClientApp keeps every check of its own (the ledger, the update checks, SecAgg+
masking, the audit log) and hands the worker only the site's work: train from a head,
or evaluate one (``client.steps``, the same code it runs in process otherwise).

Trust boundary: a Unix socket in a folder only the node's user may enter (0700); the
worker serves whatever connects through it, that is the user's own processes, which
can read the site's data anyway. It answers with what a ClientApp would compute (a
head's tensors, scalars and count tables), to that process only: nothing it holds
goes anywhere else. A worker that fails or stops ends that message with an error
reply naming the problem (the details stay in the node's log), never a wait.

Wire format: frames of a 4-byte big-endian length and a body. A request and a reply
are each a JSON header frame and an arrays frame (``.npz``, read without pickles).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import socketserver
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhead.common import errors
from fedhead.common.errors import FederationError, FedheadError
from fedhead.common.protocol import FitSettings, RunSpec

if TYPE_CHECKING:
    from fedhead.client.site import Site

log = logging.getLogger(__name__)

SOCKET_NAME = "worker.sock"
MAX_FRAME = 1 << 30  # a head and its count tables are kilobytes to megabytes
_BYTES = "bytes/"  # npz entries holding a metric's bytes (count tables)
_ARRAY = "array/"  # npz entries holding the head's tensors, in order


@dataclass(frozen=True)
class Trained:
    """A train message's answer: the trained tensors, the site's weight, the metrics."""

    arrays: list[np.ndarray]
    weight: int
    metrics: dict[str, Any]


# --- frames ------------------------------------------------------------------------
def _send(sock: socket.socket, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    for body in (json.dumps(header).encode(), buf.getvalue()):
        sock.sendall(struct.pack(">I", len(body)) + body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    frames = []
    for _ in range(2):
        (size,) = struct.unpack(">I", _recv_exactly(sock, 4))
        if size > MAX_FRAME:
            raise ConnectionError(f"a frame of {size} bytes, more than {MAX_FRAME}")
        frames.append(_recv_exactly(sock, size))
    header = json.loads(frames[0])
    if not isinstance(header, dict):
        raise ConnectionError("a header that is not a JSON object")
    with np.load(io.BytesIO(frames[1]), allow_pickle=False) as npz:
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
    """The site's work, done by the node's worker at ``path``."""

    def __init__(self, path: str, node_config: dict[str, Any], spec: RunSpec, run_id: int) -> None:
        self.path = path
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

    def _call(
        self, request: dict[str, Any], arrays: list[np.ndarray]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(self.path)
            except OSError as err:
                raise FederationError(
                    f"this node's worker does not answer at {self.path} ({err.strerror})",
                    "restart the node (fedhead node)",
                ) from err
            try:
                _send(sock, {**self.base, **request}, _head(arrays))
                header, out = _recv(sock)
            except (OSError, ValueError) as err:
                raise FederationError(
                    f"this node's worker stopped while working ({err})",
                    "see the node's log; restart the node (fedhead node)",
                ) from err
        if not header.get("ok"):
            raise _error(header.get("error", {}))
        return header, out


def _error(info: dict[str, Any]) -> Exception:
    """The worker's error, raised here as the same kind of error with the same line."""
    kind = getattr(errors, str(info.get("type", "")), None)
    if isinstance(kind, type) and issubclass(kind, FedheadError):
        err = kind.__new__(kind)
        FedheadError.__init__(err, str(info.get("what", "")), str(info.get("hint", "")))
        err.title = str(info.get("title", kind.title))
        return err
    return RuntimeError("the node's worker failed unexpectedly (details in the node's log)")


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
            kind = type(err).__name__
            info = {"type": kind, "what": err.what, "hint": err.hint, "title": err.title}
            return {"ok": False, "error": info}, {}
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
        raise FederationError(f"the worker does not know the request {header['op']!r}")

    def _site(self, run_id: int, node: dict[str, Any], spec: dict[str, Any]) -> Site:
        from fedhead.client.site import Site
        from fedhead.common.config import NodeConfig

        key = (run_id, json.dumps([node, spec], sort_keys=True))
        if key not in self.sites:
            self.sites = {k: v for k, v in self.sites.items() if k[0] == run_id}
            self.sites[key] = Site(NodeConfig.from_mapping(node), RunSpec.from_mapping(spec))
        return self.sites[key]


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        try:
            header, arrays = _recv(self.request)
        except (OSError, ValueError) as err:
            log.warning("the worker dropped a request it could not read: %s", err)
            return
        _send(self.request, *self.server.worker.handle(header, arrays))


class _Server(socketserver.UnixStreamServer):
    def __init__(self, path: str, worker: SiteWorker) -> None:
        self.worker = worker
        super().__init__(path, _Handler)


class WorkerService:
    """The worker listening on a socket in a fresh private folder, served by a thread
    of this process until ``stop``."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fedhead-worker-"))  # 0700
        self.path = str(self.folder / SOCKET_NAME)
        self.server = _Server(self.path, SiteWorker())
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="fedhead-worker", daemon=True
        )

    def start(self) -> WorkerService:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.folder, ignore_errors=True)
