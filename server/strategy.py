"""fedhead's Flower strategy: which sites take part in a round, what they are told, and
how their head updates combine (FedAvg of head deltas).

It implements Flower's legacy ``Strategy`` interface because SecAgg+ (Flower 1.41's
``SecAggPlusWorkflow``) drives exactly that interface. It is built once the sites are
prepared, from the run's ``Roster``, and keeps no record of the rounds: the training
steps check what sites send before it averages (``server.rounds``, ``server.secagg``)
and the round loop keeps the results. With ``secure=False`` it averages the sites'
checked updates, weighted by their example counts; with ``secure=True`` it only ever
sees the securely summed mean (SecAgg+ hands every result the same vector) and adds it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from flwr.common import (
    EvaluateIns,
    FitIns,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import Strategy

from fedhead.common.model import TrainableSet
from fedhead.common.protocol import FitSettings
from fedhead.common.training import scheduled_lr
from fedhead.server.aggregation import Arrays, apply_delta, weighted_mean
from fedhead.server.federated_eval import EvaluationPlan
from fedhead.server.prepare import Exclusions, Roster
from fedhead.server.rounds import Failure, FitResults

log = logging.getLogger(__name__)


class _Ready(Criterion):
    def __init__(self, ready: set[int]) -> None:
        self.ready = ready

    def select(self, client: ClientProxy) -> bool:
        return client.node_id in self.ready


def sample_ready(
    cm: ClientManager, ready: set[int], fraction: float, minimum: int
) -> list[ClientProxy]:
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
    """Sampling, round settings and FedAvg of head deltas.

    The bounds a site checks its own update against (``settings.max_update_norm``, and
    under SecAgg+ ``settings.clipping_range``) are the ones the server checks updates
    and aggregates against."""

    roster: Roster
    trainable: TrainableSet
    initial: Arrays
    settings: FitSettings
    num_rounds: int
    min_sites: int
    lr_schedule: str = "cosine"
    fraction_train: float = 1.0
    evaluation: EvaluationPlan = field(default_factory=EvaluationPlan)
    secure: bool = False
    excluded: Exclusions = field(default_factory=Exclusions)  # kept by the round loop
    # The global tensors the current round started from: sites send deltas from them.
    _start: tuple[int, Arrays] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        super().__init__()
        if self.trainable.problems(self.initial):
            raise ValueError("initial tensors do not match the trainable set")
        if self.min_sites < 1:
            raise ValueError(f"min_sites must be >= 1, got {self.min_sites}")
        self.initial = [a.copy() for a in self.initial]

    def __repr__(self) -> str:
        return f"FedHeadStrategy(secure={self.secure}, min_sites={self.min_sites})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.initial)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        ready = self.excluded.of(set(self.roster.ready))
        sites = sample_ready(client_manager, ready, self.fraction_train, self.min_sites)
        lr = scheduled_lr(
            self.settings.learning_rate, server_round, self.num_rounds, self.lr_schedule
        )
        config = {**self.settings.to_config(), "server_round": server_round, "learning_rate": lr}
        self._start = (server_round, parameters_to_ndarrays(parameters))
        evaluators = self.evaluation.evaluators(server_round, [s.node_id for s in sites])
        statistics = self.evaluation.statistics_classes > 0
        return [
            (
                site,
                FitIns(
                    parameters,
                    {
                        **config,
                        # the most this site may weigh (max-site-examples, max-site-share)
                        "max_site_examples": self.roster.train_caps[site.node_id],
                        "evaluate": site.node_id in evaluators,
                        "statistics": site.node_id in evaluators and statistics,
                    },
                ),
            )
            for site in sites
        ]

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: list[Failure]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The new global head from the round's checked updates (plain: each site's
        delta; SecAgg+: every result holds the same securely averaged delta)."""
        start = self._start
        if start is None or start[0] != server_round or len(results) < self.min_sites:
            log.error(
                "round %d: fewer than %d valid updates; the global head stays as it was",
                server_round,
                self.min_sites,
            )
            return None, {}
        if self.secure:
            raw = parameters_to_ndarrays(results[0][1].parameters)
            delta = [a.astype(s.dtype) for a, s in zip(raw, self.trainable.tensors, strict=True)]
        else:
            delta = weighted_mean(
                [(res.num_examples, parameters_to_ndarrays(res.parameters)) for _, res in results]
            )
        return ndarrays_to_parameters(apply_delta(start[1], delta)), {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        ready = self.excluded.of(set(self.roster.ready))
        sites = sample_ready(client_manager, ready, self.evaluation.fraction, 1)
        # Sites evaluate one head per round they trained in (round 0: the initial head).
        config: dict[str, Scalar] = {
            "server_round": server_round,
            "statistics": self.evaluation.statistics_classes > 0,
        }
        return [(site, EvaluateIns(parameters, config)) for site in sites]

    def aggregate_evaluate(
        self, server_round: int, results: object, failures: object
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Unused: ``server.federated_eval`` pools the sites' evaluations."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Unused: the round loop evaluates on the server's test set itself."""
        return None
