"""Closed-form heads (run config ``strategy=closed-form``), server side: the statistics
round.

A linear head on a frozen trunk has closed forms that need only sums over the data
(``common.closed_form``): class counts, per-class feature sums and the feature Gram
matrix. Round 1 asks every ready site for those of its training features in one train
message. Under SecAgg+ (the default) each site encodes them as exact fixed-point digits
on Flower's quantization grid and reports one example, so the server learns only their
sum, exact up to each site's rounding to the fixed point (``FixedPointCodec``); without
SecAgg+ the server screens each site's statistics (shapes, finite values, counts within
what the site declared, a Gram consistent with its sums) and sums them. With
differential privacy it adds Gaussian noise to the sum, once.

From the sum it solves a small grid of candidate heads (shrinkage LDA or ridge) and
sends them in one ``query.validate`` message: every site evaluates each candidate on
its validation split and answers with the loss, accuracy and count tables it computes
for any evaluation. The server pools them per candidate and keeps the one with the best
pooled balanced accuracy (AUROC on ties). That head is round 1's head, and the round's
federated evaluation is that candidate's: the model package, delivery, checkpoints and
any fine-tuning rounds (FedAvg from it) take it like any other head.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, EvaluateRes, FitIns, Parameters, Status, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid

from fedhead.common.closed_form import (
    Candidate,
    ClosedFormError,
    FixedPointCodec,
    GaussianRelease,
    Layout,
    Statistics,
    aggregate_problems,
    candidate_heads,
    screen_statistics,
)
from fedhead.common.config import RunConfig
from fedhead.common.errors import FederationError
from fedhead.common.heads import head_sha256
from fedhead.common.model import TrainableSet
from fedhead.common.protocol import (
    MSG_VALIDATE,
    RECORD_CANDIDATES,
    RECORD_VALIDATE,
    RECORD_VALIDATION_PREFIX,
    StatisticsRequest,
    ValidationRequest,
)
from fedhead.server.aggregation import Arrays
from fedhead.server.exchange import exchange, to_each
from fedhead.server.federated_eval import FederatedEvaluation, Pooling
from fedhead.server.prepare import Roster
from fedhead.server.rounds import (
    Failure,
    RoundTraining,
    Training,
    describe_failure,
    log_left_out,
    log_missing,
)
from fedhead.server.screening import ExcludedReply, checked_evaluation, decoded
from fedhead.server.secagg import Instructions, SecureWeight, aggregate_has_weight
from fedhead.server.strategy import sample_ready

log = logging.getLogger(__name__)

# The fixed-point code of the statistics under SecAgg+: 3 digits of log2(Q) bits and
# 2^-30 resolution (common.closed_form.FixedPointCodec says why these fit).
FRACTION_BITS = 30
LIMBS = 3


@dataclass(frozen=True)
class ClosedFormPlan:
    """How a run's statistics round goes: what sites sum and send, how the server
    decodes, noises and solves them, and how a head becomes the run's tensors."""

    method: str  # LDA or RIDGE
    layout: Layout
    trainable: TrainableSet
    request: StatisticsRequest
    codec: FixedPointCodec | None  # SecAgg+: the fixed-point code; None: plain float64
    release: GaussianRelease | None  # differential privacy: the one Gaussian release
    classes: tuple[str, ...]
    views: int  # rows per image (the image and its augmented views)

    @classmethod
    def of_run(cls, cfg: RunConfig, trainable: TrainableSet, feature_dim: int) -> ClosedFormPlan:
        classes = tuple(cfg.class_names())
        codec = None
        if cfg.secure_aggregation:
            codec = FixedPointCodec(
                clipping_range=cfg.secagg_clipping_range,
                quantization_range=cfg.secagg_quantization_range,
                fraction_bits=FRACTION_BITS,
                limbs=LIMBS,
            )
        views = 1 + cfg.augment_views
        release = None
        if cfg.dp_noise_multiplier > 0:
            release = GaussianRelease(
                cfg.dp_noise_multiplier, cfg.dp_feature_clip, cfg.dp_delta, rows_per_record=views
            )
        request = StatisticsRequest(
            server_round=1,
            trainable_fingerprint=trainable.fingerprint(),
            secure=cfg.secure_aggregation,
            clipping_range=cfg.secagg_clipping_range,
            quantization_range=cfg.secagg_quantization_range,
            fraction_bits=FRACTION_BITS,
            limbs=LIMBS,
            max_site_examples=cfg.max_site_examples,
            feature_clip=cfg.dp_feature_clip if release else 0.0,
        )
        layout = Layout(len(classes), feature_dim)
        return cls(cfg.closed_form, layout, trainable, request, codec, release, classes, views)

    def vector_size(self) -> int:
        """The values of one site's statistics as sent (SecAgg+: every digit)."""
        return self.layout.size * (self.codec.limbs if self.codec else 1)

    def cap(self, roster: Roster, node: int, max_site_examples: int) -> int:
        """The most examples a site's statistics may count: its declared training images
        (at most max-site-examples), each with its augmented views."""
        declared = roster.ready[node].train_examples if node in roster.ready else 0
        return min(declared, max_site_examples) * self.views

    def configure(self, roster: Roster, server_round: int, cm: ClientManager) -> Instructions:
        """Every ready, connected site: the statistics of all of them make the head."""
        sites = sample_ready(cm, set(roster.ready), 1.0, 1)
        config = {**self.request.to_config(), "server_round": server_round}
        empty = Parameters(tensors=[], tensor_type="numpy.ndarray")
        return [(site, FitIns(empty, config)) for site in sites]

    def candidates(self, stats: Statistics) -> list[Candidate]:
        """The grid of heads the sites choose from."""
        return candidate_heads(stats, self.method, class_names=self.classes)

    def arrays(self, candidate: Candidate) -> Arrays:
        """A candidate as the run's trainable tensors (a linear head: weight, bias)."""
        weight, bias = self.trainable.tensors
        return [
            candidate.head.weight.astype(np.dtype(weight.dtype)).reshape(weight.shape),
            candidate.head.bias.astype(np.dtype(bias.dtype)).reshape(bias.shape),
        ]

    def describe(self) -> dict[str, Any]:
        """report.json's ``closed_form``, before the grid is known."""
        return {
            "method": self.method,
            "classes": len(self.classes),
            "feature_dim": self.layout.dim,
            "values_per_site": self.vector_size(),
            "bytes_per_site": 8 * self.vector_size(),
            "secure_aggregation": self.codec is not None,
            "fraction_bits": self.codec.fraction_bits if self.codec else None,
            "limbs": self.codec.limbs if self.codec else None,
        }


