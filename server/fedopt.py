"""A server optimizer around the round's strategy (FedOpt: fedavgm, fedadam, ...).

``ServerOptimizerStrategy`` wraps the strategy the fit step drives (FedHeadStrategy, or
the DP wrapper around it), the way Flower's DP strategies wrap an inner one. The inner
strategy does what it always does: checks the updates (or, under SecAgg+, the
aggregate), averages them, and with DP adds the Gaussian noise, returning the round's
start tensors plus that (noised) mean delta. This wrapper reads the delta back and
replaces the plain FedAvg step by the server optimizer's.

Order, and why: the norm screening sees the raw mean delta, and DP noise is added to
the mean delta *before* the optimizer step. The optimizer is then post-processing of
the noised aggregate, so the privacy accounting (calibrated to the clipping norm of
the mean) stays valid; noise added after an adaptive step would not be, since its
sensitivity is no longer bounded by the clipping norm.
"""

from __future__ import annotations

import logging

import numpy as np
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
from flwr.server.strategy import Strategy

from fedhead.server.aggregation import Arrays
from fedhead.server.optimizers import ServerOptimizer
from fedhead.server.replies import (
    EvaluateAggregate,
    EvaluateFailures,
    EvaluateResults,
    FitAggregate,
    FitFailures,
    FitResults,
)

log = logging.getLogger(__name__)


class ServerOptimizerStrategy(Strategy):
    """``inner``'s rounds, with the global head moved by ``optimizer`` instead of FedAvg."""

    def __init__(self, inner: Strategy, optimizer: ServerOptimizer) -> None:
        super().__init__()
        self.inner = inner
        self.optimizer = optimizer
        self._start: tuple[int, Arrays] | None = None  # (round, its start tensors)

    def __repr__(self) -> str:
        return f"ServerOptimizerStrategy({self.optimizer.settings.name}, {self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._start = (server_round, parameters_to_ndarrays(parameters))
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> FitAggregate:
        params, metrics = self.inner.aggregate_fit(server_round, results, failures)
        start, self._start = self._start, None
        if params is None or start is None or start[0] != server_round:
            return params, metrics  # no new global head this round: no step, no state change
        averaged = parameters_to_ndarrays(params)
        # The (noised) mean delta, recovered from the FedAvg result in float64: exact up
        # to the rounding of that result to the tensors' dtype.
        delta = [
            a.astype(np.float64) - s.astype(np.float64)
            for a, s in zip(averaged, start[1], strict=True)
        ]
        return ndarrays_to_parameters(self.optimizer.apply(start[1], delta)), metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self, server_round: int, results: EvaluateResults, failures: EvaluateFailures
    ) -> EvaluateAggregate:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)
