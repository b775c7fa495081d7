"""The import contract: common <- client, common <- server, and only the CLI knows both.

Every ``import`` in the package counts, also those inside functions (a lazy import is
still a dependency), as import-linter's contracts count them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# package -> the fedhead packages it may import (besides itself)
ALLOWED = {
    "common": set(),
    "client": {"common"},
    "server": {"common"},
    "cli": {"common", "client", "server"},
}


def imported_packages(path: Path) -> set[str]:
    """The fedhead sub-packages a module imports (``fedhead.X...`` -> ``X``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "fedhead":
                names = [f"fedhead.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedhead" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package: str) -> None:
    modules = sorted((REPO / package).rglob("*.py"))
    assert modules, f"no modules under {package}/"
    violations = [
        f"{path.relative_to(REPO)} imports fedhead.{other}"
        for path in modules
        for other in sorted(imported_packages(path) - ALLOWED[package] - {package})
    ]
    assert not violations, "\n".join(violations)


def test_contract_check_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import fedhead.common.config\n"
        "def f():\n    from fedhead.server.app import app\n"
        "def g():\n    from fedhead import client\n"
    )
    assert imported_packages(module) == {"common", "server", "client"}
