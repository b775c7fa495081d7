"""Flower's floor: fedhead's per-round messages, with nothing done in them.

Each round is Flower's SecAgg+ workflow (setup, share keys, collect masked vectors,
unmask) over a linear head's tensors (``classes x feature-dim`` and ``classes``), and
the last round adds an evaluate exchange, as fedhead sends under SecAgg+ (its sites
evaluate each round's head in the next round's train message); the ClientApp returns
zeros and imports neither torch nor fedhead. The ServerApp appends one JSON line per
round (its seconds) to ``out-file``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow


class _NoOp(NumPyClient):
    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        return [np.zeros_like(p) for p in parameters], 1, {}

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        return 0.0, 1, {"accuracy": 0.0}


client = ClientApp(client_fn=lambda context: _NoOp().to_client(), mods=[secaggplus_mod])


class _TimedFedAvg(FedAvg):
    """FedAvg that evaluates the last round's head only and notes each round's seconds
    (from its fit's start to its aggregation, or to its evaluation in the last round)."""

    def __init__(self, out_file: str, rounds: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out_file = out_file
        self.rounds = rounds
        self.started = 0.0

    def _note(self, server_round: int) -> None:
        if self.out_file:
            line = {"round": server_round, "seconds": time.perf_counter() - self.started}
            with Path(self.out_file).open("a") as f:
                f.write(json.dumps(line) + "\n")

    def configure_fit(self, server_round: int, *args: Any, **kwargs: Any) -> Any:
        self.started = time.perf_counter()
        return super().configure_fit(server_round, *args, **kwargs)

    def aggregate_fit(self, server_round: int, *args: Any, **kwargs: Any) -> Any:
        out = super().aggregate_fit(server_round, *args, **kwargs)
        if server_round < self.rounds:
            self._note(server_round)
        return out

    def configure_evaluate(self, server_round: int, *args: Any, **kwargs: Any) -> Any:
        if server_round < self.rounds:
            return []
        return super().configure_evaluate(server_round, *args, **kwargs)

    def aggregate_evaluate(self, server_round: int, *args: Any, **kwargs: Any) -> Any:
        out = super().aggregate_evaluate(server_round, *args, **kwargs)
        self._note(server_round)
        return out


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    sites, classes, dim = int(cfg["sites"]), int(cfg["classes"]), int(cfg["feature-dim"])
    head = [np.zeros((classes, dim), np.float32), np.zeros(classes, np.float32)]
    rounds = int(cfg["num-server-rounds"])
    strategy = _TimedFedAvg(
        str(cfg["out-file"]),
        rounds,
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=sites,
        min_evaluate_clients=sites,
        min_available_clients=sites,
        initial_parameters=ndarrays_to_parameters(head),
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
    )
    # fedhead's defaults for this many sites: every site shares with every other,
    # a majority reconstructs (fedhead.server.secagg.secagg_params).
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=max(2, sites // 2 + 1),
            clipping_range=8.0,
            quantization_range=4194304,
        )
    )
    workflow(grid, legacy)
