"""ServerApp logic and ClientApp together, in one process, over a loopback Grid."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from fedhead.client.app import app as client_app
from fedhead.common import demo_data
from fedhead.common.config import RunConfig
from fedhead.common.errors import FederationError, WeightsError
from fedhead.common.evaluation import ECE_BINS
from fedhead.common.pooled import SCORE_BINS, STAT_KEYS
from fedhead.common.protocol import MSG_WEIGHTS, RECORD_MODEL_REPLY
from tests.loopback import LoopbackGrid
from tests.reports import BackboneJson, ReportJson, RoundJson, SetupJson, SetupSiteJson
from tests.server.conftest import CLASSES, loopback_config, nodes, run, server_context, write_sites


def test_a_run_distributes_the_backbone_trains_and_reports(offline_world: Path) -> None:
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 2)))
    report = run(grid, tmp)

    # the sites lacked the trunk: the server sent it once, they verified and cached it
    assert sorted(report["setup"]["backbone_sent_to"]) == ["node 100", "node 101"]
    for i in range(2):
        assert (tmp / f"node{i}" / "weights" / "mobilenet_v2-b0353104.pth").is_file()
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    acc = [r["eval_accuracy"] for r in rounds]
    assert acc[-1] > 0.6 and acc[-1] >= acc[0]
    assert report["final_eval_accuracy"] == acc[-1]
    for r in rounds:  # clinical metrics pooled from both sites' count tables
        confusion = np.array(r["eval_confusion"])
        assert confusion.sum() == r["eval_examples"] == r["eval_statistics_examples"]
        assert np.trace(confusion) / confusion.sum() == pytest.approx(r["eval_accuracy"])
        assert set(r["eval_metrics"]) == {
            "auroc",
            "balanced_accuracy",
            "sensitivity",
            "specificity",
            "ece",
        }
        assert 0.5 < r["eval_metrics"]["auroc"] <= 1.0
        sens = confusion[1, 1] / confusion[1].sum()
        assert r["eval_metrics"]["sensitivity"] == pytest.approx(sens)
        assert r["eval_statistics_refused"] == 0
    backbone = report["backbone"]
    assert backbone["head_params"] == 1280 * 2 + 2 and backbone["head_bytes"] == 4 * 2562
    assert backbone["trunk_params"] == 2_223_872
    for r in rounds:
        assert r["bytes_to_sites"] > 2 * backbone["head_bytes"]
        assert r["bytes_to_sites"] < 20 * backbone["head_bytes"]

    # report.json holds exactly what its typed view names (tests/reports.py)
    assert set(report) == set(ReportJson.__annotations__)
    assert set(backbone) == set(BackboneJson.__annotations__)
    assert set(report["setup"]) == set(SetupJson.__annotations__)
    assert [set(s) for s in report["setup"]["sites"]] == [set(SetupSiteJson.__annotations__)] * 2
    assert all(set(r) == set(RoundJson.__annotations__) for r in [report["initial_eval"], *rounds])

    # a second run finds the cached copies: no transfer
    grid2 = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 2)))
    report2 = run(grid2, tmp, **{"num-server-rounds": 1, "out-dir": str(tmp / "out2")})
    assert report2["setup"]["backbone_sent_to"] == []
    assert not any(m.metadata.message_type == MSG_WEIGHTS for m in grid2.sent)


def _check_replies(replies: list[Message], n_trainable: int, secure: bool) -> None:
    """Sites send trainable tensors (masked under SecAgg+), scalars and the fixed-size
    count tables of pooled metrics, nothing else."""
    for reply in replies:
        content = reply.content
        for name, rec in content.array_records.items():
            assert name == "fitres.parameters", name
            # under SecAgg+ the plain tensors are removed: only the masked vector leaves
            assert len(rec) == (0 if secure else n_trainable)
            assert sum(len(a.data) for a in rec.values()) < 11_000
        scalars: list[tuple[str, MetricRecord | ConfigRecord]] = [
            *content.metric_records.items(),
            *content.config_records.items(),
        ]
        for name, record in scalars:
            for key, value in record.items():
                if name == RECORD_KEY_CONFIGS:  # SecAgg+ keys, shares, masked sums
                    assert secure
                    continue
                if name == RECORD_MODEL_REPLY:  # the sha256 of the final model it kept
                    assert isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value), value
                    continue
                if key in STAT_KEYS:  # pooled-metrics count tables: size fixed by 2 classes
                    # in an evaluation: its own reply, or a train reply evaluating its head
                    assert name in ("evaluateres.metrics", "fitres.metrics"), name
                    most = 8 * (2 * 2 + 2 * 2 * SCORE_BINS + 3 * ECE_BINS)
                    assert isinstance(value, bytes) and len(value) <= most, key
                    continue
                assert isinstance(value, int | float | str), (key, value)
                assert not isinstance(value, str) or len(value) < 64, (key, value)


@pytest.mark.parametrize("secure", [False, True])
def test_sites_send_only_trainable_tensors_and_scalars(offline_world: Path, secure: bool) -> None:
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 2)))
    report = run(grid, tmp, **{"num-server-rounds": 2, "secure-aggregation": secure})
    assert report["secure_aggregation"] == ("secagg+" if secure else "none")
    _check_replies(grid.replies, len(report["backbone"]["trainable_tensors"]), secure)
    masked = [
        r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        for r in grid.replies
        if RECORD_KEY_CONFIGS in r.content.config_records
        and Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]
    ]
    assert len(masked) == (4 if secure else 0)  # 2 sites x 2 rounds


def test_a_mismatching_local_copy_is_replaced_by_the_servers(offline_world: Path) -> None:
    tmp = offline_world
    bad = tmp / "node0" / "weights" / "mobilenet_v2-b0353104.pth"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"tampered weights")
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 2)))
    report = run(grid, tmp, **{"num-server-rounds": 1})
    assert "node 100" in report["setup"]["backbone_sent_to"]
    assert bad.read_bytes() != b"tampered weights"


def test_a_site_with_bad_data_is_left_out_and_named(offline_world: Path) -> None:
    tmp = offline_world
    sites = write_sites(tmp, 3)
    cfgs = nodes(tmp, sites)
    cfgs[102]["data-path"] = str(tmp / "no-such-folder")
    report = run(LoopbackGrid(client_app, cfgs), tmp, **{"num-server-rounds": 1})
    failed = report["setup"]["sites_failed"]
    assert list(failed) == ["node 102"]
    assert failed["node 102"] == "DataError: data problem (details in the site's log)"  # no paths
    assert report["clients"] == 2

    with pytest.raises(FederationError, match="only 2 of 3 site"):
        run(LoopbackGrid(client_app, cfgs), tmp, **{"min-sites": 3, "out-dir": str(tmp / "o2")})


# SecAgg+ sends four train messages per round: setup, share keys, collect masked
# vectors (the one that trains), unmask. A site can die before or after sharing keys.
@pytest.mark.parametrize(
    ("secure", "dies_at_message"),
    [(False, 1), (True, 1), (True, 3)],
    ids=["plain", "secagg-before-sharing-keys", "secagg-while-training"],
)
def test_a_site_that_dies_mid_run_does_not_stop_it(
    offline_world: Path, secure: bool, dies_at_message: int
) -> None:
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 3)))
    seen: list[int] = []

    def kill_in_round_2(node: int, msg: Message) -> None:
        if node == 102 and msg.metadata.group_id == "2" and msg.metadata.message_type == "train":
            seen.append(1)
            if len(seen) == dies_at_message:
                grid.dead.add(102)

    grid.before_delivery = kill_in_round_2
    report = run(grid, tmp, **{"round-timeout": 1.0, "secure-aggregation": secure})
    rounds = report["rounds"]
    assert [r["sites_replied"] for r in rounds] == [3, 2, 2]
    assert rounds[1]["sites_dropped"] == 1 and rounds[1]["aggregated"]
    assert [r["sites_selected"] for r in rounds] == [3, 3, 2]


def test_unknown_run_config_key_fails_before_anything_starts() -> None:
    with pytest.raises(Exception, match="num-rounds: unknown key"):
        RunConfig.from_mapping({"classes": CLASSES, "num-rounds": 3})


def test_report_is_valid_json_without_nan(offline_world: Path) -> None:
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 2)))
    text_report = run(grid, tmp, **{"num-server-rounds": 1})
    assert math.isfinite(text_report["final_eval_accuracy"])
    assert "NaN" not in (tmp / "out" / "report.json").read_text()


def test_an_altered_trunk_on_the_server_stops_the_run_before_anything_is_sent(
    offline_world: Path, isolated_cache: Path
) -> None:
    path = isolated_cache / "weights" / "mobilenet_v2-b0353104.pth"
    altered = bytearray(path.read_bytes())
    altered[len(altered) // 3] ^= 0x01  # a single flipped bit
    path.write_bytes(bytes(altered))
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 2)))
    with pytest.raises(WeightsError, match="sha256"):
        run(grid, tmp)
    assert grid.sent == []


def test_a_custom_checkpoint_is_distributed_and_verified(
    offline_world: Path, random_checkpoint: tuple[Path, str]
) -> None:
    path, sha = random_checkpoint
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 2)))
    report = run(
        grid,
        tmp,
        **{"backbone-weights": str(path), "backbone-sha256": sha, "num-server-rounds": 1},
    )
    assert report["backbone"]["custom"] and report["backbone"]["sha256"] == sha
    assert sorted(report["setup"]["backbone_sent_to"]) == ["node 100", "node 101"]
    cached = tmp / "node0" / "weights" / report["backbone"]["weights_file"]
    assert cached.read_bytes() == path.read_bytes()


def test_the_final_global_head_makes_a_package_that_scores_the_reported_accuracy(
    offline_world: Path,
) -> None:
    """RunReport.final_arrays is the head after the last round: packaged and used at a
    site on the sites' validation images, it scores the federated evaluation exactly."""
    import json

    from fedhead.cli.inference import load_site_model, predict
    from fedhead.common.device import select_device
    from fedhead.common.images import ArrayImages
    from fedhead.common.package import ModelPackage, package_from_run
    from fedhead.server.model_card import model_card
    from fedhead.server.run import run_federation
    from fedhead.server.server_model import build_server_model

    tmp = offline_world
    sites = write_sites(tmp, 2)
    cfg = loopback_config(tmp, **{"num-server-rounds": 2})
    report = run_federation(LoopbackGrid(client_app, nodes(tmp, sites)), server_context(), cfg)
    assert "final_arrays" not in json.loads((tmp / "out" / "report.json").read_text())
    sm = build_server_model(cfg)
    assert not sm.trainable.problems(report.final_arrays)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(report.final_arrays, sm.trainable.get(sm.model), strict=True)
    )  # trained, not the initial head
    pkg = package_from_run(
        cfg, sm.model, report.final_arrays, report.training_summary(), report.final_metrics()
    )
    folder = pkg.write(tmp / "model", card=model_card(pkg))
    loaded = ModelPackage.load(folder)
    assert loaded.training.sites == 2 and loaded.training.rounds == 2
    assert loaded.training.examples == report.setup["train_examples"]
    assert loaded.metrics["federated_eval_accuracy"] == report.final_eval_accuracy

    site = load_site_model(folder)
    images, labels = [], []
    for path in sites:
        with np.load(path) as data:
            images.append(data["val_images"])
            labels.append(data["val_labels"])
    preds = predict(
        site, ArrayImages(np.concatenate(images), "val"), select_device("cpu"), progress=False
    )
    y = np.concatenate(labels)
    accuracy = float(np.mean(preds.predicted == y))
    assert accuracy == pytest.approx(report.final_eval_accuracy, abs=1e-9)


