"""What a round costs in a real federation, against two references measured in the same run.

A real ``flower-superlink`` and ``flower-supernode`` processes on 127.0.0.1, started with
``fedhead superlink --insecure`` and ``fedhead node --insecure --allow-unsigned-apps``
(each node with its share of the cores, ``--threads``), run fedhead under SecAgg+. The
same SuperLink and SuperNodes then run Flower's floor (``benchmarks/floor``: a no-op app
that sends exactly the messages of a fedhead round), and the same sites and settings
run in Flower's Simulation Engine. Rounds after the first are compared (the first one
extracts and caches the features). Site-side costs per message (process start, imports,
model build, training) are measured beside them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FLOOR_APP = Path(__file__).resolve().parent / "floor"
BIN = Path(sys.executable).parent
TRAINED = re.compile(r"trained on \d+ examples in ([0-9.]+)s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found = []
    for child in parents:
        up = parents.get(child)
        while up is not None and up != pid and up > 1:
            up = parents.get(up)
        if up == pid:
            found.append(child)
    return found


@contextmanager
def _processes(logs: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start processes (own session, log file each); stop each and its helpers by PID."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = (logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(started):
            helpers = _descendants(proc.pid)  # Flower's helpers run in sessions of their own
            for pid in [proc.pid, *helpers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)


def _env(flwr_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    flwr_home.mkdir(parents=True, exist_ok=True)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def _write_sites(folder: Path, sites: int, n_train: int, n_val: int) -> None:
    from fedhead.common import demo_data
    from fedhead.common.simulation import write_site_npz

    train, test = demo_data.load("train"), demo_data.load("test")
    rng = np.random.default_rng(3)
    for i in range(sites):
        tr = rng.choice(len(train.labels), n_train, replace=False)
        va = rng.choice(len(test.labels), n_val, replace=False)
        write_site_npz(
            folder / f"site-{i}.npz",
            demo_data.Split(train.images[tr], train.labels[tr]),
            demo_data.Split(test.images[va], test.labels[va]),
        )


def _flwr_run(app: Path, cli_home: Path, run_config: str, timeout: float) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "bench", "--stream", "--run-config", run_config],
        env=_env(cli_home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"flwr run {app.name} failed:\n{result.stdout[-3000:]}{result.stderr}")
    return time.perf_counter() - t0


def _seconds(cmd: str, repeats: int = 3) -> float:
    """Median wall seconds of a fresh Python process running ``cmd``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", cmd], check=True, env=os.environ.copy())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def site_message_costs(weights: Path) -> dict[str, float]:
    """What one per-message ClientApp process pays before and besides its handler."""
    bare = _seconds("pass")
    flower = _seconds("import flwr.supernode.cli, flwr.clientapp, flwr.client.mod")
    app = _seconds("import flwr.supernode.cli, fedhead.client.app")
    site = _seconds("import flwr.supernode.cli, fedhead.client.app, fedhead.client.site")
    probe = (
        "import time, sys; from pathlib import Path\n"
        "import torch, fedhead.client.site\n"
        "from fedhead.common.backbones import get_spec\n"
        "from fedhead.common.config import RunConfig\n"
        "from fedhead.common.model import FedHeadModel, load_backbone\n"
        "spec, cfg = get_spec('mobilenet_v2'), RunConfig.from_mapping({'classes': 'a,b'})\n"
        "t0 = time.perf_counter()\n"
        "FedHeadModel.for_run(spec, None, cfg)\n"
        "t1 = time.perf_counter()\n"
        "torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)\n"
        "t2 = time.perf_counter()\n"
        f"FedHeadModel.for_run(spec, load_backbone(spec, Path({str(weights)!r})), cfg)\n"
        "t3 = time.perf_counter()\n"
        "print(t1 - t0, t2 - t1, t3 - t2)\n"
    )
    runs = [
        [
            float(x)
            for x in subprocess.run(
                [sys.executable, "-c", probe], check=True, capture_output=True, text=True
            ).stdout.split()
        ]
        for _ in range(3)
    ]
    head, optim, full = (statistics.median(r[i] for r in runs) for i in range(3))
    return {
        "process_start": bare,
        "flower_imports": flower - bare,
        "fedhead_app_imports": app - flower,
        "torch_site_imports": site - app,
        "head_build": head,
        "optimizer_first_use": optim,  # torch.optim imports torch._dynamo on first use
        "full_model_build": full,  # backbone file loaded: only when features are missing
    }