# --- the statistics round, under SecAgg+ ------------------------------------------------
@dataclass(frozen=True)
class SecureStatistics:
    """What the SecAgg+ statistics round sums (``server.secagg.SecurePayload``): every
    ready site, one vector of fixed-point digits, a weight of exactly one each."""

    plan: ClosedFormPlan
    roster: Roster
    updates_head: bool = False

    def configure(
        self, stack: Strategy, server_round: int, parameters: Parameters, cm: ClientManager
    ) -> Instructions:
        return self.plan.configure(self.roster, server_round, cm)

    def shapes(self) -> list[tuple[int, ...]]:
        return [(self.plan.vector_size(),)]

    def claim(self, node_id: int, count: int, cap: int) -> None:
        if count != 1:
            raise ExcludedReply(
                node_id,
                "weight",
                f"claims {count} examples in the statistics round, where every site weighs one",
            )

    def problem(self, raw: Arrays, weight: SecureWeight | None) -> tuple[str, str] | None:
        assert self.plan.codec is not None
        codec = self.plan.codec
        if weight is not None and not aggregate_has_weight(
            raw, weight.total, weight.sites, weight.clipping_range, weight.quantization_range
        ):
            return ("weight", "its total weight is not one per summed site")
        try:
            codec.digit_sums(raw[0], weight.sites if weight else 1)
        except ClosedFormError as err:
            return ("range", str(err))
        return None


def decode_statistics(plan: ClosedFormPlan, training: RoundTraining) -> Statistics:
    """The summed statistics a statistics round produced (SecAgg+: decoded)."""
    if training.aggregate is None:
        raise FederationError(
            "the statistics round produced no sum of the sites' statistics "
            f"({training.replied} of {training.selected} sites replied, "
            f"{training.failed} failed{_rejected(training)})",
            "see the server log for the sites named; the report has the round's counts",
        )
    vector = training.aggregate[0]
    if plan.codec is not None:
        vector = plan.codec.decode(vector, training.summed_sites)
    return Statistics.from_vector(vector, plan.layout)


