"""Starting one of Flower's long-lived programs (flower-superlink, flower-supernode) for
``fedhead superlink`` and ``fedhead node``: where the program is, the options both
commands share, and either becoming the program or supervising it."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedhead.common.errors import SetupError

if TYPE_CHECKING:
    from fedhead.cli.supervisor import ChildWatcher


def flower_program(name: str) -> str:
    """A Flower program installed beside this Python (a venv need not be activated)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SetupError(f"{name} is not installed", "install fedhead with deploy/install.sh")
    return found


def launch(
    cmd: list[str],
    dry_run: bool,
    metrics: tuple[str, str] | None = None,
    companion: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
    restart: bool = False,
    on_exit: Callable[[int], int] | None = None,
    watcher: ChildWatcher | None = None,
    spool: Path | None = None,
) -> int:
    """Become the Flower process, or supervise it with a metrics exporter (and a
    companion process, the proxy in front of a SuperLink; or restarts; a watcher of its
    output) beside it; ``on_exit`` explains its exit code."""
    role, address = metrics or ("", "none")
    if dry_run:
        if companion:
            print(shlex.join(companion))
        print(shlex.join(cmd))
        if address != "none":
            print(f"(metrics for the {role} on http://{address}/metrics)")
        return 0
    program = flower_program(cmd[0])
    # Flower's programs start their helpers (flower-superexec, flwr-serverapp,
    # flwr-clientapp) by name: they must find them beside themselves, also when the
    # virtual environment is not activated.
    path = f"{Path(program).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, **(extra_env or {})}
    sys.stdout.flush()
    if address == "none" and companion is None and not restart and on_exit is None:
        os.execve(program, [program, *cmd[1:]], env)
    from fedhead.cli.supervisor import supervise

    code = supervise(
        [program, *cmd[1:]],
        [role],
        address,
        env,
        companion,
        restart=restart,
        watcher=watcher,
        spool=spool,
    )
    return on_exit(code) if on_exit else code


def tls_args(args: argparse.Namespace, role: str) -> list[str]:
    if args.insecure:
        print(
            f"WARNING: starting the {role} WITHOUT TLS: traffic is readable and nodes are not "
            "authenticated. Use this only on a trusted test network.",
            file=sys.stderr,
        )
        return ["--insecure"]
    return []


def serving_options(p: argparse.ArgumentParser, metrics: str, default_address: str) -> None:
    """--metrics-address and --dry-run, shared by the commands that start a Flower process."""
    p.add_argument(
        "--metrics-address",
        default=default_address,
        help=f"serve {metrics} ({default_address}; none to switch off)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command, do not start")
