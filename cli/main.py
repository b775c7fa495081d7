"""The ``fedhead`` command line: one entry point for operators and site IT.

Heavy imports (torch, flwr) happen inside the handlers so ``--help`` is instant. A
``FedheadError`` becomes one line on stderr and its exit code (see ``--help``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedhead.cli import (
    app,
    certs,
    data,
    demo,
    evaluate,
    export,
    exporter,
    health,
    models,
    node,
    predict,
    run,
    runs,
    status,
    superlink,
    weights,
)
from fedhead.common.errors import EXIT_CODES, FedheadError

# one module per command, named as the command, in the order --help lists them
COMMANDS = [demo, predict, evaluate, export, models, weights, data, certs, app]
COMMANDS += [node, superlink, exporter, run, runs, status, health]
_EPILOG = "exit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedhead",
        description="Federated transfer learning: sites fine-tune the head of a frozen, "
        "server-distributed pretrained backbone; the server aggregates the heads.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from fedhead.common import __version__

    p.add_argument("--version", action="version", version=f"fedhead {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for module in COMMANDS:
        module.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except FedheadError as err:
        print(f"fedhead: {err.title}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("fedhead: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
