"""Secure aggregation (Flower's SecAgg+) and differential privacy for fedhead's rounds.

SecAgg+ in Flower 1.41 exists only on the legacy workflow stack: ``SecAggPlusWorkflow``
drives a legacy ``Strategy`` and the sites run ``secaggplus_mod``. fedhead's round loop
is built on that stack, so the SecAgg+ workflow simply replaces the plain fit step; the
strategy, evaluation and backbone distribution are the same in both modes.

Parameters are derived once the sites have joined: the number of sampled sites gives
the shares and the reconstruction threshold (a majority by default), and the largest
site's example count gives ``max_weight`` so no site's weight overflows.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from flwr.app import Message, RecordDict
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedhead.common.config import RunConfig
from fedhead.common.errors import ConfigError
from fedhead.common.rounds import SECAGG_STAGES
from fedhead.server.grids import DelegatingGrid
from fedhead.server.replies import FitAggregate, FitFailures, FitResults
from fedhead.server.screening import (
    ExcludedReply,
    check_key_shares,
    check_masked_vector,
    check_public_keys,
    check_unmask_shares,
    quantized_weight,
)
from fedhead.server.strategy import FedHeadStrategy, SecureWeight

log = logging.getLogger(__name__)

MODULUS_RANGE = 2**32
SETUP, SHARE_KEYS, COLLECT, UNMASK = SECAGG_STAGES
StageHook = Callable[[int, str, float], None]  # (round, stage, seconds)


@dataclass(frozen=True)
class SecAggParams:
    """SecAgg+ settings for one run, in Flower's terms (float = share, int = count)."""

    num_shares: float | int
    reconstruction_threshold: float | int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float
    timeout: float
    expected_sites: int  # sampled per round, as planned when the run started

    def report(self) -> dict[str, Any]:
        return asdict(self)

    def workflow_args(self) -> dict[str, Any]:
        """Flower's ``SecAggPlusWorkflow`` arguments: every field but ``expected_sites``."""
        args = asdict(self)
        del args["expected_sites"]
        return args


def _resolved_shares(num_shares: float | int, n: int) -> int:
    """The share count Flower will use for ``n`` sampled sites (its own rule)."""
    if isinstance(num_shares, int):
        return num_shares
    shares = round(num_shares * n)
    if shares < n and shares % 2 == 0:
        shares += 1
    return n if shares <= 2 else shares


