"""fedhead benchmarks: every figure is a ratio of two measurements taken side by side.

    python benchmarks/run.py --quick     # reduced sizes, a few minutes, prints `name: value`
    python benchmarks/run.py             # full sizes; also writes BENCHMARKS.md

1. cache_speedup_<px>: per-round site compute (5 local epochs) recomputing the trunk
   every epoch, divided by fedhead's (features from the cache + head training).
2. bytes_ratio_<backbone>: bytes per site per round sending the full model, divided
   by fedhead's head-only messages (both directions, Flower's serialization).
3. extraction_throughput_ratio: fedhead's extractor (hashing, cache writes included),
   images/s divided by a plain torchvision inference loop's on the same images.
4. secagg_round_ratio_<n>_sites: round time under SecAgg+ divided by plain FedAvg's,
   Flower's Simulation Engine, rounds after the first (features cached).
5. scale_*: Flower's Simulation Engine with many sites on this machine: seconds per
   round, peak memory (PSS of the process tree), and their growth between sizes.
6. accuracy_ratio_<split>: federated final accuracy divided by the same head trained
   centrally on the pooled data, IID and non-IID (Dirichlet alpha 0.3).
8. transfer_gain_<split>: per-site gain of the federated head over a local-only head
   trained with the same budget, each on the site's own validation split (accuracy
   difference, federated - local-only), averaged over 3 sites: IID and Dirichlet
   alpha 0.3 and 0.1; with the sites flagged for negative transfer; and the same gain
   in balanced accuracy (transfer_gain_balanced_<split>).
7. deployment_*: a real SuperLink and 3 SuperNodes on 127.0.0.1 under SecAgg+, seconds
   per round divided by the same sites in the Simulation Engine and by Flower's floor
   (a no-op app sending the same messages through the same processes); the canonical
   Flower pattern's round (whole model, trunk recomputed every epoch, no SecAgg+)
   divided by fedhead's without SecAgg+; with the per-stage and per-message costs
   behind it (benchmarks/deployment.py).
8. strategy_accuracy_ratio_<name>: final accuracy of a server optimizer (FedAdam) or
   FedProx divided by FedAvg's, the demo's federation at Dirichlet alpha 0.3, same
   seed and rounds.
9. closed_form_*: the closed-form head from summed statistics against pooled logistic
   regression, federated = pooled through Flower's SecAgg+ arithmetic, its bytes and
   SecAgg+ arithmetic time, and one DP release (benchmarks/closed_form.py; a section
   of its own in BENCHMARKS.md).
10. closed_form_run_* / closed_form_deployment_*: the closed-form head in real runs
   (benchmarks/closed_form_federated.py): accuracy and AUROC against FedAvg and pooled
   logistic regression at IID, Dirichlet 0.3 and 0.1 and with single-class sites, the
   delivered head against the pooled one, the statistics round's bytes and SecAgg+
   time at 3, 10, 20 sites (1280- and 2048-wide trunks), and the wall time of a real
   deployment against FedAvg's (`--only cfaccuracy`, `cfcost`, `cfdeploy`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # imported where used: --help and --only stay quick
    from fedhead.common.device import Device
    from fedhead.server.report import RunReport
    from fedhead.server.server_model import ServerModel

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FEDHEAD_LOG_LEVEL", "ERROR")


@dataclass
class Figure:
    name: str
    value: float
    target: str
    detail: str
    command: str = "python benchmarks/run.py"
    section: str = ""  # a heading of its own in BENCHMARKS.md ("" = the main table)


@dataclass
class Results:
    quick: bool
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, fig: Figure) -> None:
        self.figures.append(fig)
        print(f"{fig.name}: {fig.value:.4g}", flush=True)


def _best_of(fn: Callable[[], float], repeats: int) -> float:
    return min(fn() for _ in range(repeats))


# --- shared set-up ------------------------------------------------------------------
def _mobilenet() -> ServerModel:
    from fedhead.common.config import RunConfig
    from fedhead.server.server_model import build_server_model

    cfg = RunConfig.from_mapping({"classes": "normal,pneumonia"})
    return build_server_model(cfg)


def _demo_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    from fedhead.common import demo_data

    train = demo_data.load("train")
    idx = np.random.default_rng(0).choice(len(train.labels), n, replace=False)
    return train.images[idx], train.labels[idx]


# --- 1. cache vs recomputing the trunk every epoch ----------------------------------
def bench_cache(res: Results, sizes: list[int], n_images: dict[int, int], epochs: int = 5) -> None:
    from fedhead.common.device import select_device

    sm = _mobilenet()
    device = select_device("auto")
    for px in sizes:
        res.add(_cache_figure(sm, device, px, n_images[px], epochs))


def _cache_figure(sm: ServerModel, device: Device, px: int, n: int, epochs: int) -> Figure:
    from fedhead.common.features import FeatureCache, FeatureExtractor
    from fedhead.common.images import ArrayImages
    from fedhead.common.training import TrainParams, train_head

    initial = sm.trainable.get(sm.model)
    images, labels = _demo_images(n)
    y = torch.from_numpy(labels)
    pre = sm.spec.preprocessor(px)
    params = TrainParams(epochs, 64, 0.01)
    with tempfile.TemporaryDirectory() as tmp:
        cache_path = Path(tmp) / "features.sqlite"
        # the first round fills the cache (not part of the per-round figure)
        t0 = time.perf_counter()
        FeatureExtractor(sm.model, pre, device, sm.sha256, FeatureCache(cache_path))(
            ArrayImages(images, "bench")
        )
        first_round = time.perf_counter() - t0

        def fedhead_round() -> float:
            """What a site does in a later round: features from the cache, train the head."""
            sm.trainable.set(sm.model, initial)
            t = time.perf_counter()
            ex = FeatureExtractor(sm.model, pre, device, sm.sha256, FeatureCache(cache_path))
            feats = ex(ArrayImages(images, "bench"))
            assert feats.stats.cache_misses == 0
            train_head(sm.model, feats.values, y, params, device)
            return time.perf_counter() - t

        def naive_round() -> float:
            """The usual pattern: every epoch runs every image through the (frozen) trunk."""
            sm.trainable.set(sm.model, initial)
            model = sm.model
            opt = torch.optim.SGD(model.head.parameters(), lr=0.01, momentum=0.9)
            t = time.perf_counter()
            for _ in range(epochs):
                order = torch.randperm(len(y))
                for s in range(0, len(y), 64):
                    idx = order[s : s + 64]
                    x = pre([images[i] for i in idx.tolist()]).to(device.torch_device)
                    with torch.no_grad(), device.autocast():
                        z = model.extract(x).float()
                    loss = torch.nn.functional.cross_entropy(
                        model.forward_from_features(z), y[idx].to(device.torch_device)
                    )
                    opt.zero_grad()
                    loss.backward()  # type: ignore[no-untyped-call]
                    opt.step()
            return time.perf_counter() - t

        ours = _best_of(fedhead_round, 3)
        naive = _best_of(naive_round, 1 if px >= 224 else 2)
    return Figure(
        f"cache_speedup_{px}px",
        naive / ours,
        ">= 20",
        f"{n} images, {epochs} local epochs, {device.describe()}: recomputing the trunk "
        f"{naive:.2f} s per round, fedhead {ours:.3f} s per round (its first round, which "
        f"extracts and caches: {first_round:.2f} s)",
    )


# --- 2. bytes per site per round ----------------------------------------------------
def bench_bytes(res: Results) -> None:
    from flwr.app import Message
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat
    from flwr.supercore.task_identity import TaskIdentity

    from fedhead.common.backbones import get_spec
    from fedhead.common.model import FedHeadModel, TrainableSet
    from fedhead.server.grids import message_bytes

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1

    def round_bytes(arrays: list[np.ndarray]) -> int:
        content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), {}), True)
        msg = Message(content=content, dst_node_id=2, message_type="train")
        return 2 * message_bytes(msg)  # the tensors go to the site and come back

    for name in ("mobilenet_v2", "resnet50"):
        spec = get_spec(name)
        model = FedHeadModel(spec, spec.build(), num_classes=2)
        head = round_bytes(TrainableSet.of(model).get(model))
        full_model = spec.build()
        full = round_bytes([v.detach().numpy() for v in full_model.state_dict().values()])
        res.add(
            Figure(
                f"bytes_ratio_{name}",
                full / head,
                ">= 100",
                f"per site per round, to and from the site: full model {full / 1e6:.1f} MB, "
                f"fedhead head-only {head / 1e3:.1f} KB (2-class linear head)",
            )
        )


# --- 3. extraction throughput vs a plain torchvision loop ---------------------------
def bench_throughput(res: Results, n: int, px: int = 128) -> None:
    from fedhead.common.device import select_device
    from fedhead.common.features import FeatureCache, FeatureExtractor
    from fedhead.common.images import ArrayImages

    sm = _mobilenet()
    device = select_device("auto")
    images, _ = _demo_images(n)
    pre = sm.spec.preprocessor(px)
    tv = sm.spec.build()
    tv.load_state_dict(torch.load(sm.weights_path, weights_only=True))
    tv.eval().to(device.torch_device)
    trunk = tv.get_submodule("features")

    def plain() -> float:
        t = time.perf_counter()
        with torch.inference_mode(), device.autocast():
            for s in range(0, n, 64):
                x = pre(list(images[s : s + 64])).to(device.torch_device)
                z = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(trunk(x), 1), 1)
                z.float().cpu()
        return n / (time.perf_counter() - t)

    def ours() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            ex = FeatureExtractor(
                sm.model, pre, device, sm.sha256, FeatureCache(Path(tmp) / "f.sqlite")
            )
            t = time.perf_counter()
            feats = ex(ArrayImages(images, "bench"))
            elapsed = time.perf_counter() - t
            assert feats.stats.extracted == n
        return n / elapsed

    plain()  # warm-up
    p_rates, o_rates = [], []
    for _ in range(3):  # alternate, so both see the same machine state
        p_rates.append(plain())
        o_rates.append(ours())
    p, o = statistics.median(p_rates), statistics.median(o_rates)
    res.add(
        Figure(
            "extraction_throughput_ratio",
            o / p,
            ">= 0.9",
            f"{n} images at {px} px, {device.describe()}: fedhead {o:.0f} img/s (hashing, "
            f"float16 cache writes included), plain torchvision loop {p:.0f} img/s",
        )
    )


# --- simulation runs (4, 5, 6) ------------------------------------------------------
def simulate(overrides: dict[str, Any], sites: int) -> RunReport:
    from flwr.simulation import run_simulation

    from fedhead.client.app import app as client_app
    from fedhead.common.config import RunConfig
    from fedhead.common.simulation import backend_config
    from fedhead.server.app import make_server_app

    logging.getLogger("flwr").setLevel(logging.ERROR)
    box: list[RunReport] = []
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig.from_mapping(
            {
                "classes": "normal,pneumonia",
                "strategy": "fedavg",  # rounds, unless a benchmark names its strategy
                "min-sites": sites,
                "join-timeout": 600.0,
                "out-dir": out,
                **overrides,
            }
        )
        run_simulation(
            make_server_app(cfg, on_report=box.append),
            client_app,
            num_supernodes=sites,
            backend_config=backend_config(),
        )
    return box[-1]


def _later_rounds_seconds(report: RunReport) -> float:
    later = [r.seconds for r in report.rounds if r.round >= 2]
    return statistics.mean(later)


def bench_secagg(res: Results, site_counts: list[int], rounds: int) -> None:
    for n in site_counts:
        base = {
            "input-size": 64,
            "num-server-rounds": rounds,
            "dirichlet-alpha": 1.0,
            "fraction-evaluate": 0.2,
        }
        plain = _later_rounds_seconds(simulate({**base, "secure-aggregation": False}, n))
        secure = _later_rounds_seconds(simulate({**base, "secure-aggregation": True}, n))
        res.add(
            Figure(
                f"secagg_round_ratio_{n}_sites",
                secure / plain,
                "(measured)",
                f"{n} simulated sites, mean of rounds 2-{rounds}: SecAgg+ {secure:.2f} s, "
                f"plain FedAvg {plain:.2f} s per round",
            )
        )


def _tree_pss_bytes(root: int) -> int:
    """Proportional set size of a process and all its descendants (shared pages split)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def _write_scale_sites(folder: Path, sites: int) -> None:
    from fedhead.common import demo_data
    from fedhead.common.simulation import write_site_npz

    train, test = demo_data.load("train"), demo_data.load("test")
    rng = np.random.default_rng(1)
    for i in range(sites):
        tr = rng.choice(len(train.labels), 8, replace=False)
        va = rng.choice(len(test.labels), 4, replace=False)
        write_site_npz(
            folder / f"site-{i}.npz",
            demo_data.Split(train.images[tr], train.labels[tr]),
            demo_data.Split(test.images[va], test.labels[va]),
        )


