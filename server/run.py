"""One federated run, server side: from a RunConfig to a RunReport, in four phases.

    prepare  wait for the sites, tell them the run, send the backbone to those lacking
             it, send earlier runs' models a site missed        -> the Roster
    plan     the strategy stack (FedAvg, DP noise, server optimizer) and the round
             steps (plain or SecAgg+), sized to the sites       -> the Plan
    rounds   per round: train; evaluate the new head on the server's test set and
             by the sites (in the next round's train messages, or by evaluate
             messages); checkpoint and record it                -> the final head
    finish   the model package, its delivery to every site, the per-site outcome,
             report.json

``run_federation`` below is that loop; each phase returns what the next needs. A run
with ``resume-from`` continues from a checkpoint (``server.resume``). Both the
ServerApp and ``fedhead demo`` call ``run_federation``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid

from fedhead.common.closed_form import LDA, LDA_SHRINKAGES, RIDGE_LAMBDAS, Statistics
from fedhead.common.config import CLOSED_FORM, RunConfig
from fedhead.common.errors import FederationError
from fedhead.common.package import package_from_run
from fedhead.common.protocol import OutcomeRequest
from fedhead.common.rounds import RoundResult
from fedhead.common.telemetry import RunFinished, RunStarted, emit
from fedhead.server.aggregation import Arrays
from fedhead.server.checkpoints import ROUND_HEADS, Checkpoint, Checkpointer, RoundState
from fedhead.server.closed_form import (
    ClosedForm,
    ClosedFormPlan,
    PlainStatistics,
    SecureStatistics,
    Validation,
    choose,
    grid_report,
)
from fedhead.server.delivery import (
    EarlierModels,
    ModelDelivery,
    connected_sites,
    describe_model,
    finished_run,
    offer_and_deliver,
)
from fedhead.server.exchange import wait_for_sites
from fedhead.server.federated_eval import EvaluationPlan, FederatedEvaluation, Pooling
from fedhead.server.grids import MeteredGrid
from fedhead.server.model_card import model_card
from fedhead.server.optimizers import (
    ServerOptimizer,
    ServerOptimizerSettings,
    ServerOptimizerStrategy,
)
from fedhead.server.outcome import ask_outcomes, outcome_content
from fedhead.server.prepare import BackboneDistributor, Exclusions, Roster, SiteCaps
from fedhead.server.privacy import PrivacyLedger, check_resumable
from fedhead.server.recorder import Recorder, ReportCallback, new_report
from fedhead.server.report import RunReport
from fedhead.server.resume import (
    check_resume,
    checkpoint_meta,
    is_cut_off_after_rounds,
    load_resume,
    model_identity,
    resumed_from,
)
from fedhead.server.rounds import EvaluationStep, PlainTraining, Rounds, Training, legacy_rounds
from fedhead.server.rundir import FINISHED, RunDir, RunState
from fedhead.server.secagg import HeadUpdates, SecAggTraining, secagg_params
from fedhead.server.server_model import ServerModel, build_server_model, fit_settings, run_spec
from fedhead.server.strategy import FedHeadStrategy
from fedhead.server.testset import ServerTestSet, server_test_set

log = logging.getLogger(__name__)

OUTCOME_RESAMPLES = 1000  # bootstrap resamples behind every per-site interval


def run_federation(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    out_dir: Path | None = None,
    on_report: ReportCallback | None = None,
) -> RunReport:
    """Run one federated job: prepare, plan, the rounds, finish. ``on_report`` gets the
    report whenever a round completed and once the run finished."""
    run_dir = RunDir(out_dir) if out_dir else RunDir.for_run(cfg.out_dir, context.run_id)
    resume = load_resume(cfg, run_dir)  # refuses a used out-dir before anything is written
    if is_cut_off_after_rounds(cfg, resume):
        assert resume is not None
        return finish_cut_off(grid, context, cfg, run_dir, resume, on_report)
    run_dir.begin(
        RunState(
            run_id=context.run_id,
            out_dir=str(run_dir.path),
            num_rounds=cfg.rounds(),
            rounds_done=resume.round if resume else 0,
            resumed_from=resumed_from(resume),
        )
    )
    emit(RunStarted(cfg.backbone, "secagg+" if cfg.secure_aggregation else "none"))
    try:
        t0 = time.perf_counter()
        run = Run.start(MeteredGrid(grid), context, cfg, run_dir, resume, on_report)
        roster = run.prepare()
        plan = run.plan(roster)
        with legacy_rounds(run.grid, context, plan.strategy, cfg.rounds()) as rounds:
            head = run.rounds(rounds, plan)
            report = run.finish(roster, plan, head, time.perf_counter() - t0)
    except BaseException as err:
        run_dir.failed(err)
        emit(RunFinished(ok=False))
        raise
    emit(RunFinished(ok=True))
    return report


@dataclass(frozen=True)
class Plan:
    """How the rounds run, sized to the sites that are ready: the strategy stack the
    steps call (FedHeadStrategy, wrapped for DP and a server optimizer), the training
    step (plain or SecAgg+) and the evaluation step, and the run's privacy ledger."""

    roster: Roster
    strategy: Strategy
    training: Training
    evaluation: EvaluationStep
    evaluations: EvaluationPlan
    privacy: PrivacyLedger | None
    closed_form: ClosedForm | None = None  # a closed-form head's statistics round


