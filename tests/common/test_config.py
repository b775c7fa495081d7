from __future__ import annotations

import tomllib

import pytest

from fedhead.common.config import NodeConfig, RunConfig
from fedhead.common.errors import ConfigError
from fedhead.common.protocol import FitSettings
from tests.conftest import REPO


def test_defaults_and_overrides() -> None:
    cfg = RunConfig.from_mapping({"classes": "a,b", "num-server-rounds": 3, "learning-rate": 1})
    assert cfg.num_server_rounds == 3 and cfg.learning_rate == 1.0
    assert cfg.class_names() == ["a", "b"]
    assert cfg.resolved_input_size() == 224  # mobilenet_v2's default


def test_all_problems_are_reported_together_each_naming_its_key() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(
            {
                "classes": "only-one",
                "num-server-rouns": 5,
                "batch-size": "64",
                "learning-rate": -1.0,
                "head": "transformer",
            }
        )
    problems = err.value.problems
    text = str(err.value)
    assert len(problems) == 5, problems
    assert "num-server-rouns: unknown key (did you mean 'num-server-rounds'?)" in text
    assert "batch-size: expected int, got str" in text
    assert "learning-rate: must be > 0" in text
    assert "head: must be one of linear, mlp" in text
    assert "classes:" in text
    assert "\n" not in text


def test_cross_checks() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({"classes": "a,b", "backbone": "vgg", "backbone-weights": "/x"})
    text = str(err.value)
    assert "unknown backbone 'vgg'" in text and "mobilenet_v2" in text
    assert "backbone-sha256" in text
    with pytest.raises(ConfigError, match="only accepts 224"):
        RunConfig.from_mapping({"classes": "a,b", "backbone": "vit_b_16", "input-size": 128})


def test_bool_is_not_an_int() -> None:
    with pytest.raises(ConfigError, match="expected int, got bool"):
        RunConfig.from_mapping({"classes": "a,b", "seed": True})


def test_node_config() -> None:
    node = NodeConfig.from_mapping({"data-path": "/d", "device": "cpu"})
    assert not node.simulated
    sim = NodeConfig.from_mapping({"partition-id": 1, "num-partitions": 3})
    assert sim.simulated
    with pytest.raises(ConfigError, match="data-pth: unknown key"):
        NodeConfig.from_mapping({"data-pth": "/d"})


def test_pyproject_run_config_lists_every_key_with_runconfig_defaults() -> None:
    """`flwr run --run-config` can only override keys present in pyproject.toml."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert sorted(table) == sorted(RunConfig.keys())
    demo_overrides = {"classes", "input-size"}
    defaults = RunConfig().to_mapping()
    for key, value in table.items():
        if key not in demo_overrides:
            assert value == defaults[key], key
    RunConfig.from_mapping(table)  # and the whole table is valid


def test_a_record_drawn_on_the_config_takes_its_keys_of_the_same_name() -> None:
    cfg = RunConfig.from_mapping({"classes": "a,b", "local-epochs": 3, "proximal-mu": 0.5})
    given = {
        "trainable_fingerprint": "fp",
        "clipping_range": 0.0,
        "uniform_weight": False,
        "evaluate": False,
        "statistics": False,
        "resumes_run": False,
    }
    settings = FitSettings.drawing_on(cfg, server_round=2, **given)
    assert (settings.local_epochs, settings.proximal_mu, settings.server_round) == (3, 0.5, 2)
    overridden = FitSettings.drawing_on(cfg, server_round=2, local_epochs=7, **given)
    assert overridden.local_epochs == 7  # what is given wins over the config
    # what the config lacks must be given, even a field with a default: a field renamed
    # on one side must not quietly take its default
    with pytest.raises(TypeError, match="trainable_fingerprint"):
        FitSettings.drawing_on(cfg, server_round=2)
    with pytest.raises(TypeError, match="no value for evaluate"):
        FitSettings.drawing_on(
            cfg, server_round=2, **{k: v for k, v in given.items() if k != "evaluate"}
        )
    with pytest.raises(TypeError, match="has no field colour"):
        FitSettings.drawing_on(cfg, server_round=2, colour="red", **given)
