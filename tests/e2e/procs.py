"""Real Flower processes on 127.0.0.1 for end-to-end tests, stopped by PID afterwards."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before opening port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


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

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the process and the app processes it started
            try:
                proc.wait(timeout=15)
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


def base_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


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
    import numpy as np

    from fedhead.common import demo_data

    share = demo_data.shares(n_sites, alpha=1.0, seed=5)[site]
    rng = np.random.default_rng(site)
    tr = rng.choice(len(share.train.labels), min(n_train, len(share.train.labels)), replace=False)
    va = rng.choice(len(share.val.labels), min(n_val, len(share.val.labels)), replace=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        images=share.train.images[tr],
        labels=share.train.labels[tr],
        val_images=share.val.images[va],
        val_labels=share.val.labels[va],
    )
    return path


SECAGG_RECORD = "secaggplus_configs"
SHA256 = re.compile(r"[0-9a-f]{64}")  # a digest (the delivered model's receipt)


def check_audit(path: Path, trainable_shapes: list[list[int]]) -> set[str]:
    """Every message a site sent: trainable tensors (masked under SecAgg+) and scalars.

    Returns the message types seen. SecAgg+ protocol records (public keys, encrypted key
    shares, the masked vector) are allowed, bounded in size; anything else must be a
    short scalar: no image bytes, paths, per-sample values or label lists.
    """
    import json

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
                        size = (
                            value.get("bytes", value.get("len", 0))
                            if isinstance(value, dict)
                            else 8
                        )
                        assert size < 200_000, (key, value)
                        continue
                    assert isinstance(value, int | float | str), (rec_name, key, value)
                    if isinstance(value, str) and not SHA256.fullmatch(value):
                        # status words, never paths or label lists
                        assert len(value) < 40 and "/" not in value, (key, value)
    return types
