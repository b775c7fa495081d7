"""The closed-form head (issue 23) offline: accuracy against pooled logistic regression,
federated = pooled through Flower's SecAgg+ arithmetic, bytes and SecAgg+ arithmetic time.

    python benchmarks/run.py --only closedform [--quick]

Features of the bundled chest X-rays (MobileNetV2 trunk at 128 px, fedhead's own
extractor and cache); all heads are fitted on the whole training split and tested on
the bundled test split. The federated heads sum per-site statistics through
``FixedPointCodec`` and Flower's own quantize / mask / unmask functions
(``tests/secagg_replay.py``), in-process: no SuperLink, no messages.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedhead.common import closed_form as cf
from fedhead.common.closed_form import FixedPointCodec, Layout, LinearHead, Statistics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Flower's SecAgg+ replay
from tests.secagg_replay import Federation

if TYPE_CHECKING:
    from run import Figure, Results

SECTION = "Closed-form head (issue 23): one round of summed statistics"
COMMAND = "python benchmarks/run.py --only closedform"
LDA_SHRINKAGE, RIDGE_LAMBDA, LOGISTIC_C = 0.1, 0.01, 1.0
# The figures issue 23 reported for these features (accuracy, AUROC on the test split).
REFERENCE = {"lda": (0.857, 0.953), "ridge": (0.861, 0.949), "logistic": (0.840, 0.942)}
MAX_WEIGHT = 1000  # Flower's default: every site reports it for the statistics round


@dataclass(frozen=True)
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def demo_features() -> Data:
    from fedhead.common import demo_data
    from fedhead.common.config import RunConfig
    from fedhead.common.images import ArrayImages
    from fedhead.server.server_model import build_server_model
    from fedhead.server.testset import server_extractor

    cfg = RunConfig.from_mapping({"classes": "normal,pneumonia", "input-size": 128})
    extractor, _ = server_extractor(cfg, build_server_model(cfg))
    out = []
    for split in ("train", "test"):
        part = demo_data.load(split)
        feats = extractor(ArrayImages(part.images, f"demo-{split}"))
        out += [feats.values.numpy().astype(np.float64), part.labels[feats.ok]]
    return Data(*out)


def metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    from fedhead.common.evaluation import point_metrics

    m = point_metrics(y, proba, ["normal", "pneumonia"])
    return {k: m[k] for k in ("accuracy", "auroc", "balanced_accuracy")}


def _show(m: dict[str, float]) -> str:
    acc, auroc, balanced = m["accuracy"], m["auroc"], m["balanced_accuracy"]
    return f"accuracy {acc:.3f}, AUROC {auroc:.3f}, balanced {balanced:.3f}"


def heads(stats: Statistics) -> dict[str, LinearHead]:
    return {
        "lda": cf.lda_head(stats, LDA_SHRINKAGE),
        "ridge": cf.ridge_head(stats, RIDGE_LAMBDA),
    }


def splits(y: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Index sets per site: IID, Dirichlet 0.3 and 0.1 over 3 sites, and 4 sites
    holding one class each (two per class)."""
    from fedhead.common.partition import dirichlet_partition, iid_partition

    single = []
    for c in (0, 1):
        idx = np.random.default_rng(c).permutation(np.flatnonzero(y == c))
        single += [np.sort(p) for p in np.array_split(idx, 2)]
    return {
        "iid": iid_partition(len(y), 3, seed=0),
        "alpha_0.3": dirichlet_partition(y, 3, 0.3, seed=0),
        "alpha_0.1": dirichlet_partition(y, 3, 0.1, seed=0),
        "single_class": single,
    }


def secagg_sum(sites: list[Statistics], codec: FixedPointCodec) -> Statistics:
    """The sites' statistics summed through the codec and Flower's SecAgg+ arithmetic."""
    fed = Federation(len(sites), max_weight=float(MAX_WEIGHT))
    encoded = [codec.encode(s.to_vector(), s.layout) for s in sites]
    mean = fed.aggregate(encoded, [MAX_WEIGHT] * len(sites))
    return Statistics.from_vector(codec.decode(mean, len(sites)), sites[0].layout)