def test_clinical_statistics_follow_the_run_and_each_sites_choice(offline_world: Path) -> None:
    tmp = offline_world
    sites = nodes(tmp, write_sites(tmp, 2))
    sites[101]["evaluation-statistics"] = False  # this site shares loss and accuracy only
    test = demo_data.load("test")
    pick = np.concatenate([np.flatnonzero(test.labels == c)[:30] for c in (0, 1)])
    np.savez(tmp / "test.npz", images=test.images[pick], labels=test.labels[pick])
    server_test = {"num-server-rounds": 1, "server-test-data": str(tmp / "test.npz")}
    report = run(LoopbackGrid(client_app, sites), tmp, **server_test)
    (r,) = report["rounds"]
    assert 0 < r["eval_statistics_examples"] < r["eval_examples"]  # site 100's tables only
    assert np.array(r["eval_confusion"]).sum() == r["eval_statistics_examples"]
    # the server's own test set: exact metrics each round, intervals for the final head
    final = report["server_test_evaluation"]
    assert final is not None and final["examples"] == 60
    auroc = final["metrics"]["auroc"]
    assert auroc["value"] == pytest.approx(r["server_eval_metrics"]["auroc"])
    assert auroc["ci95"][0] <= auroc["value"] <= auroc["ci95"][1]
    assert sum(map(sum, final["confusion_matrix"]["counts"])) == 60

    off = {"num-server-rounds": 1, "evaluation-statistics": False, "out-dir": str(tmp / "o2")}
    report = run(LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 2))), tmp, **off)
    (r,) = report["rounds"]
    assert r["eval_metrics"] == {} and r["eval_confusion"] == [] and r["eval_examples"] > 0


