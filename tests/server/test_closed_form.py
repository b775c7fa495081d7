"""Closed-form heads over the loopback grid: the real ServerApp and ClientApps in process.

One statistics round makes the pooled-data head (plain and under SecAgg+, whatever the
sites' sizes); malicious statistics are refused; fine-tuning rounds follow from the
closed-form head; a run cut off between the sum and the sites' choice resumes without
asking the sites for their statistics again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from safetensors.numpy import load_file

from fedhead.client.app import app as client_app
from fedhead.client.app import build_app
from fedhead.client.site import Site
from fedhead.common import demo_data
from fedhead.common.closed_form import Statistics, candidate_heads
from fedhead.common.config import NodeConfig
from fedhead.common.errors import FederationError
from fedhead.common.protocol import MSG_VALIDATE, TASK_KEY, TASK_STATISTICS
from fedhead.common.simulation import write_site_npz
from fedhead.server.run import run_federation
from fedhead.server.server_model import build_server_model, run_spec
from tests.loopback import LoopbackGrid
from tests.server.conftest import loopback_config, nodes, run, server_context, write_sites

pytestmark = pytest.mark.slow  # whole federations (seconds each)

CLOSED = {"strategy": "closed-form", "min-sites": 2}
ATTACKER = 102


def _pooled_head_probabilities(
    tmp: Path, configs: dict[int, dict[str, object]], chosen: str, **overrides: object
) -> tuple[np.ndarray, np.ndarray]:
    """The pooled-data closed-form head with the chosen regularisation, computed from the
    sites' own features (the statistics of their union), and the delivered head's, both
    on the sites' validation features."""
    cfg = loopback_config(tmp, **CLOSED, **overrides)
    spec = run_spec(cfg, build_server_model(cfg))
    stats = None
    val = []
    for node_config in configs.values():
        site = Site(NodeConfig.from_mapping(node_config), spec)
        x, y, _ = site.features("train")
        part = Statistics.of(x.float().numpy(), y.numpy(), 2)
        stats = part if stats is None else stats + part
        val.append(site.features("val")[0].float().numpy())
    assert stats is not None
    method, parameter = chosen.split(" ")[0], float(chosen.split("=")[1])
    (pooled,) = candidate_heads(stats, method, [parameter])
    features = np.concatenate(val)
    kept = load_file(str(Path(cfg.out_dir) / "model" / "head.safetensors"))
    weight, bias = (kept[n] for n in sorted(kept, key=lambda n: n.endswith("bias")))
    delivered = features @ weight.astype(np.float64).T + bias.astype(np.float64)
    delivered = np.exp(delivered - delivered.max(axis=1, keepdims=True))
    delivered /= delivered.sum(axis=1, keepdims=True)
    return pooled.head.probabilities(features), delivered


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_one_round_of_summed_statistics_makes_the_pooled_data_head(
    offline_world: Path, secure: bool
) -> None:
    tmp = offline_world
    configs = nodes(tmp, write_sites(tmp, 3))
    grid = LoopbackGrid(client_app, configs)
    report = run(grid, tmp, **CLOSED, **{"secure-aggregation": secure})
    assert [r["round"] for r in report["rounds"]] == [1] and report["rounds"][0]["aggregated"]
    assert report["initial_eval"] is None  # no initial head to improve on
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    stats_asks = [m for m in trains if "fitins.config" in m.content.config_records]
    assert stats_asks and all(
        m.content.config_records["fitins.config"][TASK_KEY] == TASK_STATISTICS for m in stats_asks
    )
    assert [m.metadata.message_type for m in grid.sent].count(MSG_VALIDATE) == 3
    assert not [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    closed = report["closed_form"]
    assert closed["secure_aggregation"] is secure
    grid_rows = closed["grid"]
    assert len(grid_rows) == 5 and sum(r["chosen"] for r in grid_rows) == 1
    chosen = next(r for r in grid_rows if r["chosen"])
    assert chosen["candidate"] == closed["chosen"]
    best = max(r["balanced_accuracy"] for r in grid_rows)
    assert chosen["balanced_accuracy"] == best  # the sites' pooled validation chose it
    assert report["rounds"][0]["eval_accuracy"] == pytest.approx(chosen["eval_accuracy"])
    pooled, delivered = _pooled_head_probabilities(
        tmp, configs, closed["chosen"], **{"secure-aggregation": secure}
    )
    assert float(np.abs(pooled - delivered).max()) <= 1e-4
    assert len(report["delivery"]["delivered_to"]) == 3


def test_a_site_far_larger_than_secaggs_weight_limit_takes_part(offline_world: Path) -> None:
    """Every site weighs one in the statistics round: a site of 5,000 images (Flower's
    default max_weight is 1000) is summed exactly like a small one."""
    tmp = offline_world
    sites = write_sites(tmp, 2)
    train = demo_data.load("train")
    pick = np.random.default_rng(5).choice(len(train.labels), 5000, replace=True)
    big = write_site_npz(tmp / "big.npz", demo_data.Split(train.images[pick], train.labels[pick]))
    configs = nodes(tmp, [*sites, big])
    report = run(LoopbackGrid(client_app, configs), tmp, **CLOSED)
    assert report["secure_aggregation_params"]["max_weight"] >= 1.0
    declared = {s["node_id"]: s["train_examples"] for s in report["setup"]["sites"]}
    assert max(declared.values()) >= 4000  # the big site (15% of it held out)
    assert report["rounds"][0]["aggregated"] and report["rounds"][0]["sites_replied"] == 3
    pooled, delivered = _pooled_head_probabilities(tmp, configs, report["closed_form"]["chosen"])
    assert float(np.abs(pooled - delivered).max()) <= 1e-4


def _statistics_reply(change: Callable[[np.ndarray], np.ndarray]) -> Mod:
    """A mod that rewrites the statistics a site sends (plain: the float64 vector)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        config = msg.content.config_records.get("fitins.config")
        if reply.has_error() or config is None or config.get(TASK_KEY) != TASK_STATISTICS:
            return reply
        res = compat.recorddict_to_fitres(reply.content, keep_input=False)
        (vector,) = parameters_to_ndarrays(res.parameters)
        res.parameters = ndarrays_to_parameters([change(vector.copy())])
        reply.content = compat.fitres_to_recorddict(res, keep_input=False)
        return reply

    return mod


def _inflated(v: np.ndarray) -> np.ndarray:
    return v * 1000.0  # every statistic of 1000x as many images


def _nan(v: np.ndarray) -> np.ndarray:
    v[5] = np.nan
    return v


def _inconsistent(v: np.ndarray) -> np.ndarray:
    v[2 + 2 * 1280 + 1] = 1e9  # a Gram entry no features with these sums can produce
    return v


@pytest.mark.parametrize(
    ("attack", "reason"),
    [(_inflated, "weight"), (_nan, "non_finite"), (_inconsistent, "range")],
    ids=["inflated", "nan", "inconsistent"],
)
def test_malicious_statistics_are_refused_and_the_site_named_without_secagg(
    offline_world: Path,
    caplog: pytest.LogCaptureFixture,
    attack: Callable[[np.ndarray], np.ndarray],
    reason: str,
) -> None:
    tmp = offline_world
    app = build_app(outer=[_statistics_reply(attack)])
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)), {ATTACKER: app})
    report = run(grid, tmp, **CLOSED, **{"secure-aggregation": False})
    (r,) = report["rounds"]
    assert r["aggregated"] and r["sites_replied"] == 2 and r["sites_failed"] == 1
    assert r["rejected_sites"] == {str(ATTACKER): reason}
    assert any(
        f"node {ATTACKER}" in m.getMessage() and "statistics" in m.getMessage()
        for m in caplog.records
        if m.levelname == "WARNING"
    )


def test_statistics_no_honest_sites_can_sum_to_are_refused_under_secagg(
    offline_world: Path,
) -> None:
    """Under SecAgg+ the server sees only the sum: a site that masks more examples than
    it declared makes a sum no honest sites produce, which is refused (no model is
    delivered); its wrong weight, the one thing it shows, is named."""
    tmp = offline_world

    def mask_more(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        # inside the SecAgg+ mod: what this site masks is statistics of 1000x its images
        return _statistics_reply(_inflated_digits)(msg, context, call_next)

    app = build_app(inner_train=[mask_more])
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)), {ATTACKER: app})
    with pytest.raises(FederationError, match=r"not sound|not a sum"):
        run(grid, tmp, **CLOSED)
    assert not [m for m in grid.sent if m.metadata.message_type == "query.model"]
    status = json.loads((tmp / "out" / "status.json").read_text())
    assert status["state"] == "failed"


def _inflated_digits(v: np.ndarray) -> np.ndarray:
    """The fixed-point code of statistics 1000x larger: the top digits grow (a site that
    skips its own range check)."""
    limbs = 3
    digits = v.reshape(limbs, -1).copy()
    top = digits[-1]
    step = 16 / 2**22
    digits[-1] = np.minimum(top + 50 * step, 8.0)  # a larger top digit on every value
    return digits.ravel()


def test_fine_tuning_rounds_start_from_the_closed_form_head(offline_world: Path) -> None:
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)))
    report = run(grid, tmp, **CLOSED, **{"fine-tune-rounds": 2, "secure-aggregation": False})
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(r["aggregated"] for r in report["rounds"])
    first_train = next(
        m for m in grid.sent if m.metadata.message_type == "train" and m.metadata.group_id == "2"
    )
    head = parameters_to_ndarrays(compat.recorddict_to_fitins(first_train.content, True).parameters)
    kept = load_file(str(tmp / "out" / "checkpoints" / "round-0001.safetensors"))
    assert np.array_equal(head[0], kept["head/head.0.weight"])  # round 2 trains from it
    assert len(report["delivery"]["delivered_to"]) == 3  # the sites took every head


def test_a_run_cut_off_before_the_sites_chose_resumes_without_new_statistics(
    offline_world: Path,
) -> None:
    tmp = offline_world
    sites = write_sites(tmp, 3)
    grid = LoopbackGrid(client_app, nodes(tmp, sites))

    class Crash(Exception):
        pass

    def crash_at_validation(node: int, msg: Message) -> None:
        if msg.metadata.message_type == MSG_VALIDATE:
            raise Crash("server killed")

    grid.before_delivery = crash_at_validation
    with pytest.raises(Crash):
        run(grid, tmp, **CLOSED)
    grid = LoopbackGrid(client_app, nodes(tmp, sites), run_id=5151)
    cfg = loopback_config(tmp, **CLOSED, **{"resume-from": str(tmp / "out")})
    run_federation(grid, server_context(5151), cfg)
    assert not [m for m in grid.sent if m.metadata.message_type == "train"]
    assert [m.metadata.message_type for m in grid.sent].count(MSG_VALIDATE) == 3
    report = json.loads((tmp / "out" / "report.json").read_text())
    assert report["rounds"][0]["aggregated"] and report["closed_form"]["chosen"]


def test_differential_privacy_is_one_release_of_the_statistics(offline_world: Path) -> None:
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)))
    settings = {"dp-noise-multiplier": 1.0, "dp-feature-clip": 20.0}
    report = run(grid, tmp, **CLOSED, **settings)
    dp = report["differential_privacy"]
    assert dp["feature_clip"] == 20.0 and 0 < dp["epsilon"] < 10
    assert report["rounds"][0]["dp_epsilon"] == pytest.approx(dp["epsilon"])


def test_an_mlp_head_is_trained_with_fedavg_and_says_so(
    offline_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 2)))
    report = run(grid, tmp, **CLOSED, **{"head": "mlp", "num-server-rounds": 1})
    assert report["closed_form"] is None and [r["round"] for r in report["rounds"]] == [1]
    assert any("trained with FedAvg" in m.getMessage() for m in caplog.records)


def test_each_site_learns_what_the_closed_form_head_did_for_it(offline_world: Path) -> None:
    """At no extra message: the local-only head is the same closed form on the site's own
    statistics, the personalized one the federated head with the site's class balance."""
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)))
    report = run(grid, tmp, **CLOSED, **{"local-baseline": True})
    outcome = [m for m in grid.sent if m.metadata.message_type == "query.outcome"]
    assert len(outcome) == 3 and not report["sites_failed"]
    for site in report["sites"]:
        assert site["local_only"]["accuracy"] is not None
        assert site["personalized"]["accuracy"] is not None
        assert site["gain"]["accuracy"] == pytest.approx(
            site["federated"]["accuracy"] - site["local_only"]["accuracy"]
        )
    assert len(report["closed_form"]["class_counts"]) == 2


def test_a_closed_form_run_reports_its_heads_server_test_accuracy(offline_world: Path) -> None:
    """The server's own test set scores the closed-form head as it scores every FedAvg
    round's head: the round's and the final server accuracy are the test set's."""
    tmp = offline_world
    test = demo_data.load("test")
    pick = np.concatenate([np.flatnonzero(test.labels == c)[:30] for c in (0, 1)])
    np.savez(tmp / "test.npz", images=test.images[pick], labels=test.labels[pick])
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 2)))
    report = run(grid, tmp, strategy="closed-form", **{"server-test-data": str(tmp / "test.npz")})
    (r,) = report["rounds"]
    final = report["server_test_evaluation"]
    assert final is not None
    accuracy = final["metrics"]["accuracy"]["value"]
    assert 0.5 < accuracy <= 1.0
    assert r["server_eval_accuracy"] == pytest.approx(accuracy)
    assert report["final_server_eval_accuracy"] == pytest.approx(accuracy)
