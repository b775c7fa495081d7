"""The run report: per-round results, report.json, a plot and the console table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedhead.common.files import atomic_writer, json_safe
from fedhead.common.package import TrainingSummary
from fedhead.common.rounds import CLINICAL_METRICS, RoundResult


@dataclass
class RunReport:
    run_id: int
    backbone: dict[str, Any]
    clients: int
    input_size: int
    config: dict[str, Any]
    setup: dict[str, Any] = field(default_factory=dict)
    initial_eval: RoundResult | None = None  # round 0: the head before training
    rounds: list[RoundResult] = field(default_factory=list)
    final_eval_accuracy: float = math.nan  # federated: the sites' validation data
    final_eval_loss: float = math.nan
    final_server_eval_accuracy: float = math.nan  # the server's test set, when configured
    final_server_eval_loss: float = math.nan
    # the final head on the server's test set: every metric with its bootstrap interval
    server_test_evaluation: dict[str, Any] | None = None
    centralized_accuracy: float | None = None
    centralized: dict[str, Any] | None = None
    secure_aggregation: str = "none"  # "secagg+" or "none"
    secure_aggregation_params: dict[str, Any] = field(default_factory=dict)
    differential_privacy: dict[str, Any] | None = None
    # The server optimizer (strategy other than fedavg) with the hyper-parameters it
    # ran with, its default learning rate resolved; None: FedAvg.
    server_optimizer: dict[str, Any] | None = None
    # A closed-form head (strategy closed-form): the method, what each site sent, the
    # candidate heads and how the sites' validation scored them, the one chosen.
    closed_form: dict[str, Any] | None = None
    resumed_from: dict[str, Any] | None = None  # round, checkpoint and run id continued
    model: dict[str, Any] | None = None  # the final head's description (incl. its sha256)
    delivery: dict[str, Any] | None = None  # which sites verified and kept the final model
    earlier_models: dict[str, Any] | None = None  # earlier runs' models sent before the rounds
    # per-site outcome (query.outcome): local-only / federated / personalized, the gain
    sites: list[dict[str, Any]] | None = None
    sites_failed: dict[str, str] = field(default_factory=dict)  # site label -> why
    # sites left out of the rest of the run for spoiling a round: site label -> why
    sites_excluded: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    # The global trainable tensors after the last round (TrainableSet order); kept for
    # the model package, never written to report.json.
    final_arrays: list[np.ndarray] = field(default_factory=list, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = json_safe(asdict(replace(self, final_arrays=[])))
        del cleaned["final_arrays"]
        return cleaned

    def final_metrics(self) -> dict[str, float | None]:
        """The run's final metrics as a model package records them (None: not measured)."""

        def last(values: Sequence[float]) -> float | None:
            finite = [v for v in values if math.isfinite(v)]
            return finite[-1] if finite else None

        return {
            "federated_eval_accuracy": last([self.final_eval_accuracy]),
            "federated_eval_loss": last([self.final_eval_loss]),
            "initial_federated_eval_accuracy": last(
                [self.initial_eval.eval_accuracy if self.initial_eval else math.nan]
            ),
            "server_test_accuracy": last([r.server_eval_accuracy for r in self.rounds]),
            "server_test_loss": last([r.server_eval_loss for r in self.rounds]),
            # pooled from the sites' count tables (AUROC: exact up to the score binning)
            **{
                f"federated_eval_{name}": last(
                    [r.eval_metrics.get(name, math.nan) for r in self.rounds]
                )
                for name in CLINICAL_METRICS
            },
        }

    def training_summary(self, class_counts: Sequence[int] | None = None) -> TrainingSummary:
        """Who trained the model on how much data (class counts only where known)."""
        return TrainingSummary(
            run_id=self.run_id,
            rounds=len(self.rounds),
            sites=self.clients,
            examples=int(self.setup.get("train_examples", 0)),
            class_counts=None if class_counts is None else tuple(int(c) for c in class_counts),
            secure_aggregation=self.secure_aggregation,
            differential_privacy=self.differential_privacy,
        )


# The ServerApp logs the finished report as one JSON line after this prefix, so the
# operator's `fedhead run` (or `fedhead runs --fetch-report`) collects it through the
# run's log, from wherever the SuperLink runs.
REPORT_LOG_PREFIX = "fedhead-report-json: "

