"""README's one-machine federations (without TLS; with TLS, node authentication and the
signed app) run exactly as written: from a copy of the repository's files, in a fresh
shell whose PATH lacks the virtual environment. Only the recipes' example port numbers
are replaced, by ports free at run time: the host is shared."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.procs import free_port, npz_site
from tests.reports import ReportJson, read_report

# The SecAgg+ statistics round, its validation and the delivery start a ClientApp
# process per message: minutes on 2 busy cores.
pytestmark = [pytest.mark.slow, pytest.mark.deployment, pytest.mark.timeout(2400)]

README = (REPO / "README.md").read_text()


# the example ports the recipes name: the SuperLink's, its public (nginx) one, the
# nodes' runtime ports and the three metrics exporters
RECIPE_PORTS = ("8000", "9443", "9094", "9095", "9400", "9401", "9402")


def recipe(heading: str) -> str:
    """The first bash block after ``heading``, its example ports replaced by free ones."""
    section = README[README.index(heading) :]
    text = section.split("```bash\n", 1)[1].split("```", 1)[0]
    named = set(re.findall(r"\b(\d{4})\b", text)) & set(RECIPE_PORTS)
    ports = {port: str(free_port()) for port in named}
    return re.sub(r"\b(\d{4})\b", lambda m: ports.get(m.group(1), m.group(1)), text)


def fresh_clone(dest: Path) -> Path:
    """The repository's tracked files, with .venv pointing at the installed environment."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, tracked.split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


def run_recipe(text: str, tmp_path: Path, weights: Path) -> tuple[str, Path]:
    """Run ``text`` in a fresh clone; returns its output and the clone."""
    clone = fresh_clone(tmp_path / "fedhead")
    for i in range(2):  # what `fedhead demo` would have written, smaller
        npz_site(clone / "demo-out" / "sites" / f"site-{i}.npz", i, 2)
    cache = tmp_path / "cache"
    (cache / "weights").mkdir(parents=True)
    shutil.copy(weights, cache / "weights")
    env = {
        "PATH": "/usr/bin:/bin",  # no activated virtual environment
        "HOME": str(tmp_path / "home"),
        "FEDHEAD_CACHE": str(cache),
        "TORCH_HOME": str(tmp_path / "torch"),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if "PYTHONPATH" in os.environ:  # a development checkout that shadows the install
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    log = tmp_path / "recipe.log"
    with log.open("w") as out:
        shell = subprocess.Popen(
            ["bash", "-c", "set -e\n" + text],
            cwd=clone,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            shell.wait(timeout=2300)
        finally:  # whatever the recipe left running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGTERM)
    output = log.read_text(errors="replace")
    assert shell.returncode == 0, output[-6000:]
    return output, clone


def check_run(output: str, clone: Path) -> ReportJson:
    assert "finished:completed" in output and "final accuracy: federated" in output
    assert "round  train loss  eval loss  eval acc" in output  # the table's header row
    reports = list((clone / "fedhead-runs").glob("run-*/report.json"))
    assert len(reports) == 1, output[-3000:]
    report = read_report(reports[0].parent)
    # the default training: the closed-form head, one round of summed statistics
    assert len(report["rounds"]) == 1 and report["clients"] == 2
    assert report["rounds"][0]["aggregated"] and (report["closed_form"] or {})["chosen"]
    sites = report["setup"]["sites"]
    assert sorted(s["name"] for s in sites) == ["site-0", "site-1"]
    assert f"report: fedhead-runs/{reports[0].parent.name}/report.json" in output
    return report


def test_the_one_machine_recipe_runs_as_written(tmp_path: Path, mobilenet_weights: Path) -> None:
    text = recipe("**A first try on one machine")
    assert ".venv/bin/fedhead run local-test" in text  # the operator's one command
    check_run(*run_recipe(text, tmp_path, mobilenet_weights))


def test_the_one_machine_tls_recipe_runs_as_written(
    tmp_path: Path, mobilenet_weights: Path
) -> None:
    text = recipe("**Several sites on one machine, with TLS")
    assert "--insecure" not in text and "--allow-unsigned-apps" not in text
    output, clone = run_recipe(text, tmp_path, mobilenet_weights)
    report = check_run(output, clone)
    assert report["secure_aggregation"] == "secagg+"
    # the nodes ran the signed app only, registered, through nginx
    assert (clone / "certs" / "sites" / "site-1.key").is_file()
