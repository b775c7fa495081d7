"""A site that misses the end-of-run model gets it later, over the loopback Grid with the
real ClientApp: from the next run's prepare stage, or from a delivery-only run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message

from fedhead.client.app import app as client_app
from fedhead.client.models import SiteModels
from fedhead.common.config import RunConfig
from fedhead.common.errors import PackageError
from fedhead.common.protocol import MSG_MODEL, MSG_MODELS, ModelRequest
from fedhead.server.delivery import ModelDelivery, deliver_only, finished_run
from fedhead.server.run import run_federation
from fedhead.server.rundir import RunDir
from tests.loopback import LoopbackGrid
from tests.reports import read_report
from tests.server.conftest import CLASSES, nodes, server_context, write_sites

FIRST, SECOND = 4242, 5151


def config(tmp: Path, run_id: int, **overrides: object) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "classes": CLASSES,
            "input-size": 64,
            "strategy": "fedavg",
            "num-server-rounds": 2,
            "min-sites": 2,
            "round-timeout": 5.0,
            "join-timeout": 5.0,
            "out-dir": str(tmp / "runs" / f"run-{run_id}"),
            **overrides,
        }
    )


def site_listing(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """What `fedhead models --json` shows the site's IT."""
    from fedhead.cli.main import main

    capsys.readouterr()
    assert main(["models", "--cache-dir", str(cache_dir), "--json"]) == 0
    listing: dict[str, Any] = json.loads(capsys.readouterr().out)
    return listing


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def first_run_missing_node_101(tmp: Path, node_cfgs: dict[int, dict[str, Any]]) -> Path:
    """Run FIRST with nodes 100 and 101; 101 goes offline just before the model is sent."""
    grid = LoopbackGrid(client_app, node_cfgs, run_id=FIRST)

    def offline_at_the_end(node: int, msg: Message) -> None:
        if node == 101 and msg.metadata.message_type == MSG_MODEL:
            grid.dead.add(101)

    grid.before_delivery = offline_at_the_end
    cfg = config(tmp, FIRST)
    run_federation(grid, server_context(FIRST), cfg)
    report = read_report(Path(cfg.out_dir))
    assert report["delivery"]["delivered_to"] == ["node 100"]
    assert list(report["delivery"]["failed"]) == ["node 101"]
    assert not SiteModels(tmp / "node1").holds_model(FIRST)
    return Path(cfg.out_dir)


def check_same_package(server_out: Path, site_cache: Path) -> None:
    """The site holds exactly the package the server wrote (head and model.json)."""
    kept = site_cache / "models" / str(FIRST)
    for name in ("head.safetensors", "model.json"):
        assert sha256(kept / name) == sha256(server_out / "model" / name)
    status = json.loads((server_out / "status.json").read_text())
    record = SiteModels(site_cache).run(FIRST)
    assert record is not None and record.model_sha256 == status["model_sha256"]