def deployment_rounds(
    data: Path, weights: Path, sites: int, rounds: int, work: Path
) -> dict[str, Any]:
    """fedhead and Flower's floor on one real SuperLink and ``sites`` SuperNodes."""
    threads = max(1, (os.cpu_count() or 1) // sites)  # co-located sites share the cores
    link_port = _free_port()
    cli_home = work / "cli-home"
    cli_home.mkdir(parents=True)
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    server_cache = work / "server-cache"
    (server_cache / "weights").mkdir(parents=True)
    shutil.copy(weights, server_cache / "weights")
    fedhead_cli = [sys.executable, "-m", "fedhead.cli.main"]
    no_metrics = ["--metrics-address", "none"]
    logs = work / "logs"
    logs.mkdir()
    out = work / "fedhead-out"
    floor_files = [work / "floor-a.jsonl", work / "floor-b.jsonl"]
    with _processes(logs) as start:
        link = start(
            "superlink",
            [*fedhead_cli, "superlink", "--insecure", "--port", str(link_port), *no_metrics],
            _env(work / "link-home", FEDHEAD_CACHE=str(server_cache), FEDHEAD_LOG_LEVEL="ERROR"),
        )
        _wait_for_port(link_port, link)
        for i in range(sites):
            cache = work / f"node{i}"
            (cache / "weights").mkdir(parents=True)
            shutil.copy(weights, cache / "weights")
            start(
                f"node{i}",
                [
                    *(*fedhead_cli, "node", "--superlink", f"127.0.0.1:{link_port}"),
                    *("--port", str(_free_port()), "--data", str(data / f"site-{i}.npz")),
                    *("--cache-dir", str(cache), "--device", "cpu", "--threads", str(threads)),
                    *("--insecure", "--allow-unsigned-apps", *no_metrics),
                ],
                _env(work / f"node{i}-home", FEDHEAD_LOG_LEVEL="INFO"),
            )
        floor_cfg = f"num-server-rounds={rounds} sites={sites} out-file="
        # floor, fedhead, floor: both see the same machine state on average
        _flwr_run(FLOOR_APP, cli_home, f"{floor_cfg}'{floor_files[0]}'", 900)
        _flwr_run(
            REPO,
            cli_home,
            f"num-server-rounds={rounds} input-size=64 min-sites={sites} "
            f"fraction-evaluate=1.0 join-timeout=300.0 round-timeout=600.0 out-dir='{out}'",
            3600,
        )
        _flwr_run(FLOOR_APP, cli_home, f"{floor_cfg}'{floor_files[1]}'", 900)
    report = json.loads((out / "report.json").read_text())
    later = [r for r in report["rounds"] if r["round"] >= 2]
    floor = [
        json.loads(line)["seconds"]
        for f in floor_files
        for line in f.read_text().splitlines()
        if json.loads(line)["round"] >= 2
    ]
    stages: dict[str, float] = {}
    for name in later[0]["secagg_seconds"]:
        stages[name] = statistics.mean(r["secagg_seconds"][name] for r in later)
    stages["evaluate"] = statistics.mean(
        r["seconds"] - sum(r["secagg_seconds"].values()) for r in later
    )
    # each site's training in rounds 2.. (its first round extracts the features)
    trained = [
        float(t)
        for i in range(sites)
        for t in TRAINED.findall((logs / f"node{i}.log").read_text())[1:]
    ]
    return {
        "threads": threads,
        "fedhead": statistics.mean(r["seconds"] for r in later),
        "floor": statistics.mean(floor),
        "stages": stages,
        "train": statistics.mean(trained),
    }


def measure(
    simulate: Callable[[dict[str, Any], int], Any], sites: int, rounds: int, n_train: int
) -> dict[str, Any]:
    """Deployment, Flower's floor and the Simulation Engine, side by side."""
    from fedhead.common.backbones import get_spec
    from fedhead.common.model import weights_ref
    from fedhead.common.weights import default_search_dirs, find_weights

    weights = find_weights(weights_ref(get_spec("mobilenet_v2")), default_search_dirs())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "sites"
        _write_sites(data, sites, n_train, n_train // 3)
        deployed = deployment_rounds(data, weights, sites, rounds, work / "deploy")
        report = simulate(
            {
                "input-size": 64,
                "num-server-rounds": rounds,
                "simulation-data": str(data),
                "fraction-evaluate": 1.0,
                "secure-aggregation": True,
            },
            sites,
        )
        simulated = statistics.mean(r.seconds for r in report.rounds if r.round >= 2)
    costs = site_message_costs(weights)
    return {**deployed, "simulated": simulated, "costs": costs, "rounds": rounds}
