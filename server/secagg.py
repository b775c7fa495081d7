"""Secure aggregation (Flower's SecAgg+) for fedhead's rounds: its parameters, the
timed workflow, the checks of every stage's replies and of the aggregate.

SecAgg+ in Flower 1.41 exists only on the legacy workflow stack: ``SecAggPlusWorkflow``
drives a legacy ``Strategy`` and the sites run ``secaggplus_mod``. ``SecAggTraining``
replaces the plain training exchange of a round (``server.rounds``); the strategy,
evaluation and backbone distribution are the same in both modes.

Parameters are derived once the sites have joined: the number of sampled sites gives
the shares and the reconstruction threshold (a majority by default), and the largest
site's example count gives ``max_weight`` so no site's weight overflows.

Every reply of every stage is checked before Flower's workflow reads it; a refused one
is withheld, so the workflow handles that site like one that dropped out at that stage.
The unmasked aggregate is checked before the strategy uses it: no honest mean lies
outside the clipping range, and its total weight must be the sum of the weights the
summed sites reported (a site that masked another count than it declared shows).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Message, RecordDict
from flwr.common import (
    EvaluateIns,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedhead.common.config import RunConfig
from fedhead.common.errors import ConfigError, FederationError
from fedhead.common.model import TrainableSet
from fedhead.common.protocol import FitSettings
from fedhead.common.rounds import SECAGG_STAGES
from fedhead.server.aggregation import Arrays, check_update
from fedhead.server.federated_eval import Pooling
from fedhead.server.grids import DelegatingGrid
from fedhead.server.prepare import Roster
from fedhead.server.rounds import (
    Failure,
    FitResults,
    RoundTraining,
    asked_to_evaluate,
    describe_failure,
    train_loss,
)
from fedhead.server.screening import ExcludedReply, claimed_count, decoded

log = logging.getLogger(__name__)

MODULUS_RANGE = 2**32
SETUP, SHARE_KEYS, COLLECT, UNMASK = SECAGG_STAGES


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
    if sampled_sites < 2:
        raise FederationError(
            f"secure aggregation needs at least 2 sites per round; {sampled_sites} take part "
            "(a sum of one site's update is that update)",
            "start more sites, or run a single site with secure-aggregation=false",
        )
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


# --- the replies of each stage --------------------------------------------------------
def _secagg_record(node_id: int, content: RecordDict) -> Mapping[str, Any]:
    if RECORD_KEY_CONFIGS not in content.config_records:
        raise ExcludedReply(node_id, "malformed", f"no {RECORD_KEY_CONFIGS!r} record")
    return content.config_records[RECORD_KEY_CONFIGS]


def _list_of(node_id: int, rec: Mapping[str, Any], key: str, kind: type) -> list[Any]:
    value = rec.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    ):
        raise ExcludedReply(node_id, "malformed", f"{key!r} is not a list of {kind.__name__}")
    return value


def check_public_keys(node_id: int, content: RecordDict) -> None:
    """SecAgg+ setup: two public keys."""
    rec = _secagg_record(node_id, content)
    for key in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2):
        if not isinstance(rec.get(key), bytes):
            raise ExcludedReply(node_id, "malformed", f"public key {key!r} missing")


def _shares_of_neighbours(
    node_id: int, content: RecordDict, neighbours: set[int], nodes_key: str, shares_key: str
) -> bool:
    """One share (bytes) per node id in ``nodes_key``, and neighbours' ids only."""
    rec = _secagg_record(node_id, content)
    nodes = _list_of(node_id, rec, nodes_key, int)
    shares = _list_of(node_id, rec, shares_key, bytes)
    return len(nodes) == len(shares) and set(nodes) <= neighbours


def check_key_shares(node_id: int, content: RecordDict, neighbours: set[int]) -> None:
    """SecAgg+ share keys: one encrypted share per neighbour."""
    keys = (Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST)
    if not _shares_of_neighbours(node_id, content, neighbours, *keys):
        raise ExcludedReply(node_id, "malformed", "key shares for nodes that are not neighbours")


