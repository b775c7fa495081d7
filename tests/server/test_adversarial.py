"""One malicious site among three: a real ServerApp against real ClientApps, in process.

Node 102 runs fedhead's own ClientApp, built as the production one is
(``fedhead.client.app.build_app``, every handler and mod), with one extra Flower mod
that rewrites what it sends (``tests/server/adversaries.py``). Each test checks that
the run completes with the honest sites, or stops with a clear error where no safe
result exists; that the site is named in the log and in the round's result; and that
the global head the server keeps does as well on the server's own test set as one
trained by the honest sites alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp.typing import Mod
from flwr.common import EvaluateIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fedhead.client.app import app as client_app
from fedhead.client.app import build_app
from fedhead.client.mods import ERROR_CODE_BASE
from fedhead.common import demo_data
from fedhead.common.errors import FederationError
from fedhead.common.protocol import RECORD_PREPARE, PrepareReply
from tests.loopback import LoopbackGrid
from tests.reports import ReportJson, read_report
from tests.server import adversaries as adv
from tests.server.conftest import nodes, run, write_sites

pytestmark = pytest.mark.slow  # every test runs whole federations (a few seconds each)

ATTACKER = 102
TOLERANCE = 0.05  # server-side test accuracy, attacked run vs honest sites alone
QUANTIZATION = 2**22
MODES = pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])

_honest: dict[tuple[bool, int], float] = {}


def _server_test_set(tmp: Path) -> Path:
    test = demo_data.load("test")
    pick = np.random.default_rng(1).choice(len(test.labels), 200, replace=False)
    path = tmp / "server-test.npz"
    np.savez(path, images=test.images[pick], labels=test.labels[pick])
    return path


def _settings(tmp: Path, secure: bool, rounds: int, **overrides: object) -> dict[str, object]:
    return {
        "num-server-rounds": rounds,
        "secure-aggregation": secure,
        "server-test-data": str(_server_test_set(tmp)),
        **overrides,
    }


def _attacked(
    tmp: Path,
    attack: Mod,
    secure: bool,
    rounds: int = 2,
    inner: bool = False,
    config: dict[str, object] | None = None,
) -> tuple[ReportJson, LoopbackGrid]:
    """A run of three sites, ATTACKER's app carrying ``attack`` around all its handlers
    (with ``inner``: just inside SecAgg+ around its train handler, so what the attack
    changes is what the site masks, past its own update checks)."""
    app = build_app(inner_train=[attack]) if inner else build_app(outer=[attack])
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)), {ATTACKER: app})
    return run(grid, tmp, **_settings(tmp, secure, rounds, **(config or {}))), grid


def _assert_honest_accuracy(
    tmp: Path, report: ReportJson, secure: bool, tolerance: float = TOLERANCE
) -> None:
    """The attacked run ends within ``tolerance`` of the honest sites' own accuracy."""
    honest = _honest_accuracy(tmp, secure)
    assert abs(report["rounds"][-1]["server_eval_accuracy"] - honest) <= tolerance


def _honest_accuracy(tmp: Path, secure: bool, rounds: int = 2) -> float:
    """Server-side test accuracy of the same run with the two honest sites only."""
    if (secure, rounds) not in _honest:
        cfgs = nodes(tmp, write_sites(tmp, 3))
        del cfgs[ATTACKER]
        report = run(
            LoopbackGrid(client_app, cfgs), tmp / "honest", **_settings(tmp, secure, rounds)
        )
        _honest[(secure, rounds)] = report["rounds"][-1]["server_eval_accuracy"]
    return _honest[(secure, rounds)]


def _named(caplog: pytest.LogCaptureFixture, *words: str) -> bool:
    return any(
        f"node {ATTACKER}" in r.getMessage() and all(w in r.getMessage() for w in words)
        for r in caplog.records
        if r.levelname in ("WARNING", "ERROR")
    )


def _report_after_failure(tmp: Path) -> ReportJson:
    return read_report(tmp / "out")


# --- 3: malformed replies ------------------------------------------------------------------
@MODES
def test_an_empty_train_reply_is_that_sites_failure(
    offline_world: Path, caplog: pytest.LogCaptureFixture, secure: bool
) -> None:
    tmp = offline_world
    report, _ = _attacked(tmp, adv.empty_reply("train"), secure)
    for r in report["rounds"]:
        assert r["aggregated"] and r["sites_replied"] == 2 and r["sites_failed"] == 1, r
        assert r["rejected_sites"] == {str(ATTACKER): "malformed"}
        assert r["updates_rejected"] == {"malformed": 1}
    assert _named(caplog, "malformed")
    _assert_honest_accuracy(tmp, report, secure)