def bench_scale(res: Results, site_counts: list[int], rounds: int) -> None:
    measured = []
    for n in site_counts:
        with tempfile.TemporaryDirectory() as data:
            _write_scale_sites(Path(data), n)
            peak = [0]
            done = threading.Event()

            def sample(peak: list[int] = peak, done: threading.Event = done) -> None:
                while not done.wait(0.5):
                    peak[0] = max(peak[0], _tree_pss_bytes(os.getpid()))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            report = simulate(
                {
                    "input-size": 32,
                    "num-server-rounds": rounds,
                    "simulation-data": data,
                    "secure-aggregation": False,
                    "fraction-evaluate": 0.1,
                    "round-timeout": 1800.0,
                },
                n,
            )
            done.set()
            sampler.join()
        seconds = statistics.mean(r.seconds for r in report.rounds)
        measured.append((n, seconds, peak[0]))
        res.add(
            Figure(
                f"scale_{n}_sites_seconds_per_round",
                seconds,
                "(measured)",
                f"{n} simulated sites on {os.cpu_count()} cores, plain FedAvg, "
                f"8 training images per site, mean of {rounds} round(s)",
            )
        )
        res.add(
            Figure(
                f"scale_{n}_sites_peak_memory_mb",
                peak[0] / 2**20,
                "(measured)",
                "peak proportional set size of the driver, Ray and its workers",
            )
        )
    (n0, s0, m0), (n1, s1, m1) = measured[0], measured[-1]
    res.add(
        Figure(
            f"scale_time_growth_{n1}_vs_{n0}",
            s1 / s0,
            f"(sites x{n1 / n0:g})",
            "how seconds per round grow with the number of sites",
        )
    )
    res.add(
        Figure(
            f"scale_memory_growth_{n1}_vs_{n0}",
            m1 / m0,
            f"(sites x{n1 / n0:g})",
            "how peak memory grows with the number of sites",
        )
    )


