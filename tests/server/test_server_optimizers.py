"""Server optimizers in whole runs (ServerApp and ClientApps in-process, loopback grid):
under SecAgg+ with DP, in checkpoints, and across a resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from flwr.common import FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from fedhead.client.app import app as client_app
from fedhead.common.errors import ConfigError
from fedhead.server.checkpoints import CheckpointStore
from fedhead.server.optimizers import ServerOptimizer, ServerOptimizerSettings
from fedhead.server.privacy import DPFixedClipping
from tests.loopback import LoopbackGrid
from tests.server.conftest import nodes, run, write_sites
from tests.server.test_resume import Crash

pytestmark = pytest.mark.slow

ADAM = {"strategy": "fedadam", "server-learning-rate": 0.05}


def test_fedadam_under_secagg_and_dp_steps_on_the_noised_secure_mean(
    offline_world: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The optimizer sees only what SecAgg+ and the DP wrapper hand on: the noised mean."""
    noised: dict[int, list[np.ndarray]] = {}
    real = DPFixedClipping.aggregate_fit

    def recording(
        self: DPFixedClipping,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        params, metrics = real(self, server_round, results, failures)
        assert params is not None, f"round {server_round}: no aggregate"
        noised[server_round] = parameters_to_ndarrays(params)
        return params, metrics

    monkeypatch.setattr(DPFixedClipping, "aggregate_fit", recording)
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)))
    report = run(
        grid,
        tmp,
        **ADAM,
        **{"num-server-rounds": 2, "min-sites": 3, "dp-noise-multiplier": 0.5},
    )
    assert report["secure_aggregation"] == "secagg+" and report["config"]["strategy"] == "fedadam"
    assert all(r["aggregated"] for r in report["rounds"])
    assert report["server_optimizer"] == {
        "name": "fedadam",
        "learning_rate": 0.05,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
    }
    header = "rounds of fedadam (learning_rate 0.05, beta1 0.9, beta2 0.99, tau 0.001)"
    assert any(header in r.getMessage() for r in caplog.records)

    store = CheckpointStore(tmp / "out" / "checkpoints")
    heads = {r: store.load(r).arrays for r in (1, 2)}
    optimizer = ServerOptimizer(ServerOptimizerSettings("fedadam", 0.05))
    start = _initial_head()
    for rnd in (1, 2):
        delta = [
            n.astype(np.float64) - s.astype(np.float64)
            for n, s in zip(noised[rnd], start, strict=True)
        ]
        expected = optimizer.apply(start, delta)
        for a, b in zip(heads[rnd], expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        # ... and not the plain FedAvg step
        moved = zip(heads[rnd], noised[rnd], strict=True)
        assert max(float(np.abs(a - n).max()) for a, n in moved) > 1e-3
        start = heads[rnd]
    saved = store.load(2).meta["server_optimizer"]
    assert saved["name"] == "fedadam" and saved["steps"] == 2 and saved["slots"] == ["m", "v"]


def _initial_head() -> list[np.ndarray]:
    """The run's initial head: the same for the same seed (built as the server does)."""
    from fedhead.common.config import RunConfig
    from fedhead.server.server_model import build_server_model
    from tests.server.conftest import CLASSES

    cfg = RunConfig.from_mapping({"classes": CLASSES, "input-size": 64})
    sm = build_server_model(cfg)
    return sm.trainable.get(sm.model)


def _crashing_in_round(rnd: int, sites: dict[int, dict[str, object]]) -> LoopbackGrid:
    grid = LoopbackGrid(client_app, sites)

    def crash(node: int, msg: Message) -> None:
        if msg.metadata.group_id == str(rnd):
            raise Crash("server killed")

    grid.before_delivery = crash
    return grid


def test_a_resumed_fedadam_run_ends_where_the_uninterrupted_one_does(offline_world: Path) -> None:
    tmp = offline_world
    sites = write_sites(tmp, 2)
    plain = {"num-server-rounds": 3, "secure-aggregation": False, "seed": 3, **ADAM}
    run(LoopbackGrid(client_app, nodes(tmp, sites)), tmp, **plain, **{"out-dir": str(tmp / "w")})
    whole = CheckpointStore(tmp / "w" / "checkpoints").load()

    out = tmp / "cut"
    with pytest.raises(Crash):  # the server goes down as round 3 starts
        run(_crashing_in_round(3, nodes(tmp, sites)), tmp, **plain, **{"out-dir": str(out)})
    cut = CheckpointStore(out / "checkpoints").load()
    assert cut.round == 2 and cut.meta["server_optimizer"]["steps"] == 2

    # another server optimizer cannot continue this one's state: refused before any site
    grid = LoopbackGrid(client_app, nodes(tmp, sites))
    with pytest.raises(ConfigError, match="strategy=fedadam but this run has strategy=fedyogi"):
        other = {**plain, "strategy": "fedyogi", "resume-from": str(out), "out-dir": str(out)}
        run(grid, tmp, **other)
    assert grid.sent == []

    grid = LoopbackGrid(client_app, nodes(tmp, sites))
    report = run(grid, tmp, **plain, **{"out-dir": str(out), "resume-from": str(out)})
    assert report["resumed_from"]["round"] == 2
    resumed = CheckpointStore(out / "checkpoints").load()
    assert resumed.round == 3 and resumed.meta["server_optimizer"]["steps"] == 3
    for a, b in zip(resumed.arrays, whole.arrays, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for slot in ("m", "v"):
        for name in whole.names:
            key = f"server_optimizer/{slot}/{name}"
            np.testing.assert_allclose(resumed.optimizer[key], whole.optimizer[key], atol=1e-9)
    whole_report = json.loads((tmp / "w" / "report.json").read_text())
    assert report["final_eval_accuracy"] == pytest.approx(
        whole_report["final_eval_accuracy"], abs=1e-6
    )