def check_masked_vector(
    node_id: int,
    content: RecordDict,
    shapes: Sequence[tuple[int, ...]],
    mod_range: int,
) -> int:
    """SecAgg+ collect: a masked vector that Flower can sum. The vector is the quantized
    weight (shape (1,)) followed by one integer array of each of ``shapes``, each value
    in [0, mod_range). Returns the example count the site claims (its weight)."""
    rec = _secagg_record(node_id, content)
    blobs = _list_of(node_id, rec, Key.MASKED_PARAMETERS, bytes)
    expected = [(1,), *shapes]
    if len(blobs) != len(expected):
        raise ExcludedReply(
            node_id, "malformed", f"masked vector has {len(blobs)} parts, {len(expected)} expected"
        )
    for i, (blob, shape) in enumerate(zip(blobs, expected, strict=True)):
        try:
            arr = bytes_to_ndarray(blob)
        except (ValueError, TypeError, EOFError) as err:
            raise ExcludedReply(node_id, "malformed", f"masked part {i} unreadable") from err
        if tuple(arr.shape) != tuple(shape) or arr.dtype.kind not in "iu":
            raise ExcludedReply(
                node_id,
                "malformed",
                f"masked part {i} is {arr.dtype}{list(arr.shape)}, integers{list(shape)} expected",
            )
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= mod_range):
            raise ExcludedReply(node_id, "malformed", f"masked part {i} outside the modulus")
    res: FitRes = decoded(
        node_id, "train", lambda c: compat.recorddict_to_fitres(c, keep_input=True), content
    )
    count: int = res.num_examples
    return count


def check_unmask_shares(node_id: int, content: RecordDict, neighbours: set[int]) -> None:
    """SecAgg+ unmask: key shares of neighbours only."""
    keys = (Key.NODE_ID_LIST, Key.SHARE_LIST)
    if not _shares_of_neighbours(node_id, content, neighbours, *keys):
        raise ExcludedReply(node_id, "malformed", "key shares of nodes that are not neighbours")


GCD_EVIDENCE = 16  # nonzero coordinates needed before a common factor counts as scaling


def quantized_weight(num_examples: int, max_weight: float, quantization_range: int) -> int:
    """The integer weight a site's SecAgg+ client adds for ``num_examples``."""
    return round(num_examples / max_weight * quantization_range)


def aggregate_has_weight(
    aggregate: Sequence[np.ndarray],
    total_weight: int,
    sites: int,
    clipping_range: float,
    quantization_range: int,
    tolerance: float = 1e-3,
) -> bool:
    """Whether a securely aggregated mean was divided by ``total_weight``.

    The unmasked sum is an integer vector ``s`` and the mean is
    ``(2c*s - n*c*Q) / T`` for n sites, clipping range c, quantization range Q and true
    total quantized weight T. So ``d = mean*W/(2c)`` is ``(s - n*Q/2) * W/T``: whole in
    every coordinate for W = T, and for a wrong W only if W is a multiple of T (the
    sum's unknown honest part leaves no other way). A site that masked a larger weight
    than it declared breaks wholeness; one that masked a smaller weight, scaling the
    mean up by m = W/T, leaves every ``d`` divisible by m, which the gcd reveals.
    """
    whole: list[np.ndarray] = []
    for arr in aggregate:
        d = arr.astype(np.float64) * total_weight / (2 * clipping_range)
        d += sites * quantization_range / 2  # exact for whole n*Q/2; the sum's offset
        if arr.size and float(np.abs(d - np.round(d)).max()) > tolerance:
            return False
        whole.append(np.round(d).astype(np.int64).ravel() - round(sites * quantization_range / 2))
    flat = np.concatenate(whole) if whole else np.zeros(0, np.int64)
    nonzero = np.abs(flat[flat != 0])
    # The gcd is evidence only over enough coordinates: an honest sum with a handful of
    # nonzero values (say, a head whose only change is its biases) can share a factor
    # by chance. Below GCD_EVIDENCE coordinates a smaller masked weight goes unnoticed.
    return nonzero.size < GCD_EVIDENCE or int(np.gcd.reduce(nonzero)) == 1


