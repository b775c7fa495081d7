"""Checks ``fedhead superlink`` and ``fedhead node`` make before starting Flower's process,
and hints for the ways Flower's process is known to fail.

Each check turns a failure a user would otherwise meet later, or only as a retry loop
in Flower's log, into one line naming the problem and what to do.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedhead.common.errors import ConfigError, DataError, SetupError

# flower-supernode's exit code when the SuperLink refuses to activate the node (with
# node authentication on: a key it does not know); flwr.supercore.exit.ExitCode. The
# process itself exits 1 for every error; the code is only in its log, in the form
# Flower prints for every exit ("Exit Code: <n>").
SUPERNODE_CONNECTION_ERROR = 305
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXIT_LINE = re.compile(r"Exit Code: (\d+)\s*$")
# A SuperLink back within a minute still counts a site's previous session online for
# two heartbeats (Flower's HEARTBEAT_PATIENCE x 30 s) and refuses to activate the key
# meanwhile, with the same error as an unregistered key: a node refused as it joins is
# given up only once such refusals have lasted longer than that.
REFUSED_GRACE_SECONDS = 90.0

if TYPE_CHECKING:
    from fedhead.common.datasets import ReadPolicy
    from fedhead.common.dicom import ReaderSettings


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError([f"{text!r} is not HOST:PORT (for example 127.0.0.1:9400)"], "address")
    return host, int(port)


def ensure_port_free(host: str, port: int, what: str, flag: str = "--host") -> None:
    """SetupError (exit 7) when ``host:port`` cannot be bound, before Flower (or nginx)
    tries; ConfigError naming ``flag`` for a host that does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ConfigError([f"{flag}: cannot resolve {host!r} ({err.strerror})"]) from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            s.bind(address)
        except OSError as err:
            raise SetupError(
                f"{what} port {host}:{port} is not available ({err.strerror or err})",
                f"stop what uses it, or choose another {'--port' if flag == '--host' else flag}",
            ) from err


def require_data(path: Path, flag: str = "--data") -> None:
    """DataError at once for data that cannot hold one image: a path that is missing,
    unreadable, an empty file, or a folder with no file at any depth. It runs before
    anything heavy is imported (reading images needs torch: seconds, a minute on a busy
    machine)."""
    if not path.exists():
        raise DataError(f"{flag} {path} does not exist", "point it at the site's images")
    if not os.access(path, os.R_OK):
        raise DataError(f"{flag} {path} is not readable", "give this user read access")
    if path.is_dir() and not _holds_a_file(path):
        raise DataError(
            f"{flag} {path} holds no files",
            "put the site's images there (a folder per class, a .csv or an .npz)",
        )
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{flag} {path} is empty", "point it at the site's images")


