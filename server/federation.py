"""One federated run, server side: from a RunConfig to a RunReport.

Orchestration only: set up the model and the run spec (``setup``), build the strategy
and the round plan (plain or SecAgg+ fit step, DP wrapper), run the round loop
(``workflow``) with its observers (``recorder``, and any the caller adds), and write
the report. Both the ServerApp and ``fedhead demo`` call ``run_federation``.
"""

from __future__ import annotations

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
from fedhead.common.protocol import RunSpec
from fedhead.common.telemetry import RunFinished, RunStarted, emit
from fedhead.server.distribution import BackboneDistributor, PrepareOutcome
from fedhead.server.evaluation import server_evaluator
from fedhead.server.recorder import RoundCallback, RunRecorder
from fedhead.server.report import RunReport
from fedhead.server.secure import DPFixedClipping, PrivacyLedger, TimedSecAggPlus, secagg_params
from fedhead.server.setup import ServerModel, build_server_model, fit_settings, run_spec
from fedhead.server.strategy import FedHeadStrategy
from fedhead.server.workflow import FedHeadWorkflow, PlainEvaluate, PlainFit, RoundPlan, RunObserver

log = logging.getLogger(__name__)


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
    t_start = time.perf_counter()
    sm = build_server_model(cfg)
    spec = run_spec(cfg, sm)
    strategy = FedHeadStrategy(
        trainable=sm.trainable,
        initial=sm.trainable.get(sm.model),
        settings=fit_settings(cfg, sm.trainable),
        num_rounds=cfg.num_server_rounds,
        min_sites=cfg.min_sites,
        lr_schedule=cfg.lr_schedule,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        secure=cfg.secure_aggregation,
        max_update_norm=cfg.max_update_norm,
        server_evaluate=server_evaluator(cfg, sm),
        clipping_range=cfg.secagg_clipping_range if cfg.secure_aggregation else 0.0,
    )
    report = _new_report(context.run_id, cfg, sm, spec)
    recorder = RunRecorder(cfg, sm, report, on_round)
    log.info(
        "run %d: backbone %s (sha256 %s…), %d trainable parameters (%d bytes per message), "
        "%d rounds",
        context.run_id,
        sm.spec.name,
        sm.sha256[:12],
        sm.trainable.num_params,
        sm.trainable.nbytes,
        cfg.num_server_rounds,
    )
    workflow = FedHeadWorkflow(
        strategy=strategy,
        distributor=BackboneDistributor(spec, sm.weights_path, cfg.round_timeout),
        plan_rounds=lambda outcome: plan_rounds(cfg, strategy, outcome, report),
        evaluate_step=PlainEvaluate(cfg.round_timeout, strategy),
        num_rounds=cfg.num_server_rounds,
        min_sites=cfg.min_sites,
        join_timeout=cfg.join_timeout,
        observers=[recorder, *observers],
    )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=cfg.num_server_rounds),
        strategy=strategy,
    )
    workflow(grid, legacy)
    recorder.finish(time.perf_counter() - t_start)
    out = (out_dir or Path(cfg.out_dir or f"fedhead-runs/run-{context.run_id}")).absolute()
    path = report.write(out)
    log.info("report written to %s", path)
    _require_progress(strategy, cfg.num_server_rounds)
    return report


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
        return RoundPlan(PlainFit(cfg.round_timeout, strategy), legacy, privacy)
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
