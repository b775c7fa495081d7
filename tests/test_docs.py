"""README and CI stay true to the code."""

from __future__ import annotations

import re

from fedhead.common.backbones import backbone_names, get_spec
from fedhead.common.config import NodeConfig, RunConfig
from fedhead.common.errors import EXIT_CODES
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _table_keys(section_start: str) -> set[str]:
    section = README[README.index(section_start) :]
    table = section[section.index("| key |") :]
    rows = table.split("\n\n", 1)[0].splitlines()[2:]
    return {re.findall(r"`([^`]+)`", row)[0] for row in rows}


def test_every_run_config_key_is_documented() -> None:
    assert _table_keys("### Run configuration") == set(RunConfig.keys())


def test_every_node_config_key_is_documented() -> None:
    assert _table_keys("Node configuration (") == set(NodeConfig.keys())


def test_every_backbone_is_documented_with_its_file() -> None:
    for name in backbone_names():
        assert f"`{name}`" in README and get_spec(name).weights_file in README


def test_exit_codes_are_documented() -> None:
    for code, text in EXIT_CODES.items():
        assert f"| {code} | {text} |" in README


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    quick = README[README.index("## Quick start") : README.index("The demo simulates")]
    block = quick.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    demo, tests = commands
    assert "fedhead demo" in demo
    ci = (REPO / ".ci" / "run").read_text()
    setup, run_tests = (part.strip() for part in tests.split("&&"))
    assert setup in ci and run_tests in ci


def test_readme_commands_work_without_an_activated_venv() -> None:
    """Every fedhead/Flower program in README's command blocks is called through .venv/bin
    (or with .venv/bin put on PATH for Flower's helper programs)."""
    programs = ("fedhead", "flwr", "flower-superlink", "flower-supernode", "python", "pytest")
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            for word in re.findall(r"(?:^|&&\s*|\|\s*)([\w./$\"-]+)", line.split("#")[0].strip()):
                name = word.rsplit("/", 1)[-1]
                if name in programs and not word.startswith(".venv/bin/"):
                    assert line.strip().startswith('PATH="$PWD/.venv/bin:$PATH" '), line
