"""One federated run, server side: from a RunConfig to a RunReport.

Orchestration only: set up the model, the run spec and the strategy (``setup``), plan
the rounds once sites joined (``plans``: plain or SecAgg+ fit step, DP wrapper), run
the round loop (``workflow``) with its observers (``recorder``, ``persistence``'s
checkpoints, and any the caller adds), deliver the final model (``delivery``), ask the
sites what it did for them (``outcome``) and write the report. Before the rounds,
sites get the earlier runs' models they missed and ask for. A run with ``resume-from``
continues from a checkpoint. Both the ServerApp and ``fedhead demo`` call
``run_federation``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.serverapp import Grid

from fedhead.common.config import RunConfig
from fedhead.common.package import package_from_run
from fedhead.common.protocol import OutcomeRequest
from fedhead.common.telemetry import RunFinished, RunStarted, emit
from fedhead.server.aggregation import Arrays
from fedhead.server.delivery import EarlierModels, ModelDelivery, describe_model
from fedhead.server.distribution import BackboneDistributor, PrepareOutcome
from fedhead.server.evaluation import server_test_set
from fedhead.server.fedopt import ServerOptimizerStrategy
from fedhead.server.model_card import model_card
from fedhead.server.optimizers import ServerOptimizer, ServerOptimizerSettings
from fedhead.server.outcome import OutcomeQuery, outcome_content
from fedhead.server.persistence import (
    CHECKPOINTS,
    STATUS_FILE,
    Checkpoint,
    Checkpointer,
    CheckpointError,
    CheckpointStore,
    FinalModel,
    RunStatus,
    check_resume,
    check_strategy,
    config_changes,
    load_resume,
    model_identity,
    resumed_from,
)
from fedhead.server.plans import plan_rounds
from fedhead.server.recorder import RoundCallback, RunRecorder, new_report
from fedhead.server.report import RunReport
from fedhead.server.secure import PrivacyLedger
from fedhead.server.setup import build_server_model, build_strategy, run_spec
from fedhead.server.workflow import FedHeadWorkflow, PlainStep, RoundPlan, RunObserver

log = logging.getLogger(__name__)

OUTCOME_RESAMPLES = 1000  # bootstrap resamples behind every per-site interval


def run_federation(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    on_round: RoundCallback | None = None,
    out_dir: Path | None = None,
    observers: Sequence[RunObserver] = (),
) -> RunReport:
    """Run every round of one federated job and write its report."""
    emit(RunStarted(cfg.backbone, "secagg+" if cfg.secure_aggregation else "none"))
    try:
        report = _run(grid, context, cfg, on_round, out_dir, observers)
    except BaseException:
        emit(RunFinished(ok=False))
        raise
    emit(RunFinished(ok=True))
    return report


def _run(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    on_round: RoundCallback | None,
    out_dir: Path | None,
    observers: Sequence[RunObserver],
) -> RunReport:
    out = (out_dir or Path(cfg.out_dir or f"fedhead-runs/run-{context.run_id}")).absolute()
    resume = load_resume(cfg, out)  # refuses a used out-dir before anything is written
    status = RunStatus(
        out / STATUS_FILE,
        run_id=context.run_id,
        out_dir=str(out),
        num_rounds=cfg.num_server_rounds,
        rounds_done=resume.round if resume else 0,
        resumed_from=resumed_from(resume),
    )
    status.update()
    try:
        return _federate(grid, context, cfg, on_round, out, observers, resume, status)
    except BaseException as err:
        status.failed(err)
        raise


def _federate(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    on_round: RoundCallback | None,
    out: Path,
    observers: Sequence[RunObserver],
    resume: Checkpoint | None,
    status: RunStatus,
) -> RunReport:
    t_start = time.perf_counter()
    sm = build_server_model(cfg)
    spec = run_spec(cfg, sm)
    names = sm.trainable.names
    identity = model_identity(cfg, sm.sha256, sm.trainable.fingerprint())
    initial = sm.trainable.get(sm.model)
    opt_settings = ServerOptimizerSettings.from_run(cfg)
    optimizer = ServerOptimizer(opt_settings) if opt_settings else None
    start = initial  # the run's first head, also the local-only baseline's (even on resume)
    if resume is not None:
        check_resume(resume, identity, names)
        check_strategy(resume, cfg)
        if optimizer is not None:
            resume.restore_optimizer(optimizer)
        if changes := config_changes(resume, cfg):
            log.warning(
                "resuming with settings changed since the checkpoint: %s", "; ".join(changes)
            )
        initial = resume.arrays
    test_set = server_test_set(cfg, sm)
    strategy = build_strategy(cfg, sm, initial, test_set, resume.round if resume else None)
    report = new_report(context.run_id, cfg, sm, spec)
    report.server_optimizer = opt_settings.describe() if opt_settings else None
    if resume is not None:
        earlier = resume.results
        report.initial_eval = next((r for r in earlier if r.round == 0), None)
        report.rounds = [r for r in earlier if r.round > 0]
        report.resumed_from = resumed_from(resume)
    recorder = RunRecorder(cfg, sm, report, on_round)
    ledgers: list[PrivacyLedger] = []

    prepared: list[PrepareOutcome] = []

    def planner(outcome: PrepareOutcome) -> RoundPlan:
        prepared.append(outcome)
        plan = plan_rounds(cfg, strategy, outcome, report)
        if optimizer is not None:  # outside the DP wrapper: see fedhead.server.fedopt
            plan = dataclasses.replace(
                plan, strategy=ServerOptimizerStrategy(plan.strategy, optimizer)
            )
        if plan.privacy is not None:
            ledgers.append(plan.privacy)
            if resume is not None:
                plan.privacy.replay(resume.privacy_events)
        elif resume is not None and resume.privacy_events:
            raise CheckpointError(
                "resume-from: the checkpoint's rounds used differential privacy but this run "
                "has dp-noise-multiplier=0; resume with the run's original settings"
            )
        return plan

    checkpointer = Checkpointer(
        CheckpointStore(out / CHECKPOINTS, cfg.keep_checkpoints),
        status,
        context.run_id,
        cfg,
        identity,
        names,
        lambda: ledgers[0] if ledgers else None,
        resume,
        optimizer,
    )
    finals: list[FinalModel] = []

    def final_step(grid: Grid, nodes: list[int], arrays: Arrays) -> None:
        """The run's model: its package beside the report, then a copy to every site."""
        description = describe_model(spec, context.run_id, cfg.num_server_rounds, names, arrays)
        finals.append(FinalModel(names, arrays, description))
        report.model = description.to_config()
        recorder.finish(time.perf_counter() - t_start)  # the final metrics, for the package
        if test_set is not None and (evaluation := test_set.evaluation(list(arrays))):
            report.server_test_evaluation = evaluation.to_json()
        package = package_from_run(
            cfg, sm.model, list(arrays), report.training_summary(), report.final_metrics()
        )
        package_dir = package.write(out / "model", card=model_card(package), overwrite=True)
        log.info("model package %s: head sha256 %s", package_dir, description.head_sha256)
        delivery = ModelDelivery(cfg.round_timeout).deliver(grid, nodes, description, package_dir)
        report.delivery = delivery.report()
        if cfg.local_baseline or cfg.personalize_epochs:
            ask_outcome(grid, sorted(delivery.delivered_to), nodes, description.head_sha256)

    def ask_outcome(grid: Grid, nodes: list[int], all_nodes: list[int], head_sha256: str) -> None:
        """Each site that kept the final model: what the federation did for it."""
        request = OutcomeRequest.drawing_on(
            cfg,
            run_id=context.run_id,
            head_sha256=head_sha256,
            rounds=cfg.num_server_rounds,
            resamples=OUTCOME_RESAMPLES,
        )
        content = outcome_content(request, strategy.settings, start)
        # the local-only head costs a site the whole run's training again
        timeout = cfg.round_timeout * (1 + (cfg.num_server_rounds if cfg.local_baseline else 1))
        name = prepared[0].name if prepared else (lambda n: f"node {n}")
        results = OutcomeQuery(timeout, strategy.val_caps).ask(grid, nodes, content, name)
        report.sites, report.sites_failed = results.sites, results.failed
        for node in sorted(set(all_nodes) - set(nodes)):
            report.sites_failed.setdefault(name(node), "did not keep the final model")
        log.info(
            "per-site outcome from %d of %d site(s); negative transfer at %d",
            len(results.sites),
            len(nodes),
            len(results.negative_transfer),
        )

    missed = EarlierModels(out.parent, context.run_id, cfg.round_timeout)

    def prepared_step(grid: Grid, outcome: PrepareOutcome) -> None:
        """Earlier runs' models the prepared sites missed, from the runs beside this one."""
        if wanted := missed.requests(outcome.ready):
            report.earlier_models = missed.deliver(grid, wanted)

    log.info(
        "run %d: backbone %s (sha256 %s…), %d trainable parameters (%d bytes per message), "
        "%d rounds, strategy %s%s",
        context.run_id,
        sm.spec.name,
        sm.sha256[:12],
        sm.trainable.num_params,
        sm.trainable.nbytes,
        cfg.num_server_rounds,
        _describe_strategy(cfg, opt_settings),
        f", resuming after round {resume.round} from {resume.path}" if resume else "",
    )
    workflow = FedHeadWorkflow(
        strategy=strategy,
        distributor=BackboneDistributor(spec, sm.weights_path, cfg.round_timeout, cfg.site_labels),
        plan_rounds=planner,
        evaluate_step=PlainStep(cfg.round_timeout, strategy, train=False),
        num_rounds=cfg.num_server_rounds,
        min_sites=cfg.min_sites,
        join_timeout=cfg.join_timeout,
        observers=[recorder, checkpointer, *observers],
        resume_after=resume.round if resume else None,
        final_step=final_step,
        prepared_step=prepared_step,
    )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=cfg.num_server_rounds),
        strategy=strategy,
    )
    if resume is not None:
        resume.restore_rng()
    workflow(grid, legacy)
    recorder.finish(time.perf_counter() - t_start)
    path = report.write(out)
    log.info(
        "final accuracy: federated %s%s; report written to %s (on the SuperLink's host)",
        _fmt_acc(report.final_eval_accuracy),
        f", server test set {_fmt_acc(report.final_server_eval_accuracy)}"
        if math.isfinite(report.final_server_eval_accuracy)
        else "",
        path,
    )
    strategy.require_progress()
    checkpointer.run_finished(finals[0], path)
    return report


def _describe_strategy(cfg: RunConfig, settings: ServerOptimizerSettings | None) -> str:
    """The log header's words for the aggregation: FedAvg, or the server optimizer with
    its hyper-parameters, and FedProx where the sites use it."""
    text = "fedavg"
    if settings is not None:
        hyper = ", ".join(f"{k} {v:g}" for k, v in settings.describe().items() if k != "name")
        text = f"{settings.name} ({hyper})"
    if cfg.proximal_mu > 0:
        text += f", FedProx mu {cfg.proximal_mu:g} at the sites"
    return text


def _fmt_acc(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else "-"
