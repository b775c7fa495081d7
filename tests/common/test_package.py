"""The model package: round trip, atomic writes, and every refusal."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedhead.cli.inference import load_site_model
from fedhead.common import package as package_mod
from fedhead.common.errors import (
    ModelMismatchError,
    PackageError,
    PackageExistsError,
    PackageFormatError,
    WeightsMismatchError,
    WeightsNotFoundError,
)
from fedhead.common.model import TrainableSet
from fedhead.common.package import MODEL_CARD, MODEL_JSON, TENSORS_FILE, ModelPackage
from tests.packages import CARD, make_package, run_config


@pytest.fixture(scope="module")
def pkg(mobilenet_weights: Path) -> ModelPackage:
    return make_package(mobilenet_weights, train_steps=False)


def _edit_json(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads((folder / MODEL_JSON).read_text())
    change(doc)
    (folder / MODEL_JSON).write_text(json.dumps(doc))


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def test_round_trip_keeps_everything(tmp_path: Path, pkg: ModelPackage) -> None:
    dest = pkg.write(tmp_path / "model", card=CARD)
    assert sorted(p.name for p in dest.iterdir()) == [MODEL_CARD, TENSORS_FILE, MODEL_JSON]
    back = ModelPackage.load(dest)
    assert back == pkg  # every field but the tensors (compared below)
    assert list(back.tensors) == [t.name for t in pkg.architecture.tensors]
    for name, arr in pkg.tensors.items():
        np.testing.assert_array_equal(back.tensors[name], arr)
        assert back.tensors[name].dtype == arr.dtype
    doc = json.loads((dest / MODEL_JSON).read_text())
    assert doc["format_version"] == 1
    assert doc["backbone"]["sha256"] == pkg.backbone.sha256
    assert doc["backbone"]["install"] == "fedhead weights install mobilenet_v2"
    assert doc["preprocessing"]["input_size"] == 32
    assert doc["classes"] == ["normal", "pneumonia"]
    assert doc["training"]["class_counts"] == [32, 32]
    assert (dest / MODEL_CARD).read_text() == CARD


def test_package_never_holds_the_trunk(tmp_path: Path, pkg: ModelPackage) -> None:
    dest = pkg.write(tmp_path / "model", card=CARD)
    names = list(ModelPackage.load(dest).tensors)
    assert names and all(n.startswith("head.") for n in names)
    assert (dest / TENSORS_FILE).stat().st_size < 100_000  # a 2-class linear head: ~10 KB


def test_unfrozen_blocks_travel_in_the_package(tmp_path: Path, mobilenet_weights: Path) -> None:
    cfg = run_config(**{"unfreeze-blocks": 1, "head": "mlp", "head-hidden": 16})
    pkg = make_package(mobilenet_weights, cfg, train_steps=False)
    back = ModelPackage.load(pkg.write(tmp_path / "model", card=CARD))
    assert any(n.startswith("tuned.") for n in back.tensors)
    site = load_site_model(tmp_path / "model")
    assert TrainableSet.of(site.model).names == list(back.tensors)
    for name, p in site.model.named_parameters():
        if name in back.tensors:
            np.testing.assert_array_equal(p.detach().numpy(), back.tensors[name])


def test_existing_package_is_not_replaced_unless_asked(tmp_path: Path, pkg: ModelPackage) -> None:
    dest = pkg.write(tmp_path / "model", card=CARD)
    before = (dest / MODEL_JSON).read_bytes()
    with pytest.raises(PackageExistsError):
        pkg.write(dest, card=CARD)
    assert (dest / MODEL_JSON).read_bytes() == before
    pkg.write(dest, card=CARD, overwrite=True)
    assert _siblings(dest) == ["model"]  # no temporary or set-aside folder left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(PackageExistsError):  # a folder that is not a package is never replaced
        pkg.write(other, card=CARD, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"


def _fail_on_card(monkeypatch: pytest.MonkeyPatch) -> None:
    real = package_mod._write_synced

    def failing(path: Path, data: bytes) -> None:
        if path.name == MODEL_CARD:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(package_mod, "_write_synced", failing)


def test_failed_write_leaves_no_package(
    tmp_path: Path, pkg: ModelPackage, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_on_card(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        pkg.write(tmp_path / "model", card=CARD)
    assert list(tmp_path.iterdir()) == []


def test_failed_replace_keeps_the_previous_package(
    tmp_path: Path, pkg: ModelPackage, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = pkg.write(tmp_path / "model", card=CARD)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    _fail_on_card(monkeypatch)
    with pytest.raises(OSError):
        pkg.write(dest, card=CARD, overwrite=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert _siblings(dest) == ["model"]


def test_unknown_format_version_is_refused(tmp_path: Path, pkg: ModelPackage) -> None:
    dest = pkg.write(tmp_path / "model", card=CARD)
    _edit_json(dest, lambda d: d.update(format_version=2))
    with pytest.raises(PackageFormatError, match="format version 2"):
        ModelPackage.load(dest)


def test_altered_tensors_file_is_refused(tmp_path: Path, pkg: ModelPackage) -> None:
    dest = pkg.write(tmp_path / "model", card=CARD)
    blob = bytearray((dest / TENSORS_FILE).read_bytes())
    blob[-1] ^= 0x01  # one bit of one weight
    (dest / TENSORS_FILE).write_bytes(bytes(blob))
    with pytest.raises(PackageError, match="sha256"):
        ModelPackage.load(dest)


def test_tampered_head_shape_is_refused(tmp_path: Path, pkg: ModelPackage) -> None:
    """A consistent but reshaped package (tensors and model.json both edited) still
    does not fit its architecture."""
    from safetensors.numpy import save

    dest = pkg.write(tmp_path / "model", card=CARD)
    tensors = dict(pkg.tensors)
    tensors["head.0.weight"] = np.zeros((2, 1000), np.float32)
    blob = save(tensors)
    (dest / TENSORS_FILE).write_bytes(blob)

    def reshape(d: dict[str, Any]) -> None:
        d["tensors_sha256"] = hashlib.sha256(blob).hexdigest()

    _edit_json(dest, reshape)
    with pytest.raises(ModelMismatchError, match=r"head.0.weight: shape \(2, 1000\)"):
        ModelPackage.load(dest)

    def describe_it_too(d: dict[str, Any]) -> None:
        d["architecture"]["tensors"][0]["shape"] = [2, 1000]

    _edit_json(dest, describe_it_too)
    ModelPackage.load(dest)  # self-consistent files ...
    with pytest.raises(ModelMismatchError, match="do not fit"):
        load_site_model(dest)  # ... but not the model this fedhead builds


def test_classes_that_do_not_match_the_head_are_refused(tmp_path: Path, pkg: ModelPackage) -> None:
    dest = pkg.write(tmp_path / "model", card=CARD)
    _edit_json(dest, lambda d: d.update(classes=["a", "b", "c"]))
    with pytest.raises(ModelMismatchError, match="2 outputs but the package names 3 classes"):
        ModelPackage.load(dest)


def test_malformed_description_is_refused(tmp_path: Path, pkg: ModelPackage) -> None:
    dest = pkg.write(tmp_path / "model", card=CARD)
    _edit_json(dest, lambda d: d.pop("architecture"))
    with pytest.raises(PackageError, match="malformed"):
        ModelPackage.load(dest)
    (dest / MODEL_JSON).write_text("{not json")
    with pytest.raises(PackageError, match="not readable JSON"):
        ModelPackage.load(dest)
    with pytest.raises(PackageError, match="not a model package folder"):
        ModelPackage.load(tmp_path / "nowhere")


def test_wrong_trunk_sha256_is_refused(
    tmp_path: Path, pkg: ModelPackage, mobilenet_weights: Path
) -> None:
    dest = pkg.write(tmp_path / "model", card=CARD)
    # The package names a trunk with another sha256: the installed file does not match.
    _edit_json(dest, lambda d: d["backbone"].update(sha256="0" * 64))
    with pytest.raises(WeightsMismatchError, match="expected 0000000000000000"):
        load_site_model(dest)
    with pytest.raises(WeightsMismatchError):
        load_site_model(dest, weights=mobilenet_weights)


def test_missing_trunk_says_how_to_install_it(tmp_path: Path, pkg: ModelPackage) -> None:
    dest = pkg.write(tmp_path / "model", card=CARD)
    with pytest.raises(WeightsNotFoundError, match="fedhead weights install mobilenet_v2"):
        load_site_model(dest, search_dirs=[tmp_path / "empty"])
