"""`fedhead models` at a site: the runs whose model it lacks, and forgetting one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedhead.cli.main import main
from fedhead.client.models import SiteModels
from fedhead.common.errors import ConfigError
from tests.client.test_untrusted_inputs import _spec


def test_a_run_without_a_model_is_listed_until_the_site_forgets_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shelf = SiteModels(tmp_path)
    shelf.trained(31, _spec(), 2, "d" * 64)
    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run 31" in out and "trained in rounds 2" in out and "--forget" in out

    assert main(["models", "--cache-dir", str(tmp_path), "--forget", "31"]) == 0
    assert "forgot run 31" in capsys.readouterr().out
    assert shelf.missing() == []
    assert main(["models", "--cache-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing"] == []

    assert main(["models", "--cache-dir", str(tmp_path), "--forget", "31"]) == ConfigError.exit_code
    assert "no record of run 31" in capsys.readouterr().err