def aggregate_problem(
    raw: Sequence[np.ndarray],
    trainable: TrainableSet,
    settings: FitSettings,
    expected: SecureWeight | None,
) -> tuple[str, str] | None:
    """What honest sites cannot have produced: a mean outside the clipping range (each
    site's values are clipped to it), another total weight than the summed sites
    reported, or a mean that fails the update checks (shape, finite values, norm)."""
    if settings.clipping_range and raw and len(raw) == len(trainable.tensors):
        largest = max(float(np.abs(a).max()) for a in raw if a.size)
        if not largest <= settings.clipping_range * (1 + 1e-6):
            return (
                "range",
                f"a mean value of {largest:.4g} lies outside the clipping range "
                f"+-{settings.clipping_range:g} that every site's values are clipped to",
            )
    if expected is not None and not aggregate_has_weight(
        raw, expected.total, expected.sites, expected.clipping_range, expected.quantization_range
    ):
        return (
            "weight",
            f"its total weight is not the {expected.total} that the {expected.sites} "
            "summed sites reported: a site masked another example count than it declared",
        )
    aggregate = [a.astype(s.dtype) for a, s in zip(raw, trainable.tensors, strict=False)]
    return check_update(aggregate, trainable, settings.max_update_norm)


def _combines(shares: list[bytes]) -> bool:
    try:
        combine_shares(shares)
    except (ValueError, TypeError, IndexError):
        return False
    return True


def bad_share_holders(
    sent: Mapping[int, tuple[list[int], list[bytes]]], threshold: int
) -> set[int]:
    """The holders whose unmask shares stop a key from being rebuilt, found with the spare
    shares: for each key whose shares do not combine, a holder is named when the key
    combines without its share and not with it. Needs more shares than the threshold;
    without spares nobody can be named."""
    by_owner: dict[int, list[tuple[int, bytes]]] = {}
    for holder, (owners, shares) in sent.items():
        for owner, share in zip(owners, shares, strict=False):
            by_owner.setdefault(owner, []).append((holder, share))
    named: set[int] = set()
    for items in by_owner.values():
        if _combines([s for _, s in items]) or len(items) - 1 < threshold:
            continue
        named |= {
            holder for holder, _ in items if _combines([s for other, s in items if other != holder])
        }
    return named


@dataclass(frozen=True)
class SecureWeight:
    """What a SecAgg+ round's aggregate must have been divided by: the quantized
    weights of the sites whose masked vectors were summed, from their reported counts."""

    total: int
    sites: int
    clipping_range: float
    quantization_range: int


# --- what a SecAgg+ round sums -------------------------------------------------------
Instructions = list[tuple[ClientProxy, FitIns]]


class SecurePayload(Protocol):
    """What a SecAgg+ round sums: the sites' head updates (``HeadUpdates``), or the
    closed-form statistics (``server.closed_form``)."""

    def configure(
        self, stack: Strategy, server_round: int, parameters: Parameters, cm: ClientManager
    ) -> Instructions:
        """The sites sampled for the round and what their train messages say."""

    def shapes(self) -> list[tuple[int, ...]]:
        """The arrays each site's masked vector holds after its weight."""

    def claim(self, node_id: int, count: int, cap: int) -> None:
        """Refuse (ExcludedReply) an example count a site may not claim."""

    def problem(self, raw: Arrays, weight: SecureWeight | None) -> tuple[str, str] | None:
        """Why the unmasked aggregate cannot come from honest sites (None: it can)."""

    @property
    def updates_head(self) -> bool:
        """True: the checked aggregate goes to the strategy stack (a new head); False: it
        is the round's result as it is (``RoundTraining.aggregate``)."""


