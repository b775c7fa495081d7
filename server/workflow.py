"""fedhead's round loop on Flower's (legacy) workflow stack.

One loop for every mode: wait for sites, prepare them (backbone distribution), then
per round a *fit step*, server-side evaluation and federated evaluation. The fit step
is either a plain ``PlainStep`` (each site's update reaches the strategy) or Flower's
``SecAggPlusWorkflow`` (only the masked sum does); both call the same strategy. Unlike
Flower's default steps, every wait here has a timeout, so a dead site cannot stall a
run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, EvaluateRes, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedhead.common.errors import FederationError
from fedhead.common.rounds import RoundResult
from fedhead.server.aggregation import Arrays
from fedhead.server.distribution import BackboneDistributor, PrepareOutcome
from fedhead.server.grids import DelegatingGrid
from fedhead.server.screening import ExcludedReply
from fedhead.server.secure import PrivacyLedger
from fedhead.server.strategy import FedHeadStrategy

log = logging.getLogger(__name__)

Step = Callable[[Grid, Context], None]


def message_bytes(msg: Message) -> int:
    """Serialized size of a message's whole object tree (what crosses the network)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


class MeteredGrid(DelegatingGrid):
    """A Grid that counts the bytes of every message sent to and received from sites."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._mark = (0, 0)

    def take(self) -> tuple[int, int]:
        """Bytes (sent, received) since the previous call."""
        now = (self.bytes_sent, self.bytes_received)
        since = (now[0] - self._mark[0], now[1] - self._mark[1])
        self._mark = now
        return since

    def _count_out(self, messages: list[Message]) -> None:
        self.bytes_sent += sum(message_bytes(m) for m in messages)

    def _count_in(self, messages: list[Message]) -> None:
        self.bytes_received += sum(message_bytes(m) for m in messages if m.has_content())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._count_out(messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._count_in(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self._count_out(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._count_in(replies)
        return replies


def _current_round(context: LegacyContext) -> int:
    return cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])


def _params(context: LegacyContext) -> Any:
    return compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
    )


R = TypeVar("R", FitRes, EvaluateRes)


def exchange(
    grid: Grid,
    instructions: list[tuple[ClientProxy, Any]],
    message_type: str,
    encode: Callable[[Any], RecordDict],
    decode: Callable[[int, RecordDict], R],
    server_round: int,
    timeout: float,
) -> tuple[list[tuple[ClientProxy, R]], list[tuple[ClientProxy, R] | BaseException]]:
    """Send each site its instruction, wait (up to ``timeout``) for the replies, and sort
    them into results and failures the way Flower's legacy strategies expect. A reply
    that ``decode`` refuses (``ExcludedReply``) is that site's failure."""
    proxies = {proxy.node_id: proxy for proxy, _ in instructions}
    out = [
        Message(
            content=encode(ins),
            dst_node_id=proxy.node_id,
            message_type=message_type,
            group_id=str(server_round),
        )
        for proxy, ins in instructions
    ]
    replies = list(grid.send_and_receive(out, timeout=timeout))
    results: list[tuple[ClientProxy, R]] = []
    failures: list[tuple[ClientProxy, R] | BaseException] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if node not in proxies:
            continue  # not asked: nothing to count
        if msg.has_error():
            failures.append(Exception(msg.error))  # as Flower's SecAgg+ workflow does
            continue
        try:
            res = decode(node, msg.content)
        except ExcludedReply as err:
            log.warning(
                "round %d: left out the %s reply of node %d (%s): %s",
                server_round,
                message_type,
                node,
                err.reason,
                err.detail,
            )
            failures.append(err)
            continue
        item = (proxies[node], res)
        (results if res.status.code == Code.OK else failures).append(item)
    if missing := set(proxies) - {m.metadata.src_node_id for m in replies}:
        log.warning(
            "round %d: no %s reply within %.0fs from node(s) %s",
            server_round,
            message_type,
            timeout,
            ", ".join(map(str, sorted(missing))),
        )
    return results, failures


_ENCODERS: dict[str, Callable[[Any], RecordDict]] = {
    MessageType.TRAIN: lambda ins: compat.fitins_to_recorddict(ins, True),
    MessageType.EVALUATE: lambda ins: compat.evaluateins_to_recorddict(ins, True),
}


