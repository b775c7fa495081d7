"""Keeping a Flower process running with a metrics exporter (and, for a SuperLink, the
nginx proxy) beside it: ``fedhead superlink`` and ``fedhead node`` run Flower's program
as a child, relay its output, forward signals and start it again when it exits.

Flower's programs start helpers in sessions of their own (the SuperLink's SuperExec,
which starts one ``flwr-serverapp`` per run), so a SuperLink that dies can leave a
ServerApp running with nobody to talk to. The supervisor becomes their "subreaper"
(Linux ``PR_SET_CHILD_SUBREAPER``): whatever its child leaves behind is handed to it,
and it stops those processes before it starts the child again or exits. Every event
(an exit, a restart, a process stopped, a stop asked for) is one line on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol

from fedhead.cli.exporter import Exporter, prepare_spool
from fedhead.common.telemetry import SPOOL_ENV

# How long a process asked to stop (SIGTERM, SIGINT) may take before it is killed. A
# SuperLink otherwise waits for every connection to close, which can take a minute.
STOP_GRACE_SECONDS = 5.0
# Flower's helpers look for their parent every 0.2 s (flwr/supercore/app_utils.py).
SETTLE_SECONDS = 1.0
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37
_PR_SET_PDEATHSIG = 1


# Flower exit codes after which starting the same command again cannot help (bad
# arguments, keys, certificates or addresses): the supervisor gives up on these.
def _permanent_exits() -> frozenset[int]:
    from flwr.supercore.exit import ExitCode

    return frozenset(
        {
            2,  # argparse: bad command line
            ExitCode.SUPERLINK_INVALID_ARGS,
            ExitCode.SUPERLINK_DATABASE_SCHEMA_MISMATCH,
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


def _say(text: str) -> None:
    print(f"fedhead: {text}", file=sys.stderr, flush=True)


def _relay(child: subprocess.Popen[bytes], watcher: ChildWatcher) -> None:
    """Copy the child's output to stderr, line by line, showing each to the watcher."""
    assert child.stdout is not None
    for raw in child.stdout:
        sys.stderr.buffer.write(raw)
        sys.stderr.flush()
        watcher.line(raw.decode(errors="replace"))


def _how_it_ended(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


# --- what a child leaves behind ---------------------------------------------------------
def _set_subreaper(on: bool) -> bool:
    """Adopt (or stop adopting) the orphaned descendants of this process's children;
    returns the previous setting. Linux only: elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    before = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(before), 0, 0, 0)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    return bool(before.value)


def _stopped_with_this_process() -> Callable[[], None] | None:
    """For ``Popen(preexec_fn=...)``: the child gets SIGTERM when this process dies,
    even killed (SIGKILL, the OOM killer), so a SuperLink or SuperNode never outlives
    its supervisor holding its port. Linux only (elsewhere None: nothing changes)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


def _children() -> dict[int, str]:
    """The live (not yet reaped) children of this process: pid -> program name."""
    me, found = os.getpid(), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.find("(") + 1 : text.rfind(")")], text.rsplit(")", 1)[1].split()
        if len(rest) > 1 and rest[1] == str(me):
            found[int(stat.parent.name)] = _command_name(int(stat.parent.name), name)
    return found


def _command_name(pid: int, fallback: str) -> str:
    """The program a process runs (``flwr-serverapp``, not ``python3``)."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return fallback
    words = [Path(a.decode(errors="replace")).name for a in argv[:2] if a]
    if len(words) == 2 and words[0].startswith("python"):
        return words[1]
    return words[0] if words else fallback


def _reap(pid: int) -> bool:
    """True once ``pid`` (an adopted child) has exited and was reaped."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True  # not ours (any more)
    return done == pid


@dataclass
class _Leftovers:
    """Processes a supervised child left behind, handed to this process by the kernel."""

    ours: set[int]  # children this process had before: never touched
    stopped: list[str] = field(default_factory=list)

    def find(self, keep: Sequence[int]) -> dict[int, str]:
        return {p: n for p, n in _children().items() if p not in self.ours and p not in keep}

    def reap(self, keep: Sequence[int]) -> None:
        """Reap adopted processes that have exited (no zombies pile up)."""
        for pid in self.find(keep):
            _reap(pid)

    def stop(
        self,
        keep: Sequence[int],
        owner: str,
        grace: float = STOP_GRACE_SECONDS,
        settle: float = SETTLE_SECONDS,
    ) -> None:
        """SIGTERM every adopted process (a stopped SuperExec hands its ServerApps on, so
        look again until none is left), SIGKILL what is left after ``grace`` seconds.
        Flower's helpers watch their parent and end by themselves once it is gone: they
        get ``settle`` seconds to do so first (a ServerApp that ends so says its run
        failed)."""
        settled = time.monotonic() + settle
        while self.find(keep) and time.monotonic() < settled:
            self.reap(keep)
            time.sleep(0.1)
        deadline = time.monotonic() + grace
        signalled: dict[int, int] = {}
        while found := self.find(keep):
            now = time.monotonic()
            if now >= deadline + grace:
                break  # a process that survives SIGKILL is not ours to wait for
            for pid, name in found.items():
                if _reap(pid):
                    continue
                sig = signal.SIGKILL if now >= deadline else signal.SIGTERM
                if signalled.get(pid) == sig:
                    continue
                if pid not in signalled:
                    self.stopped.append(f"{name} {pid}")
                    _say(f"stopping {name} (pid {pid}), left running by {owner}")
                signalled[pid] = sig
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(0.1)


