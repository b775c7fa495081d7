"""The run report: per-round records, report.json, a plot and the console table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedhead.common.files import atomic_writer


@dataclass
class RoundRecord:
    round: int
    train_loss: float = math.nan  # example-weighted mean over sites, last local epoch
    eval_loss: float = math.nan  # federated evaluation: example-weighted over sites
    eval_accuracy: float = math.nan
    server_eval_loss: float = math.nan  # server-side test set, when configured
    server_eval_accuracy: float = math.nan
    bytes_to_clients: int = 0
    bytes_from_clients: int = 0
    seconds: float = 0.0
    sites_selected: int = 0
    sites_replied: int = 0
    sites_failed: int = 0  # answered with an error
    sites_dropped: int = 0  # never delivered an update (died or timed out)
    updates_rejected: dict[str, int] = field(default_factory=dict)
    aggregated: bool = False  # False: too few valid updates, global head unchanged
    secagg_seconds: dict[str, float] = field(default_factory=dict)  # SecAgg+ stage durations
    dp_epsilon: float | None = None  # cumulative, at the run's dp delta (DP runs only)


@dataclass
class RunReport:
    run_id: int
    backbone: dict[str, Any]
    clients: int
    input_size: int
    config: dict[str, Any]
    setup: dict[str, Any] = field(default_factory=dict)
    initial_eval: dict[str, float] = field(default_factory=dict)  # the head before round 1
    rounds: list[RoundRecord] = field(default_factory=list)
    final_eval_accuracy: float = math.nan  # federated: the sites' validation data
    final_eval_loss: float = math.nan
    final_server_eval_accuracy: float = math.nan  # the server's test set, when configured
    final_server_eval_loss: float = math.nan
    centralized_accuracy: float | None = None
    centralized: dict[str, Any] | None = None
    secure_aggregation: str = "none"  # "secagg+" or "none"
    secure_aggregation_params: dict[str, Any] = field(default_factory=dict)
    differential_privacy: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = _clean(asdict(self))
        return cleaned

    def write(self, out_dir: Path) -> Path:
        path = out_dir / "report.json"
        with atomic_writer(path) as f:
            f.write((json.dumps(self.to_json(), indent=2) + "\n").encode())
        return path


def _clean(obj: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


# The ServerApp logs the finished report as one JSON line after this prefix, so the
# operator's `fedhead run` (or `fedhead runs --fetch-report`) collects it through the
# run's log, from wherever the SuperLink runs.
REPORT_LOG_PREFIX = "fedhead-report-json: "

# eval: federated, on the sites' validation data; test: the server's test set (or -)
TABLE_HEADER = (
    f"{'round':>5}  {'train loss':>10}  {'eval loss':>9}  {'eval acc':>8}  {'test acc':>8}  "
    f"{'to sites':>10}  {'from sites':>10}  {'seconds':>7}"
)


def _fmt(v: float, spec: str) -> str:
    return format(v, spec) if math.isfinite(v) else "-"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def table_row(r: RoundRecord) -> str:
    return (
        f"{r.round:>5}  {_fmt(r.train_loss, '.4f'):>10}  {_fmt(r.eval_loss, '.4f'):>9}  "
        f"{_fmt(r.eval_accuracy, '.4f'):>8}  {_fmt(r.server_eval_accuracy, '.4f'):>8}  "
        f"{human_bytes(r.bytes_to_clients):>10}  "
        f"{human_bytes(r.bytes_from_clients):>10}  {r.seconds:>7.2f}"
    )


def plot(report: RunReport, path: Path) -> Path:
    """Accuracy and loss by round as a PNG (centralized accuracy dashed, if known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in report.rounds]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    acc = [r.eval_accuracy for r in report.rounds]
    if math.isfinite(report.initial_eval.get("eval_accuracy", math.nan)):
        rounds, acc = [0, *rounds], [report.initial_eval["eval_accuracy"], *acc]
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
    fig.suptitle(f"fedhead: {report.backbone.get('name')} head, {report.clients} sites")
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path