def bench_accuracy(
    res: Results, figure: Callable[..., Figure], data: Data
) -> dict[str, LinearHead]:
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    logistic = LogisticRegression(C=LOGISTIC_C, max_iter=5000).fit(data.x_train, data.y_train)
    logistic_s = time.perf_counter() - t0
    base = metrics(data.y_test, logistic.predict_proba(data.x_test))
    t0 = time.perf_counter()
    pooled = Statistics.of(data.x_train, data.y_train, 2)
    stats_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fitted = heads(pooled)
    solve_s = time.perf_counter() - t0
    ref = REFERENCE["logistic"]
    setup = (
        f"{len(data.y_train)} training images (bundled train split), MobileNetV2 features "
        f"at 128 px ({data.x_train.shape[1]} wide), bundled test split of {len(data.y_test)}"
    )
    for name, head in fitted.items():
        m = metrics(data.y_test, head.probabilities(data.x_test))
        param = f"shrinkage {LDA_SHRINKAGE}" if name == "lda" else f"lambda {RIDGE_LAMBDA} x N"
        res.add(
            figure(
                f"closed_form_{name}_accuracy_gain_vs_logistic",
                m["accuracy"] - base["accuracy"],
                ">= -0.01",
                f"{setup}: closed-form {name} ({param}) {_show(m)}; pooled logistic "
                f"regression (scikit-learn, C={LOGISTIC_C:g}) {_show(base)} (an accuracy "
                f"difference, not a ratio). Issue 23 measured {name} "
                f"{REFERENCE[name][0]:.3f} / {REFERENCE[name][1]:.3f} and logistic "
                f"{ref[0]:.3f} / {ref[1]:.3f} (accuracy / AUROC). Time: statistics "
                f"{stats_s:.2f} s + both solves {solve_s:.2f} s, logistic fit {logistic_s:.2f} s",
            )
        )
    for method in cf.METHODS:
        grid = cf.candidate_heads(pooled, method)
        accuracies = [metrics(data.y_test, c.head.probabilities(data.x_test)) for c in grid]
        each = ", ".join(
            f"{c.parameter:g}: {m['accuracy']:.3f}" for c, m in zip(grid, accuracies, strict=True)
        )
        res.notes.append(
            f"- **Closed-form {method} grid** (test accuracy per candidate, for "
            f"information; a run chooses on the sites' validation splits): {each}."
        )
    return fitted


def bench_federated(
    res: Results, figure: Callable[..., Figure], data: Data, pooled: dict[str, LinearHead]
) -> None:
    codec = FixedPointCodec()
    for label, parts in splits(data.y_train).items():
        sites = [Statistics.of(data.x_train[p], data.y_train[p], 2) for p in parts]
        fed = heads(secagg_sum(sites, codec))
        diffs, shown = [], []
        for name, head in fed.items():
            p = head.probabilities(data.x_test)
            diffs.append(float(np.abs(p - pooled[name].probabilities(data.x_test)).max()))
            shown.append(f"{name} {_show(metrics(data.y_test, p))}")
        mix = "; ".join(f"{int(s.counts[0])}/{int(s.counts[1])}" for s in sites)
        res.add(
            figure(
                f"closed_form_max_probability_difference_{label}",
                max(diffs),
                "<= 1e-4",
                f"{len(sites)} sites (normal/pneumonia per site: {mix}), statistics summed "
                f"through the fixed-point code ({codec.limbs} digits of {codec.digit_bits} "
                f"bits, F={codec.fraction_bits}) and Flower's SecAgg+ quantize, masks and "
                f"unmask arithmetic, every site reporting num_examples = max_weight = "
                f"{MAX_WEIGHT}: largest |p_federated - p_pooled| over the test split and "
                f"both heads (lda {diffs[0]:.1e}, ridge {diffs[1]:.1e}); federated "
                f"{', '.join(shown)}",
            )
        )