@pytest.mark.parametrize("fraction_train", [1.0, 0.5])
def test_each_round_is_evaluated_in_the_next_rounds_train_messages(
    offline_world: Path, fraction_train: float
) -> None:
    """When every site trains every round, a round's head is evaluated in the next
    round's train messages and only the last head by evaluate messages; otherwise every
    round has evaluate messages of its own. Every round has its evaluation either way."""
    tmp = offline_world
    grid = LoopbackGrid(client_app, nodes(tmp, write_sites(tmp, 2)))
    settings = {"num-server-rounds": 3, "secure-aggregation": False, "min-sites": 1}
    report = run(grid, tmp, **settings, **{"fraction-train": fraction_train})
    evaluated = {m.metadata.group_id for m in grid.sent if m.metadata.message_type == "evaluate"}
    trains = [
        compat.recorddict_to_fitins(m.content, keep_input=True).config
        for m in grid.sent
        if m.metadata.message_type == "train"
    ]
    assert len(trains) == (6 if fraction_train == 1.0 else 3)
    if fraction_train == 1.0:
        assert evaluated == {"3"}
        assert all(c["evaluate"] is True and c["statistics"] is True for c in trains)
    else:
        assert evaluated == {"0", "1", "2", "3"}
        assert not any(c["evaluate"] for c in trains)
    val = [site["val_examples"] for site in report["setup"]["sites"]]
    for row in [report["initial_eval"], *report["rounds"]]:
        # a site evaluates only the heads of rounds it trained in (one site a round at 0.5)
        expected = sum(val) if fraction_train == 1.0 or row["round"] == 0 else val[0]
        assert row["eval_examples"] == expected and 0 <= row["eval_accuracy"] <= 1, row
        assert row["eval_statistics_examples"] == expected
    assert report["final_eval_accuracy"] == report["rounds"][-1]["eval_accuracy"]


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_a_site_restarted_under_a_new_node_id_rejoins_from_the_next_round(
    offline_world: Path, secure: bool
) -> None:
    """A node killed mid-run comes back as a new node (Flower gives it a new id) with its
    data and cache: the server prepares it when it appears and it trains from then on."""
    tmp = offline_world
    cfgs = nodes(tmp, write_sites(tmp, 3))
    grid = LoopbackGrid(client_app, cfgs)

    def restart_102_after_round_1(node: int, msg: Message) -> None:
        if msg.metadata.group_id == "2" and 102 not in grid.dead:
            grid.dead.add(102)  # it dies ...
            config = {k: v for k, v in cfgs[102].items() if isinstance(v, str | int | float)}
            grid.contexts[103] = Context(  # ... and its node comes back under a new id
                grid.run_id, 103, node_config=config, state=RecordDict(), run_config={}
            )

    grid.before_delivery = restart_102_after_round_1
    report = run(grid, tmp, **{"num-server-rounds": 4, "secure-aggregation": secure})
    trained: dict[int, set[int]] = {}
    for m in grid.sent:
        if m.metadata.message_type == "train":
            trained.setdefault(int(m.metadata.group_id), set()).add(m.metadata.dst_node_id)
    assert 103 not in trained[2] and 103 in trained[3] and 103 in trained[4]
    joined = [s for s in report["setup"]["sites"] if s.get("joined")]
    assert [s["node_id"] for s in joined] == [103]
    assert all(r["aggregated"] for r in report["rounds"])
    assert report["rounds"][-1]["sites_replied"] == 3  # 100, 101 and the restarted 103
