"""The closed-form head (issue 23) in real federated runs, against FedAvg run beside it.

    python benchmarks/run.py --only cfaccuracy   # simulated runs: accuracy, head = pooled
    python benchmarks/run.py --only cfcost       # the statistics round at 3, 10, 20 sites
    python benchmarks/run.py --only cfdeploy     # real SuperLink + SuperNodes: wall time

cfaccuracy: the demo's federation (3 simulated sites of the bundled chest X-rays, 128 px,
the server's test set = the bundled test split) at IID, Dirichlet 0.3 and 0.1 and with
single-class sites runs closed-form LDA and ridge (SecAgg+, the defaults) and FedAvg
(SecAgg+); beside them, on the same training images (the union of the sites' training
parts, their features read from the cache the sites filled), pooled logistic regression
and the pooled closed-form head of the regularisation the run's sites chose; the head
each closed-form run delivered is compared with that pooled head on the test split.

cfcost: the statistics round of a closed-form run (SecAgg+) at 3, 10 and 20 simulated
sites with a 1280-wide (MobileNetV2) and a 2048-wide (ResNet-50) trunk: the bytes each
site sent and the SecAgg+ stages' seconds, divided by those of a FedAvg round (its
second, features cached) of the same sites.

cfdeploy: benchmarks/deployment.py's closed_form_vs_fedavg.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhead.common import closed_form as cf
from fedhead.common import demo_data

SECTION = "Closed-form head (issue 23) in federated runs, beside FedAvg"
PX, SITES = 128, 3
SPLITS: dict[str, float | None] = {  # Dirichlet alpha; None: single-class sites
    "iid": 1000.0,
    "alpha_0.3": 0.3,
    "alpha_0.1": 0.1,
    "single_class": None,
}
Simulate = Callable[[dict[str, Any], int], Any]
Figure = Callable[..., Any]


# --- shared ---------------------------------------------------------------------------
def _extractor(px: int) -> Any:
    """The server's trunk and feature cache, as the simulated sites use them (the same
    cache: features of the sites' images are read back exactly as they computed them)."""
    from fedhead.common.config import RunConfig
    from fedhead.server.server_model import build_server_model
    from fedhead.server.testset import server_extractor

    cfg = RunConfig.from_mapping({"classes": "normal,pneumonia", "input-size": px})
    extractor, _ = server_extractor(cfg, build_server_model(cfg))
    return extractor


def _features(
    extractor: Any, split: demo_data.Split, name: str
) -> tuple[np.ndarray, np.ndarray, int]:
    from fedhead.common.images import ArrayImages

    feats = extractor(ArrayImages(split.images, name))
    values = feats.values.numpy().astype(np.float64)
    return values, split.labels[feats.ok], feats.stats.cache_misses


def _tested(report: Any) -> dict[str, float]:
    """Accuracy and AUROC of a run's final head on the server's test set (report.json's
    server_test_evaluation; the same figures for every strategy)."""
    if report.server_test_evaluation is None:
        raise RuntimeError("the run has no server_test_evaluation (server-test-data unset?)")
    m = report.server_test_evaluation["metrics"]
    return {"accuracy": m["accuracy"]["value"], "auroc": m["auroc"]["value"]}


def _metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    from fedhead.common.evaluation import point_metrics

    m = point_metrics(y, proba, list(demo_data.CLASSES))
    return {"accuracy": m["accuracy"], "auroc": m["auroc"]}


def _show(m: dict[str, float]) -> str:
    return f"{m['accuracy']:.4f} / {m['auroc']:.4f}"


# --- accuracy and federated = pooled ------------------------------------------------
def single_class_shares(folder: Path, seed: int = 0) -> list[demo_data.Share]:
    """3 sites of the bundled training split: site-0 holds two thirds of the normal
    images only, site-1 two thirds of the pneumonia images only, site-2 the remaining
    third of each; each holds out 15% (stratified) for validation, as the demo's shares
    do. Written as ``folder/site-<i>.npz`` for the run config's ``simulation-data``."""
    from fedhead.common.datasets import held_out_split
    from fedhead.common.simulation import write_site_npz

    train = demo_data.load("train")
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(train.labels == 0))
    pneumonia = rng.permutation(np.flatnonzero(train.labels == 1))
    cut_n, cut_p = 2 * len(normal) // 3, 2 * len(pneumonia) // 3
    parts = [
        normal[:cut_n],
        pneumonia[:cut_p],
        np.concatenate([normal[cut_n:], pneumonia[cut_p:]]),
    ]
    shares = []
    for i, idx in enumerate(parts):
        images, labels = train.images[idx], train.labels[idx]
        tr, va = held_out_split(labels, 0.15, seed * 1_000 + i)
        share = demo_data.Share(
            demo_data.Split(images[tr], labels[tr]), demo_data.Split(images[va], labels[va])
        )
        write_site_npz(folder / f"site-{i}.npz", share.train, share.val)
        shares.append(share)
    return shares


