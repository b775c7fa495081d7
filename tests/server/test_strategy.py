"""The strategy (sampling, round settings, FedAvg), the plain training step's checks and
counts, the secure aggregate's checks, and the pooling of federated evaluations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    ReconnectIns,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from fedhead.common.model import TensorSpec, TrainableSet
from fedhead.common.protocol import PrepareReply
from fedhead.common.rounds import RoundResult
from fedhead.server.federated_eval import EvaluationPlan, Pooling
from fedhead.server.prepare import Roster
from fedhead.server.rounds import PlainTraining, Rounds, RoundTraining
from fedhead.server.secagg import aggregate_problem
from fedhead.server.strategy import FedHeadStrategy
from tests.conftest import round_settings
from tests.loopback import AppCallable, LoopbackGrid

TS = TrainableSet((TensorSpec("head.w", (2, 2), "float32"), TensorSpec("head.b", (2,), "float32")))
SETTINGS = round_settings(server_round=0, trainable_fingerprint=TS.fingerprint())


class Proxy(ClientProxy):
    """A connected site the strategy can sample; it is never asked anything."""

    def __init__(self, cid: str) -> None:
        super().__init__(cid)
        self.node_id = int(cid)

    def get_properties(
        self, ins: GetPropertiesIns, timeout: float | None, group_id: int | None
    ) -> GetPropertiesRes:
        raise NotImplementedError

    def get_parameters(
        self, ins: GetParametersIns, timeout: float | None, group_id: int | None
    ) -> GetParametersRes:
        raise NotImplementedError

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None) -> FitRes:
        raise NotImplementedError

    def evaluate(
        self, ins: EvaluateIns, timeout: float | None, group_id: int | None
    ) -> EvaluateRes:
        raise NotImplementedError

    def reconnect(
        self, ins: ReconnectIns, timeout: float | None, group_id: int | None
    ) -> DisconnectRes:
        raise NotImplementedError


def roster(*ready: int, cap: int = 1000) -> Roster:
    reply = PrepareReply("ok", "", cap, cap, "cpu", "", "")
    return Roster(
        ready=dict.fromkeys(ready, reply),
        train_caps=dict.fromkeys(ready, cap),
        val_caps=dict.fromkeys(ready, cap),
    )


def zeros() -> list[np.ndarray]:
    return [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]


def fitres(delta: float, n: int, loss: float = 1.0) -> FitRes:
    arrays = [np.full((2, 2), delta, np.float32), np.full(2, delta, np.float32)]
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {"train-loss": loss})


def strategy(
    sites: Roster,
    max_update_norm: float = 0.0,
    secure: bool = False,
    evaluation: EvaluationPlan | None = None,
) -> FedHeadStrategy:
    settings = dataclasses.replace(SETTINGS, max_update_norm=max_update_norm)
    return FedHeadStrategy(
        sites,
        TS,
        zeros(),
        settings,
        num_rounds=4,
        min_sites=2,
        evaluation=evaluation or EvaluationPlan(),
        secure=secure,
    )


def manager(n: int) -> SimpleClientManager:
    cm = SimpleClientManager()
    for i in range(1, n + 1):
        cm.register(Proxy(str(i)))
    return cm


def test_only_ready_sites_are_sampled_and_learning_rate_decays() -> None:
    s = strategy(roster(1, 2))
    cm = manager(3)
    chosen = s.configure_fit(1, ndarrays_to_parameters(zeros()), cm)
    assert sorted(p.node_id for p, _ in chosen) == [1, 2]
    lr1 = chosen[0][1].config["learning_rate"]
    lr3 = s.configure_fit(3, ndarrays_to_parameters(zeros()), cm)[0][1].config["learning_rate"]
    assert isinstance(lr1, float) and isinstance(lr3, float)
    assert lr1 == pytest.approx(0.1) and lr3 < lr1


def test_too_few_ready_sites_skips_the_step_without_blocking() -> None:
    s = strategy(roster(1))
    assert s.configure_fit(1, ndarrays_to_parameters(zeros()), manager(3)) == []


def _plain_round(replies: dict[int, FitRes | Error], max_update_norm: float = 0.0) -> RoundTraining:
    """One plain training round in which site n answers ``replies[n]``."""

    def site(node: int) -> AppCallable:
        def app(msg: Message, context: Context) -> Message:
            answer = replies[node]
            if isinstance(answer, Error):
                return Message(answer, reply_to=msg)
            return Message(compat.fitres_to_recorddict(answer, False), reply_to=msg)

        return app

    sites = roster(*replies)
    configs: dict[int, dict[str, object]] = {n: {} for n in replies}
    grid = LoopbackGrid(ClientApp(), configs, {n: site(n) for n in replies})  # no other sites
    stack = strategy(sites, max_update_norm=max_update_norm)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    rounds = Rounds(grid, context, stack, num_rounds=4)
    for node in replies:
        rounds.context.client_manager.register(Proxy(str(node)))
    pooling = Pooling(EvaluationPlan(), sites.name)
    training = PlainTraining(sites, TS, max_update_norm, pooling, timeout=5.0)
    return rounds.train(training, 1, zeros())


def test_plain_aggregation_rejects_bad_updates_and_averages_the_rest() -> None:
    nan = fitres(0.0, 10)
    arrs = parameters_to_ndarrays(nan.parameters)
    arrs[0][0, 0] = np.inf
    nan.parameters = ndarrays_to_parameters(arrs)
    training = _plain_round(
        {1: fitres(1.0, 10, loss=2.0), 2: fitres(3.0, 30, loss=1.0), 3: nan, 4: fitres(1000.0, 10)},
        max_update_norm=100.0,
    )
    assert training.arrays is not None
    assert np.allclose(training.arrays[0], 2.5)  # (1*10 + 3*30) / 40
    result = RoundResult(1)
    training.into(result)
    assert result.updates_rejected == {"non_finite": 1, "norm": 1}
    assert result.rejected_sites == {"3": "non_finite", "4": "norm"}
    assert result.aggregated and result.sites_replied == 4


def test_too_few_valid_updates_leave_the_head_unchanged() -> None:
    boom = Error(code=2, reason="ClientApp raised an exception")
    training = _plain_round({1: fitres(1.0, 10), 2: boom})
    result = RoundResult(1)
    training.into(result)
    assert training.arrays is None and not result.aggregated and result.sites_failed == 1
    assert result.sites_dropped == 0


def test_gone_sites_count_as_dropped_and_erroring_sites_as_failed() -> None:
    training = RoundTraining(selected=4)
    failures = [
        Exception(Error(code=5, reason="node unavailable")),  # written by the SuperLink
        Exception(Error(code=2, reason="ClientApp raised an exception")),
    ]
    training.count(2, failures)
    result = RoundResult(1)
    training.into(result)
    assert (result.sites_selected, result.sites_replied) == (4, 2)
    assert (result.sites_failed, result.sites_dropped) == (1, 1)


def test_secure_mode_uses_the_shared_aggregate_and_checks_it() -> None:
    s = strategy(roster(1, 2), secure=True)
    one = [np.ones((2, 2), np.float32), np.ones(2, np.float32)]
    s.configure_fit(1, ndarrays_to_parameters(one), manager(2))
    agg = fitres(0.5, 10)
    # SecAgg+ hands every result the sum
    results: list[tuple[ClientProxy, FitRes]] = [(Proxy("1"), agg), (Proxy("2"), agg)]
    params, _ = s.aggregate_fit(1, results, [])
    assert params is not None and np.allclose(parameters_to_ndarrays(params)[0], 1.5)
    settings = dataclasses.replace(SETTINGS, max_update_norm=10.0)
    big = parameters_to_ndarrays(fitres(100.0, 10).parameters)
    assert aggregate_problem(big, TS, settings, None) == (
        "norm",
        "update norm 244.9 exceeds the bound 10",
    )
    assert aggregate_problem(parameters_to_ndarrays(agg.parameters), TS, settings, None) is None


def test_evaluation_is_example_weighted() -> None:
    res = [
        (1, EvaluateRes(Status(Code.OK, ""), 1.0, 10, {"accuracy": 0.5})),
        (2, EvaluateRes(Status(Code.OK, ""), 0.0, 30, {"accuracy": 1.0})),
    ]
    evaluation = Pooling(EvaluationPlan(), str).pool(1, res, [])
    assert evaluation.loss == pytest.approx(0.25) and evaluation.accuracy == pytest.approx(0.875)


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
    bad.metrics[KEY_CONFUSION] = np.array([20, 0, 0, 5], "<i8").tobytes()  # 25, claims 20
    res = [(1, good), (2, other), (3, bad)]
    evaluation = Pooling(EvaluationPlan(statistics_classes=2), str).pool(1, res, [])
    assert evaluation.examples == 100  # the bad site's loss and accuracy still count
    assert evaluation.statistics_examples == 80 and evaluation.statistics_refused == 1
    assert np.array(evaluation.confusion).sum() == 80
    assert evaluation.metrics["auroc"] > 0.5
    s = strategy(roster(1, 2), evaluation=EvaluationPlan(statistics_classes=2))
    asks = s.configure_evaluate(1, ndarrays_to_parameters(zeros()), manager(2))
    assert [ins.config["statistics"] for _, ins in asks] == [True, True]
    # without statistics_classes the server asks for none and pools none
    plain = strategy(roster(1, 2))
    asks = plain.configure_evaluate(1, ndarrays_to_parameters(zeros()), manager(2))
    assert [ins.config["statistics"] for _, ins in asks] == [False, False]
    assert Pooling(EvaluationPlan(), str).pool(1, res, []).metrics == {}
