"""What a round costs in a real federation, against three references measured in the
same run.

A real ``flower-superlink`` and ``flower-supernode`` processes on 127.0.0.1, started with
``fedhead superlink --insecure`` and ``fedhead node --insecure --allow-unsigned-apps``
(each node with its share of the cores, ``--threads``), run fedhead under SecAgg+ and
without it. The same SuperLink and SuperNodes run Flower's floor (``benchmarks/floor``:
a no-op app that sends exactly the messages of a fedhead round under SecAgg+) before
and after fedhead, and the canonical Flower pattern (``benchmarks/canonical``: the
whole model each round, the trunk recomputed every epoch, plain FedAvg); the same
sites and settings then run in Flower's Simulation Engine. Rounds after the first are
compared (fedhead's first extracts and caches the features). Site-side costs per
message (process start, imports, model build, training) are measured beside them.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedhead.server.report import RunReport

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the process helpers of the end-to-end tests
from tests.e2e import procs  # noqa: E402

FLOOR_APP = Path(__file__).resolve().parent / "floor"
CANONICAL_APP = Path(__file__).resolve().parent / "canonical"
TRAINED = re.compile(r"trained on \d+ examples in ([0-9.]+)s")


def _write_sites(folder: Path, sites: int, n_train: int, n_val: int) -> int:
    """Each site's share of the bundled chest X-rays (distinct images); returns the
    training images per site."""
    from fedhead.common import demo_data
    from fedhead.common.simulation import write_site_npz

    train, val = demo_data.load("train"), demo_data.load("val")
    rng = np.random.default_rng(3)
    order_t, order_v = rng.permutation(len(train.labels)), rng.permutation(len(val.labels))
    per_t, per_v = min(n_train, len(order_t) // sites), min(n_val, len(order_v) // sites)
    for i in range(sites):
        tr, va = order_t[i * per_t : (i + 1) * per_t], order_v[i * per_v : (i + 1) * per_v]
        write_site_npz(
            folder / f"site-{i}.npz",
            demo_data.Split(train.images[tr], train.labels[tr]),
            demo_data.Split(val.images[va], val.labels[va]),
        )
    return per_t


def _flwr_run(app: Path, cli_home: Path, run_config: str, timeout: float) -> float:
    return _flwr_run_output(app, cli_home, run_config, timeout)[0]


def _flwr_run_output(
    app: Path, cli_home: Path, run_config: str, timeout: float
) -> tuple[float, str]:
    """``flwr run --stream``: its wall seconds and what it printed (the ServerApp's log)."""
    t0 = time.perf_counter()
    result = subprocess.run(
        [str(procs.BIN / "flwr"), "run", str(app), "bench", "--stream", "--run-config", run_config],
        env=procs.base_env(cli_home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"flwr run {app.name} failed:\n{result.stdout[-3000:]}{result.stderr}")
    return time.perf_counter() - t0, result.stdout


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


@dataclass(frozen=True)
class Federation:
    """A real SuperLink and SuperNodes on 127.0.0.1, started by ``federation``: the
    ``flwr`` CLI's home for ``flwr run``, each node's data folder and the logs."""

    cli_home: Path
    node_dirs: list[Path]
    logs: Path
    threads: int


@contextmanager
def federation(
    data: Path, weights: Path, sites: int, work: Path, server_log_level: str = "ERROR"
) -> Iterator[Federation]:
    """``fedhead superlink --insecure`` and ``sites`` ``fedhead node --insecure
    --allow-unsigned-apps`` processes (node i reads ``data/site-<i>.npz``), stopped on
    leaving, also on failure and Ctrl-C. ``server_log_level``: the ServerApp's log level
    (what ``flwr run --stream`` prints)."""
    threads = procs.site_threads(sites)  # co-located sites share the cores
    link_port = procs.free_port()
    cli_home = work / "cli-home"
    cli_home.mkdir(parents=True)
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    server_cache = procs.server_cache(work, weights)
    no_metrics = ["--metrics-address", "none"]
    logs = work / "logs"
    logs.mkdir()
    node_dirs = [work / f"node{i}" for i in range(sites)]
    with procs.processes(logs) as running:
        running.start_listening(
            "superlink",
            [*procs.FEDHEAD, "superlink", "--insecure", "--port", str(link_port), *no_metrics],
            procs.base_env(
                work / "link-home",
                FEDHEAD_CACHE=str(server_cache),
                FEDHEAD_LOG_LEVEL=server_log_level,
            ),
            link_port,
        )
        for i, cache in enumerate(node_dirs):
            (cache / "weights").mkdir(parents=True)
            shutil.copy(weights, cache / "weights")
            running.start(
                f"node{i}",
                [
                    *(*procs.FEDHEAD, "node", "--superlink", f"127.0.0.1:{link_port}"),
                    *("--port", str(procs.free_port()), "--data", str(data / f"site-{i}.npz")),
                    *("--cache-dir", str(cache), "--device", "cpu", "--threads", str(threads)),
                    *("--insecure", "--allow-unsigned-apps", *no_metrics),
                ],
                procs.base_env(work / f"node{i}-home", FEDHEAD_LOG_LEVEL="INFO"),
            )
        yield Federation(cli_home, node_dirs, logs, threads)


def deployment_rounds(
    data: Path, weights: Path, sites: int, rounds: int, px: int, work: Path
) -> dict[str, Any]:
    """fedhead (SecAgg+ and plain), Flower's floor and the canonical Flower pattern on
    one real SuperLink and ``sites`` SuperNodes. The canonical pattern, whose rounds
    cost the same from the first on (nothing is cached) and take minutes, runs two."""
    canonical_rounds = 2
    out, plain_out = work / "fedhead-out", work / "fedhead-plain-out"
    floor_files = [work / "floor-a.jsonl", work / "floor-b.jsonl"]
    canonical_file = work / "canonical.jsonl"
    with federation(data, weights, sites, work) as fed:
        cli_home, logs, threads = fed.cli_home, fed.logs, fed.threads
        floor_cfg = f"num-server-rounds={rounds} sites={sites} out-file="
        fedhead_cfg = (
            f"strategy='fedavg' num-server-rounds={rounds} input-size={px} min-sites={sites} "
            "fraction-evaluate=1.0 join-timeout=300.0 round-timeout=1800.0"
        )
        # floor, fedhead, floor: both see the same machine state on average
        _flwr_run(FLOOR_APP, cli_home, f"{floor_cfg}'{floor_files[0]}'", 900)
        _flwr_run(REPO, cli_home, f"{fedhead_cfg} out-dir='{out}'", 3600)
        _flwr_run(FLOOR_APP, cli_home, f"{floor_cfg}'{floor_files[1]}'", 900)
        # without SecAgg+, beside the canonical pattern, which has none
        plain = f"{fedhead_cfg} secure-aggregation=false out-dir='{plain_out}'"
        _flwr_run(REPO, cli_home, plain, 3600)
        _flwr_run(
            CANONICAL_APP,
            cli_home,
            f"num-server-rounds={canonical_rounds} sites={sites} input-size={px} "
            f"weights='{weights}' out-file='{canonical_file}'",
            3600,
        )
    report = json.loads((out / "report.json").read_text())
    later = [r for r in report["rounds"] if r["round"] >= 2]
    plain_later = [
        r for r in json.loads((plain_out / "report.json").read_text())["rounds"] if r["round"] >= 2
    ]
    stages: dict[str, float] = {}
    for name in later[0]["secagg_seconds"]:
        stages[name] = statistics.mean(r["secagg_seconds"][name] for r in later)
    # the rest of a round: the server's evaluation and the last round's evaluate step
    stages["rest"] = statistics.mean(
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
        "fedhead_plain": statistics.mean(r["seconds"] for r in plain_later),
        "floor": statistics.mean(_later_seconds(f) for f in floor_files),
        "canonical": _later_seconds(canonical_file),
        "canonical_rounds": canonical_rounds,
        "stages": stages,
        "train": statistics.mean(trained),
    }


def _later_seconds(path: Path) -> float:
    """Mean seconds of the rounds after the first, from an app's JSON-lines file."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    seconds: list[float] = [line["seconds"] for line in lines if line["round"] >= 2]
    return statistics.mean(seconds)


def measure(
    simulate: Callable[[dict[str, Any], int], RunReport],
    sites: int,
    rounds: int,
    n_train: int,
    px: int,
) -> dict[str, Any]:
    """Deployment, Flower's floor, the canonical pattern and the Simulation Engine, side
    by side; ``n_train`` training images per site at ``px`` pixels."""
    from fedhead.common.backbones import get_spec
    from fedhead.common.model import weights_ref
    from fedhead.common.weights import default_search_dirs, find_weights

    weights = find_weights(weights_ref(get_spec("mobilenet_v2")), default_search_dirs())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "sites"
        per_site = _write_sites(data, sites, n_train, n_train // 3)
        deployed = deployment_rounds(data, weights, sites, rounds, px, work / "deploy")
        report = simulate(
            {
                "input-size": px,
                "num-server-rounds": rounds,
                "simulation-data": str(data),
                "fraction-evaluate": 1.0,
                "secure-aggregation": True,
            },
            sites,
        )
        simulated = statistics.mean(r.seconds for r in report.rounds if r.round >= 2)
    costs = site_message_costs(weights)
    return {
        **deployed,
        "simulated": simulated,
        "costs": costs,
        "rounds": rounds,
        "px": px,
        "per_site": per_site,
    }


def _mobilenet_weights() -> Path:
    from fedhead.common.backbones import get_spec
    from fedhead.common.model import weights_ref
    from fedhead.common.weights import default_search_dirs, find_weights

    return find_weights(weights_ref(get_spec("mobilenet_v2")), default_search_dirs())


def _kept(report: dict[str, Any], node_dirs: list[Path], started: float) -> dict[str, Any]:
    """When the run's model was kept at every site, in seconds after ``started`` (wall
    clock): the newest file of the model package each node wrote into its
    ``models/<run-id>/``, after checking that every node recorded the head the server
    delivered."""
    run_id, head_sha = report["run_id"], report["model"]["head_sha256"]
    kept = []
    for node in node_dirs:
        record = json.loads((node / "runs" / f"{run_id}.json").read_text())
        if record["model_sha256"] != head_sha:
            raise RuntimeError(f"{node.name} kept {record['model_sha256']!r}, not {head_sha}")
        kept.append(max(f.stat().st_mtime for f in (node / "models" / str(run_id)).iterdir()))
    return {
        "kept": max(kept) - started,
        "rounds": len(report["rounds"]),
        "round_seconds": [r["seconds"] for r in report["rounds"]],
        "secagg_seconds": [sum(r["secagg_seconds"].values()) for r in report["rounds"]],
        "secagg_stages": [r["secagg_seconds"] for r in report["rounds"]],
        "delivered_to": len(report["delivery"]["delivered_to"]),
        "closed_form": report.get("closed_form"),
    }


# Lines of the ServerApp's log (INFO) that open the phases of a run, and the line that
# closes its last: (phase, the message's start).
PHASE_LINES = (
    ("prepare", "fedhead.server.run: run "),  # the run's first line: its model is built
    ("rounds", "fedhead.server.run: secure aggregation"),  # every site is prepared
    ("delivery", "fedhead.server.run: model package"),  # after the last round
    ("end", "fedhead.server.delivery: final model"),  # delivered to every site
)
LOG_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d) ")


def _phases(output: str, started: float) -> dict[str, float]:
    """Seconds of a run's phases from its ServerApp log (1 s resolution): ``start-up``
    from ``flwr run`` until the ServerApp's first line, then each of PHASE_LINES."""
    day = time.localtime(started)
    base = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0, 0, 0, -1))
    at: dict[str, float] = {}
    for line in output.splitlines():
        clock = LOG_TIME.match(line)
        for phase, text in PHASE_LINES:
            if clock and phase not in at and text in line:
                h, m, sec = (int(g) for g in clock.groups())
                t = base + 3600 * h + 60 * m + sec
                at[phase] = t + 86400 if t < started - 60 else t  # past midnight
    missing = [p for p, _ in PHASE_LINES if p not in at]
    if missing:
        raise RuntimeError(f"the ServerApp's log lacks the lines of {missing}")
    order = [p for p, _ in PHASE_LINES]
    out = {"start-up": at[order[0]] - started}
    out |= {p: at[q] - at[p] for p, q in itertools.pairwise(order)}
    return out