# eval: federated, on the sites' validation data (auroc: pooled from the sites' score
# histograms); test: the server's test set (or -)
TABLE_HEADER = (
    f"{'round':>5}  {'train loss':>10}  {'eval loss':>9}  {'eval acc':>8}  {'auroc':>6}  "
    f"{'bal acc':>7}  {'test acc':>8}  {'to sites':>10}  {'from sites':>10}  {'seconds':>7}"
)


def _fmt(v: float, spec: str) -> str:
    return format(v, spec) if math.isfinite(v) else "-"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def table_row(r: RoundResult) -> str:
    return (
        f"{r.round:>5}  {_fmt(r.train_loss, '.4f'):>10}  {_fmt(r.eval_loss, '.4f'):>9}  "
        f"{_fmt(r.eval_accuracy, '.4f'):>8}  "
        f"{_fmt(r.eval_metrics.get('auroc', math.nan), '.4f'):>6}  "
        f"{_fmt(r.eval_metrics.get('balanced_accuracy', math.nan), '.4f'):>7}  "
        f"{_fmt(r.server_eval_accuracy, '.4f'):>8}  "
        f"{human_bytes(r.bytes_to_sites):>10}  "
        f"{human_bytes(r.bytes_from_sites):>10}  {r.seconds:>7.2f}"
    )


