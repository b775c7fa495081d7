"""MODEL_CARD.md as the server renders it for a run's package."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from fedhead.common.package import ModelPackage
from fedhead.server.model_card import model_card
from tests.packages import make_package


@pytest.fixture(scope="module")
def pkg(mobilenet_weights: Path) -> ModelPackage:
    return make_package(mobilenet_weights, train_steps=False)


def test_card_states_classes_counts_metrics_and_aggregation(pkg: ModelPackage) -> None:
    card = model_card(pkg)
    assert "Classes, in output order: `normal`, `pneumonia`." in card
    assert "normal: 32, pneumonia: 32" in card
    assert "| federated_eval_accuracy | 0.7500 |" in card
    assert "SecAgg+ secure aggregation" in card and "no differential privacy" in card
    assert f"sha256 `{pkg.backbone.sha256}`" in card


def test_card_says_what_is_not_known(pkg: ModelPackage) -> None:
    unknown = replace(
        pkg,
        training=replace(pkg.training, class_counts=None),
        metrics={"federated_eval_accuracy": math.nan},
    )
    card = model_card(unknown)
    assert "not known to the server" in card
    assert "| federated_eval_accuracy | not measured |" in card


def test_the_written_package_carries_the_card(tmp_path: Path, pkg: ModelPackage) -> None:
    dest = pkg.write(tmp_path / "model", card=model_card(pkg))
    assert (dest / "MODEL_CARD.md").read_text() == model_card(pkg)