@dataclass
class PlainStep:
    """One plain (unmasked) exchange with the sampled sites, with a timeout: training
    (``train``: FitIns out, each site's FitRes to ``aggregate_fit``, which yields the
    new global head) or federated evaluation on the sites' validation splits."""

    timeout: float
    screen: FedHeadStrategy  # reads and checks each reply
    train: bool

    def __call__(self, grid: Grid, context: Context) -> None:
        ctx = cast(LegacyContext, context)
        rnd, strategy = _current_round(ctx), ctx.strategy
        kind = MessageType.TRAIN if self.train else MessageType.EVALUATE
        configure: Callable[..., Any] = (
            strategy.configure_fit if self.train else strategy.configure_evaluate
        )
        decode: Callable[[int, RecordDict], Any] = (
            self.screen.decode_fit if self.train else self.screen.decode_evaluate
        )
        instructions = configure(rnd, _params(ctx), ctx.client_manager)
        if not instructions:
            return
        results, failures = exchange(
            grid, list(instructions), kind, _ENCODERS[kind], decode, rnd, self.timeout
        )
        if not self.train:
            loss, metrics = strategy.aggregate_evaluate(rnd, results, failures)
            if loss is not None:
                ctx.history.add_loss_distributed(server_round=rnd, loss=loss)
                ctx.history.add_metrics_distributed(server_round=rnd, metrics=metrics)
            return
        params, metrics = strategy.aggregate_fit(rnd, results, failures)
        if params is not None:
            ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                params, True
            )
            ctx.history.add_metrics_distributed_fit(server_round=rnd, metrics=metrics)


@dataclass
class RoundPlan:
    """Once sites are prepared: the fit step (plain or SecAgg+), the strategy the steps
    call (FedHeadStrategy, or a DP wrapper around it) and the privacy ledger of a DP
    run, all sized to the sites that joined."""

    fit_step: Step
    strategy: Strategy
    privacy: PrivacyLedger | None = None


RoundPlanner = Callable[[PrepareOutcome], RoundPlan]


class RunObserver(Protocol):
    """What happens in a run, for whoever records it (report, telemetry, checkpoints)."""

    def prepared(self, outcome: PrepareOutcome) -> None:
        """Sites joined and were prepared (``outcome`` includes the setup traffic)."""

    def round_started(self, server_round: int) -> None:
        """A training round begins."""

    def round_trained(self, result: RoundResult, arrays: Arrays) -> None:
        """A round's training is done (round 0: none): these are the global tensors after
        it; its federated evaluation may still be to come (``result`` fills in later)."""

    def round_finished(self, result: RoundResult, arrays: Arrays) -> None:
        """A round (0: the initial head's evaluation) is complete, its evaluation in."""


# After the last round: (grid, the sites that took part, the final global tensors).
FinalStep = Callable[[Grid, list[int], Arrays], None]
# Once the sites are prepared, before any round (delivering models they missed earlier).
PreparedStep = Callable[[Grid, PrepareOutcome], None]