def bench_accuracy(res: Results, rounds: int) -> None:
    from fedhead.cli.demo_job import centralized_baseline
    from fedhead.common import demo_data
    from fedhead.common.config import RunConfig
    from fedhead.common.simulation import write_site_npz

    test_file = write_site_npz(Path(tempfile.mkdtemp()) / "test.npz", demo_data.load("test"))
    for label, alpha in (("iid", 1000.0), ("alpha_0.3", 0.3)):
        overrides: dict[str, Any] = {
            "strategy": "fedavg",
            "input-size": 128,
            "num-server-rounds": rounds,
            "dirichlet-alpha": alpha,
            "server-test-data": str(test_file),
        }
        report = simulate(overrides, 3)
        cfg = RunConfig.from_mapping({"classes": "normal,pneumonia", **overrides})
        split = "IID: Dirichlet alpha 1000" if alpha > 100 else "non-IID: Dirichlet alpha 0.3"
        shares = demo_data.shares(3, alpha, cfg.seed)
        central = centralized_baseline(cfg, progress=False, shares=shares)["accuracy"]
        fed = report.final_server_eval_accuracy
        res.add(
            Figure(
                f"accuracy_ratio_{label}",
                fed / central,
                ">= 0.97",
                f"3 simulated sites ({split}), "
                f"{rounds} rounds, 128 px: federated {fed:.4f}, centralized {central:.4f} "
                "(bundled test split)",
            )
        )