def test_a_malformed_prepare_reply_leaves_the_site_out(
    offline_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tmp = offline_world
    report, grid = _attacked(tmp, adv.empty_reply("query.prepare"), secure=False, rounds=1)
    assert report["setup"]["sites_failed"] == {f"node {ATTACKER}": "malformed prepare reply"}
    assert report["clients"] == 2
    assert not [
        m
        for m in grid.sent
        if m.metadata.dst_node_id == ATTACKER and m.metadata.message_type == "train"
    ]
    assert any(
        str(ATTACKER) in r.getMessage() and "malformed" in r.getMessage() for r in caplog.records
    )


def test_a_malformed_evaluate_reply_is_left_out_of_the_federated_metrics(
    offline_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tmp = offline_world
    report, grid = _attacked(tmp, adv.empty_reply("evaluate"), secure=False, rounds=1)
    honest_val = _val_examples(grid, exclude=ATTACKER)
    for r in report["rounds"]:
        assert r["aggregated"] and r["eval_examples"] == honest_val
        assert r["rejected_sites"] == {str(ATTACKER): "malformed"}
    assert _named(caplog, "evaluate", "malformed")


def _declared_val(grid: LoopbackGrid) -> dict[int, int]:
    """Each site's validation count, as it declared it when the run started."""
    prepared = [r for r in grid.replies if r.metadata.message_type == "query.prepare"]
    return {
        r.metadata.src_node_id: PrepareReply.from_mapping(
            r.content.config_records[RECORD_PREPARE]
        ).val_examples
        for r in prepared
    }


def _val_examples(grid: LoopbackGrid, exclude: int) -> int:
    """The validation counts the honest sites declared when the run started."""
    return sum(n for node, n in _declared_val(grid).items() if node != exclude)


def _reshape_first(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [parts[0], parts[1].reshape(-1), *parts[2:]]


def _as_float(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [p.astype(np.float64) for p in parts]


@pytest.mark.parametrize(
    "change",
    [_reshape_first, lambda p: p[:-1], lambda p: None, _as_float],
    ids=["wrong-shape", "short", "missing", "float"],
)
def test_a_malformed_masked_vector_is_dropped_and_its_masks_removed(
    offline_world: Path,
    caplog: pytest.LogCaptureFixture,
    change: Callable[[list[np.ndarray]], list[np.ndarray] | None],
) -> None:
    tmp = offline_world
    report, _ = _attacked(tmp, adv.masked_vector(change), secure=True, rounds=1)
    (r,) = report["rounds"]
    # the honest sites' masks cancel only if the attacker's were removed as for a dropout
    assert r["aggregated"] and r["rejected_sites"] == {str(ATTACKER): "malformed"}
    assert r["sites_replied"] == 2 and r["sites_failed"] == 1
    assert _named(caplog, "SecAgg+", "malformed")
    honest = _honest_accuracy(tmp, True, rounds=1)
    assert abs(r["server_eval_accuracy"] - honest) <= TOLERANCE


# --- 4: self-reported example counts -------------------------------------------------------
@MODES
def test_a_site_claiming_more_examples_than_it_has_is_left_out(
    offline_world: Path, caplog: pytest.LogCaptureFixture, secure: bool
) -> None:
    tmp = offline_world
    # inner: under SecAgg+ the inflated count is also the weight the site masks
    report, _ = _attacked(tmp, adv.fit_claims(10**9), secure, inner=True)
    for r in report["rounds"]:
        assert r["aggregated"] and r["rejected_sites"] == {str(ATTACKER): "weight"}, r
        assert r["sites_failed"] == 1
    assert _named(caplog, "weight", "1000000000")
    _assert_honest_accuracy(tmp, report, secure)


def test_an_inflated_prepare_count_is_capped(
    offline_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tmp = offline_world
    report, _ = _attacked(
        tmp, adv.prepare_claims(10**9), secure=True, config={"max-site-examples": 1000}
    )
    # SecAgg+'s weight scale follows the capped counts, not the claim: max-site-examples,
    # then max-site-share (0.5): the attacker weighs no more than the two honest sites
    honest = [s["train_examples"] for s in report["setup"]["sites"] if s["node_id"] != ATTACKER]
    assert report["secure_aggregation_params"]["max_weight"] == float(sum(honest))
    assert all(r["aggregated"] and not r["rejected_sites"] for r in report["rounds"])
    assert any(f"node {ATTACKER} declares 1000000000" in r.getMessage() for r in caplog.records)
    # the site still trains on its real data and counts at most 1000: a fair share here
    _assert_honest_accuracy(tmp, report, True, 2 * TOLERANCE)


def _refused_masked_vector(
    tmp: Path, tamper: Callable[[list[np.ndarray]], list[np.ndarray]]
) -> ReportJson:
    """Run with the attacker's masked vector changed by ``tamper``: no round can aggregate.
    Returns the report written before the run failed."""
    with pytest.raises(FederationError, match="no round produced"):
        _attacked(tmp, adv.masked_vector(tamper), secure=True)
    return _report_after_failure(tmp)


def test_a_masked_weight_other_than_the_declared_count_is_refused(
    offline_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The site reports an honest count in the clear but adds to its masked weight."""
    tmp = offline_world

    def inflate_weight(parts: list[np.ndarray]) -> list[np.ndarray]:
        parts[0] = (parts[0] + 50 * QUANTIZATION) % 2**32
        return parts

    report = _refused_masked_vector(tmp, inflate_weight)
    for r in report["rounds"]:
        assert not r["aggregated"] and r["rejected_sites"] == {"0": "weight"}
    assert any("total weight" in r.getMessage() for r in caplog.records)


# --- 5: values SecAgg+ would otherwise hide -----------------------------------------------
def test_raw_integers_added_to_the_masked_vector_are_refused(
    offline_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tmp = offline_world

    def add_bias(parts: list[np.ndarray]) -> list[np.ndarray]:
        return [parts[0], *((p + 10 * QUANTIZATION) % 2**32 for p in parts[1:])]

    report = _refused_masked_vector(tmp, add_bias)
    for r in report["rounds"]:
        assert not r["aggregated"] and r["rejected_sites"] == {"0": "range"}
    assert any("outside the clipping range" in r.getMessage() for r in caplog.records)


# --- 6: federated evaluation --------------------------------------------------------------
@pytest.mark.parametrize("claimed", [10**9, None], ids=["inflated-count", "own-count"])
def test_a_site_reporting_perfect_accuracy_cannot_dominate(
    offline_world: Path, caplog: pytest.LogCaptureFixture, claimed: int | None
) -> None:
    tmp = offline_world
    report, grid = _attacked(tmp, adv.evaluation_claims(1.0, claimed), secure=False, rounds=1)
    (r,) = report["rounds"]
    honest_val = _val_examples(grid, exclude=ATTACKER)
    evals = _evaluations(grid.replies)
    if claimed:  # left out: the federated figures are the honest sites' alone
        assert r["rejected_sites"] == {str(ATTACKER): "weight"}
        assert r["eval_examples"] == honest_val
        assert _named(caplog, "evaluate", "weight")
        expected = _weighted([e for n, e in evals if n != ATTACKER])
    else:  # counted with the validation count it declared, no more
        attacker_val = _val_examples(grid, exclude=-1) - honest_val
        assert r["eval_examples"] == honest_val + attacker_val
        expected = _weighted([e for _, e in evals])
    assert r["eval_accuracy"] == pytest.approx(expected)
    assert r["eval_accuracy"] < 0.99


@MODES
def test_a_bad_evaluation_in_a_train_reply_leaves_out_that_evaluation_only(
    offline_world: Path, caplog: pytest.LogCaptureFixture, secure: bool
) -> None:
    """Round 1's head is evaluated in round 2's train messages: the attacker's claim of
    accuracy 1.5 there is refused; its training in round 2 still counts."""
    tmp = offline_world
    report, grid = _attacked(tmp, adv.evaluation_in_fit_claims(1.5), secure=secure, rounds=2)
    first, second = report["rounds"]
    honest_val = _val_examples(grid, exclude=ATTACKER)
    assert first["eval_examples"] == honest_val and 0 <= first["eval_accuracy"] <= 1
    assert first["rejected_sites"] == {str(ATTACKER): "malformed"}
    assert second["aggregated"] and second["sites_replied"] == 3, second
    assert report["initial_eval"]["eval_examples"] == honest_val
    assert _named(caplog, "evaluation accuracy 1.5")


def test_an_evaluation_nobody_asked_for_is_refused(
    offline_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One site in three is asked to evaluate in each round's train messages; the
    attacker adds a perfect evaluation to its train replies when it is not the one."""
    tmp = offline_world
    report, grid = _attacked(
        tmp,
        adv.unasked_evaluation(1.0, 5),
        secure=False,
        rounds=3,
        config={"fraction-evaluate": 0.1},
    )
    asked = {
        int(m.metadata.group_id): m.metadata.dst_node_id
        for m in grid.sent
        if m.metadata.message_type == "train"
        and compat.recorddict_to_fitins(m.content, keep_input=True).config["evaluate"]
    }
    assert sorted(asked) == [1, 2, 3]  # one site a round evaluates the head it trains from
    declared = _declared_val(grid)
    for row in [report["initial_eval"], *report["rounds"][:2]]:
        if asked[row["round"] + 1] == ATTACKER:  # it was asked: its own evaluation counts
            assert row["rejected_sites"] == {}, row
        else:
            assert row["rejected_sites"] == {str(ATTACKER): "malformed"}, row
            # only the asked site's evaluation counts, not the attacker's claimed one
            assert row["eval_examples"] == declared[asked[row["round"] + 1]], row
    if set(asked.values()) != {ATTACKER}:
        assert _named(caplog, "an evaluation not asked for")


def _evaluations(replies: list[Message]) -> list[tuple[int, tuple[int, float]]]:
    out = []
    for reply in replies:
        if reply.metadata.message_type == "evaluate" and reply.metadata.group_id == "1":
            res = compat.recorddict_to_evaluateres(reply.content)
            out.append(
                (reply.metadata.src_node_id, (res.num_examples, float(res.metrics["accuracy"])))
            )
    return out


def _weighted(pairs: list[tuple[int, float]]) -> float:
    return sum(n * a for n, a in pairs) / sum(n for n, _ in pairs)


# --- 7: SecAgg+ halts ---------------------------------------------------------------------
def test_a_run_where_secagg_halts_in_every_round_fails_and_counts_the_drops(
    offline_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two of three sites vanish after sharing their keys, in the run's only round."""
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)))
    trains: dict[str, int] = {}

    def vanish_at_collect(node: int, msg: Message) -> None:
        if node != 100 and msg.metadata.message_type == "train":
            key = f"{msg.metadata.group_id}/{node}"
            trains[key] = trains.get(key, 0) + 1
            if trains[key] == 3:  # the third SecAgg+ message: collect masked vectors
                grid.dead.add(node)

    grid.before_delivery = vanish_at_collect
    with pytest.raises(
        FederationError, match="secure aggregation halted at collect_masked_vectors"
    ):
        run(grid, tmp, **{"num-server-rounds": 1, "round-timeout": 1.0})
    (r,) = _report_after_failure(tmp)["rounds"]
    assert not r["aggregated"] and r["secagg_halted"] == "collect_masked_vectors"
    assert (r["sites_selected"], r["sites_replied"], r["sites_dropped"]) == (3, 1, 2), r
    assert any("stopped at stage collect_masked_vectors" in m.getMessage() for m in caplog.records)


def test_a_site_refuses_to_evaluate_heads_it_did_not_train_from(offline_world: Path) -> None:
    """A curious server sends a crafted head to count a site's classes: refused."""
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 2)))
    report = run(grid, tmp, **{"num-server-rounds": 1, "secure-aggregation": False})
    assert report["rounds"][0]["eval_examples"] > 0  # the honest evaluations were accepted
    always_first = [np.zeros((2, 1280), np.float32), np.array([10.0, -10.0], np.float32)]

    def probe(server_round: int) -> Message:
        ins = EvaluateIns(ndarrays_to_parameters(always_first), {"server_round": server_round})
        content = compat.evaluateins_to_recorddict(ins, True)
        return Message(content, dst_node_id=100, message_type="evaluate", group_id="probe")

    refused = ERROR_CODE_BASE + FederationError.exit_code  # RefusedHeadError is one
    for server_round in (0, 1, 2):  # before training, again for round 1, a future round
        (reply,) = grid.send_and_receive([probe(server_round)])
        assert reply.has_error() and reply.error.code == refused, reply.error


def test_garbage_unmask_shares_stop_the_round_name_the_site_and_leave_it_out(
    offline_world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Random bytes of the right length as a site's unmask-stage Shamir shares make
    Flower's share combination fail: the round stops cleanly (no crash, the reason in the
    report), the spare shares name the site, and the rest of the run goes on without it."""
    tmp = offline_world
    rng = np.random.default_rng(7)

    def garbage(shares: list[bytes]) -> list[bytes]:
        return [rng.bytes(len(s)) for s in shares]

    report, grid = _attacked(tmp, adv.unmask_shares(garbage), secure=True, rounds=3)
    first, *later = report["rounds"]
    assert first["secagg_halted"] == "unmask" and not first["aggregated"]
    assert "do not combine" in first["secagg_reason"]
    assert first["rejected_sites"] == {str(ATTACKER): "shares"}
    assert report["sites_excluded"] == {
        f"node {ATTACKER}": "sent SecAgg+ unmask shares that do not rebuild the keys they belong to"
    }
    assert _named(caplog, "left out of the rest of the run")
    for r in later:  # the honest two go on alone: the attacker gets no train message
        assert r["aggregated"] and r["sites_selected"] == 2, r
    trained = {m.metadata.dst_node_id for m in grid.sent if m.metadata.group_id == "3"}
    assert ATTACKER not in trained