@dataclass
class _Pending:
    """A round whose training is done but whose federated evaluation is still to come."""

    result: RoundResult
    head: Arrays


@dataclass
class Run:
    """One run's collaborators, built before any site joined."""

    grid: MeteredGrid  # every message to and from the sites passes it: it counts the bytes
    context: Context
    cfg: RunConfig
    run_dir: RunDir
    resume: Checkpoint | None
    sm: ServerModel
    initial: Arrays  # the run's first head, also the local-only baseline's (even on resume)
    recorder: Recorder
    checkpoints: Checkpointer
    test_set: ServerTestSet | None
    optimizer: ServerOptimizer | None  # with its state after the checkpoint's round
    excluded: Exclusions  # sites left out of the rest of the run (the loop adds them)

    @classmethod
    def start(
        cls,
        grid: MeteredGrid,
        context: Context,
        cfg: RunConfig,
        run_dir: RunDir,
        resume: Checkpoint | None,
        on_report: ReportCallback | None,
    ) -> Run:
        sm = build_server_model(cfg)
        names = sm.trainable.names
        identity = model_identity(cfg, sm.sha256, sm.trainable.fingerprint())
        if resume is not None and (changes := check_resume(resume, identity, names, cfg)):
            log.warning(
                "resuming with settings changed since the checkpoint: %s", "; ".join(changes)
            )
        check_resumable(cfg, resume)
        if cfg.strategy == CLOSED_FORM and not cfg.closed_form_applies():
            log.info(
                "strategy closed-form needs a linear head on a frozen trunk; this run's "
                "(head %s, unfreeze-blocks %d) is trained with FedAvg for %d rounds",
                cfg.head,
                cfg.unfreeze_blocks,
                cfg.num_server_rounds,
            )
        optimizer_settings = ServerOptimizerSettings.from_run(cfg)
        optimizer = ServerOptimizer(optimizer_settings) if optimizer_settings else None
        if optimizer is not None and resume is not None:
            resume.restore_optimizer(optimizer)
        recorder = Recorder(new_report(context.run_id, cfg, sm, run_spec(cfg, sm)), sm, on_report)
        if resume is not None:
            recorder.resumed(resume)
        meta = checkpoint_meta(context.run_id, cfg, identity, resume)
        checkpoints = Checkpointer(run_dir, cfg.keep_checkpoints, names, meta, resume)
        run = cls(
            grid,
            context,
            cfg,
            run_dir,
            resume,
            sm,
            sm.trainable.get(sm.model),
            recorder,
            checkpoints,
            server_test_set(cfg, sm),
            optimizer,
            Exclusions(resume.excluded if resume else None),
        )
        log.info(
            "run %d: backbone %s (sha256 %s…), %d trainable parameters (%d bytes per message), "
            "%s%s",
            context.run_id,
            sm.spec.name,
            sm.sha256[:12],
            sm.trainable.num_params,
            sm.trainable.nbytes,
            _describe_training(cfg, optimizer_settings),
            f", resuming after round {resume.round} from {resume.path}" if resume else "",
        )
        return run

    # --- 1. prepare ------------------------------------------------------------------
    def prepare(self) -> Roster:
        """Wait for the sites, prepare them, send earlier runs' models they missed."""
        cfg, grid = self.cfg, self.grid
        log.info("waiting up to %.0fs for %d site(s) to connect", cfg.join_timeout, cfg.min_sites)
        nodes = wait_for_sites(grid, cfg.min_sites, cfg.join_timeout)
        if len(nodes) < cfg.min_sites:
            raise FederationError(
                f"only {len(nodes)} of the {cfg.min_sites} required site(s) connected "
                f"within {cfg.join_timeout:.0f}s",
                "start more SuperNodes, or lower min-sites",
            )
        roster = self._distributor().prepare(grid, nodes)
        missed = EarlierModels(self.run_dir, self.context.run_id, cfg.round_timeout)
        if wanted := missed.requests(roster.ready):
            self.recorder.report.earlier_models = missed.deliver(grid, wanted)
        self.recorder.prepared(roster, *grid.take())  # its traffic counts as setup traffic
        self.run_dir.update(sites=len(roster.ready))
        if len(roster.ready) < cfg.min_sites:
            reasons = "; ".join(
                f"{roster.name(n)}: {why}" for n, why in sorted(roster.failed.items())
            )
            raise FederationError(
                f"only {len(roster.ready)} of {len(nodes)} site(s) are ready, "
                f"{cfg.min_sites} needed ({reasons or 'no reasons given'})",
                "fix the problems named and start the run again",
            )
        return roster

    def _distributor(self) -> BackboneDistributor:
        cfg = self.cfg
        caps = SiteCaps(cfg.max_site_examples, cfg.dp_noise_multiplier > 0, cfg.max_site_share)
        spec = run_spec(cfg, self.sm)
        return BackboneDistributor(
            spec, self.sm.weights_path, cfg.round_timeout, caps, cfg.site_labels
        )

    def _joined(self, roster: Roster, server_round: int) -> Roster | None:
        """Sites that connected since the run started (a node restarted under a new node
        id, or a site late to join): prepared now, they take part from this round on.
        None: nobody new."""
        known = set(roster.ready) | set(roster.failed)
        new = sorted(
            n for n in self.grid.get_node_ids() if n not in known and n not in self.excluded
        )
        if not new:
            return None
        log.info("round %d: %d site(s) joined the run; preparing them", server_round, len(new))
        joined = self._distributor().prepare(self.grid, new, joining=roster)
        for node in new:
            if node in joined.ready:
                log.info("round %d: %s takes part from now on", server_round, joined.name(node))
        self.recorder.joined(joined, new)
        self.run_dir.update(sites=len(joined.ready))
        return joined

    # --- 2. plan ---------------------------------------------------------------------
    def plan(self, roster: Roster, privacy: PrivacyLedger | None = None) -> Plan:
        """The strategy stack and the round steps, sized to the sites that are ready
        (``privacy``: the run's ledger so far, when sites joined a run under way)."""
        cfg, sm, resume = self.cfg, self.sm, self.resume
        ready = len(roster.ready)
        sampled = min(ready, max(cfg.min_sites, math.ceil(cfg.fraction_train * ready)))
        evaluated = resume.round if resume else None  # heads whose evaluation is in
        if cfg.closed_form_applies():  # round 1's: the sites' validation of its candidates
            evaluated = max(1, evaluated or 0)
        evaluations = EvaluationPlan.of_run(cfg, evaluated)
        pooling = Pooling(evaluations, roster.name, roster.val_weights)
        resumes = int(resume.meta["run_id"]) if resume else 0
        settings = fit_settings(cfg, sm.trainable, resumes)
        strategy: Strategy = FedHeadStrategy(
            roster=roster,
            trainable=sm.trainable,
            initial=resume.arrays if resume else self.initial,
            settings=settings,
            num_rounds=cfg.rounds(),
            min_sites=cfg.min_sites,
            lr_schedule=cfg.lr_schedule,
            fraction_train=cfg.fraction_train,
            evaluation=evaluations,
            secure=cfg.secure_aggregation,
            excluded=self.excluded,
        )
        # a closed-form head's privacy is its statistics' one release (server.closed_form)
        kept = privacy
        if privacy is None and not cfg.closed_form_applies():
            privacy = PrivacyLedger.of_run(cfg, ready, sampled)
        if privacy is not None:
            if resume is not None and kept is None:
                privacy.resume(resume)
            strategy = privacy.wrap(strategy)
            log.info(
                "differential privacy on: clipping norm %g, noise multiplier %g, %d sites",
                cfg.dp_clipping_norm,
                cfg.dp_noise_multiplier,
                sampled,
            )
        if self.optimizer is not None:  # outside the DP wrapper: see server.optimizers
            strategy = ServerOptimizerStrategy(strategy, self.optimizer)
        training: Training
        secure = None
        if cfg.secure_aggregation:
            params = secagg_params(cfg, sampled, max(roster.train_caps.values()))
            secure = params.report()
            training = SecAggTraining(params, roster, pooling, HeadUpdates(sm.trainable, settings))
            log.info(
                "secure aggregation: SecAgg+ over %d sites (shares %s, threshold %s, "
                "clipping +-%g)",
                sampled,
                params.num_shares,
                params.reconstruction_threshold,
                params.clipping_range,
            )
        else:
            log.warning(
                "secure aggregation is OFF (secure-aggregation=false): the server sees every "
                "site's head update"
            )
            training = PlainTraining(
                roster, sm.trainable, settings.max_update_norm, pooling, cfg.round_timeout
            )
        closed_form = self._closed_form(roster, pooling) if cfg.closed_form_applies() else None
        self.recorder.planned(
            secure,
            closed_form.privacy_report()
            if closed_form
            else (privacy.report() if privacy else None),
            self.optimizer.settings.describe() if self.optimizer else None,
            closed_form.plan.describe() if closed_form else None,
        )
        evaluation = EvaluationStep(roster, pooling, cfg.round_timeout)
        return Plan(roster, strategy, training, evaluation, evaluations, privacy, closed_form)

    def _closed_form(self, roster: Roster, pooling: Pooling) -> ClosedForm:
        """The statistics round of a closed-form head: every ready site sends its
        statistics (under SecAgg+: the server sees their sum only)."""
        cfg, sm = self.cfg, self.sm
        plan = ClosedFormPlan.of_run(cfg, sm.trainable, sm.spec.feature_dim)
        statistics: Training
        if cfg.secure_aggregation:
            # every site weighs one: the statistics are sums, whatever the site's size
            params = secagg_params(cfg, len(roster.ready), 1)
            statistics = SecAggTraining(params, roster, pooling, SecureStatistics(plan, roster))
        else:
            statistics = PlainStatistics(
                plan, roster, cfg.max_site_examples, cfg.min_sites, cfg.round_timeout
            )
        resumes = int(self.resume.meta["run_id"]) if self.resume else 0
        validation = Validation(roster, pooling, cfg.round_timeout, resumes)
        log.info(
            "closed-form head (%s): round 1 sums %d values of statistics per site%s, then the "
            "sites choose among %d candidate heads; %d fine-tuning round(s) follow",
            plan.method,
            plan.vector_size(),
            " under SecAgg+" if plan.codec else "",
            len(LDA_SHRINKAGES if plan.method == LDA else RIDGE_LAMBDAS),
            cfg.fine_tune_rounds,
        )
        return ClosedForm(plan, statistics, validation, roster, cfg.max_site_examples)

    # --- 3. rounds -------------------------------------------------------------------
    def rounds(self, rounds: Rounds, plan: Plan) -> Arrays:
        """Every round, in order; returns the final global head.

        A round is complete once its head's federated evaluation is in. When the next
        round's train messages carry that evaluation, the round waits, pending, until
        that training is done; the last round's head always gets evaluate messages."""
        num_rounds, resume = self.cfg.rounds(), self.resume
        head = resume.arrays if resume else self.initial
        pending: _Pending | None = None
        if resume is not None:
            log.info("resuming after round %d of %d", resume.round, num_rounds)
            resume.restore_rng()
            first = resume.round + 1
        elif plan.closed_form is None:
            # round 0: the initial head, the baseline the rounds improve on
            pending = self._evaluate(rounds, plan, RoundResult(0), head, time.perf_counter())
            first = 1
        else:
            first = 1
        if plan.closed_form is not None and (first == 1 or (resume and not resume.complete)):
            head = self._statistics_round(rounds, plan, plan.closed_form)
            first = 2
        for rnd in range(first, num_rounds + 1):
            t0 = time.perf_counter()
            self.recorder.round_started(rnd)
            self.checkpoints.round_started(rnd)
            if (joined := self._joined(plan.roster, rnd)) is not None:
                plan = self.plan(joined, plan.privacy)
                rounds.use(plan.strategy)
            training = rounds.train(plan.training, rnd, head)
            self._exclude(plan.roster, training.culprits, rnd)
            if pending is not None:  # its evaluation came with this round's training
                self._complete(pending, training.evaluation)
            result = RoundResult(rnd)
            training.into(result)
            head = training.arrays if training.arrays is not None else head
            pending = self._evaluate(rounds, plan, result, head, t0)
        return head

    def _statistics_round(self, rounds: Rounds, plan: Plan, cf: ClosedForm) -> Arrays:
        """Round 1 of a closed-form head: the sites' summed statistics, the candidate
        heads solved from them, and the one the sites' validation chose."""
        t0 = time.perf_counter()
        self.recorder.round_started(1)
        self.checkpoints.round_started(1)
        result = RoundResult(1)
        resume = self.resume
        if resume is not None and resume.statistics is not None:
            log.info("round 1: the sites' summed statistics come from %s", resume.path.name)
            stats = Statistics.from_vector(resume.statistics, cf.plan.layout)
            result = resume.results[-1]
        else:
            training = rounds.train(cf.statistics, 1, self.initial)
            self._exclude(plan.roster, training.culprits, 1)
            training.into(result)
            stats = cf.summed(training)
        candidates = cf.plan.candidates(stats)
        heads = [cf.plan.arrays(c) for c in candidates]
        # The sum is saved before the sites are asked to choose: a crash from here on
        # resumes without asking them for their statistics again.
        kept = RoundState(
            closed_form={"method": cf.plan.method, "chosen": None},
            statistics=stats.to_vector(),
        )
        self.checkpoints.round_trained(result, heads[len(heads) // 2], kept)
        evaluations = cf.validation.evaluate(self.grid, 1, heads)
        chosen = choose(evaluations)
        evaluations[chosen].into(result)
        result.aggregated = True
        self._test(result, heads[chosen])
        result.seconds = time.perf_counter() - t0
        result.bytes_to_sites, result.bytes_from_sites = self.grid.take()
        grid = grid_report(candidates, heads, self.sm.trainable.names, evaluations, chosen)
        report = self.recorder.report
        report.closed_form = {
            **cf.plan.describe(),
            "chosen": candidates[chosen].label,
            "grid": grid,
            "class_counts": [float(c) for c in stats.counts],  # of the (released) sum
        }
        if cf.plan.release is not None:
            result.dp_epsilon = cf.plan.release.epsilon()
            result.dp_delta = cf.plan.release.delta
        log.info(
            "round 1: the sites chose %s (pooled balanced accuracy %.4f over %d examples)",
            candidates[chosen].label,
            evaluations[chosen].metrics.get("balanced_accuracy", evaluations[chosen].accuracy),
            evaluations[chosen].examples,
        )
        head = heads[chosen]
        done = RoundState(
            closed_form={
                "method": cf.plan.method,
                "chosen": candidates[chosen].label,
                "grid": grid,
            },
            statistics=stats.to_vector(),
        )
        self.checkpoints.round_trained(result, head, done)
        self._complete(_Pending(result, head), None)
        return head

    def _exclude(self, roster: Roster, culprits: dict[int, str], server_round: int) -> None:
        """Leave the sites that spoiled a round out of the rest of the run."""
        for node, why in culprits.items():
            if self.excluded.add(node, why):
                name = roster.name(node)
                self.recorder.report.sites_excluded[name] = why
                log.error(
                    "round %d: %s is left out of the rest of the run: it %s",
                    server_round,
                    name,
                    why,
                )

    def _evaluate(
        self, rounds: Rounds, plan: Plan, result: RoundResult, head: Arrays, t0: float
    ) -> _Pending | None:
        """Evaluate the round's head on the server's test set, and by the sites: now,
        with evaluate messages (then the round is complete), or with the next round's
        training (then it is returned, pending)."""
        self._test(result, head)
        if result.round < self.cfg.rounds() and plan.evaluations.in_train(result.round + 1):
            return self._trained(rounds, plan, result, head, t0)
        if result.round == self.cfg.rounds():
            # The last head is kept before its evaluation: a run cut off during it is
            # finished by resuming, without training again (finish_cut_off). The
            # round's time and traffic then take in the evaluation's.
            pending = self._trained(rounds, plan, result, head, t0)
            evaluation = rounds.evaluate(plan.evaluation, result.round, head)
            result.seconds = time.perf_counter() - t0
            sent, received = self.grid.take()
            result.bytes_to_sites += sent
            result.bytes_from_sites += received
            self._complete(pending, evaluation)
            return None
        evaluation = rounds.evaluate(plan.evaluation, result.round, head)
        pending = self._trained(rounds, plan, result, head, t0)
        self._complete(pending, evaluation)
        return None

    def _test(self, result: RoundResult, head: Arrays) -> None:
        """The round's head on the server's own test set, when it has one."""
        if self.test_set is not None:
            loss, accuracy, metrics = self.test_set(head)
            result.server_eval_loss, result.server_eval_accuracy = loss, accuracy
            result.server_eval_metrics = metrics

    def _trained(
        self, rounds: Rounds, plan: Plan, result: RoundResult, head: Arrays, t0: float
    ) -> _Pending:
        """The round's own figures (time, traffic, privacy spent) and its checkpoint."""
        result.seconds = time.perf_counter() - t0
        result.bytes_to_sites, result.bytes_from_sites = self.grid.take()
        privacy = plan.privacy
        if privacy is not None and result.aggregated:
            result.dp_epsilon = privacy.release()
            result.dp_delta = privacy.delta
        state = RoundState(
            privacy.checkpoint_state() if privacy else None,
            self.optimizer,
            excluded=self.excluded.to_json(),
        )
        self.checkpoints.round_trained(result, head, state)
        return _Pending(result, head)

    def _complete(self, pending: _Pending, evaluation: FederatedEvaluation | None) -> None:
        """The round's federated evaluation is in (or is not coming): it is complete."""
        if evaluation is not None:
            evaluation.into(pending.result)
        self.checkpoints.round_completed(pending.result)
        self.recorder.round_completed(pending.result, pending.head)

    # --- 4. finish -------------------------------------------------------------------
    def finish(self, roster: Roster, plan: Plan, head: Arrays, seconds: float) -> RunReport:
        """The model package beside the report, a copy to every site, the per-site
        outcome, report.json; the run fails if no round produced a new head."""
        cfg, sm, report, grid = self.cfg, self.sm, self.recorder.report, self.grid
        names = sm.trainable.names
        spec = run_spec(cfg, sm)
        description = describe_model(spec, self.context.run_id, cfg.rounds(), names, head)
        report.model = description.to_config()
        self.recorder.finish(seconds)  # the final metrics, for the package
        try:  # no model to deliver when no round produced one: the initial head is none
            require_progress(report)
        except FederationError:
            self.run_dir.write_report(report.to_json())
            raise
        if self.test_set is not None and (evaluation := self.test_set.evaluation(head)):
            report.server_test_evaluation = evaluation.to_json()
        package = package_from_run(
            cfg, sm.model, head, report.training_summary(), report.final_metrics()
        )
        package_dir = package.write(
            self.run_dir.model_dir, card=model_card(package), overwrite=True
        )
        log.info("model package %s: head sha256 %s", package_dir, description.head_sha256)
        nodes = roster.nodes
        delivery = ModelDelivery(cfg.round_timeout).deliver(grid, nodes, description, package_dir)
        report.delivery = delivery.report(roster.name)
        if cfg.local_baseline or cfg.personalize_epochs:
            kept = sorted(delivery.delivered_to)
            self._ask_outcomes(roster, kept, description.head_sha256)
        self.recorder.finish(seconds)
        path = self.run_dir.write_report(report.to_json())
        log.info(
            "final accuracy: federated %s%s; report written to %s (on the SuperLink's host)",
            _fmt_acc(report.final_eval_accuracy),
            f", server test set {_fmt_acc(report.final_server_eval_accuracy)}"
            if math.isfinite(report.final_server_eval_accuracy)
            else "",
            path,
        )
        self.run_dir.update(state=FINISHED, model_sha256=description.head_sha256, report=str(path))
        self.recorder.finished()
        return report

    def _ask_outcomes(self, roster: Roster, kept: list[int], head_sha256: str) -> None:
        """Each site that kept the final model: what the federation did for it."""
        cfg, report = self.cfg, self.recorder.report
        closed = report.closed_form or {}
        request = OutcomeRequest.drawing_on(
            cfg,
            run_id=self.context.run_id,
            head_sha256=head_sha256,
            rounds=cfg.rounds(),
            resamples=OUTCOME_RESAMPLES,
            closed_form=str(closed.get("chosen", "")),
            class_counts=",".join(str(round(c)) for c in closed.get("class_counts", [])),
        )
        content = outcome_content(request, fit_settings(cfg, self.sm.trainable), self.initial)
        # the local-only head costs a site the whole run's training again
        timeout = cfg.round_timeout * (1 + (cfg.rounds() if cfg.local_baseline else 1))
        outcomes = ask_outcomes(self.grid, kept, content, timeout, roster.val_caps, roster.name)
        report.sites, report.sites_failed = outcomes.sites, outcomes.failed
        for node in sorted(set(roster.nodes) - set(kept)):
            report.sites_failed.setdefault(roster.name(node), "did not keep the final model")
        log.info(
            "per-site outcome from %d of %d site(s); negative transfer at %d",
            len(outcomes.sites),
            len(kept),
            len(outcomes.negative_transfer),
        )


def finish_cut_off(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    run_dir: RunDir,
    ckpt: Checkpoint,
    on_report: ReportCallback | None = None,
) -> RunReport:
    """Finish a run cut off after its last round (during the final evaluation, the
    delivery, the per-site outcome or the report): its model package, report and status
    from the last checkpoint, under the run id its sites trained in; then the model to
    every connected site that trained in that run and lacks it (never again to one that
    holds it). The per-site outcome is not asked again."""
    run_id = int(ckpt.meta["run_id"])
    log.info(
        "run %d ended after its last round (%d) without finishing; finishing it from %s",
        run_id,
        ckpt.round,
        ckpt.path,
    )
    sm = build_server_model(cfg)
    identity = model_identity(cfg, sm.sha256, sm.trainable.fingerprint())
    check_resume(ckpt, identity, sm.trainable.names, cfg)
    spec = run_spec(cfg, sm)
    recorder = Recorder(new_report(run_id, cfg, sm, spec), sm, on_report)
    recorder.resumed(ckpt)
    report = recorder.report
    report.resumed_from = {**(resumed_from(ckpt) or {}), "finished_by_run": context.run_id}
    report.closed_form = ckpt.meta.get("closed_form")
    head = ckpt.arrays
    description = describe_model(spec, run_id, ckpt.round, sm.trainable.names, head)
    report.model = description.to_config()
    report.final_arrays = [a.copy() for a in head]
    recorder.finish(0.0)
    test_set = server_test_set(cfg, sm)
    if test_set is not None and (evaluation := test_set.evaluation(head)):
        report.server_test_evaluation = evaluation.to_json()
    require_progress(report)
    package = package_from_run(
        cfg, sm.model, head, report.training_summary(), report.final_metrics()
    )
    package.write(run_dir.model_dir, card=model_card(package), overwrite=True)
    state = run_dir.read_state()
    run_dir.begin(
        RunState(
            run_id=run_id,
            out_dir=str(run_dir.path),
            num_rounds=cfg.rounds(),
            rounds_done=ckpt.round,
            resumed_from=state.resumed_from if state else None,
            round_heads=dict(ckpt.meta.get(ROUND_HEADS, {})),
            last_checkpoint=str(ckpt.path),
            started=state.started if state else time.time(),
        )
    )
    path = run_dir.write_report(report.to_json())
    run_dir.update(state=FINISHED, model_sha256=description.head_sha256, report=str(path))
    log.info("run %d finished: model package %s, report %s", run_id, run_dir.model_dir, path)
    # The model to the sites that lack it: they say so, with a proof of having trained.
    nodes = connected_sites(grid, cfg)
    report.delivery = offer_and_deliver(
        grid, finished_run(run_dir), nodes, cfg.round_timeout, context.run_id
    )
    run_dir.write_report(report.to_json())
    recorder.finished()
    return report


def require_progress(report: RunReport) -> None:
    """A run in which most rounds produced no new global head failed, whatever else it
    did: its model is not what its rounds were meant to train (a run in which every round
    after the first halted under SecAgg+ must not read as finished)."""
    rounds = [r for r in report.rounds if r.round > 0]
    stuck = [r for r in rounds if not r.aggregated]
    if not rounds or (2 * len(stuck) <= len(rounds) and len(stuck) < len(rounds)):
        return
    why = []
    for r in stuck:
        if r.secagg_halted:
            why.append(f"round {r.round}: secure aggregation halted at {r.secagg_halted}")
        elif r.rejected_sites:
            who = ", ".join(f"node {n} ({reason})" for n, reason in r.rejected_sites.items())
            why.append(f"round {r.round}: left out {who}")
        else:
            why.append(f"round {r.round}: {r.sites_replied} of {r.sites_selected} sites replied")
    what = (
        "no round produced a new global head"
        if len(stuck) == len(rounds)
        else f"{len(stuck)} of {len(rounds)} rounds produced no new global head"
    )
    raise FederationError(
        f"{what} (" + "; ".join(why) + ")",
        "see the server log for the sites named; the report has every round's counts",
    )


def _describe_training(cfg: RunConfig, settings: ServerOptimizerSettings | None) -> str:
    """The log header's words for the training: the closed-form head, or the rounds of
    FedAvg or of the server optimizer with its hyper-parameters; FedProx where the
    sites train by SGD with it."""
    if cfg.closed_form_applies():
        text, sgd = cfg.training_text(), cfg.fine_tune_rounds > 0
    else:
        how = "fedavg"
        if settings is not None:
            hyper = ", ".join(f"{k} {v:g}" for k, v in settings.describe().items() if k != "name")
            how = f"{settings.name} ({hyper})"
        rounds = cfg.num_server_rounds
        text, sgd = f"{rounds} round{'s' if rounds != 1 else ''} of {how}", True
    if sgd and cfg.proximal_mu > 0:
        text += f", FedProx mu {cfg.proximal_mu:g} at the sites"
    return text


def _fmt_acc(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else "-"
