"""Types shared by the command modules, and how a command is registered."""

from __future__ import annotations

import argparse
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]
Subparsers = Any  # argparse's _SubParsersAction, which argparse does not export


def add_command(
    sub: Subparsers, name: str, handler: Handler, description: str = ""
) -> argparse.ArgumentParser:
    """Register ``fedhead NAME`` to run ``handler``. What a command does is written once,
    in the handler's docstring beside the code that does it: its first paragraph is the
    line in the command list, and the whole of it as written, then ``description`` (for
    text with values filled in), is what ``--help`` shows above the options."""
    doc = inspect.cleandoc(handler.__doc__ or "")
    if not doc:
        raise ValueError(f"fedhead {name}: its handler {handler.__name__} has no docstring")
    summary = " ".join(doc.split("\n\n")[0].split())
    if description:
        doc = f"{doc}\n\n{textwrap.fill(description, width=88)}"
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def add_group(sub: Subparsers, name: str, help: str, metavar: str = "ACTION") -> Subparsers:
    """Register ``fedhead NAME``, a group whose commands (one is required) go on the
    returned subparsers with ``add_command``."""
    group = sub.add_parser(name, help=help)
    return group.add_subparsers(dest=f"{name}_command", required=True, metavar=metavar)
