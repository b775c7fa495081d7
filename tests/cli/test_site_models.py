"""`fedhead models` at a site: the models it holds (when made, rounds, accuracy), the runs
whose model it lacks and why, forgetting one; a demo's simulated sites keep theirs apart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedhead.cli.main import main
from fedhead.client.models import SiteModels
from fedhead.common.errors import ConfigError
from tests.client.test_untrusted_inputs import _spec
from tests.packages import CARD, make_package


def _age(shelf: SiteModels, run_id: int, hours: float) -> None:
    """Make the site's record of ``run_id`` as if it last trained ``hours`` ago."""
    path = shelf.run_file(run_id)
    doc = json.loads(path.read_text())
    doc["updated"] = time.time() - hours * 3600
    path.write_text(json.dumps(doc))


def test_a_run_trained_in_just_now_is_not_called_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    SiteModels(tmp_path).trained(31, _spec(), 2, "d" * 64)  # the run going on now
    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no model yet: trained in it 0 min ago" in out and "missing" not in out
    assert main(["models", "--cache-dir", str(tmp_path), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["missing"]
    assert entry["run_id"] == 31 and entry["state"] == "no model yet"


def test_a_missing_model_is_listed_until_the_site_forgets_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shelf = SiteModels(tmp_path)
    for rnd in (1, 2, 3, 5):
        shelf.trained(31, _spec(), rnd, "d" * 64)
    _age(shelf, 31, hours=30)
    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("31 "))
    assert "1-3,5" in row and "missing: the run ended while this site was offline" in row
    assert "--forget" in out

    assert main(["models", "--cache-dir", str(tmp_path), "--forget", "31"]) == 0
    assert "forgot run 31" in capsys.readouterr().out
    assert shelf.missing() == []
    assert main(["models", "--cache-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing"] == []

    assert main(["models", "--cache-dir", str(tmp_path), "--forget", "31"]) == ConfigError.exit_code
    assert "no record of run 31" in capsys.readouterr().err


def test_held_models_show_date_rounds_accuracy_and_a_cut_off_run_its_resumption(
    tmp_path: Path, mobilenet_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shelf = SiteModels(tmp_path)
    for rnd in (1, 2, 3):  # cut off during round 3 ...
        shelf.trained(40, _spec(), rnd, "a" * 64)
    _age(shelf, 40, hours=5)
    for rnd in (3, 4, 5):  # ... resumed from its round-2 checkpoint as run 41
        shelf.trained(41, _spec(), rnd, "b" * 64)
    pkg = make_package(mobilenet_weights, train_steps=False)  # 3 rounds, accuracy 0.75
    pkg.write(shelf.model_dir(41), card=CARD)
    shelf.trained(42, _spec(seed=9), 1, "c" * 64)  # another run, long ago
    _age(shelf, 42, hours=50)

    assert main(["models", "--cache-dir", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (held,) = doc["held"]
    assert held["run_id"] == "41" and held["rounds"] == 3 and held["accuracy"] == 0.75
    assert held["trained_rounds"] == [3, 4, 5] and held["created"] == pkg.created
    states = {m["run_id"]: (m["state"], m["resumed_as"]) for m in doc["missing"]}
    assert states == {40: ("resumed", 41), 42: ("missing", None)}

    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("41 "))
    assert "0.7500" in row and row.split()[3] == "3"  # run, date, time, rounds, accuracy
    assert "resumed as run 41, whose model is held" in out


def test_simulated_sites_keep_their_models_apart_from_a_real_sites(isolated_cache: Path) -> None:
    from fedhead.client.models import site_models_dir
    from fedhead.common.config import NodeConfig

    simulated = NodeConfig.from_mapping({"partition-id": 1, "num-partitions": 3})
    assert site_models_dir(simulated) == isolated_cache / "simulation" / "site-1"
    real = NodeConfig.from_mapping({"data-path": "/data/site"})
    assert site_models_dir(real) == isolated_cache  # `fedhead models` lists these
    chosen = NodeConfig.from_mapping({"partition-id": 1, "cache-dir": "/srv/site"})
    assert site_models_dir(chosen) == Path("/srv/site")
