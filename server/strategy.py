"""fedhead's Flower strategy: which sites take part, what counts, how heads combine.

It implements Flower's legacy ``Strategy`` interface because SecAgg+ (Flower 1.41's
``SecAggPlusWorkflow``) drives exactly that interface. With ``secure=False`` the
strategy sees every site's update, checks each one and averages the valid ones; with
``secure=True`` it only ever sees the securely summed mean (SecAgg+ hands every result
the same aggregate vector) and checks that.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Error, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import Strategy

from fedhead.common.errors import FederationError
from fedhead.common.model import TrainableSet
from fedhead.common.pooled import STAT_KEYS, EvalStatistics, pool
from fedhead.common.protocol import FitSettings
from fedhead.common.rounds import RoundResult
from fedhead.common.training import scheduled_lr
from fedhead.server.aggregation import (
    Arrays,
    Rejection,
    apply_delta,
    check_update,
    weighted_mean,
    weighted_metric,
)
from fedhead.server.replies import (
    EvaluateAggregate,
    EvaluateFailures,
    EvaluateResults,
    FitAggregate,
    FitFailures,
    FitResults,
)
from fedhead.server.screening import (
    ExcludedReply,
    aggregate_has_weight,
    decode_evaluate,
    decode_fit,
    evaluation_in_fit,
)

log = logging.getLogger(__name__)

# arrays -> (loss, accuracy, clinical metrics by name: common.evaluation.point_metrics)
ServerEvaluate = Callable[[Arrays], tuple[float, float, dict[str, float]]]


@dataclass(frozen=True)
class SecureWeight:
    """What a SecAgg+ round's aggregate must have been divided by: the quantized
    weights of the sites whose masked vectors were summed, from their reported counts."""

    total: int
    sites: int
    clipping_range: float
    quantization_range: int


class _Ready(Criterion):
    def __init__(self, ready: set[int]) -> None:
        self.ready = ready

    def select(self, client: ClientProxy) -> bool:
        return client.node_id in self.ready


def _sample(cm: ClientManager, ready: set[int], fraction: float, minimum: int) -> list[ClientProxy]:
    """Sample ready, connected sites without blocking; [] if fewer than ``minimum``."""
    available = [c for c in cm.all().values() if c.node_id in ready]
    if len(available) < minimum:
        log.warning(
            "only %d prepared site(s) connected, %d needed: skipping this step",
            len(available),
            minimum,
        )
        return []
    num = max(minimum, math.ceil(fraction * len(available)))
    return cm.sample(num, min_num_clients=0, criterion=_Ready(ready))


@dataclass(eq=False, repr=False)
class FedHeadStrategy(Strategy):
    """Sampling, checking and FedAvg of head deltas; federated and server evaluation.

    The bounds a site checks its own update against (``settings.max_update_norm``, and
    under SecAgg+ ``settings.clipping_range``, outside which no honest mean lies) are
    the ones the server checks updates and aggregates against."""

    trainable: TrainableSet
    initial: Arrays
    settings: FitSettings
    num_rounds: int
    min_sites: int
    lr_schedule: str = "cosine"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    secure: bool = False
    server_evaluate: ServerEvaluate | None = None
    # > 0: sites send count tables of this many classes for pooled clinical metrics
    statistics_classes: int = 0
    # From this round on, a train message asks the site to evaluate the head it is sent
    # (the previous round's global head) first: that evaluation is the previous round's
    # federated evaluation, without a message of its own. None: never.
    evaluate_in_train_from: int | None = None
    # The global tensors each round started from. The workflow owns the current
    # global tensors and passes them in: a wrapper (DP noise) may have changed
    # what this strategy returned, so it keeps no copy of its own.
    _round_start: dict[int, Arrays] = field(init=False, default_factory=dict)
    ready: set[int] = field(init=False, default_factory=set)
    names: dict[int, str] = field(init=False, default_factory=dict)  # node id -> log label
    # What each site may count: its prepare-time example counts, capped by the run's
    # max-site-examples (1 each under uniform weighting). Sites report their counts
    # themselves; a claim above these is refused, not believed.
    train_caps: dict[int, int] = field(init=False, default_factory=dict)
    val_caps: dict[int, int] = field(init=False, default_factory=dict)
    secure_weights: dict[int, SecureWeight] = field(init=False, default_factory=dict)
    rounds: dict[int, RoundResult] = field(init=False, default_factory=dict)
    # round -> the sites its train messages asked to evaluate the head they carry
    _asked_to_evaluate: dict[int, set[int]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()
        if self.trainable.problems(self.initial):
            raise ValueError("initial tensors do not match the trainable set")
        if self.min_sites < 1:
            raise ValueError(f"min_sites must be >= 1, got {self.min_sites}")
        self.initial = [a.copy() for a in self.initial]

    def __repr__(self) -> str:
        return f"FedHeadStrategy(secure={self.secure}, min_sites={self.min_sites})"

    def stats(self, server_round: int) -> RoundResult:
        """The round's result so far (created on first use)."""
        return self.rounds.setdefault(server_round, RoundResult(server_round))

    def require_progress(self) -> None:
        """A run in which no round produced a global head failed, whatever else it did."""
        rounds = [self.stats(r) for r in range(1, self.num_rounds + 1)]
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
                why.append(
                    f"round {r.round}: {r.sites_replied} of {r.sites_selected} sites replied"
                )
        raise FederationError(
            "no round produced a new global head (" + "; ".join(why) + ")",
            "see the server log for the sites named; the report has every round's counts",
        )

    def count_replies(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> RoundResult:
        """Record who replied, failed or dropped in a training round.

        A site that is gone leaves either no failure entry (a wait timed out) or an
        error reply the SuperLink wrote for it (node unavailable): both count as
        dropped. Failed means the site itself answered with an error, or with a reply
        that was left out as malformed or implausible (``ExcludedReply``).
        """
        st = self.stats(server_round)
        st.sites_replied = len(results)
        st.sites_failed = sum(1 for f in failures if not _unreachable(f))
        st.sites_dropped = max(0, st.sites_selected - st.sites_replied - st.sites_failed)
        self._note_excluded(server_round, failures)
        return st

    def _note_excluded(self, server_round: int, failures: Sequence[object]) -> None:
        """Record sites whose replies were left out as malformed or implausible."""
        st = self.stats(server_round)
        for f in failures:
            if isinstance(f, ExcludedReply) and st.rejected_sites.get(str(f.node_id)) != f.reason:
                st.reject(f.node_id, f.reason)

    def secure_halted(
        self, server_round: int, stage: str, live: set[int], failures: Sequence[Exception]
    ) -> None:
        """SecAgg+ stopped at ``stage``: count who was still live, failed or dropped."""
        st = self.stats(server_round)
        st.secagg_halted = stage
        self._round_start.pop(server_round, None)
        self.secure_weights.pop(server_round, None)
        st.sites_replied = len(live)
        st.sites_failed = sum(1 for f in failures if not _unreachable(f))
        st.sites_dropped = max(0, st.sites_selected - st.sites_replied - st.sites_failed)
        self._note_excluded(server_round, failures)

    # --- reading replies -------------------------------------------------------------
    def set_caps(self, train: dict[int, int], val: dict[int, int]) -> None:
        self.train_caps, self.val_caps = dict(train), dict(val)

    def decode_fit(self, node_id: int, content: RecordDict) -> FitRes:
        return decode_fit(node_id, content, self.train_caps.get(node_id, 0), self.trainable)

    def decode_evaluate(self, node_id: int, content: RecordDict) -> EvaluateRes:
        return decode_evaluate(node_id, content, self.val_caps.get(node_id, 0))

    # --- training ------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.initial)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        sites = _sample(client_manager, self.ready, self.fraction_train, self.min_sites)
        self.stats(server_round).sites_selected = len(sites)
        lr = scheduled_lr(
            self.settings.learning_rate, server_round, self.num_rounds, self.lr_schedule
        )
        config = {**self.settings.to_config(), "server_round": server_round, "learning_rate": lr}
        if sites:
            self._round_start[server_round] = parameters_to_ndarrays(parameters)
        evaluators = self._evaluators(server_round, sites)
        return [
            (
                site,
                FitIns(
                    parameters,
                    {
                        **config,
                        "evaluate": site.node_id in evaluators,
                        "statistics": site.node_id in evaluators and self.statistics_classes > 0,
                    },
                ),
            )
            for site in sites
        ]

    def evaluates_in_train(self, server_round: int) -> bool:
        """Whether round ``server_round``'s train messages evaluate the head they carry."""
        start = self.evaluate_in_train_from
        return start is not None and server_round >= start

    def _evaluators(self, server_round: int, sites: list[ClientProxy]) -> set[int]:
        """The training sites that evaluate the head they are sent: a ``fraction_evaluate``
        sample of them, as a separate evaluate step would take."""
        if not sites or not self.evaluates_in_train(server_round):
            return set()
        num = max(1, math.ceil(self.fraction_evaluate * len(sites)))
        chosen = {site.node_id for site in random.sample(sites, min(num, len(sites)))}
        self._asked_to_evaluate[server_round] = chosen
        return chosen

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> FitAggregate:
        st = self.count_replies(server_round, results, failures)
        for failure in failures:
            log.warning("round %d: a site failed: %s", server_round, _describe_failure(failure))
        self.evaluations_in_fit(server_round, results)
        st.train_loss = weighted_metric(
            [(r.num_examples, float(r.metrics.get("train-loss", math.nan))) for _, r in results]
        )
        if self.secure:
            delta = self._secure_delta(server_round, results)
        else:
            delta = self._plain_delta(server_round, results)
        if delta is None:
            self._round_start.pop(server_round, None)
            log.error(
                "round %d: fewer than %d valid updates; the global head stays as it was",
                server_round,
                self.min_sites,
            )
            return None, {"train-loss": st.train_loss}
        new_global = apply_delta(self._round_start.pop(server_round), delta)
        st.aggregated = True
        return ndarrays_to_parameters(new_global), {"train-loss": st.train_loss}

    def _plain_delta(self, server_round: int, results: FitResults) -> Arrays | None:
        st = self.stats(server_round)
        valid: list[tuple[int, Arrays]] = []
        for proxy, res in results:
            arrays = parameters_to_ndarrays(res.parameters)
            problem = check_update(arrays, self.trainable, self.settings.max_update_norm)
            if problem is None and res.num_examples <= 0:
                problem = ("no_examples", "the update reports no training examples")
            if problem is not None:
                self._reject(st, server_round, Rejection(proxy.node_id, *problem))
                continue
            valid.append((res.num_examples, arrays))
        if len(valid) < self.min_sites:
            return None
        return weighted_mean(valid)

    def _secure_delta(self, server_round: int, results: FitResults) -> Arrays | None:
        """Under SecAgg+ every result carries the same, already averaged, delta."""
        st = self.stats(server_round)
        if len(results) < self.min_sites:
            return None
        raw = parameters_to_ndarrays(results[0][1].parameters)
        problem = self._secure_problem(server_round, raw)
        aggregate = [
            a.astype(spec.dtype) for a, spec in zip(raw, self.trainable.tensors, strict=False)
        ]
        if problem is None:
            problem = check_update(aggregate, self.trainable, self.settings.max_update_norm)
        if problem is not None:
            self._reject(st, server_round, Rejection(0, problem[0], "aggregate: " + problem[1]))
            return None
        return aggregate

    def _secure_problem(self, server_round: int, raw: Arrays) -> tuple[str, str] | None:
        """What honest sites cannot have produced: a mean outside the clipping range
        (each site's values are clipped to it) or another total weight than reported."""
        if self.settings.clipping_range and raw and len(raw) == len(self.trainable.tensors):
            largest = max(float(np.abs(a).max()) for a in raw if a.size)
            if not largest <= self.settings.clipping_range * (1 + 1e-6):
                return (
                    "range",
                    f"a mean value of {largest:.4g} lies outside the clipping range "
                    f"+-{self.settings.clipping_range:g} that every site's values are clipped to",
                )
        expected = self.secure_weights.pop(server_round, None)
        if expected is not None and not aggregate_has_weight(
            raw,
            expected.total,
            expected.sites,
            expected.clipping_range,
            expected.quantization_range,
        ):
            return (
                "weight",
                f"its total weight is not the {expected.total} that the {expected.sites} "
                "summed sites reported: a site masked another example count than it declared",
            )
        return None

    def _reject(self, st: RoundResult, server_round: int, r: Rejection) -> None:
        st.reject(r.node_id, r.reason)
        site = self.names.get(r.node_id, f"node {r.node_id}")
        who = "the secure aggregate" if r.node_id == 0 else f"update from {site}"
        log.warning("round %d: rejected %s (%s): %s", server_round, who, r.reason, r.detail)

    # --- evaluation ----------------------------------------------------------------
    def evaluations_in_fit(self, server_round: int, results: FitResults) -> None:
        """The previous round's federated evaluation, from this round's training replies
        (each evaluated the head it was sent, the one it trained from), when this round's
        train messages asked for it. A site whose evaluation fails the checks is left out
        of the evaluation, not out of training."""
        if not self.evaluates_in_train(server_round):
            return
        asked = self._asked_to_evaluate.pop(server_round, set())
        evaluations: EvaluateResults = []
        refused: EvaluateFailures = []
        for proxy, res in results:
            try:
                evaluation = evaluation_in_fit(
                    proxy.node_id, res, self.val_caps.get(proxy.node_id, 0)
                )
            except ExcludedReply as err:
                refused.append(err)
                continue
            if evaluation is None:
                continue
            if proxy.node_id in asked:
                evaluations.append((proxy, evaluation))
            else:
                refused.append(
                    ExcludedReply(proxy.node_id, "malformed", "an evaluation not asked for")
                )
        if evaluations or refused:
            self.aggregate_evaluate(server_round - 1, evaluations, refused)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        sites = _sample(client_manager, self.ready, self.fraction_evaluate, 1)
        # Sites evaluate one head per round they trained in (round 0: the initial head).
        config: dict[str, Scalar] = {
            "server_round": server_round,
            "statistics": self.statistics_classes > 0,
        }
        return [(site, EvaluateIns(parameters, config)) for site in sites]

    def aggregate_evaluate(
        self, server_round: int, results: EvaluateResults, failures: EvaluateFailures
    ) -> EvaluateAggregate:
        st = self.stats(server_round)
        for failure in failures:
            log.warning(
                "round %d: evaluation failed on a site: %s",
                server_round,
                _describe_failure(failure),
            )
        self._note_excluded(server_round, list(failures))
        counted = [(r.num_examples, r) for _, r in results if r.num_examples > 0]
        if not counted:
            return None, {}
        st.eval_examples = sum(n for n, _ in counted)
        st.eval_loss = weighted_metric([(n, r.loss) for n, r in counted])
        st.eval_accuracy = weighted_metric(
            [(n, float(r.metrics.get("accuracy", math.nan))) for n, r in counted]
        )
        self._pool_statistics(st, server_round, [(p.node_id, r) for p, r in results])
        return st.eval_loss, {"accuracy": st.eval_accuracy, **st.eval_metrics}

    def _pool_statistics(
        self, st: RoundResult, server_round: int, results: list[tuple[int, EvaluateRes]]
    ) -> None:
        """Pooled clinical metrics from the sites' count tables (``common.pooled``).

        A site's tables that fail the checks leave only that site's tables out (its loss
        and accuracy, already checked, still count); a site that sends none (its node
        config says no) is simply not in the pooled metrics: ``eval_statistics_examples``
        says how many examples they cover.
        """
        if not self.statistics_classes:
            return
        tables = []
        for node_id, res in results:
            if not any(key in res.metrics for key in STAT_KEYS):
                continue
            try:
                tables.append(
                    EvalStatistics.from_metrics(
                        res.metrics, self.statistics_classes, res.num_examples
                    )
                )
            except ValueError as err:
                st.eval_statistics_refused += 1
                log.warning(
                    "round %d: evaluation statistics of %s left out: %s",
                    server_round,
                    self.names.get(node_id, f"node {node_id}"),
                    err,
                )
        pooled = pool(tables)
        if pooled is None or pooled.examples == 0:
            return
        st.eval_statistics_examples = pooled.examples
        st.eval_metrics = pooled.metrics()
        st.eval_confusion = pooled.confusion.tolist()

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        if self.server_evaluate is None:
            return None
        loss, accuracy, metrics = self.server_evaluate(parameters_to_ndarrays(parameters))
        st = self.stats(server_round)
        st.server_eval_loss, st.server_eval_accuracy = loss, accuracy
        st.server_eval_metrics = metrics
        return loss, {"accuracy": accuracy, **metrics}


# Flower error codes meaning the node or its reply is gone (not that its app failed).
UNREACHABLE_CODES = frozenset(
    {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE}
)


def _flower_error(failure: object) -> Error | None:
    if isinstance(failure, BaseException) and failure.args and isinstance(failure.args[0], Error):
        return failure.args[0]
    return None


def _unreachable(failure: tuple[ClientProxy, FitRes] | BaseException) -> bool:
    error = _flower_error(failure)
    return error is not None and error.code in UNREACHABLE_CODES


def _describe_failure(failure: tuple[ClientProxy, FitRes | EvaluateRes] | BaseException) -> str:
    if (error := _flower_error(failure)) is not None:
        return f"error {error.code}: {error.reason}"
    if isinstance(failure, BaseException):
        return str(failure)
    proxy, res = failure
    return f"node {proxy.node_id}: {res.status.message}"
