"""``fedhead superlink``: the operator's Flower SuperLink, with TLS and node
authentication, its state in a database, nginx in front for the sites (Fleet API
only) and the federation's metrics exporter beside it, supervised (started again when
it dies, stopped with everything beside it) by ``fedhead.cli.supervisor``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from fedhead.cli import launch, preflight
from fedhead.cli.types import Subparsers, add_command
from fedhead.common.errors import ConfigError, SetupError
from fedhead.common.telemetry import DEFAULT_SERVER_ADDRESS


def fedhead_data_dir() -> Path:
    """fedhead's data root: ``$FEDHEAD_HOME``, else ``$XDG_DATA_HOME/fedhead``."""
    if env := os.environ.get("FEDHEAD_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "fedhead"


def _state_dir(given: str | None, create: bool) -> Path:
    """The SuperLink's state folder (registered node keys, runs), private to its owner."""
    path = Path(given).expanduser() if given else fedhead_data_dir() / "superlink"
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _superlink(args: argparse.Namespace) -> int:
    """start the operator's Flower SuperLink

    Starts flower-superlink with runtime dependency installation disabled. TLS is required
    unless --insecure is given. Its port also serves the Control API, so it listens on
    loopback only; --public-address starts nginx for the sites, forwarding only the Fleet
    API, and --signed-app offers the app signed with `fedhead app sign` to the SuperLink.
    A SuperLink that exits on its own is started again (after 2 s, then longer pauses up
    to a minute), with the metrics exporter and nginx kept up; a run's ServerApp it
    leaves behind is stopped. SIGTERM or Ctrl-C stops everything within seconds.
    """
    from fedhead.cli import proxy

    cmd = ["flower-superlink", "--disable-runtime-dependency-installation"]
    cmd += ["--host", args.host, "--port", str(args.port)]
    if args.host not in proxy.LOOPBACK_NAMES:
        raise ConfigError(
            [
                f"--host {args.host}: the SuperLink's port also serves the Control API (list "
                "and register nodes, start runs) to anyone holding ca.crt; keep --host "
                "127.0.0.1 and give sites --public-address HOST:PORT, which forwards only "
                "the Fleet API"
            ]
        )
    state = _state_dir(args.state_dir, create=not args.dry_run and not args.database)
    database = args.database or str(state / "superlink.db")
    cmd += ["--database", database]
    if not args.insecure and not args.certs_dir:
        raise ConfigError(
            [
                "--certs-dir: a SuperLink needs TLS (create certificates with `fedhead certs`), "
                "or --insecure for a test setup"
            ]
        )
    if args.public_address and not args.certs_dir:
        raise ConfigError(["--public-address: needs TLS (--certs-dir); sites connect over it"])
    if args.signed_app and not args.public_address:
        raise ConfigError(["--signed-app: served by the proxy; give --public-address too"])
    cmd += launch.tls_args(args, "SuperLink")
    if args.certs_dir:
        certs = Path(args.certs_dir).expanduser()
        files = {"ca": certs / "ca.crt", "cert": certs / "server.crt", "key": certs / "server.key"}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise SetupError(
                f"missing certificate file(s): {', '.join(missing)}",
                "create them with `fedhead certs`",
            )
        from fedhead.cli.certs import certificate_problem

        if problem := certificate_problem(files["cert"]):
            expired, line = problem
            if expired:
                raise SetupError(line)
            print(f"warning: {line}", file=sys.stderr)
        cmd += [
            "--ssl-ca-certfile",
            str(files["ca"]),
            "--ssl-certfile",
            str(files["cert"]),
            "--ssl-keyfile",
            str(files["key"]),
            "--enable-supernode-auth",
        ]
    metrics = ("server", args.metrics_address)
    if not args.dry_run:
        preflight.ensure_port_free(args.host, args.port, "the SuperLink's")
    if not args.public_address:
        return launch.launch(cmd, args.dry_run, metrics=metrics, restart=True)
    upstream = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    if args.dry_run:
        print(
            f"nginx ({proxy.TEMPLATE}): {args.public_address} -> {upstream}, the Fleet API only",
        )
        return launch.launch(cmd, True, metrics=metrics)
    proxy.check_loopback_name(files["cert"])
    public_host, public_port = preflight.parse_address(args.public_address)
    preflight.ensure_port_free(public_host, public_port, "the sites'", "--public-address")
    signed_app = Path(args.signed_app).expanduser() if args.signed_app else None
    fleet_proxy = proxy.prepare(args.public_address, upstream, certs, signed_app)
    try:
        fleet_proxy.check()
        print(
            f"sites connect to {args.public_address} (Fleet API only, through nginx); "
            f"the Control API stays on {upstream}",
            file=sys.stderr,
        )
        # Flower's SuperLink fetches `flwr run @publisher/name` apps, with their
        # signatures, from this address.
        store = {"FLWR_SUPERGRID_API_URL": fleet_proxy.app_store_url}
        return launch.launch(cmd, False, metrics, fleet_proxy.command(), store, restart=True)
    finally:
        shutil.rmtree(fleet_proxy.run_dir, ignore_errors=True)


def add_parser(sub: Subparsers) -> None:
    """``fedhead superlink``."""
    s = add_command(sub, "superlink", _superlink)
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="loopback address to listen on (127.0.0.1): this port also serves the "
        "Control API, so it never faces the sites; they use --public-address",
    )
    s.add_argument("--port", type=int, default=8000, help="port of the SuperLink (8000)")
    s.add_argument(
        "--public-address",
        help="HOST:PORT for the sites (e.g. 0.0.0.0:9443): nginx listens there with the "
        "SuperLink's certificate and forwards only the Fleet API; needs --certs-dir",
    )
    s.add_argument(
        "--signed-app",
        help="folder from `fedhead app sign`: runs started with `flwr run @publisher/name` "
        "use this FAB and its signature (sites with --trusted-entities run only these)",
    )
    s.add_argument("--certs-dir", help="folder with ca.crt, server.crt, server.key")
    s.add_argument(
        "--state-dir",
        help="folder for the SuperLink's state database: registered site keys and runs "
        "survive a restart (default $FEDHEAD_HOME/superlink or ~/.local/share/fedhead/superlink)",
    )
    s.add_argument(
        "--database",
        help="the state database file instead (:memory: keeps nothing across a restart)",
    )
    s.add_argument("--insecure", action="store_true", help="no TLS (test setups only)")
    launch.serving_options(
        s, "the federation's Prometheus metrics here, across runs", DEFAULT_SERVER_ADDRESS
    )
