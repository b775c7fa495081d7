"""SecAgg+ and differential privacy, in process over the loopback Grid."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common import Parameters, Scalar, parameters_to_ndarrays
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedhead.client.app import app as client_app
from fedhead.client.site import Site, TrainOutcome
from fedhead.common.config import RunConfig
from fedhead.common.errors import ConfigError, FederationError
from fedhead.common.protocol import FitSettings
from fedhead.server.rounds import Failure, FitResults
from fedhead.server.screening import ExcludedReply
from fedhead.server.secagg import (
    aggregate_has_weight,
    check_key_shares,
    check_unmask_shares,
    quantized_weight,
    secagg_params,
)
from fedhead.server.strategy import FedHeadStrategy
from tests.loopback import LoopbackGrid
from tests.reports import ReportJson
from tests.server.conftest import CLASSES, nodes, run, write_sites


def _run(grid: LoopbackGrid, tmp: Path, **overrides: object) -> ReportJson:
    return run(grid, tmp, **{"num-server-rounds": 2, "min-sites": 3, **overrides})


def test_the_server_sees_only_the_secure_sum_and_it_equals_fedavg(
    offline_world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What each site computed, what reached the strategy, and how they relate."""
    site_deltas: dict[tuple[int, int], tuple[int, list[np.ndarray]]] = {}
    strategy_inputs: dict[int, list[list[np.ndarray]]] = {}

    real_train = Site.train

    def recording_train(
        self: Site, arrays: list[np.ndarray], settings: FitSettings
    ) -> TrainOutcome:
        outcome = real_train(self, arrays, settings)
        delta = [t - g for t, g in zip(outcome.arrays, arrays, strict=True)]
        site_deltas[(settings.server_round, id(self))] = (outcome.result.examples, delta)
        return outcome

    real_aggregate = FedHeadStrategy.aggregate_fit

    def recording_aggregate(
        self: FedHeadStrategy, server_round: int, results: FitResults, failures: list[Failure]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        strategy_inputs[server_round] = [parameters_to_ndarrays(r.parameters) for _, r in results]
        return real_aggregate(self, server_round, results, failures)

    monkeypatch.setattr(Site, "train", recording_train)
    monkeypatch.setattr(FedHeadStrategy, "aggregate_fit", recording_aggregate)
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)))
    report = _run(grid, tmp)
    assert report["secure_aggregation"] == "secagg+"

    for rnd in (1, 2):
        received = strategy_inputs[rnd]
        sites = [v for (r, _), v in site_deltas.items() if r == rnd]
        assert len(received) == len(sites) == 3
        # every result handed to the strategy carries the same vector: the aggregate
        for other in received[1:]:
            for a, b in zip(received[0], other, strict=True):
                np.testing.assert_array_equal(a, b)
        aggregate = received[0]
        # ... which is none of the sites' own updates
        for _, delta in sites:
            assert (
                max(float(np.abs(a - d).max()) for a, d in zip(aggregate, delta, strict=True))
                > 1e-3
            )
        # ... and equals example-weighted FedAvg of them, to quantization precision
        total = sum(n for n, _ in sites)
        fedavg = [sum(n * d[i] for n, d in sites) / total for i in range(len(aggregate))]
        for a, f in zip(aggregate, fedavg, strict=True):
            np.testing.assert_allclose(a, f, atol=5e-5, rtol=0)


def test_secagg_params_are_derived_from_the_sites() -> None:
    cfg = RunConfig.from_mapping({"classes": CLASSES})
    p = secagg_params(cfg, sampled_sites=5, max_examples=900)
    assert (p.num_shares, p.reconstruction_threshold, p.max_weight) == (1.0, 3, 900.0)
    assert secagg_params(cfg, sampled_sites=2, max_examples=10).reconstruction_threshold == 2
    explicit = RunConfig.from_mapping({"classes": CLASSES, "secagg-threshold": 4.0})
    with pytest.raises(ConfigError, match="exceeds the 3 shares"):
        secagg_params(explicit, sampled_sites=3, max_examples=10)
    big = RunConfig.from_mapping({"classes": CLASSES, "secagg-quantization-range": 2**30})
    with pytest.raises(ConfigError, match="overflow"):
        secagg_params(big, sampled_sites=8, max_examples=10)
    dp = RunConfig.from_mapping(
        {"classes": CLASSES, "strategy": "fedavg", "dp-noise-multiplier": 1.0}
    )
    assert secagg_params(dp, 4, 1000).max_weight == 1.0  # DP: every site weighs the same


def test_turning_secure_aggregation_off_is_logged(
    offline_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)))
    report = _run(grid, tmp, **{"secure-aggregation": False, "num-server-rounds": 1})
    assert report["secure_aggregation"] == "none" and report["secure_aggregation_params"] == {}
    assert any("secure aggregation is OFF" in r.message for r in caplog.records)