@dataclass(frozen=True)
class HeadUpdates:
    """The sites' head deltas: the strategy samples and configures, each site's weight
    is its example count, the aggregate must be a mean honest deltas can produce."""

    trainable: TrainableSet
    settings: FitSettings
    updates_head: bool = True

    def configure(
        self, stack: Strategy, server_round: int, parameters: Parameters, cm: ClientManager
    ) -> Instructions:
        return stack.configure_fit(server_round, parameters, cm)

    def shapes(self) -> list[tuple[int, ...]]:
        return [spec.shape for spec in self.trainable.tensors]

    def claim(self, node_id: int, count: int, cap: int) -> None:
        claimed_count(node_id, count, cap, "training")

    def problem(self, raw: Arrays, weight: SecureWeight | None) -> tuple[str, str] | None:
        return aggregate_problem(raw, self.trainable, self.settings, weight)


# --- the workflow ---------------------------------------------------------------------
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


@dataclass
class _RoundState(WorkflowState):
    """Flower's per-round SecAgg+ state, with what fedhead records of the round."""

    server_round: int = 0
    training: RoundTraining = field(default_factory=RoundTraining)
    claims: dict[int, int] = field(default_factory=dict)  # node -> example count it masked
    weight: SecureWeight | None = None
    asked: set[int] = field(default_factory=set)  # sites asked to evaluate in their reply
    # unmask stage: holder -> (owners, their shares) as the holder sent them
    unmask_shares: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)


class _CheckedAggregate(Strategy):
    """What the SecAgg+ workflow sees as its strategy for one round: the run's strategy
    stack, with the round's facts recorded and the aggregate checked before the stack
    reads it."""

    def __init__(self, stack: Strategy, state: _RoundState, training: SecAggTraining) -> None:
        super().__init__()
        self.stack, self.state, self.owner = stack, state, training

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.stack.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        payload = self.owner.payload
        instructions = payload.configure(self.stack, server_round, parameters, client_manager)
        self.state.training.selected = len(instructions)
        self.state.asked = asked_to_evaluate(instructions)
        return instructions

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: list[Failure]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        return self.owner.aggregate(self.stack, self.state, results, failures)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: object, failures: object
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