def bench_tables(res: Results, site_counts: list[int], px: int = 64) -> None:
    """Pooled clinical metrics from the sites' coarsened count tables (no reported score
    describes fewer than MIN_CELL images) against the exact figures on the union of
    their validation splits, and against the uncoarsened 100-bin tables sent before."""
    from sklearn.linear_model import LogisticRegression

    from fedhead.common import demo_data
    from fedhead.common.evaluation import point_metrics
    from fedhead.common.pooled import MIN_CELL, EvalStatistics, pool

    sm = _mobilenet()
    pre = sm.spec.preprocessor(px)

    def features(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.cat(
                [
                    sm.model.extract(pre(list(images[i : i + 256])))
                    for i in range(0, len(images), 256)
                ]
            ).numpy()

    for sites in site_counts:
        shares = demo_data.shares(sites, 0.5)
        train_x = features(np.concatenate([s.train.images for s in shares]))
        train_y = np.concatenate([s.train.labels for s in shares])
        model = LogisticRegression(max_iter=2000).fit(train_x, train_y)
        parts = [(s.val.labels, model.predict_proba(features(s.val.images))) for s in shares]
        y = np.concatenate([p[0] for p in parts])
        proba = np.concatenate([p[1] for p in parts])
        exact = point_metrics(y, proba, list(demo_data.CLASSES))
        tables = [EvalStatistics.from_predictions(a, b) for a, b in parts]
        binned = pool(tables)
        coarse = pool(t.coarsened() for t in tables)
        assert binned is not None and coarse is not None
        before, after = binned.metrics(), coarse.metrics()
        sizes = ", ".join(str(len(p[0])) for p in parts)
        res.add(
            Figure(
                f"pooled_auroc_error_{sites}_sites",
                abs(after["auroc"] - exact["auroc"]),
                "<= 0.02",
                f"{sites} sites of the bundled data (Dirichlet alpha 0.5; validation "
                f"images {sizes}), a head on {px} px features: pooled AUROC from "
                f"tables coarsened to >= {MIN_CELL} images a score {after['auroc']:.4f}, "
                f"from the 100-bin tables before {before['auroc']:.4f}, exact "
                f"{exact['auroc']:.4f}; ECE {after['ece']:.4f} (before {before['ece']:.4f}, "
                f"exact {exact['ece']:.4f}); balanced accuracy {after['balanced_accuracy']:.4f} "
                f"(exact {exact['balanced_accuracy']:.4f}; an absolute difference, not a ratio)",
                "python benchmarks/run.py --only tables",
            )
        )


# What figure 8 compares with FedAvg: run-config overrides per label. FedAdam with
# Flower's default server settings and with a tenth of its server learning rate (the
# paper tunes it per task); FedProx with a proximal weight in the range Li et al. 2020
# found useful (0.001 to 1).
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedadam": {"strategy": "fedadam"},
    "fedadam_lr_0.01": {"strategy": "fedadam", "server-learning-rate": 0.01},
    "fedprox": {"proximal-mu": 0.1},
}