# The closed-form runs of ``closed_form_vs_fedavg``, in order: the first extracts and
# caches the sites' features (a warm-up for the other two, reported beside them).
CLOSED_FORM_RUNS = ("closed_form_first", "fedavg", "closed_form")


def closed_form_vs_fedavg(sites: int, rounds: int, n_train: int, px: int) -> dict[str, Any]:
    """Wall time from ``flwr run`` until the model is kept at every site: a closed-form
    head (strategy=closed-form, its defaults) and FedAvg for ``rounds`` rounds, both
    under SecAgg+, through the same SuperLink and SuperNodes. A closed-form run goes
    first and extracts the features; FedAvg and a second closed-form run then find them
    cached, so the two compared runs see the same site state."""
    weights = _mobilenet_weights()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "sites"
        per_site = _write_sites(data, sites, n_train, n_train // 3)
        base = (
            f"input-size={px} min-sites={sites} fraction-evaluate=1.0 join-timeout=300.0 "
            "round-timeout=1800.0"
        )
        settings = {
            "closed_form_first": "strategy='closed-form'",
            "fedavg": f"strategy='fedavg' num-server-rounds={rounds}",
            "closed_form": "strategy='closed-form'",
        }
        runs: dict[str, dict[str, Any]] = {}
        with federation(data, weights, sites, work / "deploy", "INFO") as fed:
            for label in CLOSED_FORM_RUNS:
                out = work / f"out-{label}"
                started = time.time()
                wall, output = _flwr_run_output(
                    REPO, fed.cli_home, f"{base} {settings[label]} out-dir='{out}'", 3600
                )
                report = json.loads((out / "report.json").read_text())
                runs[label] = {
                    **_kept(report, fed.node_dirs, started),
                    "flwr_run": wall,
                    "phases": _phases(output, started),
                }
                print(f"  {label}: model kept at every site after {runs[label]['kept']:.1f} s")
            threads = fed.threads
    return {"runs": runs, "per_site": per_site, "threads": threads, "rounds": rounds, "px": px}