def _holds_a_file(folder: Path) -> bool:
    """Whether any file lies below ``folder`` (symlinked folders followed, once each)."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        if files:
            return True
    return False


def check_node_data(
    path: Path,
    classes: list[str] | None,
    policy: ReadPolicy | None = None,
    reader: ReaderSettings | None = None,
) -> None:
    """Refuse to join with data that cannot be used.

    With the run's classes: the full check of ``fedhead data check`` (every image read).
    Without them: the path must be readable and hold something.
    """
    require_data(path)
    if classes:
        from fedhead.cli.data import check_site_data

        check_site_data(path, classes, policy=policy, reader=reader)


def probe_tls(address: str, insecure: bool, timeout: float = 5.0) -> bool:
    """Compare the node's TLS choice with what the SuperLink speaks, when it can be reached.

    A plaintext node against a TLS SuperLink (or the reverse) would otherwise retry for
    minutes without saying why. Returns False when undecided (SuperLink not reachable:
    the node waits for it as usual), True when the choices match; ConfigError otherwise.
    """
    host, port = parse_address(address)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return False
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only asking whether it speaks TLS at all
    with raw:
        try:
            with context.wrap_socket(raw, server_hostname=host):
                speaks_tls = True
        except ssl.SSLError:
            speaks_tls = False
        except OSError:
            return False  # reset or timed out: undecided, let the node try
    if insecure and speaks_tls:
        raise ConfigError(
            [
                f"--insecure: the SuperLink at {address} uses TLS; start the node with "
                "--root-certificates ca.crt --auth-key <site>.key instead of --insecure"
            ]
        )
    if not insecure and not speaks_tls:
        raise ConfigError(
            [
                f"--root-certificates: the SuperLink at {address} does not use TLS (it was "
                "started with --insecure); ask the operator to start it with TLS"
            ]
        )
    return True


# A node refused this soon after it started was refused as it joined (an unregistered
# key); one that fails later lost a SuperLink it had joined.
JOIN_SECONDS = 60.0


class NodeWatch:
    """Beside a running SuperNode: probes the SuperLink until it answers and stops the
    node on a TLS mismatch (Flower's node would retry for minutes); then explains the
    node's exit code."""

    def __init__(self, superlink: str, insecure: bool, authenticated: bool) -> None:
        self.superlink = superlink
        self.insecure = insecure
        self.authenticated = authenticated
        self.problem: ConfigError | None = None
        self.flower_code: int | None = None  # the exit code flower-supernode logged
        self.started = time.monotonic()  # when the current node process started
        self.code_after = 0.0  # seconds after its start that it logged its exit code
        self.first_refused: float | None = None  # refused as it joined, since when

    def line(self, text: str) -> None:
        if match := _EXIT_LINE.search(_ANSI.sub("", text)):
            self.flower_code = int(match.group(1))
            self.code_after = time.monotonic() - self.started

    def __call__(self, child: subprocess.Popen[bytes], every: float = 2.0) -> None:
        self.started, self.flower_code = time.monotonic(), None  # a new node process
        while child.poll() is None:
            try:
                if probe_tls(self.superlink, self.insecure):
                    return
            except ConfigError as err:
                self.problem = err
                child.terminate()
                return
            time.sleep(every)

    def permanent(self) -> bool:
        """A TLS mismatch, or a node refused as it joined (its key is not registered):
        starting it again cannot help. A node that ran for a while before it lost its
        SuperLink (a restart), or one refused while the SuperLink still counts its
        previous session online, is started again."""
        refused_at_start = (
            self.flower_code == SUPERNODE_CONNECTION_ERROR and self.code_after < JOIN_SECONDS
        )
        if not refused_at_start:
            self.first_refused = None
            return self.problem is not None
        now = time.monotonic()
        self.first_refused = self.first_refused or now
        return self.problem is not None or now - self.first_refused > REFUSED_GRACE_SECONDS

    def explain(self, code: int) -> int:
        if self.problem is not None:
            raise self.problem
        if self.flower_code is not None:
            explain_node_exit(self.flower_code, self.authenticated)
        return code


def explain_node_exit(flower_code: int, authenticated: bool) -> None:
    """SetupError with the fix for the refusals flower-supernode reports by ``flower_code``."""
    if flower_code == SUPERNODE_CONNECTION_ERROR and authenticated:
        raise SetupError(
            "the SuperLink refused this node (its public key is not registered there, or "
            "this machine's clock is more than 5 minutes off)",
            "send <site>.pub to the operator to run `.venv/bin/flwr supernode register "
            "<site>.pub <connection>`, then start the node again",
        )
    if flower_code == SUPERNODE_CONNECTION_ERROR:
        raise SetupError(
            "the SuperLink refused this node", "see the SuperNode's log above for the reason"
        )


def site_name_arg(text: str) -> str:
    """argparse type for ``--name``: the label rules the server applies (common.protocol)."""
    import argparse

    from fedhead.common.protocol import valid_site_name

    if not valid_site_name(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: letters, digits, '.', '_' and '-' only, starting with a letter or "
            "digit, at most 32 characters"
        )
    return text