@dataclass(frozen=True)
class ClosedFormRun:
    """One simulated closed-form run: its test figures, the candidate the sites chose,
    and the head it delivered against the pooled head of that candidate."""

    method: str
    tested: dict[str, float]
    chosen: str
    pooled: dict[str, float]  # the pooled closed-form head of the same candidate
    max_probability_difference: float
    # the pooled head's own tensors rounded to float32, as a head travels and is kept
    float32_difference: float
    statistics_seconds: float  # round 1, the statistics and the validation message


def _closed_form_run(
    simulate: Simulate,
    base: dict[str, Any],
    method: str,
    pooled: cf.Statistics,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> ClosedFormRun:
    report = simulate({**base, "strategy": "closed-form", "closed-form": method}, SITES)
    if len(report.rounds) != 1 or report.closed_form is None:
        raise RuntimeError(f"closed-form {method}: {len(report.rounds)} rounds, no closed_form")
    chosen = report.closed_form["chosen"]
    candidates = cf.candidate_heads(pooled, method, class_names=demo_data.CLASSES)
    (candidate,) = [c for c in candidates if c.label == chosen]
    weight, bias = (np.asarray(a, dtype=np.float64) for a in report.final_arrays)
    delivered = cf.LinearHead(weight.reshape(candidate.head.weight.shape), bias.reshape(-1))
    p_run = delivered.probabilities(x_test)
    p_pooled = candidate.head.probabilities(x_test)
    as_float32 = cf.LinearHead(
        *(
            np.asarray(a, dtype=np.float32).astype(np.float64)
            for a in (candidate.head.weight, candidate.head.bias)
        )
    )
    return ClosedFormRun(
        method,
        _tested(report),
        chosen,
        _metrics(y_test, p_pooled),
        float(np.abs(p_run - p_pooled).max()),
        float(np.abs(as_float32.probabilities(x_test) - p_pooled).max()),
        report.rounds[0].seconds,
    )


def bench_accuracy(res: Any, figure: Figure, simulate: Simulate, quick: bool) -> None:
    from sklearn.linear_model import LogisticRegression

    from fedhead.common.simulation import write_site_npz

    px = 64 if quick else PX
    rounds = 5 if quick else 10
    splits = ["iid", "alpha_0.1"] if quick else list(SPLITS)
    extractor = _extractor(px)
    test = demo_data.load("test")
    x_test, y_test, _ = _features(extractor, test, "demo-test")
    with tempfile.TemporaryDirectory() as tmp:
        test_file = write_site_npz(Path(tmp) / "test.npz", test)
        for label in splits:
            alpha = SPLITS[label]
            base: dict[str, Any] = {"input-size": px, "server-test-data": str(test_file)}
            if alpha is None:
                folder = Path(tmp) / label
                shares = single_class_shares(folder)
                base["simulation-data"] = str(folder)
                split = "single-class sites: two holding one class only, one both"
            else:
                shares = demo_data.shares(SITES, alpha)
                base["dirichlet-alpha"] = alpha
                split = "IID: Dirichlet alpha 1000" if alpha > 100 else f"Dirichlet alpha {alpha}"
            # FedAvg first: its sites cache their features, which the pooled heads then use
            fedavg = _tested(simulate({**base, "num-server-rounds": rounds}, SITES))
            train = demo_data.Split(
                np.concatenate([s.train.images for s in shares]),
                np.concatenate([s.train.labels for s in shares]),
            )
            x_train, y_train, misses = _features(extractor, train, "demo-train")
            pooled = cf.Statistics.of(x_train, y_train, len(demo_data.CLASSES))
            runs = {
                m: _closed_form_run(simulate, base, m, pooled, x_test, y_test) for m in cf.METHODS
            }
            logistic_model = LogisticRegression(C=1.0, max_iter=5000).fit(x_train, y_train)
            logistic = _metrics(y_test, logistic_model.predict_proba(x_test))
            mix = "; ".join(
                f"{int((s.train.labels == 0).sum())}/{int((s.train.labels == 1).sum())}"
                for s in shares
            )
            setup = (
                f"{SITES} simulated sites ({split}; normal/pneumonia training images per "
                f"site {mix}), {px} px, SecAgg+, bundled test split of {len(y_test)}"
            )
            others = (
                f"FedAvg {rounds} rounds {_show(fedavg)}; pooled logistic regression "
                f"(scikit-learn, C=1, the same {len(y_train)} training images) {_show(logistic)}"
            )
            for m, run in runs.items():
                mine = f"closed-form {m} (the sites chose {run.chosen}) {_show(run.tested)}"
                res.add(
                    figure(
                        f"closed_form_run_{m}_vs_fedavg_accuracy_{label}",
                        run.tested["accuracy"] / fedavg["accuracy"],
                        ">= 1",
                        f"{setup}; test accuracy / AUROC: {mine}; {others}; AUROC ratio "
                        f"{run.tested['auroc'] / fedavg['auroc']:.4f}",
                    )
                )
                res.add(
                    figure(
                        f"closed_form_run_{m}_minus_logistic_accuracy_{label}",
                        run.tested["accuracy"] - logistic["accuracy"],
                        ">= -0.01",
                        f"the same runs: {mine}; {others}; AUROC difference "
                        f"{run.tested['auroc'] - logistic['auroc']:+.4f} (differences, not ratios)",
                    )
                )
            each = "; ".join(
                f"{m} ({r.chosen}) {r.max_probability_difference:.1e} (the pooled head "
                f"rounded to float32 alone: {r.float32_difference:.1e}), pooled head "
                f"{_show(r.pooled)}, run {_show(r.tested)}, statistics round "
                f"{r.statistics_seconds:.1f} s"
                for m, r in runs.items()
            )
            res.add(
                figure(
                    f"closed_form_run_max_probability_difference_{label}",
                    max(r.max_probability_difference for r in runs.values()),
                    "<= 1e-4",
                    f"the same closed-form runs ({split}, SecAgg+): largest |p_run - p_pooled| "
                    f"over the test split between the head each run delivered "
                    f"(report.final_arrays, float32) and the closed-form head of the "
                    f"candidate its sites chose solved in float64 from the pooled statistics "
                    f"of the same {len(y_train)} training images ({misses} of their features "
                    f"not in the sites' cache): {each}",
                )
            )


# --- the statistics round's cost ---------------------------------------------------------
def _write_small_sites(folder: Path, sites: int, n_train: int = 8, n_val: int = 4) -> None:
    """``sites`` sites of the bundled images, each with both classes (cost runs)."""
    from fedhead.common.simulation import write_site_npz

    train, test = demo_data.load("train"), demo_data.load("test")
    rng = np.random.default_rng(1)
    for i in range(sites):
        tr = np.concatenate(
            [
                rng.choice(np.flatnonzero(train.labels == c), n_train // 2, replace=False)
                for c in (0, 1)
            ]
        )
        va = np.concatenate(
            [
                rng.choice(np.flatnonzero(test.labels == c), n_val // 2, replace=False)
                for c in (0, 1)
            ]
        )
        write_site_npz(
            folder / f"site-{i}.npz",
            demo_data.Split(train.images[tr], train.labels[tr]),
            demo_data.Split(test.images[va], test.labels[va]),
        )


@contextmanager
def resnet50_checkpoint() -> Iterator[dict[str, Any]]:
    """A ResNet-50 checkpoint (torchvision's architecture, seeded random weights with
    zero-initialised residual branches, so features stay of moderate size) in a
    temporary fedhead cache that the server and the simulated sites share
    (``FEDHEAD_CACHE``): the run-config keys that select it. The registered ImageNet
    file cannot be installed on a machine without access to download.pytorch.org; the
    statistics round's cost depends on the feature width, not on the weights' values."""
    import torch
    import torchvision

    from fedhead.common.backbones import get_spec
    from fedhead.common.model import weights_filename

    before = os.environ.get("FEDHEAD_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None, zero_init_residual=True)
        staged = Path(tmp) / "resnet50.pth"
        torch.save(model.state_dict(), staged)
        sha = hashlib.sha256(staged.read_bytes()).hexdigest()
        path = Path(tmp) / "weights" / weights_filename(get_spec("resnet50"), sha)
        path.parent.mkdir()
        staged.rename(path)
        os.environ["FEDHEAD_CACHE"] = tmp
        try:
            yield {"backbone": "resnet50", "backbone-weights": str(path), "backbone-sha256": sha}
        finally:
            if before is None:
                del os.environ["FEDHEAD_CACHE"]
            else:
                os.environ["FEDHEAD_CACHE"] = before


def _cost_figures(
    res: Any, figure: Figure, simulate: Simulate, n: int, dim: int, trunk: dict[str, Any]
) -> None:
    with tempfile.TemporaryDirectory() as data:
        _write_small_sites(Path(data), n)
        base = {
            **trunk,
            "input-size": 32,
            "simulation-data": data,
            "round-timeout": 1800.0,
            "fraction-evaluate": 1.0,
        }
        # FedAvg first: its round 2 and the statistics round both find the features cached
        fedavg = simulate({**base, "num-server-rounds": 2}, n)
        closed = simulate({**base, "strategy": "closed-form"}, n)
    stats_round, fedavg_round = closed.rounds[0], fedavg.rounds[1]
    stats_secagg = sum(stats_round.secagg_seconds.values())
    fedavg_secagg = sum(fedavg_round.secagg_seconds.values())
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in stats_round.secagg_seconds.items())
    sent = stats_round.bytes_from_sites / n
    fedavg_sent = fedavg_round.bytes_from_sites / n
    described = closed.closed_form
    name = f"{dim}-wide ({'MobileNetV2' if dim == 1280 else 'ResNet-50, seeded random weights'})"
    res.add(
        figure(
            f"closed_form_run_statistics_secagg_vs_fedavg_{n}_sites_{dim}",
            stats_secagg / fedavg_secagg,
            "(measured)",
            f"{n} simulated sites, {name} trunk, 32 px, 8 training images per site, "
            f"SecAgg+ (every site sharing keys with every other): the statistics round's "
            f"SecAgg+ stages {stats_secagg:.2f} s ({stages}; the whole round with the "
            f"validation message {stats_round.seconds:.2f} s), a FedAvg round of the same "
            f"sites (its second) {fedavg_secagg:.2f} s",
        )
    )
    res.add(
        figure(
            f"closed_form_run_statistics_bytes_per_site_{n}_sites_{dim}",
            sent,
            "(measured)",
            f"the same runs: Flower's serialized messages each site sent in the statistics "
            f"round (SecAgg+'s four stages and the validation replies) {sent / 1e6:.2f} MB "
            f"({described['values_per_site']:,} int64 values, {described['limbs']} "
            f"fixed-point digits per statistic; report.json's closed_form.bytes_per_site "
            f"{described['bytes_per_site'] / 1e6:.2f} MB) and received "
            f"{stats_round.bytes_to_sites / n / 1e6:.3f} MB; in a FedAvg round of the same "
            f"sites each sent {fedavg_sent / 1e3:.1f} KB ({sent / fedavg_sent:.0f} times less)",
        )
    )


def bench_cost(res: Any, figure: Figure, simulate: Simulate, quick: bool) -> None:
    site_counts = [3] if quick else [3, 10, 20]
    for n in site_counts:
        _cost_figures(res, figure, simulate, n, 1280, {})
    if quick:
        return
    with resnet50_checkpoint() as trunk:
        for n in site_counts:
            _cost_figures(res, figure, simulate, n, 2048, trunk)


# --- deployment ----------------------------------------------------------------------------
def bench_deploy(res: Any, figure: Figure, quick: bool) -> None:
    import deployment

    rounds, n_train, px = (3, 40, 64) if quick else (10, 150, 64)
    m = deployment.closed_form_vs_fedavg(SITES, rounds, n_train, px)
    runs = m["runs"]
    first, fedavg, closed = (runs[k] for k in deployment.CLOSED_FORM_RUNS)

    def phases(r: dict[str, Any]) -> str:
        """Where a run's time went, from its ServerApp's log (1 s resolution)."""
        ph = r["phases"]
        return (
            f"start-up until the ServerApp's first line {ph['start-up']:.0f} s, the sites' "
            f"preparation {ph['prepare']:.0f} s, rounds {ph['rounds']:.0f} s, the model's "
            f"delivery {ph['delivery']:.0f} s"
        )

    def stages(per_round: list[dict[str, float]]) -> str:
        names = per_round[0]
        return ", ".join(f"{k} {statistics.mean(r[k] for r in per_round):.1f} s" for k in names)

    fedavg_round = statistics.mean(fedavg["round_seconds"])
    stats_round = closed["round_seconds"][0]
    setup = (
        f"{SITES} sites on {os.cpu_count()} cores ({m['threads']} thread(s) each), {px} "
        f"px, {m['per_site']} training images per site, SecAgg+, the same SuperLink and "
        "SuperNodes"
    )
    res.add(
        figure(
            "closed_form_deployment_speedup_vs_fedavg",
            fedavg["kept"] / closed["kept"],
            ">= 5",
            f"{setup}: from `flwr run` until the model is kept at every site, FedAvg "
            f"{m['rounds']} rounds {fedavg['kept']:.1f} s ({phases(fedavg)}; `flwr run` "
            f"returned after {fedavg['flwr_run']:.1f} s), closed form {closed['kept']:.1f} s "
            f"({phases(closed)}; `flwr run` returned after {closed['flwr_run']:.1f} s). The "
            f"first closed-form run, which extracted and cached the features: "
            f"{first['kept']:.1f} s",
        )
    )
    res.add(
        figure(
            "closed_form_deployment_round_vs_fedavg_round",
            stats_round / fedavg_round,
            "(measured)",
            f"the same runs: the statistics round with its validation message "
            f"{stats_round:.1f} s (SecAgg+ stages {stages(closed['secagg_stages'])}; the "
            f"rest, the solve and the validation message, "
            f"{stats_round - closed['secagg_seconds'][0]:.1f} s), a FedAvg round "
            f"{fedavg_round:.1f} s, mean of {m['rounds']} (SecAgg+ stages "
            f"{stages(fedavg['secagg_stages'])}); rounds "
            f"{', '.join(f'{x:.1f}' for x in fedavg['round_seconds'])} s",
        )
    )


NOTE = (
    "- **Closed-form head in federated runs.** `cfaccuracy` runs the demo's federation "
    "in Flower's Simulation Engine (3 sites of the bundled chest X-rays, each holding out "
    "15% of its share for validation; MobileNetV2 at 128 px; seed 0; the server's test "
    "set the bundled test split) three times per split: `strategy=closed-form` with LDA "
    "(the default) and with `closed-form=ridge`, one statistics round whose "
    "regularisation the sites' validation chooses, and FedAvg for 10 rounds, all under "
    "SecAgg+. Accuracy and AUROC are the report's `server_test_evaluation` for every "
    "run. The single-class split "
    "gives site-0 two thirds of the normal images only, site-1 two thirds of the "
    "pneumonia images only and site-2 the rest of both (`simulation-data`); the Dirichlet "
    "splits are the demo's. Pooled logistic regression and the pooled closed-form head "
    "are fitted on the union of the sites' training parts, with the features the sites "
    "computed (read back from the feature cache they share with the server). "
    "`cfcost` runs the statistics round at 3, 10 and 20 sites of 8 images at 32 px: the "
    "2048-wide rows use a ResNet-50 checkpoint with seeded random weights through "
    "`backbone-weights` (the registered ImageNet file cannot be downloaded on this "
    "machine; the statistics' size and the SecAgg+ work depend on the width only), so "
    "their accuracies mean nothing. `cfdeploy` starts `fedhead superlink` and 3 "
    "`fedhead node` processes as the deployment rows do, at 64 px with 150 training "
    "images per site, and runs a closed-form head, FedAvg for 10 rounds and a "
    "closed-form head again through them, all under SecAgg+; each time is from just "
    "before `flwr run` until the newest file of the model package that every node wrote "
    "into its `models/<run-id>/` (each node's record holds the head the server "
    "delivered). The speed-up is bounded by (10 R + O) / (R_cf + O), with R a FedAvg "
    "round, R_cf the statistics round and O what every run pays once whatever it "
    "trains (the ServerApp's start-up, the sites' preparation, the delivery): with "
    "Flower's per-message floor in every SecAgg+ stage and the statistics round's larger "
    "masked vector (2.5 million digits against a head's 2,562 values) R_cf is about "
    "1.6 R, and O about 1.3 R."
)


def run(res: Any, figure: Figure, simulate: Simulate, parts: set[str], quick: bool) -> None:
    """Add the chosen parts' figures (cfaccuracy, cfcost, cfdeploy) to ``res``."""
    if "cfaccuracy" in parts:
        bench_accuracy(res, figure, simulate, quick)
    if "cfcost" in parts:
        bench_cost(res, figure, simulate, quick)
    if "cfdeploy" in parts:
        bench_deploy(res, figure, quick)
    res.notes.append(NOTE)