def bench_strategies(res: Results, rounds: int, alpha: float = 0.3) -> None:
    from fedhead.common import demo_data
    from fedhead.common.simulation import write_site_npz

    test_file = write_site_npz(Path(tempfile.mkdtemp()) / "test.npz", demo_data.load("test"))
    base: dict[str, Any] = {
        "input-size": 128,
        "num-server-rounds": rounds,
        "dirichlet-alpha": alpha,
        "server-test-data": str(test_file),
    }
    fedavg = simulate(base, 3).final_server_eval_accuracy
    print(f"  fedavg final accuracy {fedavg:.4f}", flush=True)
    for label, overrides in STRATEGIES.items():
        acc = simulate({**base, **overrides}, 3).final_server_eval_accuracy
        settings = ", ".join(f"{k}={v}" for k, v in overrides.items())
        res.add(
            Figure(
                f"strategy_accuracy_ratio_{label}",
                acc / fedavg,
                "(measured)",
                f"3 simulated sites (non-IID: Dirichlet alpha {alpha}), {rounds} rounds, "
                f"128 px, SecAgg+, seed 0: {label} ({settings}) {acc:.4f}, FedAvg {fedavg:.4f} "
                "(bundled test split)",
            )
        )


def bench_gain(res: Results, rounds: int, px: int) -> None:
    for label, alpha in (("iid", 1000.0), ("alpha_0.3", 0.3), ("alpha_0.1", 0.1)):
        overrides: dict[str, Any] = {
            "input-size": px,
            "num-server-rounds": rounds,
            "dirichlet-alpha": alpha,
            "local-baseline": True,
            "secure-aggregation": False,  # the gain does not depend on how updates are summed
        }
        report = simulate(overrides, 3)
        sites = report.sites or []
        if len(sites) != 3:
            raise RuntimeError(f"{label}: {len(sites)} of 3 sites reported ({report.sites_failed})")
        gains = [s["gain"]["accuracy"] for s in sites]
        balanced = [s["gain"]["balanced_accuracy"] for s in sites]
        flagged = [s["site"] for s in sites if s["negative_transfer"]]
        each = ", ".join(
            f"{s['site']} {s['local_only']['accuracy']:.3f} -> {s['federated']['accuracy']:.3f}"
            for s in sorted(sites, key=lambda s: str(s["site"]))
        )
        split = "IID: Dirichlet alpha 1000" if alpha > 100 else f"Dirichlet alpha {alpha}"
        res.add(
            Figure(
                f"transfer_gain_{label}",
                statistics.mean(gains),
                "(measured)",
                f"3 simulated sites ({split}), {rounds} rounds, {px} px; validation accuracy "
                f"local-only -> federated per site: {each}; negative transfer at "
                f"{', '.join(flagged) or 'no site'} (an accuracy difference, not a ratio)",
            )
        )
        each = ", ".join(
            f"{s['site']} {s['local_only']['balanced_accuracy']:.3f} -> "
            f"{s['federated']['balanced_accuracy']:.3f}"
            for s in sorted(sites, key=lambda s: str(s["site"]))
        )
        res.add(
            Figure(
                f"transfer_gain_balanced_{label}",
                statistics.mean(balanced),
                "(measured)",
                f"the same runs, balanced accuracy local-only -> federated per site: {each}",
            )
        )


