"""``fedhead demo``: a complete federated job on the embedded chest X-ray data.

Simulated hospitals (Flower's Simulation Engine) each hold a non-IID share of the
bundled training split and validate on a part held out from that share. The bundled
test split stays untouched: the server measures the final accuracy on it
(``server-test-data``). The head is trained federatedly and, for comparison, centrally
on the pooled training parts of the hospitals with the same schedule.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhead.cli.exporter import Exporter, prepare_spool
from fedhead.common import demo_data
from fedhead.common.config import CLOSED_FORM, RunConfig
from fedhead.common.errors import ConfigError, FedheadError
from fedhead.common.images import ArrayImages
from fedhead.common.logs import setup_logging
from fedhead.common.model import FedHeadModel
from fedhead.common.package import package_from_run
from fedhead.common.simulation import backend_config, write_site_npz
from fedhead.common.telemetry import SPOOL_ENV
from fedhead.common.training import TrainParams, evaluate_head, round_seed, scheduled_lr, train_head
from fedhead.server.checkpoints import holds_checkpoints
from fedhead.server.model_card import model_card
from fedhead.server.recorder import ReportCallback
from fedhead.server.report import (
    TABLE_HEADER,
    RunReport,
    human_bytes,
    plot,
    plot_sites,
    sites_table,
    table_row,
)
from fedhead.server.rundir import RunDir
from fedhead.server.server_model import build_server_model
from fedhead.server.testset import server_extractor

log = logging.getLogger(__name__)

DEMO_ROUNDS = 10  # FedAvg rounds when --rounds is not given
TEST_FILE = "test.npz"  # the bundled test split, for the server's evaluation only


@dataclass(frozen=True)
class DemoOptions:
    rounds: int | None = None  # FedAvg rounds (10 when not given)
    clients: int = 3
    out: Path = Path("demo-out")
    alpha: float = 0.5
    input_size: int = 128
    backbone: str = "mobilenet_v2"
    local_epochs: int = 5
    learning_rate: float = 0.01
    seed: int = 0
    device: str = "auto"
    secure_aggregation: bool = True
    metrics_address: str = "none"
    verbose: bool = False
    resume: bool = False  # continue the run whose checkpoints are in ``out``
    strategy: str = CLOSED_FORM  # run-config key strategy
    closed_form: str = "lda"  # run-config key closed-form
    fine_tune_rounds: int = 0  # run-config key fine-tune-rounds
    proximal_mu: float = 0.0  # FedProx at the sites (run-config key proximal-mu)
    local_baseline: bool = True  # each site also trains alone: the per-site gain
    personalize_epochs: int = 0

    def run_config(self) -> RunConfig:
        return RunConfig.from_mapping(
            {
                "backbone": self.backbone,
                "classes": ",".join(demo_data.CLASSES),
                "input-size": self.input_size,
                "num-server-rounds": DEMO_ROUNDS if self.rounds is None else self.rounds,
                "local-epochs": self.local_epochs,
                "learning-rate": self.learning_rate,
                "min-sites": self.clients,
                "seed": self.seed,
                "device": self.device,
                "simulation-data": str((self.out / "sites").resolve()),
                "server-test-data": str((self.out / TEST_FILE).resolve()),
                "dirichlet-alpha": self.alpha,
                "out-dir": str(self.out),
                "join-timeout": 120.0,
                "secure-aggregation": self.secure_aggregation,
                "resume-from": str(self.out) if self.resume else "",
                "strategy": self.strategy,
                "closed-form": self.closed_form,
                "fine-tune-rounds": self.fine_tune_rounds,
                "proximal-mu": self.proximal_mu,
                "local-baseline": self.local_baseline,
                "personalize-epochs": self.personalize_epochs,
            }
        )


def _check(opts: DemoOptions) -> None:
    problems = []
    if opts.rounds is not None and opts.rounds < 1:
        problems.append(f"--rounds: must be >= 1 (got {opts.rounds})")
    if opts.rounds is not None and opts.strategy == CLOSED_FORM:
        problems.append(
            "--rounds: counts FedAvg rounds; the closed-form head takes one statistics round "
            "(add FedAvg rounds after it with --fine-tune-rounds, or choose --strategy fedavg)"
        )
    if opts.fine_tune_rounds < 0:
        problems.append(f"--fine-tune-rounds: must be >= 0 (got {opts.fine_tune_rounds})")
    if not 2 <= opts.clients <= 50:
        problems.append(f"--clients: must be between 2 and 50 (got {opts.clients})")
    if opts.alpha <= 0:
        problems.append(f"--alpha: must be > 0 (got {opts.alpha})")
    if opts.personalize_epochs < 0:
        problems.append(f"--personalize-epochs: must be >= 0 (got {opts.personalize_epochs})")
    held = holds_checkpoints(RunDir(opts.out).checkpoints)
    if held and not opts.resume:
        problems.append(
            f"--out: {opts.out} holds checkpoints of an earlier demo; add --resume to "
            "continue it, or choose another --out"
        )
    if opts.resume and not held:
        problems.append(f"--resume: {opts.out} holds no checkpoints to continue from")
    if problems:
        raise ConfigError(problems, "demo options")


def _write_sites(opts: DemoOptions) -> list[demo_data.Share]:

    write_site_npz(opts.out / TEST_FILE, demo_data.load("test"))
    shares = demo_data.shares(opts.clients, opts.alpha, opts.seed)
    for i, share in enumerate(shares):
        write_site_npz(opts.out / "sites" / f"site-{i}.npz", share.train, share.val)
    return shares


def _aggregation(cfg: RunConfig) -> str:
    """How the sites' updates become the global head, in the demo's header."""
    text = cfg.training_text()
    sgd = not cfg.closed_form_applies() or cfg.fine_tune_rounds > 0  # FedProx acts there
    return text + (f" with FedProx mu={cfg.proximal_mu:g}" if sgd and cfg.proximal_mu > 0 else "")


def _counts(labels: np.ndarray) -> str:
    c = np.bincount(labels, minlength=len(demo_data.CLASSES))
    return ", ".join(f"{n} {name}" for name, n in zip(demo_data.CLASSES, c, strict=True))


def centralized_baseline(
    cfg: RunConfig,
    progress: bool,
    shares: list[demo_data.Share] | None = None,
    federated: list[np.ndarray] | None = None,
    closed_form: str = "",
) -> dict[str, Any]:
    """The same head trained on the pooled training data (the sites' training parts, or
    the whole training split), with the federated schedule: ``num-server-rounds``
    stages of ``local-epochs`` epochs at the round's learning rate; tested on the
    bundled test split. Beside it, under ``closed_form``, the closed-form head of the
    pooled data (the candidate the sites chose, e.g. "lda shrinkage=0.1"; without one,
    the run's method at its grid's middle), and how far the ``federated`` head's test
    probabilities lie from it (a closed-form run: the same head, up to the fixed-point
    code)."""
    sm = build_server_model(cfg)
    initial = sm.trainable.get(sm.model)
    extractor, device = server_extractor(cfg, sm, progress)
    train, test = demo_data.load("train"), demo_data.load("test")
    if shares is not None:
        train = demo_data.Split(
            np.concatenate([s.train.images for s in shares]),
            np.concatenate([s.train.labels for s in shares]),
        )
    f_train = extractor(ArrayImages(train.images, "demo-train"))
    f_test = extractor(ArrayImages(test.images, "demo-test"))
    y_train = torch.from_numpy(train.labels[f_train.ok])
    y_test = torch.from_numpy(test.labels[f_test.ok])
    t0 = time.perf_counter()
    sm.trainable.set(sm.model, initial)
    for rnd in range(1, cfg.num_server_rounds + 1):
        lr = scheduled_lr(cfg.learning_rate, rnd, cfg.num_server_rounds, cfg.lr_schedule)
        params = TrainParams(
            cfg.local_epochs,
            cfg.batch_size,
            lr,
            cfg.optimizer,
            cfg.momentum,
            cfg.weight_decay,
            cfg.unfreeze_lr_scale,
            round_seed(cfg.seed, rnd),
        )
        train_head(sm.model, f_train.values, y_train, params, device)
    result = evaluate_head(sm.model, f_test.values, y_test, device)
    x_test = f_test.values.float().numpy()
    return {
        "accuracy": result.accuracy,
        "loss": result.loss,
        "train_examples": len(y_train),
        "test_examples": result.examples,
        "epochs": cfg.num_server_rounds * cfg.local_epochs,
        "seconds": time.perf_counter() - t0,
        "closed_form": _pooled_closed_form(
            cfg, f_train.values.float().numpy(), y_train.numpy(), x_test, y_test.numpy(),
            federated, closed_form,
        ),
    }  # fmt: skip


def _pooled_closed_form(
    cfg: RunConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    federated: list[np.ndarray] | None,
    chosen: str,
) -> dict[str, Any]:
    """The closed-form head of the pooled training features, on the test split."""
    from fedhead.common.closed_form import (
        LDA_SHRINKAGES,
        RIDGE_LAMBDAS,
        Statistics,
        candidate_heads,
    )

    if chosen:
        method, parameter = chosen.split(" ")[0], float(chosen.split("=")[1])
    else:
        method = cfg.closed_form
        grid = LDA_SHRINKAGES if method == "lda" else RIDGE_LAMBDAS
        parameter = grid[len(grid) // 2]
    stats = Statistics.of(x_train, y_train, len(cfg.class_names()))
    (pooled,) = candidate_heads(stats, method, [parameter])
    proba = pooled.head.probabilities(x_test)
    out: dict[str, Any] = {
        "head": pooled.label,
        "accuracy": float((proba.argmax(axis=1) == y_test).mean()),
    }
    if federated is not None and chosen:  # the federated head is the same closed form
        weight, bias = (a.astype(np.float64) for a in federated)
        logits = x_test @ weight.T + bias
        fed = np.exp(logits - logits.max(axis=1, keepdims=True))
        fed /= fed.sum(axis=1, keepdims=True)
        out["max_probability_difference"] = float(np.abs(fed - proba).max())
    return out


def _quiet_frameworks(verbose: bool) -> None:
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        os.environ.setdefault("FEDHEAD_LOG_LEVEL", "WARNING")
        logging.getLogger("flwr").setLevel(logging.ERROR)


def run_demo(opts: DemoOptions) -> RunReport:
    """Run the demo; print the per-round table; write report.json and the plot."""
    _check(opts)
    _quiet_frameworks(opts.verbose)
    setup_logging()
    cfg = opts.run_config()
    sm = build_server_model(cfg)  # fails early, with one line, if weights are missing
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    shares = _write_sites(opts)
    print(
        f"fedhead demo: {opts.clients} simulated hospitals, {sm.spec.name} trunk frozen "
        f"({sum(p.numel() for p in sm.model.frozen.parameters()):,} parameters), "
        f"{cfg.head} head ({sm.trainable.num_params:,} parameters, "
        f"{human_bytes(sm.trainable.nbytes)}), {cfg.resolved_input_size()} px, "
        f"{_aggregation(cfg)}"
    )
    print(
        f"site data (bundled chest X-rays; Dirichlet alpha={opts.alpha} shares of the train "
        f"split, 15% of each held out for validation), in {out / 'sites'}; the test split "
        f"({out / TEST_FILE}) is only for the final accuracy:"
    )
    for i, s in enumerate(shares):
        print(
            f"  site-{i}: train {len(s.train.labels)} ({_counts(s.train.labels)}), "
            f"validation {len(s.val.labels)}"
        )
    exporter = _start_exporter(opts.metrics_address)
    print("starting Flower's Simulation Engine (first round extracts trunk features) ...")
    print(TABLE_HEADER)
    shown = 0  # rounds printed so far (a resumed demo: its earlier rounds come first)
    latest: list[RunReport] = []

    def on_report(report: RunReport) -> None:
        nonlocal shown
        for rec in report.rounds[shown:]:
            print(table_row(rec), flush=True)
        shown = len(report.rounds)
        latest[:] = [report]

    try:
        _simulate(cfg, opts, on_report)
    finally:
        if exporter is not None:
            exporter.stop()
    report = latest[0]
    chosen = str((report.closed_form or {}).get("chosen", ""))
    baseline = centralized_baseline(cfg, False, shares, report.final_arrays, chosen)
    report.centralized = baseline
    # the reference of the same method: a closed-form run's is the pooled closed form
    closed = baseline["closed_form"]
    report.centralized_accuracy = closed["accuracy"] if chosen else baseline["accuracy"]
    RunDir(out).write_report(report.to_json())
    png = plot(report, out / "accuracy_loss.png")
    sites_png = plot_sites(report, out / "sites.png") if report.sites else None
    model_dir = _write_package(cfg, sm.model, report, shares, out / "model")
    final = report.final_server_eval_accuracy
    diff = final - report.centralized_accuracy
    pooled = baseline["train_examples"]
    print(
        f"\ncentralized reference, SGD (same head, pooled {pooled} training images, "
        f"{baseline['epochs']} epochs): accuracy {baseline['accuracy']:.4f}"
    )
    print(
        f"centralized reference, closed form ({closed['head']} on the same pooled "
        f"images): accuracy {closed['accuracy']:.4f}"
        + (
            f"; the federated head's test probabilities differ from it by at most "
            f"{closed['max_probability_difference']:.2g}"
            if "max_probability_difference" in closed
            else ""
        )
    )
    print(
        f"federated final accuracy on the bundled test split: {final:.4f} "
        f"(federated minus the centralized {'closed form' if chosen else 'SGD head'}: "
        f"{diff:+.4f})"
    )
    if report.secure_aggregation == "secagg+":
        p = report.secure_aggregation_params
        print(
            f"secure aggregation: SecAgg+ (key shares rebuilt from {p['reconstruction_threshold']} "
            f"of {p['expected_sites']} sites): the server only ever saw the sum of the updates"
        )
    else:
        print("secure aggregation: OFF (--no-secure-aggregation): the server saw every update")
    if report.sites is not None:
        print(
            "\nper site, validation accuracy on the site's own split (gain: federated minus "
            "local-only, paired bootstrap 95% interval):"
        )
        print("\n".join(sites_table(report.sites, report.sites_failed)))
        flagged = [s["site"] for s in report.sites if s["negative_transfer"]]
        if flagged:
            print(
                f"negative transfer at {', '.join(flagged)}: alone, they trained a head more "
                "accurate on their own validation split (read the balanced-accuracy gain too: "
                "a skewed site's local head may just predict its majority class)"
            )
    print(
        f"report: {out / 'report.json'}   plot: {png}"
        + (f"   per-site plot: {sites_png}" if sites_png else "")
    )
    print(
        f"model package: {model_dir} (use it with `fedhead predict --model {model_dir} "
        "--data PATH`)"
    )
    return report


def _write_package(
    cfg: RunConfig,
    model: FedHeadModel,
    report: RunReport,
    shares: list[demo_data.Share],
    dest: Path,
) -> Path:
    """The run's model package; a previous demo's package in ``dest`` is replaced."""
    labels = np.concatenate([s.train.labels for s in shares])
    counts = np.bincount(labels, minlength=len(demo_data.CLASSES)).tolist()
    pkg = package_from_run(
        cfg, model, report.final_arrays, report.training_summary(counts), report.final_metrics()
    )
    return pkg.write(dest, card=model_card(pkg), overwrite=True)


def _start_exporter(address: str) -> Exporter | None:
    """Metrics for the whole demo: the ServerApp (this process) and the simulated sites
    (Ray's workers, which inherit the spool folder through the environment)."""
    if address == "none":
        return None
    spool = prepare_spool()
    exporter = Exporter(["server", "site"], spool)
    if not exporter.start(address):
        return None
    os.environ[SPOOL_ENV] = str(spool)
    print(f"metrics: http://{address}/metrics (while the demo runs)")
    return exporter


def _simulate(
    cfg: RunConfig,
    opts: DemoOptions,
    on_report: ReportCallback,
) -> None:
    from flwr.simulation import run_simulation

    from fedhead.client.app import app as client_app
    from fedhead.server.app import make_server_app

    gpus = 1.0 / opts.clients if torch.cuda.is_available() and opts.device != "cpu" else 0.0
    backend = backend_config(gpus, opts.verbose)
    server_app = make_server_app(cfg, out_dir=opts.out, on_report=on_report)
    try:
        run_simulation(
            server_app,
            client_app,
            num_supernodes=opts.clients,
            backend_config=backend,
        )
    except FedheadError:
        raise
    except Exception as err:  # Flower wraps ServerApp errors; surface ours unwrapped
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, FedheadError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
