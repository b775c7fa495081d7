"""Keeping a Flower process running with a metrics exporter (and, for a SuperLink, the
nginx proxy) beside it: ``fedhead superlink`` and ``fedhead node`` run Flower's program
as a child, relay its output, forward signals and start it again when it exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Protocol

from fedhead.cli.exporter import Exporter, prepare_spool
from fedhead.common.telemetry import SPOOL_ENV


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