def bench_deploy(res: Results, rounds: int, n_train: int, px: int, sites: int = 3) -> None:
    import deployment

    m = deployment.measure(simulate, sites, rounds, n_train, px)
    st, c = m["stages"], m["costs"]
    setup = (
        f"{sites} sites on {os.cpu_count()} cores ({m['threads']} thread(s) each), {px} px, "
        f"{m['per_site']} training images per site, mean of rounds 2-{rounds}"
    )
    res.add(
        Figure(
            "deployment_round_vs_floor",
            m["fedhead"] / m["floor"],
            "<= 1.5",
            f"{setup}, SecAgg+: fedhead {m['fedhead']:.2f} s per round, Flower's floor (no-op "
            f"apps, the same messages, the same SuperLink and SuperNodes) {m['floor']:.2f} s",
        )
    )
    res.add(
        Figure(
            "deployment_round_vs_simulated",
            m["fedhead"] / m["simulated"],
            "(as low as the design allows)",
            f"{setup}, SecAgg+: real SuperLink and SuperNodes {m['fedhead']:.2f} s per round, "
            f"the same sites in the Simulation Engine {m['simulated']:.2f} s",
        )
    )
    res.add(
        Figure(
            "deployment_canonical_vs_fedhead",
            m["canonical"] / m["fedhead_plain"],
            ">= 10",
            f"{setup}, both without SecAgg+, the same SuperLink and SuperNodes and thread "
            f"settings: the canonical Flower pattern (whole model each round, trunk "
            f"recomputed every epoch, FedAvg) {m['canonical']:.2f} s per round (its round "
            f"2 of {m['canonical_rounds']}), fedhead {m['fedhead_plain']:.2f} s",
        )
    )
    res.add(
        Figure(
            "deployment_canonical_vs_fedhead_secagg",
            m["canonical"] / m["fedhead"],
            "(measured)",
            f"{setup}: the canonical pattern without secure aggregation {m['canonical']:.2f} s "
            f"per round, fedhead under SecAgg+ (three key-exchange messages more per round) "
            f"{m['fedhead']:.2f} s",
        )
    )
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in st.items())
    res.add(
        Figure(
            "deployment_round_seconds",
            m["fedhead"],
            "(measured)",
            f"server's view of a SecAgg+ round by stage: {stages}",
        )
    )
    res.add(
        Figure(
            "deployment_site_message_seconds",
            c["process_start"] + c["flower_imports"] + c["fedhead_app_imports"],
            "(measured)",
            "what every per-message ClientApp process pays before its handler: process "
            f"start {c['process_start']:.2f} s, Flower's imports {c['flower_imports']:.2f} s, "
            f"fedhead's ClientApp imports {c['fedhead_app_imports']:.2f} s (no torch). What "
            "the node's warm worker saves each train and evaluate message, paid once per "
            f"node instead: torch and the site code {c['torch_site_imports']:.2f} s, the "
            f"head's build {c['head_build']:.3f} s, torch.optim's first use "
            f"{c['optimizer_first_use']:.2f} s (it imports torch._dynamo); training on cached "
            f"features in the worker {m['train']:.2f} s; the full model build, needed only "
            f"to extract missing features, {c['full_model_build']:.2f} s",
        )
    )


def bench_closed_form(res: Results) -> None:
    import closed_form

    figure = functools.partial(Figure, command=closed_form.COMMAND, section=closed_form.SECTION)
    closed_form.run(res, figure, res.quick)


# The parts of the closed-form section measured in real runs, each its own `--only` name.
CLOSED_FORM_RUNS = ("cfaccuracy", "cfcost", "cfdeploy")


def bench_closed_form_federated(res: Results, parts: set[str]) -> None:
    import closed_form_federated as cff

    for part in CLOSED_FORM_RUNS:
        if part in parts:
            figure = functools.partial(
                Figure, command=f"python benchmarks/run.py --only {part}", section=cff.SECTION
            )
            cff.run(res, figure, simulate, {part}, res.quick)


