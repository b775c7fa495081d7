"""Real Flower processes on 127.0.0.1 for end-to-end tests, stopped by PID afterwards."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
FEDHEAD = [sys.executable, "-m", "fedhead.cli.main"]


def interrupt_on_sigterm() -> None:
    """SIGTERM and SIGHUP (a CI timeout, ``timeout``, a closed terminal) end this process
    as Ctrl-C does, with KeyboardInterrupt: every ``finally`` and fixture teardown runs,
    so the processes, containers and volumes it started are stopped and removed.
    Python's default is to die at once, leaving them running."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def fedhead(*args: str) -> subprocess.CompletedProcess[str]:
    """``fedhead ARGS`` run to its end, its output captured."""
    return subprocess.run([*FEDHEAD, *args], capture_output=True, text=True, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll_until(
    condition: Callable[[], bool],
    what: str,
    timeout: float = 60.0,
    interval: float = 0.2,
    proc: subprocess.Popen[Any] | None = None,
) -> None:
    """Wait until ``condition()`` holds; fail naming ``what`` after ``timeout`` seconds,
    or at once if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {what}")
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"not {what} after {timeout}s")


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (Linux /proc; an exited child not yet reaped does not)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(
    port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    poll_until(lambda: port_open(port), f"listening on 127.0.0.1:{port}", timeout, proc=proc)


def descendant_commands(pid: int) -> list[str]:
    """Command lines of the live descendants of process ``pid`` (Linux /proc). Flower
    starts its helpers in sessions of their own, so parentage is what links them."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the name: state, ppid
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found = []
    for child in parents:
        ancestor = parents.get(child)
        while ancestor is not None and ancestor != pid and ancestor > 1:
            ancestor = parents.get(ancestor)
        if ancestor == pid:
            try:
                cmd = (Path("/proc") / str(child) / "cmdline").read_bytes()
            except OSError:
                continue
            found.append(cmd.replace(b"\0", b" ").decode())
    return found


@dataclass
class Processes:
    """Starts processes in their own process group; ``stop_all`` ends each group by PID."""

    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def start_listening(
        self, name: str, cmd: Sequence[str], env: dict[str, str], port: int
    ) -> subprocess.Popen[bytes]:
        """Start a server and wait until it listens on ``port`` (fail if it exits first)."""
        proc = self.start(name, cmd, env)
        wait_for_port(port, proc=proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the process and the app processes it started
            try:
                proc.wait(timeout=30)  # fedhead's wrappers stop what they started first
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@contextmanager
def processes(logs: Path) -> Iterator[Processes]:
    procs = Processes(logs)
    try:
        yield procs
    finally:
        procs.stop_all()


def server_cache(tmp: Path, weights: Path) -> Path:
    """A SuperLink's fedhead cache under ``tmp`` holding the backbone ``weights`` file."""
    cache = tmp / "server-cache"
    (cache / "weights").mkdir(parents=True)
    shutil.copy(weights, cache / "weights")
    return cache


def base_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update(
        FLWR_HOME=str(flwr_home),
        # fedhead's own state (the SuperLink's database): per test, never the user's
        FEDHEAD_HOME=str(flwr_home / "fedhead-home"),
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def site_threads(sites: int) -> int:
    """Each of ``sites`` co-located sites gets its share of the cores (``threads``)."""
    return max(1, (os.cpu_count() or 1) // sites)


def tls_superlink(certs: Path, port: int, *args: str) -> list[str]:
    """``fedhead superlink`` with the TLS files in ``certs``, on 127.0.0.1:``port``; its
    metrics exporter off unless ``args`` give it an address (its default is a fixed port)."""
    metrics = [] if "--metrics-address" in args else ["--metrics-address", "none"]
    return [
        *FEDHEAD,
        "superlink",
        "--certs-dir",
        str(certs),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *metrics,
        *args,
    ]


def plain_superlink(port: int) -> list[str]:
    """Flower's own SuperLink command, without TLS, on 127.0.0.1:``port``."""
    return [
        str(BIN / "flower-superlink"),
        "--insecure",
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def plain_supernode(link_port: int, node_config: str) -> list[str]:
    """Flower's own SuperNode command, without TLS, joining the SuperLink on ``link_port``."""
    return [
        str(BIN / "flower-supernode"),
        "--insecure",
        "--superlink",
        f"127.0.0.1:{link_port}",
        "--port",
        str(free_port()),
        "--node-config",
        node_config,
    ]


def write_flwr_connection(
    flwr_home: Path, name: str, port: int, root_certificates: Path | None = None
) -> None:
    """A SuperLink connection in $FLWR_HOME/config.toml, as `flwr run` expects it."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (
        f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "127.0.0.1:{port}"\n{security}\n'
    )


def new_connection(tmp: Path, name: str, root_certificates: Path | None = None) -> tuple[int, Path]:
    """A free port for the test's SuperLink, and a Flower home (``tmp``/flwr-home) whose
    default connection ``name`` points at it."""
    port, flwr_home = free_port(), tmp / "flwr-home"
    write_flwr_connection(flwr_home, name, port, root_certificates)
    return port, flwr_home


def flwr(flwr_home: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=base_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def npz_site(path: Path, site: int, n_sites: int, n_train: int = 120, n_val: int = 40) -> Path:
    """A small non-IID share of the embedded demo data, as a site's .npz file."""
    from fedhead.common import demo_data
    from tests.conftest import write_share_npz

    share = demo_data.shares(n_sites, alpha=1.0, seed=5)[site]
    return write_share_npz(path, share, n_train, n_val, seed=site)


SECAGG_RECORD = "secaggplus_configs"
SHA256 = re.compile(r"[0-9a-f]{64}")  # a digest (the delivered model's receipt)


def check_audit(
    path: Path, trainable_shapes: list[list[int]], closed_form: bool = False
) -> set[str]:
    """Every message a site sent: trainable tensors (masked under SecAgg+) and scalars.

    Returns the message types seen. SecAgg+ protocol records (public keys, encrypted key
    shares, the masked vector) are allowed, bounded in size: in a ``closed_form`` run
    (a linear head) the masked vector of the site's statistics may be as large as their
    values, 8 bytes each; anything else must be a short scalar: no image bytes, paths,
    per-sample values or label lists. Evaluation and validation replies may carry the
    pooled-metrics count tables, whose size the class count fixes.
    """
    import json

    from flwr.common.secure_aggregation.secaggplus_constants import Key

    from fedhead.common.closed_form import FixedPointCodec, Layout
    from fedhead.common.evaluation import ECE_BINS
    from fedhead.common.pooled import SCORE_BINS, STAT_KEYS
    from fedhead.common.protocol import MSG_VALIDATE, parse_model_requests

    types = set()
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        types.add(entry["message_type"])
        assert "error" not in entry, entry
        for rec_name, arrays in entry["arrays"].items():
            assert entry["message_type"] == "train" and rec_name == "fitres.parameters", entry
            if arrays:  # plain FedAvg; under SecAgg+ the record is emptied before sending
                assert [a["shape"] for a in arrays.values()] == trainable_shapes
                assert {a["dtype"] for a in arrays.values()} == {"float32"}
        for group in ("metrics", "configs"):
            for rec_name, rec in entry[group].items():
                for key, value in rec.items():
                    if rec_name == SECAGG_RECORD:
                        size: int = 8  # a scalar
                        if isinstance(value, dict):  # bytes or a list: described by size
                            size = value["bytes"] if "bytes" in value else value.get("len", 0)
                        most = 200_000
                        if key == Key.MASKED_PARAMETERS and closed_form:
                            classes, width = trainable_shapes[0]
                            # int64 digits per statistic, and the arrays' headers
                            digits = FixedPointCodec().limbs * Layout(classes, width).size
                            most = 8 * digits + 4096
                        assert size < most, (key, value)
                        continue
                    if key in STAT_KEYS:  # count tables for pooled metrics, fixed size
                        k = trainable_shapes[-1][0]  # classes: the head's bias
                        most = 8 * (k * k + 2 * k * SCORE_BINS + 3 * ECE_BINS)
                        # an evaluation: its own reply, a train reply evaluating its head
                        # or a validation reply (one record per candidate head)
                        assert entry["message_type"] in ("evaluate", MSG_VALIDATE) or (
                            entry["message_type"] == "train" and rec_name == "fitres.metrics"
                        ), entry
                        assert value["type"] == "bytes" and value["len"] <= most, (key, value)
                        continue
                    assert isinstance(value, int | float | str), (rec_name, key, value)
                    if key == "missing_models":  # earlier runs' ids and sha256 digests
                        parse_model_requests(str(value))
                        continue
                    if isinstance(value, str) and not SHA256.fullmatch(value):
                        # status words, never paths or label lists
                        assert len(value) < 40 and "/" not in value, (key, value)
    return types
