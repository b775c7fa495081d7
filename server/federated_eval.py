"""Federated evaluation: sites evaluate a global head on their validation splits and the
server pools what they report (loss, accuracy, and the count tables behind the pooled
clinical metrics, ``common.pooled``).

A round's head is evaluated either by an evaluate message of its own, or, when every
site trains every round, inside the next round's train messages: each train message
then asks a ``fraction-evaluate`` share of the sites to evaluate the head it carries
(the previous round's) before training from it, and the evaluation travels in the
FitRes metrics. That saves one message per site and round. The last round's head, and
every head of a run whose sites sit rounds out, get an evaluate message.

Evaluations are untrusted like every reply: a refused one (``screening``) leaves that
site out of the evaluation only, and the site is named; an evaluation from a site that
was not asked for one is refused too.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flwr.common import EvaluateRes, FitRes

from fedhead.common.config import RunConfig
from fedhead.common.pooled import STAT_KEYS, EvalStatistics, pool
from fedhead.common.protocol import FIT_EVAL_ACCURACY, FIT_EVAL_EXAMPLES, FIT_EVAL_LOSS
from fedhead.common.rounds import RoundResult
from fedhead.server.aggregation import weighted_metric
from fedhead.server.screening import ExcludedReply, checked_evaluation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationPlan:
    """Which heads are evaluated where, and by how many sites.

    ``in_train_from``: the first round whose train messages also evaluate the head they
    carry (None: never); ``statistics_classes`` > 0: sites send count tables of this many
    classes for the pooled clinical metrics.
    """

    fraction: float = 1.0
    in_train_from: int | None = None
    statistics_classes: int = 0

    @classmethod
    def of_run(cls, cfg: RunConfig, evaluated: int | None) -> EvaluationPlan:
        """When every site trains every round, a round's federated evaluation needs no
        message of its own. The first round after ``evaluated`` (a resumed run's
        checkpoint, a closed-form head's round 1, whose evaluation is in already) does
        not evaluate in training."""
        start = None
        if cfg.fraction_train >= 1.0:  # sites that sit a round out need an evaluate step
            start = 1 if evaluated is None else evaluated + 2
        classes = len(cfg.class_names()) if cfg.evaluation_statistics else 0
        return cls(cfg.fraction_evaluate, start, classes)

    def in_train(self, server_round: int) -> bool:
        """Whether round ``server_round``'s train messages evaluate the head they carry."""
        return self.in_train_from is not None and server_round >= self.in_train_from

    def evaluators(self, server_round: int, sites: list[int]) -> set[int]:
        """The training sites of ``server_round`` that evaluate the head they are sent: a
        ``fraction`` sample of them, as a separate evaluate step would take."""
        if not sites or not self.in_train(server_round):
            return set()
        num = max(1, math.ceil(self.fraction * len(sites)))
        return set(random.sample(sites, min(num, len(sites))))


@dataclass
class FederatedEvaluation:
    """One head's federated evaluation, pooled over the sites that evaluated it."""

    loss: float = math.nan
    accuracy: float = math.nan
    examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # pooled clinical metrics
    confusion: list[list[int]] = field(default_factory=list)
    statistics_examples: int = 0  # examples behind ``metrics``
    statistics_refused: int = 0  # sites whose count tables failed the checks
    refused: dict[int, str] = field(default_factory=dict)  # node -> why its reply was left out

    def into(self, result: RoundResult) -> None:
        """Record this evaluation as the one of ``result``'s head."""
        for node, reason in self.refused.items():
            if result.rejected_sites.get(str(node)) != reason:
                result.reject(node, reason)
        if self.examples == 0:
            return
        result.eval_loss, result.eval_accuracy = self.loss, self.accuracy
        result.eval_examples = self.examples
        result.eval_metrics, result.eval_confusion = self.metrics, self.confusion
        result.eval_statistics_examples = self.statistics_examples
        result.eval_statistics_refused = self.statistics_refused


def evaluation_in_fit(node_id: int, res: FitRes, cap: int) -> EvaluateRes | None:
    """The evaluation a training reply carries of the head it was sent (None: none),
    as an evaluation reply, with an evaluation reply's checks."""
    metrics = dict(res.metrics)
    keys = (FIT_EVAL_LOSS, FIT_EVAL_ACCURACY, FIT_EVAL_EXAMPLES)
    if not any(k in metrics for k in keys):
        return None
    loss, accuracy, examples = (metrics.pop(k, None) for k in keys)
    metrics.pop("train-loss", None)
    evaluation = EvaluateRes(
        res.status,
        loss,  # type: ignore[arg-type]  # checked next
        examples,  # type: ignore[arg-type]
        {**metrics, "accuracy": accuracy},  # type: ignore[dict-item]
    )
    return checked_evaluation(node_id, evaluation, cap)


class Pooling:
    """Pools sites' evaluations of one head: loss and accuracy weighted by example
    counts, clinical metrics from the summed count tables."""

    def __init__(
        self,
        plan: EvaluationPlan,
        name: Callable[[int], str],
        weights: Mapping[int, int] | None = None,
    ) -> None:
        self.plan = plan
        self.name = name
        self.weights = weights  # node -> the most its evaluation weighs (None: its count)

    def from_fit(
        self,
        server_round: int,
        replies: Iterable[tuple[int, FitRes]],
        asked: set[int],
        caps: Mapping[int, int],
    ) -> FederatedEvaluation | None:
        """The previous round's head's evaluation from round ``server_round``'s train
        replies, when its train messages asked for one (None: they did not). A site
        whose evaluation fails the checks is left out of the evaluation, not out of
        training."""
        if not self.plan.in_train(server_round):
            return None
        evaluations: list[tuple[int, EvaluateRes]] = []
        refused: list[ExcludedReply] = []
        for node, res in replies:
            try:
                evaluation = evaluation_in_fit(node, res, caps.get(node, 0))
            except ExcludedReply as err:
                refused.append(err)
                continue
            if evaluation is None:
                continue
            if node in asked:
                evaluations.append((node, evaluation))
            else:
                refused.append(ExcludedReply(node, "malformed", "an evaluation not asked for"))
        if not evaluations and not refused:
            return None
        return self.pool(server_round - 1, evaluations, refused)

    def pool(
        self,
        server_round: int,
        results: list[tuple[int, EvaluateRes]],
        refused: list[ExcludedReply],
        failures: Iterable[str] = (),
    ) -> FederatedEvaluation:
        """Round ``server_round``'s head's evaluation from the sites' checked replies."""
        for why in failures:
            log.warning("round %d: evaluation failed on a site: %s", server_round, why)
        for err in refused:
            log.warning("round %d: evaluation failed on a site: %s", server_round, err)
        evaluation = FederatedEvaluation(refused={e.node_id: e.reason for e in refused})
        counted = [(self._weight(node, r.num_examples), r) for node, r in results]
        counted = [(n, r) for n, r in counted if n > 0]
        if not counted:
            return evaluation
        evaluation.examples = sum(n for n, _ in counted)
        evaluation.loss = weighted_metric([(n, r.loss) for n, r in counted])
        evaluation.accuracy = weighted_metric(
            [(n, float(r.metrics.get("accuracy", math.nan))) for n, r in counted]
        )
        self._pool_statistics(evaluation, server_round, results)
        return evaluation

    def _weight(self, node: int, examples: int) -> int:
        """A site's weight in the pooled loss and accuracy: its examples, at most its
        share-capped weight (max-site-share)."""
        return examples if self.weights is None else min(examples, self.weights.get(node, 0))

    def _pool_statistics(
        self,
        evaluation: FederatedEvaluation,
        server_round: int,
        results: list[tuple[int, EvaluateRes]],
    ) -> None:
        """Pooled clinical metrics from the sites' count tables (``common.pooled``).

        A site's tables that fail the checks leave only that site's tables out (its loss
        and accuracy, already checked, still count); a site that sends none (its node
        config says no) is simply not in the pooled metrics: ``statistics_examples``
        says how many examples they cover.
        """
        classes = self.plan.statistics_classes
        if not classes:
            return
        tables = []
        for node, res in results:
            if not any(key in res.metrics for key in STAT_KEYS):
                continue
            try:
                tables.append(EvalStatistics.from_metrics(res.metrics, classes, res.num_examples))
            except ValueError as err:
                evaluation.statistics_refused += 1
                log.warning(
                    "round %d: evaluation statistics of %s left out: %s",
                    server_round,
                    self.name(node),
                    err,
                )
        pooled = pool(tables)
        if pooled is None or pooled.examples == 0:
            return
        evaluation.statistics_examples = pooled.examples
        evaluation.metrics = pooled.metrics()
        evaluation.confusion = pooled.confusion.tolist()