# --- report ------------------------------------------------------------------------
NOTES = [
    "## Notes",
    "",
    "- **GPU.** These figures were measured on a machine without a GPU, so figures 1 "
    "and 3 exist for the CPU only. The CUDA path (mixed precision, channels_last, "
    "DataLoader workers into pinned memory) runs where a site has a GPU; its DataLoader "
    "path is tested on the CPU (`tests/common/test_features.py`).",
    "- **Per-round compute** compares what a site does in every round after its first: "
    "read the features from its cache and train the head, against the usual pattern of "
    "running every image through the frozen trunk in every epoch. The first round, which "
    "extracts and caches, is given beside it.",
    "- **Bytes** are Flower's serialized message sizes (object trees) for the tensors a "
    "site receives and sends back per round. SecAgg+ adds its key-exchange messages to "
    "fedhead's side; see the demo's report for a whole round's traffic.",
    "- **SecAgg+ vs plain FedAvg** runs the same federation twice in Flower's Simulation "
    "Engine; SecAgg+ adds three message exchanges per round (setup, key sharing, "
    "unmasking) and the masking work, so its round time is a multiple of plain FedAvg's "
    "when local training is as short as a head's.",
    "- **Scale** uses plain FedAvg (SecAgg+ with every site sharing keys with every other "
    "grows with the square of the sites; figure 4 measures its cost) and 8 training "
    "images per site. Peak memory is the proportional set size of the driver, Ray and its "
    "workers. A simulation worker shares one frozen model and one cache connection among "
    "the sites it serves, so memory stays flat as sites grow. The remaining growth of "
    "round time with the number of sites is in Flower's simulation engine: a sampling "
    "profile of the driver at 500 sites spends most of its time in "
    "`InMemoryGrid.send_and_receive` polling, Ray's result fetching and the in-memory "
    "LinkState's message scans, not in fedhead's code.",
    "- **Deployment** starts `fedhead superlink --insecure` and three `fedhead node "
    "--insecure --allow-unsigned-apps --threads N` processes on 127.0.0.1 (N = the "
    "cores split between the sites), each site holding 150 of the bundled training "
    "images (50 for validation) at the backbone's native 224 px. Through them run "
    "Flower's floor (`benchmarks/floor`: no-op apps, no torch, sending fedhead's "
    "messages: the four SecAgg+ stages over a head-sized vector, and an evaluate after "
    "the last round), fedhead under SecAgg+, the floor again, fedhead without SecAgg+, "
    "and the canonical Flower pattern (`benchmarks/canonical`: Flower's PyTorch "
    "quickstart applied to a frozen-trunk MobileNetV2: the whole model travels each "
    "round, every image goes through the trunk in every epoch, FedAvg without secure "
    "aggregation, the same epochs, batch size, optimizer and thread setting; two "
    "rounds, as its rounds take minutes); the same sites then run in the Simulation "
    "Engine. A SuperNode starts one ClientApp process per message, and waits 3 s "
    "between two looks for work; fedhead sends four messages per site and round under "
    "SecAgg+ (one without), as its sites evaluate each round's head in the next round's"
    " train message. The train and evaluate messages hand their work to the node's warm"
    " worker (in the `fedhead node` process), so no per-message process imports torch, "
    "and with the features cached no trunk is built. fedhead's ServerApp reads replies "
    "every 0.1 s where Flower's deployment Grid, which the floor and the canonical "
    "pattern use as shipped, waits 3 s between two looks. The per-message costs are "
    "medians of fresh processes timed in the same run.",
    "- **Transfer gain** runs the demo's federation with `local-baseline=true`: after "
    "the last round each site trains a head alone with the run's budget (local epochs x "
    "rounds, same optimizer and schedule, from the same initial head) and reports both "
    "heads' accuracy on its own validation split. The figure is the mean over sites of "
    "federated minus local-only; a site is flagged when the paired bootstrap interval of "
    "its difference lies below zero. Under strong label skew a site's own validation "
    "split shares its skew, so a local-only head that predicts the site's majority class "
    "scores well there: a negative gain says the federated head fits the site's own "
    "distribution less well, not that it is worse on the pooled test split.",
    "- **Accuracy** runs the demo's federation (3 sites, the bundled chest X-rays, "
    "MobileNetV2 head at 128 px) and the same head trained centrally with the same "
    "schedule, both evaluated on the bundled test split.",
    "- **Pooled clinical metrics** split the bundled training data over 3 and 10 simulated "
    "sites (Dirichlet alpha 0.5, each holding out 15% for validation), fit a logistic "
    "regression on the 64 px MobileNetV2 features of all training parts, and compare the "
    "AUROC, ECE and balanced accuracy pooled from the sites' count tables (coarsened: no "
    "reported score describes fewer than 5 of a site's images) with the exact figures on "
    "the union of their validation splits and with the 100-bin tables sent before.",
]


