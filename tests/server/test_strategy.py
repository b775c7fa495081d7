from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from fedhead.common.model import TensorSpec, TrainableSet
from fedhead.server.strategy import FedHeadStrategy
from tests.conftest import round_settings

TS = TrainableSet((TensorSpec("head.w", (2, 2), "float32"), TensorSpec("head.b", (2,), "float32")))
SETTINGS = round_settings(server_round=0, trainable_fingerprint=TS.fingerprint())


class Proxy(ClientProxy):
    def get_properties(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_parameters(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def fit(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def evaluate(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def reconnect(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def node_id(self) -> int:  # type: ignore[override]
        return int(self.cid)


def zeros() -> list[np.ndarray]:
    return [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]


def fitres(delta: float, n: int, loss: float = 1.0) -> FitRes:
    arrays = [np.full((2, 2), delta, np.float32), np.full(2, delta, np.float32)]
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {"train-loss": loss})


def strategy(max_update_norm: float = 0.0, **kw) -> FedHeadStrategy:  # type: ignore[no-untyped-def]
    settings = dataclasses.replace(SETTINGS, max_update_norm=max_update_norm)
    return FedHeadStrategy(TS, zeros(), settings, num_rounds=4, min_sites=2, **kw)


def manager(n: int) -> SimpleClientManager:
    cm = SimpleClientManager()
    for i in range(1, n + 1):
        cm.register(Proxy(str(i)))
    return cm


def test_only_ready_sites_are_sampled_and_learning_rate_decays() -> None:
    s = strategy()
    s.ready = {1, 2}
    cm = manager(3)
    chosen = s.configure_fit(1, ndarrays_to_parameters(zeros()), cm)
    assert sorted(p.node_id for p, _ in chosen) == [1, 2]
    lr1 = chosen[0][1].config["learning_rate"]
    lr3 = s.configure_fit(3, ndarrays_to_parameters(zeros()), cm)[0][1].config["learning_rate"]
    assert lr1 == pytest.approx(0.1) and lr3 < lr1


def test_too_few_ready_sites_skips_the_step_without_blocking() -> None:
    s = strategy()
    s.ready = {1}
    assert s.configure_fit(1, ndarrays_to_parameters(zeros()), manager(3)) == []


def test_plain_aggregation_rejects_bad_updates_and_averages_the_rest() -> None:
    s = strategy(max_update_norm=100.0)
    nan = fitres(0.0, 10)
    arrs = parameters_to_ndarrays(nan.parameters)
    arrs[0][0, 0] = np.inf
    nan.parameters = ndarrays_to_parameters(arrs)
    results = [
        (Proxy("1"), fitres(1.0, 10, loss=2.0)),
        (Proxy("2"), fitres(3.0, 30, loss=1.0)),
        (Proxy("3"), nan),
        (Proxy("4"), fitres(1000.0, 10)),
    ]
    s.ready = {1, 2, 3, 4}
    s.configure_fit(1, ndarrays_to_parameters(zeros()), manager(4))
    params, _ = s.aggregate_fit(1, results, [])
    assert params is not None
    new = parameters_to_ndarrays(params)
    assert np.allclose(new[0], 2.5)  # (1*10 + 3*30) / 40
    st = s.stats(1)
    assert st.updates_rejected == {"non_finite": 1, "norm": 1}
    assert st.rejected_sites == {"3": "non_finite", "4": "norm"}
    assert st.aggregated and st.sites_replied == 4


def test_too_few_valid_updates_leave_the_head_unchanged() -> None:
    s = strategy()
    params, _ = s.aggregate_fit(1, [(Proxy("1"), fitres(1.0, 10))], [RuntimeError("boom")])
    assert params is None and not s.stats(1).aggregated and s.stats(1).sites_failed == 1
    assert s.stats(1).sites_dropped == 0


def test_secure_mode_uses_the_shared_aggregate_and_checks_it() -> None:
    s = strategy(secure=True, max_update_norm=10.0)
    s.ready = {1, 2}
    one = [np.ones((2, 2), np.float32), np.ones(2, np.float32)]
    for rnd in (1, 2):
        s.configure_fit(rnd, ndarrays_to_parameters(one), manager(2))
    agg = fitres(0.5, 10)
    results = [(Proxy("1"), agg), (Proxy("2"), agg)]  # SecAgg+ hands every result the sum
    params, _ = s.aggregate_fit(1, results, [])
    assert params is not None and np.allclose(parameters_to_ndarrays(params)[0], 1.5)
    big = fitres(100.0, 10)
    params, _ = s.aggregate_fit(2, [(Proxy("1"), big), (Proxy("2"), big)], [])
    assert params is None and s.stats(2).updates_rejected == {"norm": 1}


def test_evaluation_is_example_weighted() -> None:
    s = strategy()
    res = [
        (Proxy("1"), EvaluateRes(Status(Code.OK, ""), 1.0, 10, {"accuracy": 0.5})),
        (Proxy("2"), EvaluateRes(Status(Code.OK, ""), 0.0, 30, {"accuracy": 1.0})),
    ]
    loss, metrics = s.aggregate_evaluate(1, res, [])
    assert loss == pytest.approx(0.25) and metrics["accuracy"] == pytest.approx(0.875)


def test_server_side_evaluation_is_used_when_given() -> None:
    seen = []
    s = strategy(server_evaluate=lambda arrays: (seen.append(arrays) or 0.3, 0.9, {"auroc": 0.8}))
    assert s.evaluate(1, ndarrays_to_parameters(zeros())) == (0.3, {"accuracy": 0.9, "auroc": 0.8})
    assert s.stats(1).server_eval_metrics == {"auroc": 0.8}
    assert strategy().evaluate(1, ndarrays_to_parameters(zeros())) is None


def test_gone_sites_count_as_dropped_and_erroring_sites_as_failed() -> None:
    from flwr.app import Error

    s = strategy()
    s.ready = {1, 2, 3, 4}
    s.configure_fit(1, ndarrays_to_parameters(zeros()), manager(4))
    failures = [
        Exception(Error(code=5, reason="node unavailable")),  # written by the SuperLink
        Exception(Error(code=2, reason="ClientApp raised an exception")),
    ]
    s.aggregate_fit(1, [(Proxy("1"), fitres(0.1, 5)), (Proxy("2"), fitres(0.1, 5))], failures)
    st = s.stats(1)
    assert (st.sites_selected, st.sites_replied, st.sites_failed, st.sites_dropped) == (4, 2, 1, 1)


def test_sites_count_tables_are_pooled_and_a_bad_one_is_left_out() -> None:
    from fedhead.common.pooled import KEY_CONFUSION, EvalStatistics

    rng = np.random.default_rng(0)

    def reply(n: int) -> EvaluateRes:
        y = rng.integers(0, 2, n)
        p1 = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.2, n), 0, 1)
        stats = EvalStatistics.from_predictions(y, np.stack([1 - p1, p1], axis=1))
        acc = float(np.trace(stats.confusion) / n)
        return EvaluateRes(Status(Code.OK, ""), 0.5, n, {"accuracy": acc, **stats.to_metrics()})

    good, other, bad = reply(30), reply(50), reply(20)
    bad.metrics[KEY_CONFUSION] = [20, 0, 0, 5]  # counts 25 examples, claims 20
    s = strategy(statistics_classes=2)
    res = [(Proxy("1"), good), (Proxy("2"), other), (Proxy("3"), bad)]
    _, metrics = s.aggregate_evaluate(1, res, [])
    st = s.stats(1)
    assert st.eval_examples == 100  # the bad site's loss and accuracy still count
    assert st.eval_statistics_examples == 80 and st.eval_statistics_refused == 1
    assert np.array(st.eval_confusion).sum() == 80
    assert metrics["auroc"] == st.eval_metrics["auroc"] > 0.5
    s.ready = {1, 2}
    asks = s.configure_evaluate(1, ndarrays_to_parameters(zeros()), manager(2))
    assert [ins.config["statistics"] for _, ins in asks] == [True, True]
    # without statistics_classes the server asks for none and pools none
    plain = strategy()
    plain.ready = {1, 2}
    asks = plain.configure_evaluate(1, ndarrays_to_parameters(zeros()), manager(2))
    assert [ins.config["statistics"] for _, ins in asks] == [False, False]
    plain.aggregate_evaluate(1, res, [])
    assert plain.stats(1).eval_metrics == {}
