"""A site does not trust the run description or its own data files blindly."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedhead.client.app import app as client_app
from fedhead.client.site import Site, check_run_spec
from fedhead.common.backbones import get_spec
from fedhead.common.config import NodeConfig, RunConfig
from fedhead.common.errors import ConfigError, DataError, RunSpecError
from fedhead.common.images import LabeledImages
from fedhead.common.model import weights_ref
from fedhead.common.protocol import (
    MSG_PREPARE,
    MSG_WEIGHTS,
    PROTOCOL_VERSION,
    RECORD_RUN,
    RECORD_WEIGHTS,
    WEIGHTS_MISSING,
    RunSpec,
)
from fedhead.server.prepare import BackboneDistributor, SiteCaps
from fedhead.server.server_model import build_server_model, run_spec
from tests.conftest import write_png
from tests.loopback import LoopbackGrid

MOBILENET = get_spec("mobilenet_v2")
PLANTED = "../../outside-cache/planted.sh"


def _spec(**changes: Any) -> RunSpec:
    honest = RunSpec(
        protocol=PROTOCOL_VERSION,
        backbone=MOBILENET.name,
        weights_file=MOBILENET.weights_file,
        weights_sha256=MOBILENET.sha256,
        custom_weights=False,
        classes="normal,pneumonia",
        input_size=64,
        head="linear",
        head_hidden=8,
        head_dropout=0.0,
        unfreeze_blocks=0,
        augment_views=0,
        augment_flip=False,
        trainable_fingerprint="fp",
        val_fraction=0.2,
        seed=0,
        simulation_data="",
        dirichlet_alpha=0.5,
    )
    return dataclasses.replace(honest, **changes)  # any value: tests try wrong ones too


def _node(tmp: Path, data: Path, **extra: object) -> NodeConfig:
    return NodeConfig.from_mapping(
        {"data-path": str(data), "cache-dir": str(tmp / "node" / "cache"), **extra}
    )


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_dir()}


# --- the run description --------------------------------------------------------------
@pytest.mark.parametrize("custom", [False, True])
@pytest.mark.parametrize(
    "name",
    [PLANTED, "../../outside-cache/planted.pth", "/tmp/planted.pth", "weights/x.pth", ".x.pth"],
)
def test_unsafe_weights_names_are_refused_before_the_disk_is_touched(
    tmp_path: Path, image_folder: Path, name: str, custom: bool
) -> None:
    before = _files(tmp_path)
    spec = _spec(weights_file=name, custom_weights=custom, weights_sha256="ab" * 32)
    with pytest.raises(RunSpecError, match=r"weights_file .* is not the file name of") as err:
        Site(_node(tmp_path, image_folder), spec)
    assert "\n" not in str(err.value)
    assert _files(tmp_path) == before
    assert not (tmp_path / "node").exists()


def test_an_absolute_path_and_its_sha256_do_not_confirm_a_files_contents(
    tmp_path: Path, image_folder: Path
) -> None:
    secret = tmp_path / "elsewhere" / "secret.pth"
    secret.parent.mkdir()
    secret.write_bytes(b"patient list")
    sha = hashlib.sha256(secret.read_bytes()).hexdigest()
    spec = _spec(weights_file=str(secret), weights_sha256=sha, custom_weights=True)
    with pytest.raises(RunSpecError, match="is not the file name of a custom checkpoint"):
        Site(_node(tmp_path, image_folder), spec)


def test_the_sha256_and_the_custom_flag_must_agree_with_the_registry(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = "cd" * 32
    # a registered backbone's file with another content would overwrite the cached copy
    with pytest.raises(RunSpecError, match="not the registered sha256 of mobilenet_v2"):
        check_run_spec(_spec(weights_sha256=other))
    with pytest.raises(RunSpecError, match="not the file name of a custom checkpoint"):
        check_run_spec(_spec(weights_sha256=other, custom_weights=True))
    with pytest.raises(RunSpecError, match="64 lowercase hex"):
        check_run_spec(_spec(weights_sha256="../x", custom_weights=True))
    # a custom checkpoint under the name this fedhead version gives it is accepted
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch"))
    name = weights_ref(MOBILENET, other).filename
    site = Site(
        _node(tmp_path, image_folder),
        _spec(weights_file=name, weights_sha256=other, custom_weights=True),
    )
    assert site.weights_status() == WEIGHTS_MISSING


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"protocol": PROTOCOL_VERSION + 1},
            rf"protocol {PROTOCOL_VERSION + 1} \(this site speaks {PROTOCOL_VERSION}\)",
        ),
        ({"backbone": "../resnet"}, r"backbone '../resnet' is unknown here \(known: "),
        ({"input_size": 0}, r"input_size 0 is not in 1..1024"),
        ({"input_size": 100_000}, r"input_size 100000 is not in 1..1024"),
    ],
)
def test_other_run_description_fields_are_checked(changes: dict[str, object], message: str) -> None:
    with pytest.raises(RunSpecError, match=message):
        check_run_spec(_spec(**changes))


def test_another_protocol_version_is_refused_before_its_keys_are_read() -> None:
    record = {"protocol": PROTOCOL_VERSION + 1, "something": "new"}
    with pytest.raises(RunSpecError, match=f"protocol {PROTOCOL_VERSION + 1}, this site speaks"):
        RunSpec.from_mapping(record)
    with pytest.raises(RunSpecError, match="protocol \\(none\\)"):
        RunSpec.from_mapping({"backbone": "mobilenet_v2"})
    assert RunSpec.from_mapping(_spec().to_config()) == _spec()


# --- through the real ClientApp ---------------------------------------------------------
def test_a_malicious_server_cannot_plant_a_file_outside_the_site_cache(
    tmp_path: Path, image_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's own distribution code, fed a crafted RunSpec, against real ClientApps."""
    payload = b"#!/bin/sh\necho planted\n"
    planted = tmp_path / "server" / "planted.sh"
    planted.parent.mkdir()
    planted.write_bytes(payload)
    spec = _spec(
        weights_file=PLANTED,
        weights_sha256=hashlib.sha256(payload).hexdigest(),
        custom_weights=True,
    )
    node_configs = {
        100 + i: {"data-path": str(image_folder), "cache-dir": str(tmp_path / f"node{i}")}
        for i in range(2)
    }
    grid = LoopbackGrid(client_app, node_configs)
    before = _files(tmp_path)
    with caplog.at_level(logging.ERROR):
        outcome = BackboneDistributor(spec, planted, 30, SiteCaps(1000)).prepare(grid, [100, 101])
    assert outcome.ready == {} and outcome.weights_sent_to == ()
    assert set(outcome.failed) == {100, 101}
    for reason in outcome.failed.values():  # the server learns the kind of problem only
        assert reason == "RunSpecError: refused run description (details in the site's log)"
    site_lines = [r.getMessage() for r in caplog.records if r.name == "fedhead.client.mods"]
    assert len(site_lines) == 2
    for line in site_lines:
        assert line.startswith("refused run description: the server's run description is")
        assert f"weights_file {PLANTED!r} is not the file name of a custom checkpoint" in line

    # the server sends the bytes anyway: the sites were never prepared and refuse them
    push = [
        Message(
            content=RecordDict(
                {RECORD_WEIGHTS: ArrayRecord({"file": Array(np.frombuffer(payload, np.uint8))})}
            ),
            dst_node_id=node,
            message_type=MSG_WEIGHTS,
            group_id="prepare",
        )
        for node in (100, 101)
    ]
    replies = list(grid.send_and_receive(push, timeout=30))
    assert len(replies) == 2 and all(r.has_error() for r in replies)
    assert not (tmp_path / "outside-cache").exists()
    assert _files(tmp_path) == before  # nothing written anywhere, inside or outside