def _rows(figures: Iterable[Figure]) -> list[str]:
    return [f"| `{f.name}` | {f.value:.4g} | {f.target} | {f.detail} |" for f in figures]


def write_markdown(res: Results, path: Path, seconds: float) -> None:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        "# fedhead benchmarks",
        "",
        f"Measured {dt.date.today().isoformat()} with `python benchmarks/run.py` in "
        f"{seconds / 60:.0f} minutes on {cpu}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"torch {torch.__version__}, no GPU. Every figure is a ratio of two measurements "
        "taken side by side in the same run; `--quick` repeats them at reduced sizes.",
        "",
        "| figure | value | target | what was measured |",
        "|---|---|---|---|",
    ]
    lines += _rows(f for f in res.figures if not f.section)
    lines += [
        "",
        "Reproduce: `python benchmarks/run.py` (writes this file), "
        "`python benchmarks/run.py --quick` (reduced sizes, prints `name: value`).",
    ]
    for section in dict.fromkeys(f.section for f in res.figures if f.section):
        figures = [f for f in res.figures if f.section == section]
        commands = " and ".join(f"`{c}`" for c in dict.fromkeys(f.command for f in figures))
        lines += ["", f"## {section}", "", f"Measured with {commands}.", ""]
        lines += ["| figure | value | target | what was measured |", "|---|---|---|---|"]
        lines += _rows(figures)
    lines += ["", *res.notes, ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes (a few minutes)")
    parser.add_argument(
        "--only",
        help="comma-separated subset: "
        "cache,bytes,throughput,secagg,scale,accuracy,tables,strategies,gain,deploy,closedform,"
        "cfaccuracy,cfcost,cfdeploy",
    )
    parser.add_argument("--write", help="markdown file to write (full runs: BENCHMARKS.md)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # the process helpers of the end-to-end tests
    from tests.e2e.procs import interrupt_on_sigterm

    # stopped by `timeout` or CI: the SuperLink and nodes it started are stopped too
    interrupt_on_sigterm()
    q = args.quick
    res = Results(quick=q, notes=NOTES)
    t0 = time.perf_counter()
    every = (
        "cache,bytes,throughput,secagg,scale,accuracy,tables,strategies,gain,deploy,closedform,"
        "cfaccuracy,cfcost,cfdeploy"
    )
    chosen = set((args.only or every).split(","))
    if "cache" in chosen:
        bench_cache(res, [96, 224], {96: 128, 224: 32} if q else {96: 512, 224: 128})
    if "bytes" in chosen:
        bench_bytes(res)
    if "throughput" in chosen:
        bench_throughput(res, 128 if q else 512)
    if "secagg" in chosen:
        bench_secagg(res, [5] if q else [5, 10, 20], 3)
    if "scale" in chosen:
        bench_scale(res, [20, 50] if q else [100, 500], 1 if q else 2)
    if "accuracy" in chosen:
        bench_accuracy(res, 5 if q else 10)
    if "tables" in chosen:
        bench_tables(res, [3] if q else [3, 10])
    if "strategies" in chosen:
        bench_strategies(res, 5 if q else 10)
    if "gain" in chosen:
        bench_gain(res, 3 if q else 10, 64 if q else 128)
    if "deploy" in chosen:
        bench_deploy(res, 3 if q else 4, 60 if q else 150, 224)
    if "closedform" in chosen:
        bench_closed_form(res)
    if chosen & set(CLOSED_FORM_RUNS):
        bench_closed_form_federated(res, chosen)
    seconds = time.perf_counter() - t0
    target = args.write or (None if q else str(REPO / "BENCHMARKS.md"))
    if target:
        write_markdown(res, Path(target), seconds)
        print(f"wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stopped:  # Ctrl-C, or SIGTERM (timeout): all was cleaned up
        print(
            f"benchmarks: {stopped or 'interrupted'}; nothing they started runs on", file=sys.stderr
        )
        sys.exit(130)