def _rejected(training: RoundTraining) -> str:
    if not training.rejected:
        return ""
    who = ", ".join(f"node {n} ({r})" for n, r in sorted(training.rejected.items()))
    return f"; left out: {who}"


# --- the statistics round, plain ----------------------------------------------------------
@dataclass
class PlainStatistics:
    """The statistics round without SecAgg+: the server sees each site's statistics,
    screens them and sums the sound ones."""

    plan: ClosedFormPlan
    roster: Roster
    max_site_examples: int
    min_sites: int
    timeout: float

    def train(self, grid: Grid, context: LegacyContext, server_round: int) -> RoundTraining:
        instructions = self.plan.configure(self.roster, server_round, context.client_manager)
        training = RoundTraining(selected=len(instructions))
        contents = {p.node_id: compat.fitins_to_recorddict(ins, True) for p, ins in instructions}
        replies = exchange(grid, contents, MessageType.TRAIN, str(server_round), self.timeout)
        failures: list[Failure] = [Exception(e) for e in replies.errors.values()]
        sums: list[np.ndarray] = []
        replied = 0
        for node, content in replies.ok.items():
            try:
                vector = self._read(node, content)
            except ExcludedReply as err:
                log_left_out(server_round, MessageType.TRAIN, err)
                failures.append(err)
                continue
            replied += 1
            sums.append(vector)
        log_missing(server_round, MessageType.TRAIN, self.timeout, replies.dropped)
        training.count(replied, failures)
        for failure in failures:
            log.warning("round %d: a site failed: %s", server_round, describe_failure(failure))
        if len(sums) >= self.min_sites:
            training.aggregate = [np.sum(sums, axis=0)]
            training.summed_sites = len(sums)
        else:
            log.error(
                "round %d: fewer than %d sites sent sound statistics", server_round, self.min_sites
            )
        return training

    def _read(self, node: int, content: RecordDict) -> np.ndarray:
        res = decoded(
            node, "train", lambda c: compat.recorddict_to_fitres(c, keep_input=False), content
        )
        if res.status.code != Code.OK:
            raise ExcludedReply(node, "malformed", f"statistics reply: {res.status.message}")
        arrays = decoded(node, "train", lambda _: parameters_to_ndarrays(res.parameters), content)
        if len(arrays) != 1 or arrays[0].shape != (self.plan.layout.size,):
            raise ExcludedReply(node, "structure", "statistics of another layout than the run's")
        vector = np.asarray(arrays[0], dtype=np.float64)
        cap = self.plan.cap(self.roster, node, self.max_site_examples)
        if problems := screen_statistics(vector, self.plan.layout, cap):
            first = problems[0]
            log.warning(
                "statistics of %s refused (%s): %s",
                self.roster.name(node),
                first.reason,
                "; ".join(p.detail for p in problems[:3]),
            )
            raise ExcludedReply(node, first.reason, first.detail)
        return vector


def check_sum(stats: Statistics, roster: Roster, plan: ClosedFormPlan, max_site: int) -> None:
    """Refuse a sum of statistics no honest sites can produce (more examples than they
    declared, negative counts); under SecAgg+ no single site can be named."""
    cap = sum(plan.cap(roster, n, max_site) for n in roster.ready)
    if problems := aggregate_problems(stats, cap):
        detail = "; ".join(p.detail for p in problems[:3])
        raise FederationError(
            f"the sites' summed statistics are not sound: {detail}",
            "a site sent statistics it cannot hold; see the server log",
        )


