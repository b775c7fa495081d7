"""The bound on a round's step holds for the server's own optimizers on adversarial
sequences of aggregates, and is not needlessly loose for a steady one."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedhead.common.stepbound import (
    DEFAULT_SERVER_LEARNING_RATES,
    StepSettings,
    distance_bound,
    mean_bound,
    round_bound,
)
from fedhead.server.optimizers import (
    DEFAULT_LEARNING_RATES,
    ServerOptimizer,
    ServerOptimizerSettings,
)

VALUES = 50
BASE = StepSettings(
    max_update_norm=3.0,
    clipping_range=0.0,
    strategy="fedavg",
    server_learning_rate=0.0,
    server_momentum=0.9,
    server_beta1=0.9,
    server_beta2=0.99,
    server_tau=1e-3,
    dp_noise_multiplier=0.0,
    dp_clipping_norm=1.0,
    min_sites=2,
)


def test_the_default_learning_rates_are_the_servers() -> None:
    assert DEFAULT_SERVER_LEARNING_RATES == DEFAULT_LEARNING_RATES


def _deltas(kind: str, rounds: int, norm: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Aggregates of norm at most ``norm``: steady, random, alternating large and tiny,
    and tiny for long then large (what an adaptive optimizer's v is slowest to follow)."""
    out = []
    steady = rng.normal(size=VALUES)
    for t in range(rounds):
        if kind == "steady":
            d = steady
        elif kind == "random":
            d = rng.normal(size=VALUES) * rng.uniform(0, 1, size=VALUES) ** 4
        elif kind == "alternating":
            d = steady * (1.0 if t % 2 else 1e-6)
        else:  # "burst"
            d = steady * (1e-6 if t < rounds - 3 else 1.0)
        out.append(d / np.linalg.norm(d) * norm)
    return out


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
@pytest.mark.parametrize("kind", ["steady", "random", "alternating", "burst"])
@pytest.mark.parametrize(("beta1", "beta2"), [(0.9, 0.99), (0.0, 0.5), (0.99, 0.9)])
def test_no_step_of_the_servers_optimizers_exceeds_the_bound(
    strategy: str, kind: str, beta1: float, beta2: float
) -> None:
    settings = dataclasses.replace(BASE, strategy=strategy, server_beta1=beta1, server_beta2=beta2)
    opt = ServerOptimizer(
        ServerOptimizerSettings(
            strategy,
            settings.learning_rate,
            settings.server_momentum,
            beta1,
            beta2,
            settings.server_tau,
        )
    )
    rng = np.random.default_rng(hash((strategy, kind, beta1)) % 2**32)
    worst = 0.0
    for t, delta in enumerate(_deltas(kind, 40, BASE.max_update_norm, rng), start=1):
        step = float(np.linalg.norm(opt.step([delta])[0]))
        bound = round_bound(settings, VALUES, t)
        assert step <= bound * (1 + 1e-9), (t, step, bound)
        worst = max(worst, step / bound)
    if kind == "steady" and strategy != "fedadagrad" and beta1 == 0.9:
        assert worst > 0.1  # the bound is within an order of magnitude of a steady step


def test_fedavg_moves_by_the_mean_and_secagg_and_dp_bound_it_too() -> None:
    assert round_bound(BASE, VALUES, 1) == 3.0
    assert distance_bound(BASE, VALUES, 2, 5) == pytest.approx(9.0, rel=2e-3)
    secagg = dataclasses.replace(BASE, max_update_norm=0.0, clipping_range=0.1)
    assert mean_bound(secagg, VALUES) == pytest.approx(0.1 * math.sqrt(VALUES))
    dp = dataclasses.replace(BASE, dp_noise_multiplier=1.0, dp_clipping_norm=0.5, min_sites=5)
    # the clipped mean, plus noise of std 0.1 a value: norm about 0.1 * sqrt(50) = 0.71
    assert mean_bound(dp, VALUES) == pytest.approx(0.5 + 0.1 * (math.sqrt(VALUES) + 6.5))
    noise = np.random.default_rng(0).normal(0, 0.1, size=(10_000, VALUES))
    assert (np.linalg.norm(noise, axis=1) + 0.5 <= mean_bound(dp, VALUES)).all()


def test_only_fedavg_and_fedavgm_without_any_bound_are_unbounded() -> None:
    free = dataclasses.replace(BASE, max_update_norm=0.0)
    assert math.isinf(round_bound(free, VALUES, 1))
    assert math.isinf(round_bound(dataclasses.replace(free, strategy="fedavgm"), VALUES, 1))
    for strategy in ("fedadam", "fedyogi", "fedadagrad"):
        assert math.isfinite(round_bound(dataclasses.replace(free, strategy=strategy), VALUES, 9))


def test_settings_a_site_cannot_bound_are_named() -> None:
    bad = dataclasses.replace(BASE, strategy="fedmagic", server_beta2=1.0, min_sites=0)
    problems = "; ".join(bad.problems())
    assert "fedmagic" in problems and "server_beta2" in problems and "min_sites" in problems
    assert BASE.problems() == []


def test_a_round_may_tighten_the_bounds_never_loosen_them() -> None:
    dp = dataclasses.replace(BASE, dp_noise_multiplier=1.0, clipping_range=8.0)
    assert dp.within(dp)
    for tighter in ({"max_update_norm": 2.0}, {"clipping_range": 4.0}, {"min_sites": 3}):
        assert dataclasses.replace(dp, **tighter).within(dp)
    for looser in (
        {"max_update_norm": 0.0},  # no bound at all
        {"clipping_range": 9.0},
        {"min_sites": 1},
        {"dp_clipping_norm": 2.0},
        {"server_learning_rate": 2.0},
        {"strategy": "fedavgm"},
    ):
        assert not dataclasses.replace(dp, **looser).within(dp)