def secagg_params(cfg: RunConfig, sampled_sites: int, max_examples: int) -> SecAggParams:
    """Derive SecAgg+ settings for ``sampled_sites`` per round from the run config."""
    problems = []
    shares: float | int = (
        float(cfg.secagg_num_shares) if cfg.secagg_num_shares <= 1 else int(cfg.secagg_num_shares)
    )
    resolved = _resolved_shares(shares, sampled_sites)
    threshold: float | int
    if cfg.secagg_threshold == 0:
        threshold = max(2, min(resolved, resolved // 2 + 1))  # a majority of the shares
    elif cfg.secagg_threshold <= 1:
        threshold = float(cfg.secagg_threshold)
    else:
        threshold = int(cfg.secagg_threshold)
        if threshold > resolved:
            problems.append(
                f"secagg-threshold: {threshold} exceeds the {resolved} shares of "
                f"{sampled_sites} sampled sites"
            )
    if sampled_sites * cfg.secagg_quantization_range >= MODULUS_RANGE:
        problems.append(
            f"secagg-quantization-range: {sampled_sites} sites x {cfg.secagg_quantization_range} "
            f"levels overflow the 2^32 modulus; lower it below "
            f"{MODULUS_RANGE // sampled_sites}"
        )
    if problems:
        raise ConfigError(problems, "run configuration")
    uniform = cfg.dp_noise_multiplier > 0
    return SecAggParams(
        num_shares=shares,
        reconstruction_threshold=threshold,
        clipping_range=cfg.secagg_clipping_range,
        quantization_range=cfg.secagg_quantization_range,
        modulus_range=MODULUS_RANGE,
        max_weight=1.0 if uniform else float(max(1, max_examples)),
        timeout=cfg.round_timeout,
        expected_sites=sampled_sites,
    )


ReplyCheck = Callable[[int, RecordDict], None]  # raises ExcludedReply


class _ScreenedGrid(DelegatingGrid):
    """A Grid whose replies pass ``check`` before the SecAgg+ workflow reads them.

    A refused reply is withheld, so Flower's workflow handles that site exactly like
    one that dropped out at this stage (its masks are removed through the other sites'
    key shares), and the refusal joins the round's failures.
    """

    def __init__(self, inner: Grid, check: ReplyCheck, failures: list[Exception]) -> None:
        super().__init__(inner)
        self.check, self.failures = check, failures

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("the SecAgg+ stages only use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("the SecAgg+ stages only use send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        kept = []
        for msg in self.inner.send_and_receive(messages, timeout=timeout):
            if not msg.has_error():
                try:
                    self.check(msg.metadata.src_node_id, msg.content)
                except ExcludedReply as err:
                    log.warning(
                        "left out the SecAgg+ reply of node %d (%s): %s; its masks are "
                        "removed as for a site that dropped out",
                        err.node_id,
                        err.reason,
                        err.detail,
                    )
                    self.failures.append(err)
                    continue
            kept.append(msg)
        return kept


class TimedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with every reply checked before it is used, each
    stage timed, halts counted in the round's result, and the aggregate's total weight
    handed to the strategy for checking."""

    def __init__(
        self, params: SecAggParams, strategy: FedHeadStrategy, on_stage: StageHook | None = None
    ) -> None:
        super().__init__(**params.workflow_args())
        self.strategy = strategy
        self.on_stage = on_stage

    def _timed(
        self,
        name: str,
        stage: Callable[[Grid, LegacyContext, WorkflowState], bool],
        grid: Grid,
        context: LegacyContext,
        state: WorkflowState,
        check: ReplyCheck,
    ) -> bool:
        t0 = time.perf_counter()
        ok = stage(_ScreenedGrid(grid, check, state.failures), context, state)
        rnd = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        if self.on_stage:
            self.on_stage(rnd, name, time.perf_counter() - t0)
        if not ok:
            self.strategy.secure_halted(rnd, name, set(state.active_node_ids), state.failures)
            log.error(
                "round %d: secure aggregation stopped at stage %s (too few live sites for the "
                "reconstruction threshold); the global head stays as it was",
                rnd,
                name,
            )
        return ok

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._timed(SETUP, super().setup_stage, grid, context, state, check_public_keys)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        def check(node: int, content: RecordDict) -> None:
            check_key_shares(node, content, state.nid_to_neighbours.get(node, set()))

        ok = self._timed(SHARE_KEYS, super().share_keys_stage, grid, context, state, check)
        # Sites that dropped before sharing their keys never entered anyone's masks and
        # left no key shares behind: they are out of the round, not "dead". Flower 1.41
        # keeps them among the sampled sites, so unmasking would ask the others for
        # shares that do not exist and the whole round would fail. Narrow the sampled
        # set and the neighbourhoods to the sites that completed key sharing.
        shared = set(state.active_node_ids)
        if ok and shared != state.sampled_node_ids:
            log.warning(
                "%d site(s) dropped before sharing keys; continuing with %d",
                len(state.sampled_node_ids - shared),
                len(shared),
            )
            state.sampled_node_ids = shared
            for nid in list(state.nid_to_neighbours):
                state.nid_to_neighbours[nid] &= shared
            ok = self._check_threshold(state)
        return ok

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        claims: dict[int, int] = {}

        def check(node: int, content: RecordDict) -> None:
            cap = self.strategy.train_caps.get(node, 0)
            trainable = self.strategy.trainable
            claims[node] = check_masked_vector(node, content, trainable, state.mod_range, cap)

        stage = super().collect_masked_vectors_stage
        ok = self._timed(COLLECT, stage, grid, context, state, check)
        rnd = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        summed = [n for n in state.active_node_ids if n in claims]
        self.strategy.secure_weights[rnd] = SecureWeight(
            total=sum(
                quantized_weight(claims[n], self.max_weight, self.quantization_range)
                for n in summed
            ),
            sites=len(summed),
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
        )
        return ok

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        def check(node: int, content: RecordDict) -> None:
            check_unmask_shares(node, content, state.nid_to_neighbours.get(node, set()))

        return self._timed(UNMASK, super().unmask_stage, grid, context, state, check)


class DPFixedClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's central DP with client-side fixed clipping, recording skipped rounds.

    Flower's wrapper skips a round in which any site failed (the noise is calibrated to
    a fixed number of sites); this records that in the round's statistics.
    """

    def __init__(
        self,
        inner: FedHeadStrategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
    ) -> None:
        super().__init__(inner, noise_multiplier, clipping_norm, num_sampled_clients)
        self.inner = inner

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> FitAggregate:
        if failures:
            self.inner.count_replies(server_round, results, failures)
            self.inner.evaluations_in_fit(server_round, results)  # they still count
            log.error(
                "round %d: %d site(s) failed; with differential privacy the round is skipped "
                "(noise is calibrated to %d sites)",
                server_round,
                len(failures),
                self.num_sampled_clients,
            )
        return super().aggregate_fit(server_round, results, failures)


PrivacyEvent = tuple[float, int, int]  # (noise multiplier, sampled sites, population)


@dataclass
class PrivacyLedger:
    """Cumulative (epsilon, delta) of the rounds whose noisy aggregate was released.

    ``released`` lists every accounted round's event, so a resumed run can replay
    them and go on from the same privacy spent.
    """

    noise_multiplier: float
    delta: float
    sites: int  # population: the sites that joined the run
    sampled: int  # sites per round
    released: list[PrivacyEvent] = field(default_factory=list)
    _accountant: Any = None

    def __post_init__(self) -> None:
        from flwr.serverapp import RdpAccountant
        from flwr.supercore.privacy_accounting import (
            NeighboringRelation,
            PrivacyConfig,
            SamplingMethod,
        )

        self._accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=self.delta,
                population_size=self.sites,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )

    def release(self) -> float:
        """Account one released round; returns the cumulative epsilon at ``delta``."""
        self._compose((self.noise_multiplier, min(self.sampled, self.sites), self.sites))
        return self.epsilon()

    def replay(self, events: list[PrivacyEvent]) -> float:
        """Account the rounds an earlier (cut-off) part of this run released."""
        for event in events:
            self._compose(event)
        return self.epsilon()

    def epsilon(self) -> float:
        if not self.released:
            return 0.0
        epsilon = float(self._accountant.get_epsilon(self.delta))
        return epsilon if math.isfinite(epsilon) else math.inf

    def _compose(self, event: PrivacyEvent) -> None:
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        noise, sampled, sites = float(event[0]), int(event[1]), int(event[2])
        self._accountant.compose(GaussianPrivacyEvent(noise, sampled, sites))
        self.released.append((noise, sampled, sites))