@dataclass(eq=False, repr=False)
class FedHeadWorkflow:
    """Wait for sites, prepare them, then run the rounds.

    A resumed run (``resume_after``: the round its checkpoint saved) starts from the
    strategy's initial tensors, which are then that checkpoint's head, at round
    ``resume_after + 1``; the initial evaluation is not repeated. ``prepared_step`` runs
    once the sites are prepared (delivering earlier runs' models they ask for); ``final_step`` runs
    once the last round is done (delivering the model to the sites).
    """

    strategy: FedHeadStrategy
    distributor: BackboneDistributor
    plan_rounds: RoundPlanner
    evaluate_step: Step
    num_rounds: int
    min_sites: int
    join_timeout: float
    observers: Sequence[RunObserver] = ()
    resume_after: int | None = None
    final_step: FinalStep | None = None
    prepared_step: PreparedStep | None = None

    def __post_init__(self) -> None:
        n, after = self.num_rounds, self.resume_after
        if after is not None and not 0 <= after < n:
            raise ValueError(f"resume_after must be in [0, {n}), got {after}")
        self.observers = list(self.observers)

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        metered = MeteredGrid(grid)
        thread, stop, registered = start_update_client_manager_thread(
            metered, context.client_manager
        )
        try:
            registered.wait()
            self._run(metered, context)
        finally:
            stop.set()
            thread.join()

    def _wait_for_sites(self, context: LegacyContext) -> list[int]:
        log.info("waiting up to %.0fs for %d site(s) to connect", self.join_timeout, self.min_sites)
        deadline = time.monotonic() + self.join_timeout
        while True:
            nodes = [c.node_id for c in context.client_manager.all().values()]
            if len(nodes) >= self.min_sites:
                return sorted(nodes)
            if time.monotonic() >= deadline:
                raise FederationError(
                    f"only {len(nodes)} of the {self.min_sites} required site(s) connected "
                    f"within {self.join_timeout:.0f}s",
                    "start more SuperNodes, or lower min-sites",
                )
            time.sleep(0.5)

    def _run(self, grid: MeteredGrid, context: LegacyContext) -> None:
        nodes = self._wait_for_sites(context)
        outcome = self.distributor.prepare(grid, nodes)
        if self.prepared_step is not None:
            self.prepared_step(grid, outcome)  # its traffic counts as setup traffic
        outcome.bytes_to_sites, outcome.bytes_from_sites = grid.take()
        for obs in self.observers:
            obs.prepared(outcome)
        if len(outcome.ready) < self.min_sites:
            reasons = "; ".join(
                f"{outcome.name(n)}: {why}" for n, why in sorted(outcome.failed.items())
            )
            raise FederationError(
                f"only {len(outcome.ready)} of {len(nodes)} site(s) are ready, "
                f"{self.min_sites} needed ({reasons or 'no reasons given'})",
                "fix the problems named and start the run again",
            )
        self.strategy.ready = set(outcome.ready)
        self.strategy.names = dict(outcome.names)
        plan = self.plan_rounds(outcome)
        context.strategy = plan.strategy
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(self.strategy.initial), True
        )
        first = 1 if self.resume_after is None else self.resume_after + 1
        cfg = ConfigRecord({Key.START_TIME: time.time(), Key.CURRENT_ROUND: first - 1})
        context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        # A round is complete once its head's federated evaluation is in. When the next
        # round's train messages carry that evaluation (``strategy.evaluates_in_train``),
        # the round waits, "pending", until that training is done; the last round's
        # head is always evaluated by an evaluate step of its own.
        pending: _Closed | None = None
        if self.resume_after is None:
            # Round 0: how the initial head does, the baseline the rounds improve on.
            t0 = time.perf_counter()
            self.strategy.evaluate(0, _params(context))
            pending = self._evaluate(0, t0, grid, context, plan)
        else:
            log.info("resuming after round %d of %d", self.resume_after, self.num_rounds)
        for rnd in range(first, self.num_rounds + 1):
            t0 = time.perf_counter()
            cfg[Key.CURRENT_ROUND] = rnd
            for obs in self.observers:
                obs.round_started(rnd)
            plan.fit_step(grid, context)
            if pending is not None:  # its evaluation came with this round's training
                self._publish(pending)
            self.strategy.evaluate(rnd, _params(context))
            pending = self._evaluate(rnd, t0, grid, context, plan)
        if self.final_step is not None:
            self.final_step(grid, sorted(outcome.ready), parameters_to_ndarrays(_params(context)))

    def _evaluate(
        self, rnd: int, t0: float, grid: MeteredGrid, context: LegacyContext, plan: RoundPlan
    ) -> _Closed | None:
        """Round ``rnd``'s federated evaluation: now, with an evaluate step (then the
        round is published), or with the next round's training (then it is returned,
        pending)."""
        if rnd < self.num_rounds and self.strategy.evaluates_in_train(rnd + 1):
            return self._close(rnd, time.perf_counter() - t0, grid, context, plan)
        self.evaluate_step(grid, context)
        self._publish(self._close(rnd, time.perf_counter() - t0, grid, context, plan))
        return None

    def _close(
        self, rnd: int, seconds: float, grid: MeteredGrid, context: LegacyContext, plan: RoundPlan
    ) -> _Closed:
        """The round's own figures (time, traffic, privacy) and its global tensors."""
        result = self.strategy.stats(rnd)
        result.seconds = seconds
        result.bytes_to_sites, result.bytes_from_sites = grid.take()
        if plan.privacy is not None and result.aggregated:
            result.dp_epsilon = plan.privacy.release()
            result.dp_delta = plan.privacy.delta
        closed = _Closed(result, parameters_to_ndarrays(_params(context)))
        for obs in self.observers:
            obs.round_trained(closed.result, closed.arrays)
        return closed

    def _publish(self, closed: _Closed) -> None:
        """Tell the observers: the round is complete."""
        for obs in self.observers:
            obs.round_finished(closed.result, closed.arrays)


@dataclass(frozen=True)
class _Closed:
    """A round whose training is done: its result and the global tensors after it."""

    result: RoundResult
    arrays: Arrays
