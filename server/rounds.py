"""One round's exchanges with the sites, on Flower's legacy stack (which SecAgg+ needs).

``Rounds`` holds Flower's ``LegacyContext`` (the strategy stack the steps call, the
round number, the client manager that tracks connected sites) for the rounds of one
run and runs each round's steps on the head the round loop hands it:

- training: ``PlainTraining`` (each site's update reaches the strategy) or, under
  SecAgg+, ``server.secagg.SecAggTraining`` (only the masked sum does); both return a
  ``RoundTraining``: the new global head (or none), who replied, failed or was left
  out, and the evaluation the train replies carried of the head they were sent;
- federated evaluation by an evaluate message of its own (``evaluate``).

Unlike Flower's default steps, every wait has a timeout, so a dead site cannot stall
a run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context, Error
from flwr.app.message_type import MessageType
from flwr.common import Code, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedhead.common.model import TrainableSet
from fedhead.common.rounds import RoundResult
from fedhead.server.aggregation import Arrays, check_update, weighted_metric
from fedhead.server.exchange import UNREACHABLE_CODES, exchange
from fedhead.server.federated_eval import FederatedEvaluation, Pooling
from fedhead.server.prepare import Roster
from fedhead.server.screening import ExcludedReply, decode_evaluate, decode_fit

log = logging.getLogger(__name__)

# What Flower's legacy strategies take as a round's failures: an error reply (as an
# Exception holding Flower's Error), a reply left out (ExcludedReply) or a site's own
# non-OK result.
Failure = tuple[ClientProxy, Any] | BaseException
FitResults = list[tuple[ClientProxy, FitRes]]


def _flower_error(failure: Failure) -> Error | None:
    if isinstance(failure, BaseException) and failure.args and isinstance(failure.args[0], Error):
        return failure.args[0]
    return None


def _unreachable(failure: Failure) -> bool:
    error = _flower_error(failure)
    return error is not None and error.code in UNREACHABLE_CODES


def describe_failure(failure: Failure) -> str:
    if (error := _flower_error(failure)) is not None:
        return f"error {error.code}: {error.reason}"
    if isinstance(failure, BaseException):
        return str(failure)
    proxy, res = failure
    return f"node {proxy.node_id}: {res.status.message}"


@dataclass
class RoundTraining:
    """What one round's training exchange produced."""

    selected: int = 0  # sites sent a train message
    replied: int = 0  # sites whose update (or, under SecAgg+, masked vector) came in
    failed: int = 0  # sites that answered with an error or a reply that was left out
    rejected: dict[int, str] = field(default_factory=dict)  # node (0: the aggregate) -> why
    train_loss: float = math.nan
    arrays: Arrays | None = None  # the new global head; None: it stays as it was
    aggregate: Arrays | None = None  # what a round that sums something else summed ...
    summed_sites: int = 0  # ... over this many sites
    # the head these sites were sent (the previous round's), evaluated in their replies
    evaluation: FederatedEvaluation | None = None
    secagg_seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    secagg_halted: str = ""  # the SecAgg+ stage at which the round stopped ...
    secagg_reason: str = ""  # ... and why
    # sites that spoiled the round in a way only a malicious site can: node -> why; the
    # round loop leaves them out of the rest of the run
    culprits: dict[int, str] = field(default_factory=dict)

    def count(self, replied: int, failures: Sequence[Failure]) -> None:
        """Who replied and who failed: a site that is gone leaves either no failure (a
        wait timed out) or an error reply the SuperLink wrote for it; both count as
        dropped (selected, neither replied nor failed)."""
        self.replied = replied
        self.failed = sum(1 for f in failures if not _unreachable(f))
        for f in failures:
            if isinstance(f, ExcludedReply):
                self.rejected[f.node_id] = f.reason

    def into(self, result: RoundResult) -> None:
        """Record this training in the round's result."""
        result.sites_selected, result.sites_replied = self.selected, self.replied
        result.sites_failed = self.failed
        result.sites_dropped = max(0, self.selected - self.replied - self.failed)
        for node, reason in self.rejected.items():
            result.reject(node, reason)
        result.train_loss = self.train_loss
        result.aggregated = self.arrays is not None
        result.secagg_seconds, result.secagg_halted = self.secagg_seconds, self.secagg_halted
        result.secagg_reason = self.secagg_reason


def train_loss(results: Sequence[tuple[ClientProxy, FitRes]]) -> float:
    """The sites' last-epoch training loss, weighted by their example counts."""
    return weighted_metric(
        [(r.num_examples, float(r.metrics.get("train-loss", math.nan))) for _, r in results]
    )


def asked_to_evaluate(instructions: Sequence[tuple[ClientProxy, Any]]) -> set[int]:
    """The sites whose train message asks them to evaluate the head it carries."""
    return {proxy.node_id for proxy, ins in instructions if ins.config.get("evaluate") is True}


class Training(Protocol):
    """A round's training exchange: plain, or SecAgg+ (``server.secagg``)."""

    def train(self, grid: Grid, context: LegacyContext, server_round: int) -> RoundTraining: ...