def _synthetic_statistics(dim: int) -> Statistics:
    rng = np.random.default_rng(dim)
    x = np.maximum(rng.normal(0.3, 1.0, (256, dim)), 0)
    return Statistics.of(x, rng.integers(0, 2, 256), 2)


def bench_bytes(res: Results, figure: Callable[..., Figure]) -> None:
    codec = FixedPointCodec()
    for dim, trunk in ((1280, "MobileNetV2"), (2048, "ResNet-50")):
        layout = Layout(2, dim)
        head_bytes = 4 * (2 * dim + 2)
        res.add(
            figure(
                f"closed_form_bytes_per_site_{dim}",
                codec.bytes_per_site(layout),
                "(measured)",
                f"{trunk} ({dim} wide), 2 classes: {layout.size:,} statistics (counts, class "
                f"sums, Gram upper triangle); a site's masked SecAgg+ vector is "
                f"{codec.limbs} int64 digits per statistic = "
                f"{codec.bytes_per_site(layout) / 1e6:.1f} MB, once (plain: float64 "
                f"{layout.bytes_float64() / 1e6:.1f} MB); a FedAvg run sends the float32 "
                f"head ({head_bytes / 1e3:.1f} KB) each way each round",
            )
        )


def bench_secagg_time(
    res: Results, figure: Callable[..., Figure], site_counts: list[int], dims: list[int]
) -> None:
    """Per site: encode + Flower's quantize and masks (pairwise with every other site,
    as fedhead's default shares); server: sum mod 2^32, unmask, decode."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        parameters_addition,
        parameters_mod,
    )

    codec = FixedPointCodec()
    for dim in dims:
        stats = _synthetic_statistics(dim)
        vector = stats.to_vector()
        for n in site_counts:
            fed = Federation(n, max_weight=float(MAX_WEIGHT))
            site_s, server_s, total = [], 0.0, None
            for i in range(n):
                t0 = time.perf_counter()
                masked = fed.masked_vector(i, codec.encode(vector, stats.layout), MAX_WEIGHT)
                site_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                total = masked if total is None else parameters_addition(total, masked)
                server_s += time.perf_counter() - t0
            assert total is not None
            t0 = time.perf_counter()
            total = parameters_mod(total, fed.modulus_range)
            decoded = codec.decode(fed.unmask(total), n)
            server_s += time.perf_counter() - t0
            err = float(np.abs(decoded - n * vector).max())
            assert err <= codec.error_bound(n) + 1e-9 * float(np.abs(n * vector).max())
            site = float(np.mean(site_s))
            res.add(
                figure(
                    f"closed_form_secagg_seconds_{n}_sites_{dim}",
                    site + server_s,
                    "(measured)",
                    f"{n} sites, {dim}-wide statistics ({3 * stats.layout.size:,} digits), "
                    f"in-process proxy of the arithmetic only (no messages, no key "
                    f"exchange): per site encode + Flower quantize + private and {n - 1} "
                    f"pairwise masks {site:.2f} s (sites work in parallel), server sum mod "
                    f"2^32 + unmask + decode {server_s:.2f} s; decoded sum within "
                    f"{err:.1e} of the exact one",
                )
            )


def _clipped(x: np.ndarray, r: float) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = x * np.minimum(1.0, r / np.maximum(norms, 1e-300))
    return out


def bench_dp(
    res: Results, figure: Callable[..., Figure], data: Data, noise_multipliers: list[float]
) -> None:
    """LDA from one Gaussian release of the pooled statistics, features clipped to
    the median norm of the training features (test features too, as a DP head's
    package must); beside it the same without noise, and nearest class means."""
    r = float(np.median(np.linalg.norm(data.x_train, axis=1)))
    clipped = cf.clipped_statistics(data.x_train, data.y_train, 2, r)
    x_test = _clipped(data.x_test, r)

    def accuracy(stats: Statistics, shrinkage: float) -> dict[str, float]:
        return metrics(data.y_test, cf.lda_head(stats, shrinkage).probabilities(x_test))

    exact = accuracy(clipped.statistics, 0.3)["accuracy"]
    centroid = accuracy(clipped.statistics, 1.0)["accuracy"]
    for z in noise_multipliers:
        release = cf.GaussianRelease(z, r, delta=1e-5)
        runs = [
            accuracy(release.release(clipped.statistics, np.random.default_rng(seed)), 0.3)
            for seed in range(3)
        ]
        acc = float(np.mean([m["accuracy"] for m in runs]))
        auroc = float(np.mean([m["auroc"] for m in runs]))
        eps = release.epsilon()
        stds = ", ".join(f"{s:.3g}" for s in release.noise_stds())
        res.add(
            figure(
                f"closed_form_dp_lda_accuracy_epsilon_{eps:.2g}",
                acc,
                "(measured)",
                f"LDA (shrinkage 0.3) from one Gaussian release (noise multiplier {z:g}, "
                f"stds {stds} on counts, sums, Gram) of the statistics of features "
                f"clipped to L2 norm {r:.2f} (the median; {clipped.clipped} of "
                f"{clipped.examples} clipped): epsilon {eps:.2f} at delta 1e-5 per image; "
                f"mean of 3 releases: accuracy {acc:.3f}, AUROC {auroc:.3f}. Without "
                f"noise: {exact:.3f}; nearest class means (shrinkage 1, no noise): "
                f"{centroid:.3f}",
            )
        )


def run(res: Results, figure: Callable[..., Figure], quick: bool) -> None:
    """Add the closed-form figures to ``res`` (benchmarks/run.py's Results)."""
    data = demo_features()
    pooled = bench_accuracy(res, figure, data)
    bench_federated(res, figure, data, pooled)
    bench_bytes(res, figure)
    bench_secagg_time(res, figure, [3] if quick else [3, 10, 20], [1280] if quick else [1280, 2048])
    bench_dp(res, figure, data, [2.0] if quick else [1.0, 2.0, 4.0])
    res.notes.append(NOTE)


NOTE = (
    "- **Closed-form head.** Every head here is fitted on the whole bundled training "
    "split's features (MobileNetV2, 128 px, fedhead's extractor and float16 cache) and "
    "tested on the bundled test split. Closed-form LDA and ridge solve from the summed "
    "statistics (class counts, class sums, Gram matrix; `fedhead.common.closed_form`); "
    "the ridge scores are calibrated into probabilities from the same statistics. The "
    "federated rows split the training split over sites (IID, Dirichlet 0.3 and 0.1 "
    "over 3 sites, and 4 sites holding one class each), sum the sites' statistics "
    "through the fixed-point code and Flower's own SecAgg+ functions in-process "
    "(`tests/secagg_replay.py`: quantize, factor_combine, private and pairwise masks mod "
    "2^32, Shamir-rebuilt private masks, dequantize, offset and ratio), and compare the "
    "heads' test probabilities with the pooled heads'. SecAgg+ timings are the arithmetic "
    "only (a proxy: no SuperLink, messages or key exchange, whose cost a real round adds, "
    "see deployment_round_seconds). The DP rows clip features to the median norm, which "
    "a real run must fix without looking at the data, and clip the test features the "
    "same way. At these sizes (2,428 images, 1,280-wide features) the Gram's noise "
    "(spectral norm about 2 std sqrt(D)) outweighs its signal at every epsilon tried, so "
    "the released LDA is about as accurate as nearest class means: a DP closed-form "
    "head needs far more examples per feature dimension."
    " FedAvg is not run here: the main table's accuracy rows give its figures "
    "(another run, sites that hold out 15% of their images for validation)."
)