# --- the supervisor -----------------------------------------------------------------
def _stop(proc: subprocess.Popen[bytes], signum: int, grace: float) -> bool:
    """Signal ``proc``'s process group, wait up to ``grace`` seconds, then kill it.
    Returns True if it had to be killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)
    try:
        proc.wait(timeout=grace)
        return False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


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
    grace: float = STOP_GRACE_SECONDS,
) -> int:
    """Run ``cmd`` with an exporter beside it (unless ``address`` is none); forward
    signals; return its exit code (0 when a signal asked it to stop and it did).
    ``spool``: the events folder (default: a fresh one).

    ``companion``: a process (the proxy in front of a SuperLink) that lives as long as
    the supervisor; if it ends first, ``cmd`` is stopped and the companion's exit code
    returned. ``restart``: a child that exits on its own (a SuperLink that crashed, a
    SuperNode whose SuperLink went away or forgot it) is started again after a growing
    pause (``backoff``: first and longest, in seconds), one line per attempt, until a
    signal stops the supervisor or the child fails in a way a restart cannot fix; the
    exporter (and its counters) and the companion stay up meanwhile.
    ``watcher``: runs beside each child (it may stop it) and sees each line of its
    output, which is relayed to stderr; it can tell that a restart cannot help.
    ``grace``: seconds a process asked to stop may take before it is killed.
    """
    name = Path(cmd[0]).name
    spool = spool or prepare_spool()
    exporter = Exporter(roles, spool) if address != "none" else None
    if exporter is not None:
        exporter.start(address)
    child_env = {**(env or os.environ), SPOOL_ENV: str(spool)}
    leftovers = _Leftovers(set(_children()))
    was_subreaper = _set_subreaper(True)
    # Children get sessions of their own: a terminal's Ctrl-C reaches this process
    # only, which stops them in order; their process groups are signalled as one.
    # They also get SIGTERM should this process die without stopping them.
    with_us = _stopped_with_this_process()
    helper = (
        subprocess.Popen(companion, start_new_session=True, preexec_fn=with_us)
        if companion
        else None
    )
    readers: list[threading.Thread] = []

    def start_child() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            cmd,
            env=child_env,
            stdout=subprocess.PIPE if watcher else None,
            stderr=subprocess.STDOUT if watcher else None,
            start_new_session=True,
            preexec_fn=with_us,
        )
        if watcher is not None:  # checks beside the child (may stop it); sees its output
            threading.Thread(
                target=watcher, args=(proc,), name="fedhead-watch", daemon=True
            ).start()
            readers.append(threading.Thread(target=_relay, args=(proc, watcher), daemon=True))
            readers[-1].start()
        return proc

    stop = threading.Event()  # a signal asked us to stop
    asked: list[int] = []
    companion_ended = threading.Event()
    finishing = threading.Event()  # this supervisor stops the companion itself

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        asked.append(signum)
        stop.set()

    previous = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    if helper is not None and companion is not None:

        def watch_companion() -> None:
            helper.wait()
            if not stop.is_set() and not finishing.is_set():
                companion_ended.set()
                stop.set()

        threading.Thread(target=watch_companion, daemon=True).start()
    keep = [helper.pid] if helper else []
    permanent = _permanent_exits() if restart else frozenset()
    delay, attempt, code, killed = backoff[0], 0, 0, False
    child = start_child()
    try:
        while True:
            started = time.monotonic()
            ticks = 0
            while child.poll() is None and not stop.wait(0.5):
                ticks += 1
                if ticks % 10 == 0:  # reap what an exited helper of the child left
                    leftovers.reap([*keep, child.pid])
            if child.poll() is None:  # asked to stop, or the companion ended
                if companion_ended.is_set():
                    _say(
                        f"{Path(companion[0]).name if companion else 'companion'} exited with "
                        f"{helper.returncode if helper else '?'}; stopping {name}"
                    )
                else:
                    signame = signal.Signals(asked[0]).name if asked else "a signal"
                    _say(f"{signame}: stopping {name} and everything started beside it")
                if helper is not None and helper.poll() is None:
                    finishing.set()
                    helper.terminate()
                killed = _stop(child, asked[0] if asked else signal.SIGTERM, grace)
                if killed:
                    _say(f"{name} did not stop within {grace:g} s; killed it")
            code = child.wait()
            leftovers.stop(keep, name, grace)  # they may hold the child's output open
            for reader in readers:
                reader.join(timeout=5)
            readers.clear()
            if stop.is_set():
                break
            given_up = watcher is not None and watcher.permanent()
            if not restart or code == 0 or code in permanent or given_up:
                _say(f"{name} {_how_it_ended(code)}" + ("; not starting it again" * restart))
                break
            if time.monotonic() - started > backoff[1]:  # it ran well for a while
                delay, attempt = backoff[0], 0
            attempt += 1
            _say(
                f"{name} {_how_it_ended(code)}; starting it again in {delay:.0f}s "
                f"(attempt {attempt})"
            )
            if stop.wait(delay):
                break
            child = start_child()
            delay = min(delay * 2, backoff[1])
    finally:
        finishing.set()
        if helper is not None and helper.poll() is None:
            _stop(helper, signal.SIGTERM, grace)
        leftovers.stop(keep, name, grace)
        _set_subreaper(was_subreaper)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if exporter is not None:
            exporter.stop()
        for path in spool.glob("*"):
            path.unlink(missing_ok=True)
        spool.rmdir()
    if companion_ended.is_set() and helper is not None:
        return helper.returncode or 1
    if stop.is_set():  # asked to stop: a child that stopped, or was stopped, ended cleanly
        return 0 if code == 0 or killed or (asked and code == -asked[0]) else code
    return code