def plot(report: RunReport, path: Path) -> Path:
    """Accuracy and loss by round as a PNG (centralized accuracy dashed, if known); a
    closed-form head without fine-tuning rounds: the candidates the sites chose from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in report.rounds]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    grid = (report.closed_form or {}).get("grid") or []
    if grid and len(rounds) == 1:
        _plot_candidates(report, grid, ax_acc, ax_loss)
        return _save(report, fig, path)
    acc = [r.eval_accuracy for r in report.rounds]
    if report.initial_eval is not None and math.isfinite(report.initial_eval.eval_accuracy):
        rounds, acc = [0, *rounds], [report.initial_eval.eval_accuracy, *acc]
    ax_acc.plot(rounds, acc, "o-", label="federated eval")
    if any(math.isfinite(r.server_eval_accuracy) for r in report.rounds):
        ax_acc.plot(
            [r.round for r in report.rounds],
            [r.server_eval_accuracy for r in report.rounds],
            "s-",
            label="server test set",
        )
    if report.centralized_accuracy is not None:
        ax_acc.axhline(report.centralized_accuracy, ls="--", c="gray", label="centralized")
    ax_acc.set(xlabel="round", ylabel="accuracy", title="Accuracy by round")
    ax_acc.legend()
    trained = [r.round for r in report.rounds]
    ax_loss.plot(trained, [r.train_loss for r in report.rounds], "o-", label="train (sites)")
    ax_loss.plot(trained, [r.eval_loss for r in report.rounds], "s-", label="federated eval")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss by round")
    ax_loss.legend()
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.set_xticks(rounds)
    ax_acc.set_ylim(top=1.0)
    return _save(report, fig, path)


def _plot_candidates(
    report: RunReport, grid: Sequence[dict[str, Any]], ax_acc: Any, ax_loss: Any
) -> None:
    """The closed-form round: each candidate head's pooled validation scores at the
    sites by its regularisation, the chosen one marked, with its server test accuracy."""
    method = str(grid[0].get("method", ""))
    name = "shrinkage" if method == "lda" else "lambda (x N)"
    x = [float(g["parameter"]) for g in grid]
    for key, label, style in (
        ("balanced_accuracy", "balanced accuracy (sites' validation)", "o-"),
        ("eval_accuracy", "accuracy (sites' validation)", "s-"),
    ):
        ax_acc.plot(x, [_num(g.get(key)) for g in grid], style, label=label)
    ax_loss.plot(x, [_num(g.get("eval_loss")) for g in grid], "s-", label="sites' validation")
    chosen = next((g for g in grid if g.get("chosen")), None)
    if chosen is not None:
        at = float(chosen["parameter"])
        ax_acc.axvline(at, c="gray", ls=":", label=f"chosen: {chosen.get('candidate', at)}")
        ax_loss.axvline(at, c="gray", ls=":")
        test = report.rounds[0].server_eval_accuracy
        if math.isfinite(test):
            ax_acc.plot([at], [test], "*", ms=12, label=f"chosen, server test set {test:.4f}")
    if report.centralized_accuracy is not None:
        ax_acc.axhline(
            report.centralized_accuracy, ls="--", c="gray", label="centralized, server test set"
        )
    ax_acc.set(xlabel=name, ylabel="accuracy", title=f"Closed-form {method}: candidates")
    ax_loss.set(xlabel=name, ylabel="cross-entropy", title="Validation loss by candidate")
    for ax in (ax_acc, ax_loss):
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax_acc.set_ylim(top=1.0)


def _save(report: RunReport, fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(f"fedhead: {report.backbone.get('name')} head, {report.clients} sites")
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


SITES_HEADER = (
    f"{'site':<20}  {'local-only':>10}  {'federated':>9}  {'personal.':>9}  "
    f"{'gain':>7}  {'gain 95% CI':>17}  {'bal. gain':>9}  flag"
)


def _acc(head: dict[str, Any] | None) -> float:
    if head is None or head.get("accuracy") is None:
        return math.nan
    return float(head["accuracy"])


def sites_table(sites: Sequence[dict[str, Any]], failed: dict[str, str]) -> list[str]:
    """The per-site outcome as console lines: validation accuracy of each head, the gain
    federated - local-only with its paired interval, the same gain in balanced accuracy,
    and the negative-transfer flag
    (a personalized head that did not beat the federated one is shown in brackets)."""
    lines = [SITES_HEADER]
    for s in sites:
        gain = s.get("gain") or {}
        lo, hi = gain.get("ci95") or [None, None]
        personal = _fmt(_acc(s.get("personalized")), ".4f")
        if s.get("personalized") is not None and not s.get("personalized_kept"):
            personal = f"({personal})"
        ci = f"[{_fmt(_num(lo), '+.3f')}, {_fmt(_num(hi), '+.3f')}]" if gain else "-"
        lines.append(
            f"{s['site'][:20]:<20}  {_fmt(_acc(s.get('local_only')), '.4f'):>10}  "
            f"{_fmt(_acc(s.get('federated')), '.4f'):>9}  {personal:>9}  "
            f"{_fmt(_num(gain.get('accuracy')), '+.4f'):>7}  {ci:>17}  "
            f"{_fmt(_num(gain.get('balanced_accuracy')), '+.4f'):>9}  "
            f"{'NEGATIVE TRANSFER' if s.get('negative_transfer') else ''}"
        )
    for site, why in sorted(failed.items()):
        lines.append(f"{site[:20]:<20}  no outcome: {why}")
    return lines


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else math.nan


def plot_sites(report: RunReport, path: Path) -> Path:
    """Per-site validation accuracy of the local-only, federated and personalized heads
    as grouped bars, with each head's 95% interval; negative-transfer sites marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = report.sites or []
    heads = [
        ("local_only", "local-only"),
        ("federated", "federated"),
        ("personalized", "personalized"),
    ]
    shown = [(k, label) for k, label in heads if any(s.get(k) for s in sites)]
    width = 0.8 / max(len(shown), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(sites) + 2), 4))
    x = np.arange(len(sites))
    for i, (key, label) in enumerate(shown):
        acc = [_acc(s.get(key)) for s in sites]
        err = [
            [
                a - _num((s.get(key) or {}).get("accuracy_lo"))
                for a, s in zip(acc, sites, strict=True)
            ],
            [
                _num((s.get(key) or {}).get("accuracy_hi")) - a
                for a, s in zip(acc, sites, strict=True)
            ],
        ]
        ax.bar(x + (i - (len(shown) - 1) / 2) * width, acc, width, yerr=err, capsize=3, label=label)
    names = [
        s["site"] + ("\n(negative transfer)" if s.get("negative_transfer") else "") for s in sites
    ]
    ax.set_xticks(x, names)
    ax.set(
        ylabel="validation accuracy",
        ylim=(0, 1.05),
        title="Accuracy per site, on its own validation split",
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(shown), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
