"""fedhead's round loop on Flower's (legacy) workflow stack.

One loop for every mode: wait for sites, prepare them (backbone distribution), then
per round a *fit step*, server-side evaluation and federated evaluation. The fit step
is either ``PlainFit`` (each site's update reaches the strategy) or Flower's
``SecAggPlusWorkflow`` (only the masked sum does); both call the same strategy. Unlike
Flower's default steps, every wait here has a timeout, so a dead site cannot stall a
run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, EvaluateRes, FitRes
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.run import Run

from fedhead.common.errors import FederationError
from fedhead.server.distribution import BackboneDistributor, PrepareOutcome
from fedhead.server.strategy import FedHeadStrategy

log = logging.getLogger(__name__)

Step = Callable[[Grid, Context], None]


def message_bytes(msg: Message) -> int:
    """Serialized size of a message's whole object tree (what crosses the network)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


class MeteredGrid(Grid):
    """A Grid that counts the bytes of every message sent to and received from sites."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self._mark = (0, 0)

    def take(self) -> tuple[int, int]:
        """Bytes (sent, received) since the previous call."""
        now = (self.bytes_sent, self.bytes_received)
        since = (now[0] - self._mark[0], now[1] - self._mark[1])
        self._mark = now
        return since

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.inner.get_nodes()

    def _count_out(self, messages: list[Message]) -> None:
        self.bytes_sent += sum(message_bytes(m) for m in messages)
        self.messages_sent += len(messages)

    def _count_in(self, messages: list[Message]) -> None:
        self.bytes_received += sum(message_bytes(m) for m in messages if m.has_content())
        self.messages_received += len(messages)

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
    decode: Callable[[RecordDict], R],
    server_round: int,
    timeout: float,
) -> tuple[list[tuple[ClientProxy, R]], list[tuple[ClientProxy, R] | BaseException]]:
    """Send each site its instruction, wait (up to ``timeout``) for the replies, and sort
    them into results and failures the way Flower's legacy strategies expect."""
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
        if msg.has_error():
            failures.append(Exception(msg.error))  # as Flower's SecAgg+ workflow does
            continue
        res = decode(msg.content)
        item = (proxies[msg.metadata.src_node_id], res)
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


@dataclass
class PlainFit:
    """Send FitIns to the sampled sites, collect FitRes (with a timeout), aggregate."""

    timeout: float

    def __call__(self, grid: Grid, context: Context) -> None:
        ctx = cast(LegacyContext, context)
        rnd = _current_round(ctx)
        instructions = ctx.strategy.configure_fit(rnd, _params(ctx), ctx.client_manager)
        if not instructions:
            return
        results, failures = exchange(
            grid,
            instructions,
            MessageType.TRAIN,
            lambda ins: compat.fitins_to_recorddict(ins, True),
            lambda rd: compat.recorddict_to_fitres(rd, keep_input=False),
            rnd,
            self.timeout,
        )
        params, metrics = ctx.strategy.aggregate_fit(rnd, results, failures)
        if params is not None:
            ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                params, True
            )
            ctx.history.add_metrics_distributed_fit(server_round=rnd, metrics=metrics)


@dataclass
class PlainEvaluate:
    """Federated evaluation on the sites' validation splits (with a timeout)."""

    timeout: float

    def __call__(self, grid: Grid, context: Context) -> None:
        ctx = cast(LegacyContext, context)
        rnd = _current_round(ctx)
        instructions = ctx.strategy.configure_evaluate(rnd, _params(ctx), ctx.client_manager)
        if not instructions:
            return
        results, failures = exchange(
            grid,
            instructions,
            MessageType.EVALUATE,
            lambda ins: compat.evaluateins_to_recorddict(ins, True),
            compat.recorddict_to_evaluateres,
            rnd,
            self.timeout,
        )
        loss, metrics = ctx.strategy.aggregate_evaluate(rnd, results, failures)
        if loss is not None:
            ctx.history.add_loss_distributed(server_round=rnd, loss=loss)
            ctx.history.add_metrics_distributed(server_round=rnd, metrics=metrics)


RoundHook = Callable[[int, float], None]  # (round, seconds); round 0 = initial evaluation
# Once sites are prepared: the fit step (plain or SecAgg+) and the strategy the steps
# call (FedHeadStrategy, or a DP wrapper around it), both sized to the sites that joined.
RoundBuilder = Callable[[PrepareOutcome], tuple[Step, Strategy]]


class FedHeadWorkflow:
    """Wait for sites, prepare them, then run the rounds."""

    def __init__(
        self,
        strategy: FedHeadStrategy,
        distributor: BackboneDistributor,
        build_round: RoundBuilder,
        evaluate_step: Step,
        num_rounds: int,
        min_sites: int,
        join_timeout: float,
        on_prepared: Callable[[PrepareOutcome], None] | None = None,
        on_round: RoundHook | None = None,
        on_round_start: Callable[[int], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.distributor = distributor
        self.build_round = build_round
        self.evaluate_step = evaluate_step
        self.num_rounds = num_rounds
        self.min_sites = min_sites
        self.join_timeout = join_timeout
        self.on_prepared = on_prepared
        self.on_round = on_round
        self.on_round_start = on_round_start

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
        try:
            registered.wait()
            self._run(grid, context)
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

    def _run(self, grid: Grid, context: LegacyContext) -> None:
        nodes = self._wait_for_sites(context)
        outcome = self.distributor.prepare(grid, nodes)
        if self.on_prepared:
            self.on_prepared(outcome)
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
        fit_step, context.strategy = self.build_round(outcome)
        params = self.strategy.initialize_parameters(context.client_manager)
        assert params is not None
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            params, True
        )
        cfg = ConfigRecord({Key.START_TIME: time.time(), Key.CURRENT_ROUND: 0})
        context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        # Round 0: how the initial head does, the baseline the rounds improve on.
        t0 = time.perf_counter()
        self.strategy.evaluate(0, _params(context))
        self.evaluate_step(grid, context)
        if self.on_round:
            self.on_round(0, time.perf_counter() - t0)
        for rnd in range(1, self.num_rounds + 1):
            t0 = time.perf_counter()
            cfg[Key.CURRENT_ROUND] = rnd
            if self.on_round_start:
                self.on_round_start(rnd)
            fit_step(grid, context)
            self.strategy.evaluate(rnd, _params(context))
            self.evaluate_step(grid, context)
            if self.on_round:
                self.on_round(rnd, time.perf_counter() - t0)
