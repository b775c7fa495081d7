"""One federated run, server side: from a RunConfig to a RunReport.

Orchestration only: set up the model and the run spec (``setup``), build the strategy
and the round plan (plain or SecAgg+ fit step, DP wrapper), run the round loop
(``workflow``) with its observers (``recorder``, ``persistence``'s checkpoints, and
any the caller adds), deliver the final model (``delivery``) and write the report.
Before the rounds, sites get the earlier runs' models they missed and ask for. A
run with ``resume-from`` continues from a checkpoint. Both the ServerApp and
``fedhead demo`` call ``run_federation``.
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
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid

from fedhead.common.config import RunConfig
from fedhead.common.errors import FederationError
from fedhead.common.model import count_params
from fedhead.common.package import package_from_run
from fedhead.common.protocol import OutcomeRequest, RunSpec
from fedhead.common.telemetry import RunFinished, RunStarted, emit
from fedhead.server.aggregation import Arrays
from fedhead.server.delivery import EarlierModels, ModelDelivery, describe_model
from fedhead.server.distribution import BackboneDistributor, PrepareOutcome
from fedhead.server.evaluation import server_test_set
from fedhead.server.fedopt import ServerOptimizerStrategy
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
from fedhead.server.recorder import RoundCallback, RunRecorder
from fedhead.server.report import RunReport
from fedhead.server.secure import DPFixedClipping, PrivacyLedger, TimedSecAggPlus, secagg_params
from fedhead.server.setup import ServerModel, build_server_model, fit_settings, run_spec
from fedhead.server.strategy import FedHeadStrategy
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
    strategy = FedHeadStrategy(
        trainable=sm.trainable,
        initial=initial,
        settings=fit_settings(cfg, sm.trainable),
        num_rounds=cfg.num_server_rounds,
        min_sites=cfg.min_sites,
        lr_schedule=cfg.lr_schedule,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        secure=cfg.secure_aggregation,
        max_update_norm=cfg.max_update_norm,
        server_evaluate=test_set,
        clipping_range=cfg.secagg_clipping_range if cfg.secure_aggregation else 0.0,
        statistics_classes=len(cfg.class_names()) if cfg.evaluation_statistics else 0,
        evaluate_in_train_from=_evaluate_in_train_from(cfg, resume),
    )
    report = _new_report(context.run_id, cfg, sm, spec)
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
        package_dir = package.write(out / "model", overwrite=True)
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
        content = outcome_content(request, fit_settings(cfg, sm.trainable), start)
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
    _require_progress(strategy, cfg.num_server_rounds)
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


def _require_progress(strategy: FedHeadStrategy, num_rounds: int) -> None:
    """A run in which no round produced a global head failed, whatever else it did."""
    rounds = [strategy.stats(r) for r in range(1, num_rounds + 1)]
    if not rounds or any(r.aggregated for r in rounds):
        return
    why = []
    for r in rounds:
        if r.secagg_halted:
            why.append(f"round {r.round}: secure aggregation halted at {r.secagg_halted}")
        elif r.rejected_sites:
            who = ", ".join(f"node {n} ({reason})" for n, reason in r.rejected_sites.items())
            why.append(f"round {r.round}: left out {who}")
        else:
            why.append(f"round {r.round}: {r.sites_replied} of {r.sites_selected} sites replied")
    raise FederationError(
        "no round produced a new global head (" + "; ".join(why) + ")",
        "see the server log for the sites named; the report has every round's counts",
    )


def _new_report(run_id: int, cfg: RunConfig, sm: ServerModel, spec: RunSpec) -> RunReport:
    return RunReport(
        run_id=run_id,
        backbone={
            "name": sm.spec.name,
            "sha256": sm.sha256,
            "weights_file": spec.weights_file,
            "custom": spec.custom_weights,
            "trunk_params": count_params(sm.model.frozen) + count_params(sm.model.tuned),
            "head_params": sm.trainable.num_params,
            "head_bytes": sm.trainable.nbytes,
            "trainable_tensors": sm.trainable.names,
        },
        clients=0,
        input_size=spec.input_size,
        config=cfg.to_mapping(),
    )


def plan_rounds(
    cfg: RunConfig, strategy: FedHeadStrategy, outcome: PrepareOutcome, report: RunReport
) -> RoundPlan:
    """Once sites joined: the fit step, the strategy it drives and the privacy ledger,
    sized to them; the report notes the secure aggregation and DP settings."""
    ready = len(outcome.ready)
    sampled = min(ready, max(cfg.min_sites, math.ceil(cfg.fraction_train * ready)))
    uniform = cfg.dp_noise_multiplier > 0
    for node, reply in sorted(outcome.ready.items()):
        if max(reply.train_examples, reply.val_examples) > cfg.max_site_examples:
            log.warning(
                "site %d declares %d training / %d validation examples; it counts as %d "
                "(max-site-examples)",
                node,
                reply.train_examples,
                reply.val_examples,
                cfg.max_site_examples,
            )
    strategy.set_caps(
        train={
            n: 1 if uniform else min(r.train_examples, cfg.max_site_examples)
            for n, r in outcome.ready.items()
        },
        val={n: min(r.val_examples, cfg.max_site_examples) for n, r in outcome.ready.items()},
    )
    legacy: Strategy = strategy
    privacy: PrivacyLedger | None = None
    if cfg.dp_noise_multiplier > 0:
        legacy = DPFixedClipping(strategy, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, sampled)
        privacy = PrivacyLedger(cfg.dp_noise_multiplier, cfg.dp_delta, ready, sampled)
        report.differential_privacy = {
            "noise_multiplier": cfg.dp_noise_multiplier,
            "clipping_norm": cfg.dp_clipping_norm,
            "delta": cfg.dp_delta,
            "sites": ready,
            "sampled_per_round": sampled,
            "accounting": "RDP, no sampling amplification, add-or-remove-one site",
        }
        log.info(
            "differential privacy on: clipping norm %g, noise multiplier %g, %d sites",
            cfg.dp_clipping_norm,
            cfg.dp_noise_multiplier,
            sampled,
        )
    if not cfg.secure_aggregation:
        log.warning(
            "secure aggregation is OFF (secure-aggregation=false): the server sees every "
            "site's head update"
        )
        return RoundPlan(PlainStep(cfg.round_timeout, strategy, train=True), legacy, privacy)
    max_examples = max(strategy.train_caps.values())
    params = secagg_params(cfg, sampled, max_examples)
    report.secure_aggregation = "secagg+"
    report.secure_aggregation_params = params.report()
    log.info(
        "secure aggregation: SecAgg+ over %d sites (shares %s, threshold %s, clipping +-%g)",
        sampled,
        params.num_shares,
        params.reconstruction_threshold,
        params.clipping_range,
    )

    def stage_done(rnd: int, stage: str, seconds: float) -> None:
        strategy.stats(rnd).secagg_seconds[stage] = seconds

    return RoundPlan(TimedSecAggPlus(params, strategy, stage_done), legacy, privacy)


def _evaluate_in_train_from(cfg: RunConfig, resume: Checkpoint | None) -> int | None:
    """The first round whose train messages also evaluate the head they carry (the
    previous round's): when every site trains every round, a round's federated
    evaluation needs no message of its own. A resumed run's first round does not: its
    checkpoint holds that evaluation already."""
    if cfg.fraction_train < 1.0:
        return None  # sites that sit a round out are evaluated by an evaluate step
    return 1 if resume is None else resume.round + 2