@dataclass
class PlainTraining:
    """Training without secure aggregation: every site's update reaches the server, which
    checks each one (shape, finite values, norm, example count) and averages the rest."""

    roster: Roster
    trainable: TrainableSet
    max_update_norm: float
    pooling: Pooling
    timeout: float

    def train(self, grid: Grid, context: LegacyContext, server_round: int) -> RoundTraining:
        stack = context.strategy
        params = compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
        instructions = stack.configure_fit(server_round, params, context.client_manager)
        training = RoundTraining(selected=len(instructions))
        if not instructions:
            return training
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        contents = {p.node_id: compat.fitins_to_recorddict(ins, True) for p, ins in instructions}
        replies = exchange(grid, contents, MessageType.TRAIN, str(server_round), self.timeout)
        results: list[tuple[ClientProxy, FitRes]] = []
        failures: list[Failure] = [Exception(e) for e in replies.errors.values()]
        for node, content in replies.ok.items():
            try:
                res = decode_fit(node, content, self.roster.train_caps.get(node, 0), self.trainable)
            except ExcludedReply as err:
                log_left_out(server_round, MessageType.TRAIN, err)
                failures.append(err)
                continue
            (results if res.status.code == Code.OK else failures).append((proxies[node], res))
        log_missing(server_round, MessageType.TRAIN, self.timeout, replies.dropped)
        training.count(len(results), failures)
        training.evaluation = self.pooling.from_fit(
            server_round,
            [(p.node_id, r) for p, r in results],
            asked_to_evaluate(instructions),
            self.roster.val_caps,
        )
        training.train_loss = train_loss(results)
        for failure in failures:
            log.warning("round %d: a site failed: %s", server_round, describe_failure(failure))
        valid = []
        for proxy, res in results:
            problem = check_update(
                parameters_to_ndarrays(res.parameters), self.trainable, self.max_update_norm
            )
            if problem is None and res.num_examples <= 0:
                problem = ("no_examples", "the update reports no training examples")
            if problem is not None:
                training.rejected[proxy.node_id] = problem[0]
                log.warning(
                    "round %d: rejected update from %s (%s): %s",
                    server_round,
                    self.roster.name(proxy.node_id),
                    *problem,
                )
                continue
            valid.append((proxy, res))
        new, _ = stack.aggregate_fit(server_round, valid, failures)
        training.arrays = parameters_to_ndarrays(new) if new is not None else None
        return training


def log_left_out(server_round: int, message_type: str, err: ExcludedReply) -> None:
    log.warning(
        "round %d: left out the %s reply of node %d (%s): %s",
        server_round,
        message_type,
        err.node_id,
        err.reason,
        err.detail,
    )


def log_missing(
    server_round: int, message_type: str, timeout: float, dropped: dict[int, str]
) -> None:
    if dropped:
        log.warning(
            "round %d: no %s reply within %.0fs from node(s) %s",
            server_round,
            message_type,
            timeout,
            ", ".join(map(str, sorted(dropped))),
        )


@dataclass
class EvaluationStep:
    """Federated evaluation by an evaluate message: the strategy samples the sites, each
    evaluates the head on its validation split, the replies are checked and pooled."""

    roster: Roster
    pooling: Pooling
    timeout: float

    def evaluate(
        self, grid: Grid, context: LegacyContext, server_round: int
    ) -> FederatedEvaluation | None:
        stack = context.strategy
        params = compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
        instructions = stack.configure_evaluate(server_round, params, context.client_manager)
        if not instructions:
            return None
        contents = {
            p.node_id: compat.evaluateins_to_recorddict(ins, True) for p, ins in instructions
        }
        replies = exchange(grid, contents, MessageType.EVALUATE, str(server_round), self.timeout)
        results = []
        refused: list[ExcludedReply] = []
        failures = [f"error {e.code}: {e.reason}" for e in replies.errors.values()]
        for node, content in replies.ok.items():
            try:
                res = decode_evaluate(node, content, self.roster.val_caps.get(node, 0))
            except ExcludedReply as err:
                log_left_out(server_round, MessageType.EVALUATE, err)
                refused.append(err)
                continue
            if res.status.code == Code.OK:
                results.append((node, res))
            else:
                failures.append(f"node {node}: {res.status.message}")
        log_missing(server_round, MessageType.EVALUATE, self.timeout, replies.dropped)
        return self.pooling.pool(server_round, results, refused, failures)


class Rounds:
    """Flower's legacy context for one run's rounds: the strategy stack the steps call,
    the round number, and the client manager that tracks the connected sites (a thread
    of Flower's keeps it up to date)."""

    def __init__(self, grid: Grid, context: Context, strategy: Strategy, num_rounds: int) -> None:
        self.grid = grid
        self.context = LegacyContext(
            context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy
        )
        self.config = ConfigRecord({Key.START_TIME: time.time(), Key.CURRENT_ROUND: 0})
        self.context.state.config_records[MAIN_CONFIGS_RECORD] = self.config

    def use(self, strategy: Strategy) -> None:
        """The strategy stack the steps call from now on (sites joined the run)."""
        self.context.strategy = strategy

    def _at(self, server_round: int, head: Arrays) -> None:
        self.config[Key.CURRENT_ROUND] = server_round
        self.context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(head), True
        )

    def train(self, training: Training, server_round: int, head: Arrays) -> RoundTraining:
        """Round ``server_round``'s training from the global head ``head``."""
        self._at(server_round, head)
        return training.train(self.grid, self.context, server_round)

    def evaluate(
        self, step: EvaluationStep, server_round: int, head: Arrays
    ) -> FederatedEvaluation | None:
        """The federated evaluation of round ``server_round``'s head, by evaluate messages."""
        self._at(server_round, head)
        return step.evaluate(self.grid, self.context, server_round)


@contextmanager
def legacy_rounds(
    grid: Grid, context: Context, strategy: Strategy, num_rounds: int
) -> Iterator[Rounds]:
    """``Rounds`` with Flower's client-manager thread running while they are used."""
    rounds = Rounds(grid, context, strategy, num_rounds)
    thread, stop, registered = start_update_client_manager_thread(
        grid, rounds.context.client_manager
    )
    try:
        registered.wait()
        yield rounds
    finally:
        stop.set()
        thread.join()