@pytest.mark.slow
def test_a_site_offline_at_the_end_gets_the_model_in_the_next_runs_prepare(
    offline_world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = offline_world
    node_cfgs = nodes(tmp, write_sites(tmp, 2))
    first_out = first_run_missing_node_101(tmp, node_cfgs)
    # the site knows what it lacks: the run, and the head it trained from as proof
    missing = SiteModels(tmp / "node1").missing()
    assert [r.run_id for r in missing] == [FIRST]
    listing = site_listing(tmp / "node1", capsys)
    assert listing["held"] == [] and [m["run_id"] for m in listing["missing"]] == [FIRST]

    grid = LoopbackGrid(client_app, node_cfgs, run_id=SECOND)
    cfg = config(tmp, SECOND, **{"num-server-rounds": 1})
    run_federation(grid, server_context(SECOND), cfg)
    report = read_report(Path(cfg.out_dir))
    assert report["earlier_models"][str(FIRST)]["delivered_to"] == [101]
    check_same_package(first_out, tmp / "node1")
    assert SiteModels(tmp / "node1").missing() == []
    listing = site_listing(tmp / "node1", capsys)
    status = json.loads((first_out / "status.json").read_text())
    assert [(m["run_id"], m["head_sha256"]) for m in listing["held"]] == [
        (str(FIRST), status["model_sha256"]),
        (str(SECOND), report["model"]["head_sha256"]),
    ]
    assert listing["missing"] == []
    # the first run's out-dir records the later delivery
    lines = (first_out / RunDir.DELIVERIES).read_text().splitlines()
    assert [json.loads(line)["delivered_to"] for line in lines] == [[101]]
    assert json.loads(lines[0])["by_run"] == SECOND
    # the second run delivered its own model to both, as usual
    assert report["delivery"]["delivered_to"] == ["node 100", "node 101"]


@pytest.mark.slow
def test_a_delivery_only_run_sends_the_model_to_the_site_that_lacks_it(
    offline_world: Path,
) -> None:
    tmp = offline_world
    sites = write_sites(tmp, 3)
    node_cfgs = nodes(tmp, sites[:2])
    first_out = first_run_missing_node_101(tmp, node_cfgs)
    held_before = sha256(tmp / "node0" / "models" / str(FIRST) / "head.safetensors")
    outsider = nodes(tmp, sites)[102]  # connected now, never trained in the first run
    grid = LoopbackGrid(client_app, {**node_cfgs, 102: outsider}, run_id=SECOND)
    cfg = config(tmp, SECOND, **{"deliver-from": str(first_out), "min-sites": 3})
    entry = deliver_only(grid, server_context(SECOND), cfg)

    assert entry["delivered_to"] == [101]
    assert entry["already_held"] == [100]
    assert entry["not_trained"] == [102]
    check_same_package(first_out, tmp / "node1")
    assert not (tmp / "node2" / "models").exists()
    # the site that held it was not sent it again, and its copy is untouched
    model_msgs = [m for m in grid.sent if m.metadata.message_type == MSG_MODEL]
    assert [m.metadata.dst_node_id for m in model_msgs] == [101]
    assert sha256(tmp / "node0" / "models" / str(FIRST) / "head.safetensors") == held_before
    # pushed anyway (a server that skips the checks), the outsider refuses to keep it
    run = finished_run(RunDir(first_out))
    pushed = ModelDelivery(5.0).deliver(grid, [102], run.description, run.package_dir)
    assert "FederationError" in pushed.failed[102] and not (tmp / "node2" / "models").exists()
    assert {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == MSG_MODELS} == {
        100,
        101,
        102,
    }
    # a second delivery finds every site served
    third = SECOND + 1
    grid = LoopbackGrid(client_app, node_cfgs, run_id=third)
    again = deliver_only(
        grid, server_context(third), config(tmp, third, **{"deliver-from": str(first_out)})
    )
    assert again["delivered_to"] == [] and again["already_held"] == [100, 101]


@pytest.mark.slow
def test_a_request_without_proof_gets_nothing_and_a_tampered_package_is_not_sent(
    offline_world: Path,
) -> None:
    tmp = offline_world
    node_cfgs = nodes(tmp, write_sites(tmp, 2))
    first_out = first_run_missing_node_101(tmp, node_cfgs)
    # node 101 forges its proof: a head the first run never trained from
    shelf = SiteModels(tmp / "node1")
    record = shelf.run(FIRST)
    assert record is not None
    shelf.trained(FIRST, record.run_spec(), 99, "e" * 64)
    assert shelf.missing() == [ModelRequest(FIRST, "e" * 64)]
    cfg = config(tmp, SECOND, **{"deliver-from": str(first_out)})
    grid = LoopbackGrid(client_app, node_cfgs, run_id=SECOND)
    entry = deliver_only(grid, server_context(SECOND), cfg)
    assert entry["refused"] == [101] and entry["delivered_to"] == []
    assert not shelf.holds_model(FIRST)

    # a package altered on the server's disk since the run is refused before any offer
    head = first_out / "model" / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 1
    head.write_bytes(bytes(data))
    with pytest.raises(PackageError):
        finished_run(RunDir(first_out))
    with pytest.raises(PackageError, match="no finished run"):
        finished_run(RunDir(tmp / "runs"))


def test_a_delivery_only_run_refuses_a_folder_without_a_finished_run(tmp_path: Path) -> None:
    from fedhead.common.errors import ConfigError

    with pytest.raises(ConfigError, match="deliver-from"):
        config(tmp_path, 1, **{"deliver-from": "a", "resume-from": "b"})
    cfg = config(tmp_path, 1, **{"deliver-from": str(tmp_path)})
    with pytest.raises(PackageError, match="no finished run"):
        deliver_only(LoopbackGrid(client_app, {}, run_id=7), server_context(7), cfg)