def test_a_server_of_another_protocol_version_is_refused_at_prepare(
    tmp_path: Path, image_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    grid = LoopbackGrid(
        client_app, {7: {"data-path": str(image_folder), "cache-dir": str(tmp_path / "c")}}
    )
    record = _spec().to_record()
    record["protocol"] = PROTOCOL_VERSION + 1
    msg = Message(
        content=RecordDict({RECORD_RUN: record}),
        dst_node_id=7,
        message_type=MSG_PREPARE,
        group_id="prepare",
    )
    with caplog.at_level(logging.ERROR):
        (reply,) = grid.send_and_receive([msg], timeout=30)
    assert reply.has_error() and "RunSpecError" in (reply.error.reason or "")
    assert f"fedhead protocol {PROTOCOL_VERSION + 1}, this site speaks" in caplog.text
    assert not (tmp_path / "c").exists()


# --- the node's data options ----------------------------------------------------------------
def test_data_roots_let_a_site_follow_symlinks_into_named_folders(
    tmp_path: Path, image_folder: Path
) -> None:
    shared = tmp_path / "shared"
    write_png(shared / "extra.png", np.full((16, 16), 9, np.uint8))
    (image_folder / "normal" / "extra.png").symlink_to(shared / "extra.png")
    with pytest.raises(DataError, match="lead outside the data folder"):
        Site(_node(tmp_path, image_folder), _spec()).data()
    site = Site(_node(tmp_path, image_folder, **{"data-roots": str(shared)}), _spec())
    assert len(site.data().train) + len(site.data().val) == 21
    with pytest.raises(ConfigError, match="data-roots: folders must be absolute paths"):
        _node(tmp_path, image_folder, **{"data-roots": "shared"})


def test_a_site_counts_images_above_its_pixel_limit_as_unreadable(
    tmp_path: Path, image_folder: Path, mobilenet_weights: Path
) -> None:
    cfg = RunConfig.from_mapping({"classes": "normal,pneumonia", "input-size": 32})
    spec = run_spec(cfg, build_server_model(cfg))
    write_png(image_folder / "normal" / "big.png", np.zeros((120, 150), np.uint8))  # 18000 px
    site = Site(_node(tmp_path, image_folder, **{"max-image-pixels": 10_000}), spec)
    data = site.data()
    part = "train" if any("big.png" in str(p) for p in _paths(data.train)) else "val"
    _, labels, stats = site.features(part)
    assert stats.skipped == 1 and len(labels) == len(getattr(data, part)) - 1
    assert "150x120 pixels is larger than the limit of 10000" in stats.skipped_examples[0]


def _paths(part: LabeledImages) -> list[str]:
    return [part.images.describe(i) for i in range(len(part))]


@pytest.mark.parametrize("mu", [-1.0, float("nan"), float("inf"), 1e6])
def test_a_site_refuses_a_proximal_mu_it_cannot_train_with(mu: float) -> None:
    from fedhead.common.errors import FederationError
    from fedhead.common.model import TensorSpec, TrainableSet
    from fedhead.common.protocol import FitSettings
    from fedhead.server.server_model import fit_settings

    cfg = RunConfig.from_mapping({"classes": "a,b", "input-size": 64})
    sent = fit_settings(cfg, TrainableSet((TensorSpec("head.w", (2, 2), "float32"),))).to_config()
    assert FitSettings.from_mapping(sent).proximal_mu == 0.0
    with pytest.raises(FederationError, match="proximal_mu"):
        FitSettings.from_mapping({**sent, "proximal_mu": mu})
