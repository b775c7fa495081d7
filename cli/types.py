"""Types shared by the command modules, and how a command is registered."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]
Subparsers = Any  # argparse's _SubParsersAction, which argparse does not export


def add_command(
    sub: Subparsers, name: str, handler: Handler, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """Register ``fedhead NAME`` to run ``handler``. Its ``--help`` shows ``help`` in the
    command list and, above the options, ``description`` or else the handler's docstring,
    so what a command does is written once, beside the code that does it."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description or handler.__doc__
    )
    parser.set_defaults(handler=handler)
    return parser


def add_group(sub: Subparsers, name: str, help: str, metavar: str = "ACTION") -> Subparsers:
    """Register ``fedhead NAME``, a group whose commands (one is required) go on the
    returned subparsers with ``add_command``."""
    group = sub.add_parser(name, help=help)
    return group.add_subparsers(dest=f"{name}_command", required=True, metavar=metavar)
