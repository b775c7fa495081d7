"""Server optimizers on the aggregated head delta (Reddi et al. 2021, "Adaptive
Federated Optimization", Algorithm 2; FedAvgM: Hsu et al. 2019).

Each round's aggregate delta ``Δ_t`` (the example-weighted mean of the sites' head
changes, plus DP noise where DP is on) is the negative of a pseudo-gradient. FedAvg
adds it as it is; the optimizers here add a step computed from it and from state they
keep across rounds:

* fedavgm:    m_t = μ m_{t-1} + Δ_t;                         x += η m_t
* fedadam:    m_t = β1 m_{t-1} + (1-β1) Δ_t;  v_t = β2 v_{t-1} + (1-β2) Δ_t²
* fedyogi:    m_t as fedadam;                 v_t = v_{t-1} - (1-β2) Δ_t² sign(v_{t-1} - Δ_t²)
* fedadagrad: m_t as fedadam;                 v_t = v_{t-1} + Δ_t²
* the adaptive three:                          x += η m_t / (√v_t + τ)

with m_{-1} = 0 and v_{-1} = τ² as in the paper, and, as in the paper, no bias
correction. Only the sum (or mean) of the sites' updates enters, so all of them work
unchanged under SecAgg+. The state is float64, one array per trainable tensor.

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

Why not torch.optim: its Adam bias-corrects and starts v at 0 (the paper does
neither), it has no Yogi, and its Adagrad has no first moment (β1). Its SGD with
momentum (dampening 0) is exactly fedavgm, and its Adagrad (``initial_accumulator_value
= τ²``, ``eps = τ``) is exactly fedadagrad with β1 = 0: the tests check both against
it. Flower's FedAdam differs from the paper (bias correction, v starting at 0); its
FedAdagrad fixes β1 at 0 (here it takes server-beta1, as in the paper). Defaults
follow Flower's strategies, except fedavgm's momentum: 0.9 (Hsu et al.), since
Flower's 0 would make it plain FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

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

from fedhead.common.config import CLOSED_FORM, RunConfig
from fedhead.common.stepbound import DEFAULT_SERVER_LEARNING_RATES
from fedhead.server.rounds import Failure, FitResults

Arrays = list[np.ndarray]

# Flower's default server learning rates (flwr.serverapp.strategy), used when the run
# config leaves server-learning-rate at 0.
# (sites bound how far a round can move the head with the same defaults)
DEFAULT_LEARNING_RATES = DEFAULT_SERVER_LEARNING_RATES
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")


@dataclass(frozen=True)
class ServerOptimizerSettings:
    """One server optimizer and its hyper-parameters (validated here)."""

    name: str
    learning_rate: float
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in DEFAULT_LEARNING_RATES:
            known = ", ".join(DEFAULT_LEARNING_RATES)
            raise ValueError(f"name must be one of {known}, got {self.name!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for key in ("momentum", "beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")

    @classmethod
    def from_run(cls, cfg: RunConfig) -> ServerOptimizerSettings | None:
        """The run's server optimizer; None for plain FedAvg (and the fine-tuning rounds of a
        closed-form head, which are FedAvg rounds)."""
        if cfg.strategy in ("fedavg", CLOSED_FORM):
            return None
        return cls(
            name=cfg.strategy,
            learning_rate=cfg.server_learning_rate or DEFAULT_LEARNING_RATES[cfg.strategy],
            momentum=cfg.server_momentum,
            beta1=cfg.server_beta1,
            beta2=cfg.server_beta2,
            tau=cfg.server_tau,
        )

    def describe(self) -> dict[str, Any]:
        """Only the hyper-parameters this optimizer uses (for the report and the log)."""
        used = {"fedavgm": ("momentum",), "fedadagrad": ("beta1", "tau")}
        keys = used.get(self.name, ("beta1", "beta2", "tau"))
        values = asdict(self)
        return {"name": self.name, "learning_rate": self.learning_rate} | {
            k: values[k] for k in keys
        }


class ServerOptimizer:
    """Turns each round's aggregate delta into the step the global head takes."""

    def __init__(self, settings: ServerOptimizerSettings) -> None:
        self.settings = settings
        self.steps = 0
        self.m: Arrays | None = None
        self.v: Arrays | None = None

    def step(self, delta: Sequence[np.ndarray]) -> Arrays:
        """The step to add to the global tensors for this aggregate delta (float64)."""
        s = self.settings
        d = [np.asarray(a, dtype=np.float64) for a in delta]
        if self.m is None:
            self.m = [np.zeros_like(a) for a in d]
        if s.name == "fedavgm":
            self.m = [s.momentum * m + g for m, g in zip(self.m, d, strict=True)]
            self.steps += 1
            return [s.learning_rate * m for m in self.m]
        if self.v is None:
            self.v = [np.full_like(a, s.tau**2) for a in d]
        self.m = [s.beta1 * m + (1 - s.beta1) * g for m, g in zip(self.m, d, strict=True)]
        self.v = [_second_moment(s, v, g * g) for v, g in zip(self.v, d, strict=True)]
        self.steps += 1
        return [
            s.learning_rate * m / (np.sqrt(v) + s.tau) for m, v in zip(self.m, self.v, strict=True)
        ]

    def apply(self, global_arrays: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> Arrays:
        """The new global tensors (each in its own dtype) after one step."""
        return [
            (g.astype(np.float64) + s).astype(g.dtype)
            for g, s in zip(global_arrays, self.step(delta), strict=True)
        ]

    # --- state, for checkpoints ----------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, Arrays]]:
        """(JSON-able description, the moment arrays by slot name) of the current state."""
        slots = {k: a for k, a in (("m", self.m), ("v", self.v)) if a is not None}
        meta = {**self.settings.describe(), "steps": self.steps, "slots": sorted(slots)}
        return meta, slots

    def load_state(
        self, meta: Mapping[str, Any], slots: Mapping[str, Sequence[np.ndarray]]
    ) -> None:
        """Continue from a saved state (same optimizer; shapes are the caller's check)."""
        if meta.get("name") != self.settings.name:
            raise ValueError(
                f"the saved state is {meta.get('name')!r}'s, not {self.settings.name!r}'s"
            )
        if set(meta.get("slots", [])) != set(slots):
            raise ValueError(
                f"the saved state lists slots {meta.get('slots')}, holds {sorted(slots)}"
            )
        self.steps = int(meta["steps"])
        self.m = [np.asarray(a, dtype=np.float64) for a in slots["m"]] if "m" in slots else None
        self.v = [np.asarray(a, dtype=np.float64) for a in slots["v"]] if "v" in slots else None


def _second_moment(s: ServerOptimizerSettings, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
    out: np.ndarray
    if s.name == "fedadam":
        out = s.beta2 * v + (1 - s.beta2) * g2
    elif s.name == "fedyogi":
        out = v - (1 - s.beta2) * g2 * np.sign(v - g2)
    else:  # fedadagrad
        out = v + g2
    return out


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
        self, server_round: int, results: FitResults, failures: list[Failure]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
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
        self, server_round: int, results: Any, failures: Any
    ) -> tuple[float | None, dict[str, Scalar]]:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)