def test_differential_privacy_with_secagg_reports_the_privacy_spent(offline_world: Path) -> None:
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)))
    report = _run(
        grid,
        tmp,
        **{"dp-noise-multiplier": 1.0, "dp-clipping-norm": 0.5, "num-server-rounds": 3},
    )
    assert report["secure_aggregation"] == "secagg+"
    dp = report["differential_privacy"]
    assert dp["noise_multiplier"] == 1.0 and dp["clipping_norm"] == 0.5 and dp["delta"] == 1e-5
    eps = [r["dp_epsilon"] for r in report["rounds"]]
    assert all(e is not None and e > 0 for e in eps) and eps == sorted(eps) and eps[0] < eps[-1]
    # under DP every site counts once: SecAgg+'s weight cap is 1
    assert report["secure_aggregation_params"]["max_weight"] == 1.0


def test_an_update_beyond_the_norm_bound_is_refused_by_the_site(offline_world: Path) -> None:
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)))
    # an absurdly high learning rate makes honest sites produce huge updates: they
    # refuse to send them (checked before masking), so no round can aggregate
    with pytest.raises(FederationError, match="no round produced a new global head"):
        _run(grid, tmp, **{"learning-rate": 1000.0, "max-update-norm": 1.0, "num-server-rounds": 1})
    report = json.loads((tmp / "out" / "report.json").read_text())  # written all the same
    assert not report["rounds"][0]["aggregated"]
    errors = [r for r in grid.replies if r.has_error()]
    assert errors and all("FederationError" in (r.error.reason or "") for r in errors)


# --- the checks of the stages and of the aggregate, without a federation -------------
C, Q = 8.0, 2**22


def _secure_mean(
    updates: list[tuple[int, list[np.ndarray]]], max_weight: float, masked_extra: int = 0
) -> list[np.ndarray]:
    """What Flower's SecAgg+ hands the strategy, computed with Flower's own helpers
    (masks cancel in the sum, so they are left out here)."""
    total = None
    for n, arrays in updates:
        q = quantized_weight(n, max_weight, Q)
        vec = factor_combine(q, quantize([a * (q / Q) for a in arrays], C, Q))
        total = vec if total is None else [a + b for a, b in zip(total, vec, strict=True)]
    assert total is not None
    total[0] = total[0] + masked_extra  # a site adds to the weight it masks
    q_total, summed = factor_extract(total)
    mean = dequantize(summed, C, Q)
    return [(m - (len(updates) - 1) * C) * (Q / q_total) for m in mean]


@pytest.mark.parametrize("extra", [0, 50 * Q, Q // 3, -Q, -(3 * Q) // 2])
def test_the_total_weight_of_a_secure_mean_is_recognised(extra: int) -> None:
    """An honest mean passes; one whose masked weight was raised or lowered does not
    (2Q declared in all, so -Q doubles the mean and -1.5Q quadruples it)."""
    rng = np.random.default_rng(0)
    updates = [(n, [rng.normal(0, 0.05, (8, 16)), rng.normal(0, 0.05, 16)]) for n in (120, 80, 40)]
    mean = _secure_mean(updates, max_weight=120, masked_extra=extra)
    declared = sum(quantized_weight(n, 120, Q) for n, _ in updates)
    assert declared == 2 * Q
    assert aggregate_has_weight(mean, declared, 3, C, Q) == (extra == 0)


def test_an_honest_mean_with_few_changed_values_is_not_taken_for_a_scaled_one() -> None:
    """A head whose only change is its biases (a trunk that outputs zeros) sums to a few
    values that can share a factor by chance: no evidence of a lowered weight."""
    updates = [(n, [np.zeros((8, 16)), np.array([0.01, -0.01] * 8)]) for n in (120, 120)]
    mean = _secure_mean(updates, max_weight=120, masked_extra=0)
    declared = sum(quantized_weight(n, 120, Q) for n, _ in updates)
    assert aggregate_has_weight(mean, declared, 2, C, Q)


@pytest.mark.parametrize(
    ("check", "nodes_key", "shares_key"),
    [
        (check_key_shares, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST),
        (check_unmask_shares, Key.NODE_ID_LIST, Key.SHARE_LIST),
    ],
    ids=["share-keys", "unmask"],
)
def test_key_shares_pair_up_and_name_neighbours_only(
    check: Callable[[int, RecordDict, set[int]], None], nodes_key: str, shares_key: str
) -> None:
    def reply(nodes: list[int], shares: list[bytes]) -> RecordDict:
        record = ConfigRecord({nodes_key: nodes, shares_key: shares})
        return RecordDict({RECORD_KEY_CONFIGS: record})

    check(7, reply([2, 3], [b"a", b"b"]), {2, 3, 4})  # accepted
    for content in (reply([2, 9], [b"a", b"b"]), reply([2, 3], [b"a"]), RecordDict()):
        with pytest.raises(ExcludedReply) as err:
            check(7, content, {2, 3, 4})
        assert err.value.reason == "malformed"
