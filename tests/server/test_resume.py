"""A run cut off after round 2 and resumed ends where an uninterrupted run ends; every
site keeps the final model (ServerApp and ClientApps in-process, loopback grid)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from fedhead.client.app import app as client_app
from fedhead.common.errors import ConfigError
from fedhead.common.protocol import MSG_MODEL
from fedhead.server.checkpoints import CheckpointStore
from fedhead.server.run import run_federation
from tests.loopback import RUN_ID, LoopbackGrid
from tests.reports import read_report
from tests.server.conftest import loopback_config, nodes, run, server_context, write_sites

pytestmark = pytest.mark.slow

PLAIN = {"num-server-rounds": 3, "secure-aggregation": False, "seed": 3}


class Crash(Exception):
    """The server going down in the middle of a run."""


def test_a_resumed_run_ends_with_the_uninterrupted_runs_head(offline_world: Path) -> None:
    tmp = offline_world
    sites = write_sites(tmp, 2)
    run(
        LoopbackGrid(client_app, nodes(tmp, sites)), tmp, **PLAIN, **{"out-dir": str(tmp / "whole")}
    )
    whole_head = CheckpointStore(tmp / "whole" / "checkpoints").load()
    assert whole_head.round == 3

    # the same run, cut off as round 3 starts
    grid = LoopbackGrid(client_app, nodes(tmp, sites))

    def crash_in_round_3(node: int, msg: Message) -> None:
        if msg.metadata.group_id == "3":
            raise Crash("server killed")

    grid.before_delivery = crash_in_round_3
    out = tmp / "cut"
    with pytest.raises(Crash):
        run(grid, tmp, **PLAIN, **{"out-dir": str(out)})
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "server killed" in status["reason"]
    assert status["rounds_done"] == 2
    assert not (out / "report.json").exists()

    # starting it again in the same out-dir without resume-from is refused
    with pytest.raises(ConfigError, match="resume-from"):
        run(LoopbackGrid(client_app, nodes(tmp, sites)), tmp, **PLAIN, **{"out-dir": str(out)})

    grid = LoopbackGrid(client_app, nodes(tmp, sites))
    report = run(grid, tmp, **PLAIN, **{"out-dir": str(out), "resume-from": str(out)})
    trained = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert {m.metadata.group_id for m in trained} == {"3"}  # rounds 1 and 2 were not redone
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert report["initial_eval"]["round"] == 0
    assert report["resumed_from"]["round"] == 2
    assert report["resumed_from"]["checkpoint"].endswith("round-0002.safetensors")
    resumed_head = CheckpointStore(out / "checkpoints").load()
    assert resumed_head.round == 3
    for a, b in zip(resumed_head.arrays, whole_head.arrays, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert report["final_eval_accuracy"] == pytest.approx(
        json.loads((tmp / "whole" / "report.json").read_text())["final_eval_accuracy"], abs=1e-6
    )
    assert json.loads((out / "status.json").read_text())["state"] == "finished"

    # delivery: every site verified and kept the server's final head
    sha = report["model"]["head_sha256"]
    assert sha == resumed_head.meta["head_sha256"]
    assert report["delivery"]["delivered_to"] == ["node 100", "node 101"]
    for i in range(2):
        kept = tmp / f"node{i}" / "models" / str(RUN_ID)
        described = json.loads((kept / "model.json").read_text())
        assert described["tensors_sha256"] == sha and described["training"]["rounds"] == 3
        assert described["backbone"]["sha256"] == report["backbone"]["sha256"]
        assert hashlib.sha256((kept / "head.safetensors").read_bytes()).hexdigest() == sha


def test_a_resume_with_another_model_setting_is_refused(offline_world: Path) -> None:
    tmp = offline_world
    sites = write_sites(tmp, 2)
    out = tmp / "out"
    grid = LoopbackGrid(client_app, nodes(tmp, sites))

    def crash_in_round_2(node: int, msg: Message) -> None:
        if msg.metadata.group_id == "2":
            raise Crash("server killed")

    grid.before_delivery = crash_in_round_2
    with pytest.raises(Crash):
        run(grid, tmp, **PLAIN)
    grid = LoopbackGrid(client_app, nodes(tmp, sites))
    with pytest.raises(ConfigError, match="head='linear' but this run has head='mlp'"):
        run(grid, tmp, **PLAIN, **{"resume-from": str(out), "head": "mlp"})
    assert grid.sent == []  # refused before any site heard of it


def test_a_run_cut_off_during_delivery_is_finished_and_the_model_sent_only_where_missing(
    offline_world: Path,
) -> None:
    """The server goes down while it delivers the final model: one site kept it, the
    other never got it. Resuming the run finishes it (package, report, status) without
    training again, and sends the model to the site that lacks it only."""
    tmp = offline_world
    sites = write_sites(tmp, 2)
    out = tmp / "cut"
    grid = LoopbackGrid(client_app, nodes(tmp, sites))

    def crash_during_delivery(node: int, msg: Message) -> None:
        if msg.metadata.message_type == MSG_MODEL and node == 101:
            raise Crash("SuperLink killed during delivery")

    grid.before_delivery = crash_during_delivery
    with pytest.raises(Crash):
        run(grid, tmp, **PLAIN, **{"out-dir": str(out)})
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
    assert (tmp / "node0" / "models" / str(RUN_ID) / "model.json").is_file()
    assert not (tmp / "node1" / "models" / str(RUN_ID)).exists()

    finishing = 5151  # the run that finishes it has an id of its own
    grid = LoopbackGrid(client_app, nodes(tmp, sites), run_id=finishing)
    cfg = loopback_config(tmp, **PLAIN, **{"out-dir": str(out), "resume-from": str(out)})
    context = server_context(finishing)
    run_federation(grid, context, cfg)
    assert not [m for m in grid.sent if m.metadata.message_type == "train"]  # no round again
    sent = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == MSG_MODEL]
    assert sent == [101]  # node 100 said it holds the model
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["run_id"] == RUN_ID
    report = read_report(out)
    assert report["run_id"] == RUN_ID and [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert report["resumed_from"]["finished_by_run"] == finishing
    sha = report["model"]["head_sha256"]
    for i in range(2):
        kept = tmp / f"node{i}" / "models" / str(RUN_ID) / "head.safetensors"
        assert hashlib.sha256(kept.read_bytes()).hexdigest() == sha

    # once finished, resuming it again is refused with what to do instead
    with pytest.raises(ConfigError, match="deliver-from="):
        run_federation(LoopbackGrid(client_app, nodes(tmp, sites), run_id=6161), context, cfg)