class SecAggTraining(SecAggPlusWorkflow):
    """A round's training under Flower's SecAgg+, every stage timed and its replies
    checked, returning what the round produced (``RoundTraining``)."""

    def __init__(
        self, params: SecAggParams, roster: Roster, pooling: Pooling, payload: SecurePayload
    ) -> None:
        super().__init__(**params.workflow_args())
        self.roster = roster
        self.pooling = pooling
        self.payload = payload

    def train(self, grid: Grid, context: LegacyContext, server_round: int) -> RoundTraining:
        state = _RoundState(server_round=server_round)
        stack = context.strategy
        context.strategy = _CheckedAggregate(stack, state, self)
        try:
            stages = (
                (SETUP, self.setup_stage, check_public_keys),
                (SHARE_KEYS, self.share_keys_stage, self._key_shares_check(state)),
                (COLLECT, self.collect_masked_vectors_stage, self._masked_vector_check(state)),
                (UNMASK, self.unmask_stage, self._unmask_check(state)),
            )
            for name, stage, check in stages:
                t0 = time.perf_counter()
                ok = stage(_ScreenedGrid(grid, check, state.failures), context, state)
                state.training.secagg_seconds[name] = time.perf_counter() - t0
                if not ok:
                    self._halted(state, name)
                    break
        finally:
            context.strategy = stack
        return state.training

    def _halted(self, state: _RoundState, stage: str) -> None:
        """The round stopped at ``stage``: too few live sites for the reconstruction
        threshold, or (unmask) key shares that do not rebuild the keys."""
        training = state.training
        training.secagg_halted = stage
        training.secagg_reason = training.secagg_reason or "too few live sites for the threshold"
        training.count(len(state.active_node_ids), state.failures)
        for node, why in training.culprits.items():
            training.rejected[node] = "shares"
            log.error("round %d: %s: %s", state.server_round, self.roster.name(node), why)
        log.error(
            "round %d: secure aggregation stopped at stage %s (%s); the global head stays as "
            "it was",
            state.server_round,
            stage,
            training.secagg_reason,
        )

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's unmask stage, which raises when key shares do not combine (a site sent
        shares that are not the ones it was given): the round stops cleanly instead, and
        the sites whose shares are the reason are named where the spare shares tell."""
        assert isinstance(state, _RoundState)
        try:
            return bool(super().unmask_stage(grid, context, state))
        except (ValueError, TypeError) as err:  # combine_shares, or a rebuilt key unreadable
            state.training.secagg_reason = f"key shares that do not combine ({err})"
            state.training.culprits = {
                node: "sent SecAgg+ unmask shares that do not rebuild the keys they belong to"
                for node in bad_share_holders(state.unmask_shares, state.threshold)
            }
            return False

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().share_keys_stage(grid, context, state)
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
        ok = super().collect_masked_vectors_stage(grid, context, state)
        assert isinstance(state, _RoundState)
        summed = [n for n in state.active_node_ids if n in state.claims]
        state.weight = SecureWeight(
            total=sum(
                quantized_weight(state.claims[n], self.max_weight, self.quantization_range)
                for n in summed
            ),
            sites=len(summed),
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
        )
        return ok

    def _key_shares_check(self, state: _RoundState) -> ReplyCheck:
        def check(node: int, content: RecordDict) -> None:
            check_key_shares(node, content, state.nid_to_neighbours.get(node, set()))

        return check

    def _masked_vector_check(self, state: _RoundState) -> ReplyCheck:
        def check(node: int, content: RecordDict) -> None:
            count = check_masked_vector(node, content, self.payload.shapes(), state.mod_range)
            self.payload.claim(node, count, self.roster.train_caps.get(node, 0))
            state.claims[node] = count

        return check

    def _unmask_check(self, state: _RoundState) -> ReplyCheck:
        def check(node: int, content: RecordDict) -> None:
            check_unmask_shares(node, content, state.nid_to_neighbours.get(node, set()))
            rec = _secagg_record(node, content)
            state.unmask_shares[node] = (
                _list_of(node, rec, Key.NODE_ID_LIST, int),
                _list_of(node, rec, Key.SHARE_LIST, bytes),
            )

        return check

    def aggregate(
        self, stack: Strategy, state: _RoundState, results: FitResults, failures: list[Failure]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The unmasked round: count it, read the evaluations the replies carry, check
        the aggregate, then let the strategy stack (DP noise, server optimizer, FedAvg
        step) make the new global head from it."""
        training, rnd = state.training, state.server_round
        training.count(len(results), failures)
        training.evaluation = self.pooling.from_fit(
            rnd, [(p.node_id, r) for p, r in results], state.asked, self.roster.val_caps
        )
        training.train_loss = train_loss(results)
        for failure in failures:
            log.warning("round %d: a site failed: %s", rnd, describe_failure(failure))
        if results:
            raw = parameters_to_ndarrays(results[0][1].parameters)
            problem = self.payload.problem(raw, state.weight)
            if problem is not None:
                training.rejected[0] = problem[0]
                log.warning(
                    "round %d: rejected the secure aggregate (%s): aggregate: %s", rnd, *problem
                )
                return None, {}
            if not self.payload.updates_head:
                training.aggregate = raw
                training.summed_sites = state.weight.sites if state.weight else len(results)
                return None, {}
        new, metrics = stack.aggregate_fit(rnd, results, failures)
        training.arrays = parameters_to_ndarrays(new) if new is not None else None
        return new, metrics