# --- federated validation of the candidates -----------------------------------------------
@dataclass
class Validation:
    """One ``query.validate`` message: every ready site evaluates every candidate head on
    its validation split; the server pools each candidate's evaluations."""

    roster: Roster
    pooling: Pooling
    timeout: float
    resumes_run: int = 0  # a resumed run: the run whose statistics round it goes on

    def evaluate(
        self, grid: Grid, server_round: int, heads: list[Arrays]
    ) -> list[FederatedEvaluation]:
        tensors = {  # "<k>/<i>": tensor i of candidate k
            f"{k}/{i}": Array(np.ascontiguousarray(a))
            for k, head in enumerate(heads)
            for i, a in enumerate(head)
        }
        statistics = self.pooling.plan.statistics_classes > 0
        request = ValidationRequest(server_round, len(heads), statistics, self.resumes_run)
        content = RecordDict(
            {RECORD_CANDIDATES: ArrayRecord(tensors), RECORD_VALIDATE: request.to_record()}
        )
        replies = exchange(
            grid, to_each(self.roster.nodes, content), MSG_VALIDATE, str(server_round), self.timeout
        )
        per_candidate: list[list[tuple[int, EvaluateRes]]] = [[] for _ in heads]
        refused: list[ExcludedReply] = []
        for node, answer in replies.ok.items():
            try:
                evaluations = self._read(node, answer, len(heads))
            except ExcludedReply as err:
                log_left_out(server_round, MSG_VALIDATE, err)
                refused.append(err)
                continue
            for k, res in enumerate(evaluations):
                per_candidate[k].append((node, res))
        failures = [f"{self.roster.name(n)}: {why}" for n, why in replies.failed.items()]
        log_missing(server_round, MSG_VALIDATE, self.timeout, replies.dropped)
        return [
            self.pooling.pool(server_round, results, refused, failures if k == 0 else ())
            for k, results in enumerate(per_candidate)
        ]

    def _read(self, node: int, content: RecordDict, candidates: int) -> list[EvaluateRes]:
        cap = self.roster.val_caps.get(node, 0)
        out = []
        for k in range(candidates):
            record = content.config_records.get(f"{RECORD_VALIDATION_PREFIX}{k}")
            if record is None:
                raise ExcludedReply(node, "malformed", f"no evaluation of candidate {k}")
            metrics = dict(record)
            loss, examples = metrics.pop("loss", None), metrics.pop("examples", None)
            res = EvaluateRes(Status(Code.OK, ""), loss, examples, metrics)  # type: ignore[arg-type]
            out.append(checked_evaluation(node, res, cap))
        return out


def choose(evaluations: list[FederatedEvaluation]) -> int:
    """The candidate with the best pooled balanced accuracy (accuracy without count
    tables), AUROC on ties; the first on a full tie."""

    def key(k: int) -> tuple[float, float, int]:
        e = evaluations[k]
        first = e.metrics.get("balanced_accuracy", e.accuracy)
        second = e.metrics.get("auroc", -math.inf)
        return (_finite(first), _finite(second), -k)

    return max(range(len(evaluations)), key=key)


def _finite(v: float) -> float:
    return v if math.isfinite(v) else -math.inf


def grid_report(
    candidates: list[Candidate],
    heads: list[Arrays],
    names: list[str],
    evaluations: list[FederatedEvaluation],
    chosen: int,
) -> list[dict[str, Any]]:
    """report.json's ``closed_form.grid``: every candidate, its head's sha256 (a site that
    validated it names one to prove it took part, should it miss the model) and how the
    sites scored it."""
    return [
        {
            "candidate": c.label,
            "head_sha256": head_sha256(names, head),
            "method": c.method,
            "parameter": c.parameter,
            "eval_examples": e.examples,
            "eval_accuracy": e.accuracy,
            "eval_loss": e.loss,
            "balanced_accuracy": e.metrics.get("balanced_accuracy", math.nan),
            "auroc": e.metrics.get("auroc", math.nan),
            "chosen": k == chosen,
        }
        for k, (c, head, e) in enumerate(zip(candidates, heads, evaluations, strict=True))
    ]


@dataclass(frozen=True)
class ClosedForm:
    """A closed-form run's statistics round: the plan, the statistics exchange (plain or
    SecAgg+) and the validation of the candidates."""

    plan: ClosedFormPlan
    statistics: Training
    validation: Validation
    roster: Roster
    max_site_examples: int

    def summed(self, training: RoundTraining) -> Statistics:
        """The sites' summed statistics, checked, and under differential privacy noised
        (the one release: everything after it is post-processing)."""
        stats = decode_statistics(self.plan, training)
        check_sum(stats, self.roster, self.plan, self.max_site_examples)
        if self.plan.release is not None:
            stats = self.plan.release.release(stats, np.random.default_rng())
        return stats

    def privacy_report(self) -> dict[str, Any] | None:
        """report.json's ``differential_privacy`` for the statistics' one release."""
        release = self.plan.release
        if release is None:
            return None
        return {
            "noise_multiplier": release.noise_multiplier,
            "feature_clip": release.clip_norm,
            "delta": release.delta,
            "epsilon": release.epsilon(),
            "noise_std": dict(zip(("counts", "sums", "gram"), release.noise_stds(), strict=True)),
            "accounting": "one Gaussian release of the summed statistics, RDP, "
            "add-or-remove-one image (with its augmented views)",
        }
