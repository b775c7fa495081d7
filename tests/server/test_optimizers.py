"""Server optimizers: each update against steps worked out by hand from the formulas of
Reddi et al. 2021 (Algorithm 2) and Hsu et al. 2019, and against torch where it
implements the same update; the strategy wrapper; state round trips."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedhead.common.config import RunConfig
from fedhead.common.errors import ConfigError
from fedhead.server.optimizers import (
    ServerOptimizer,
    ServerOptimizerSettings,
    ServerOptimizerStrategy,
)

DELTAS = [1.0, -0.5, 2.0]  # three rounds' aggregate deltas of a one-value head
X0 = 0.25


def _run(settings: ServerOptimizerSettings, deltas: list[float] = DELTAS) -> list[float]:
    opt = ServerOptimizer(settings)
    x = [np.array([X0], dtype=np.float64)]
    out = []
    for d in deltas:
        x = opt.apply(x, [np.array([d])])
        out.append(float(x[0][0]))
    return out


def test_fedadam_matches_the_papers_update_by_hand() -> None:
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    m1, v1 = (1 - b1) * 1.0, b2 * tau**2 + (1 - b2) * 1.0  # m_{-1} = 0, v_{-1} = tau^2
    x1 = X0 + eta * m1 / (math.sqrt(v1) + tau)
    m2, v2 = b1 * m1 + (1 - b1) * -0.5, b2 * v1 + (1 - b2) * 0.25
    x2 = x1 + eta * m2 / (math.sqrt(v2) + tau)
    m3, v3 = b1 * m2 + (1 - b1) * 2.0, b2 * v2 + (1 - b2) * 4.0
    x3 = x2 + eta * m3 / (math.sqrt(v3) + tau)
    got = _run(ServerOptimizerSettings("fedadam", eta, beta1=b1, beta2=b2, tau=tau))
    assert got == pytest.approx([x1, x2, x3], rel=1e-12)


def test_fedyogi_matches_the_papers_update_by_hand() -> None:
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    m1 = (1 - b1) * 1.0
    v1 = tau**2 - (1 - b2) * 1.0 * np.sign(tau**2 - 1.0)  # v grows: sign is -1
    x1 = X0 + eta * m1 / (math.sqrt(v1) + tau)
    m2 = b1 * m1 + (1 - b1) * -0.5
    v2 = v1 - (1 - b2) * 0.25 * np.sign(v1 - 0.25)
    x2 = x1 + eta * m2 / (math.sqrt(v2) + tau)
    m3 = b1 * m2 + (1 - b1) * 2.0
    v3 = v2 - (1 - b2) * 4.0 * np.sign(v2 - 4.0)
    x3 = x2 + eta * m3 / (math.sqrt(v3) + tau)
    got = _run(ServerOptimizerSettings("fedyogi", eta, beta1=b1, beta2=b2, tau=tau))
    assert got == pytest.approx([x1, x2, x3], rel=1e-12)
    assert v1 == pytest.approx(tau**2 + 0.01)  # unlike Adam, Yogi adds (1-b2)*g^2 outright


def test_fedadagrad_matches_the_papers_update_by_hand() -> None:
    eta, b1, tau = 0.1, 0.9, 1e-3
    m1, v1 = (1 - b1) * 1.0, tau**2 + 1.0
    x1 = X0 + eta * m1 / (math.sqrt(v1) + tau)
    m2, v2 = b1 * m1 + (1 - b1) * -0.5, v1 + 0.25
    x2 = x1 + eta * m2 / (math.sqrt(v2) + tau)
    m3, v3 = b1 * m2 + (1 - b1) * 2.0, v2 + 4.0
    x3 = x2 + eta * m3 / (math.sqrt(v3) + tau)
    got = _run(ServerOptimizerSettings("fedadagrad", eta, beta1=b1, tau=tau))
    assert got == pytest.approx([x1, x2, x3], rel=1e-12)


def test_fedavgm_matches_the_update_by_hand() -> None:
    eta, mu = 0.5, 0.9
    m1 = 1.0
    m2 = mu * m1 - 0.5
    m3 = mu * m2 + 2.0
    expected = [X0 + eta * m1, X0 + eta * (m1 + m2), X0 + eta * (m1 + m2 + m3)]
    got = _run(ServerOptimizerSettings("fedavgm", eta, momentum=mu))
    assert got == pytest.approx(expected, rel=1e-12)


def _torch_steps(
    optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], deltas: np.ndarray
) -> list[np.ndarray]:
    x = torch.nn.Parameter(torch.full((deltas.shape[1],), X0, dtype=torch.float64))
    opt = optimizer([x])
    out = []
    for d in deltas:
        x.grad = -torch.from_numpy(d)  # the delta is the negative pseudo-gradient
        opt.step()
        out.append(x.detach().numpy().copy())
    return out


def test_fedavgm_is_torchs_sgd_with_momentum_and_fedadagrad_without_beta1_its_adagrad() -> None:
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(4, 5))

    def ours(settings: ServerOptimizerSettings) -> list[np.ndarray]:
        opt, x, out = ServerOptimizer(settings), [np.full(5, X0)], []
        for d in deltas:
            x = opt.apply(x, [d])
            out.append(x[0])
        return out

    sgd = _torch_steps(lambda x: torch.optim.SGD(x, lr=0.7, momentum=0.8), deltas)
    for a, b in zip(ours(ServerOptimizerSettings("fedavgm", 0.7, momentum=0.8)), sgd, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    tau = 1e-2
    adagrad = _torch_steps(
        lambda x: torch.optim.Adagrad(x, lr=0.1, eps=tau, initial_accumulator_value=tau**2),
        deltas,
    )
    settings = ServerOptimizerSettings("fedadagrad", 0.1, beta1=0.0, tau=tau)
    for a, b in zip(ours(settings), adagrad, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_the_adaptive_step_is_about_the_learning_rate_whatever_the_deltas_scale() -> None:
    """What makes FedAdam robust to the scale of updates: without bias correction the
    first step is eta*(1-b1)/sqrt(1-b2) = eta per value once |delta| >> tau, and less
    (damped by tau) for tiny deltas."""
    for scale in (1.0, 1e3, 1e-3):
        opt = ServerOptimizer(ServerOptimizerSettings("fedadam", 0.1))
        step = float(opt.step([np.full(3, scale)])[0][0])
        if scale >= 1:
            assert step == pytest.approx(0.1, rel=1e-2)
        else:
            assert 0 < step < 0.1 / 2


def test_state_round_trip_continues_exactly() -> None:
    for name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        settings = ServerOptimizerSettings(name, 0.05)
        whole = ServerOptimizer(settings)
        for d in DELTAS[:2]:
            whole.step([np.array([d, -d], dtype=np.float32)])
        meta, slots = whole.state()
        resumed = ServerOptimizer(settings)
        resumed.load_state(meta, slots)
        assert resumed.steps == 2
        a = whole.step([np.array([2.0, 1.0])])
        b = resumed.step([np.array([2.0, 1.0])])
        np.testing.assert_array_equal(a[0], b[0])
        with pytest.raises(ValueError, match="saved state is"):
            other = "fedyogi" if name != "fedyogi" else "fedadam"
            ServerOptimizer(ServerOptimizerSettings(other, 0.1)).load_state(meta, slots)


def test_settings_validate_and_defaults_follow_flower() -> None:
    base = {"classes": "a,b"}
    assert ServerOptimizerSettings.from_run(RunConfig.from_mapping(base)) is None
    adam = ServerOptimizerSettings.from_run(RunConfig.from_mapping({**base, "strategy": "fedadam"}))
    assert adam is not None
    assert (adam.learning_rate, adam.beta1, adam.beta2, adam.tau) == (0.1, 0.9, 0.99, 1e-3)
    yogi = ServerOptimizerSettings.from_run(
        RunConfig.from_mapping({**base, "strategy": "fedyogi", "server-learning-rate": 0.02})
    )
    assert yogi is not None and yogi.learning_rate == 0.02
    assert adam.describe() == {
        "name": "fedadam",
        "learning_rate": 0.1,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
    }
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(
            {**base, "server-learning-rate": 0.5, "server-beta2": 1.0, "server-tau": 0.0}
        )
    text = str(err.value)
    assert "server-learning-rate: applies to a server optimizer only" in text
    assert "server-beta2: must be in [0, 1)" in text and "server-tau: must be > 0" in text
    with pytest.raises(ValueError, match="tau must be > 0"):
        ServerOptimizerSettings("fedadam", 0.1, tau=0.0)
    with pytest.raises(ValueError, match="name must be one of"):
        ServerOptimizerSettings("fedsgd", 0.1)


class _Averaging(Strategy):
    """An inner strategy whose aggregate is the start tensors plus a fixed (noised) delta."""

    def __init__(self, delta: float | None) -> None:
        self.delta = delta
        self.start: list[np.ndarray] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.start = parameters_to_ndarrays(parameters)
        return []

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if self.delta is None:
            return None, {}
        return ndarrays_to_parameters([a + self.delta for a in self.start]), {"k": 1}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def test_the_wrapper_steps_on_what_the_inner_strategy_averaged() -> None:
    start: Parameters = ndarrays_to_parameters([np.full(4, 0.5, dtype=np.float32)])
    settings = ServerOptimizerSettings("fedavgm", 2.0, momentum=0.5)
    wrapped = ServerOptimizerStrategy(_Averaging(0.25), ServerOptimizer(settings))
    wrapped.configure_fit(1, start, SimpleClientManager())
    params, metrics = wrapped.aggregate_fit(1, [], [])
    assert params is not None and metrics == {"k": 1}
    new = parameters_to_ndarrays(params)[0]
    assert new.dtype == np.float32
    np.testing.assert_allclose(new, 0.5 + 2.0 * 0.25, rtol=1e-6)
    # a round without a new global head leaves the optimizer's state alone
    idle = ServerOptimizerStrategy(_Averaging(None), ServerOptimizer(settings))
    idle.configure_fit(1, start, SimpleClientManager())
    assert idle.aggregate_fit(1, [], []) == (None, {})
    assert idle.optimizer.steps == 0
