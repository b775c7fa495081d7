"""``fedhead superlink``, ``fedhead node`` and ``fedhead exporter``: Flower's long-lived
processes, started with fedhead's defaults and a metrics exporter beside them."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from fedhead.cli.types import Subparsers
from fedhead.common.errors import ConfigError, SetupError
from fedhead.common.telemetry import DEFAULT_SERVER_ADDRESS, DEFAULT_SITE_ADDRESS, SPOOL_ENV


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _program(name: str) -> str:
    """A Flower program installed beside this Python (a venv need not be activated)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SetupError(f"{name} is not installed", "install fedhead with deploy/install.sh")
    return found


def _exec(cmd: list[str], dry_run: bool, metrics: tuple[str, str] | None = None) -> int:
    """Become the Flower process, or supervise it with a metrics exporter beside it."""
    role, address = metrics or ("", "none")
    if dry_run:
        print(shlex.join(cmd))
        if address != "none":
            print(f"(metrics for the {role} on http://{address}/metrics)")
        return 0
    program = _program(cmd[0])
    # Flower's programs start their helpers (flower-superexec, flwr-serverapp,
    # flwr-clientapp) by name: they must find them beside themselves, also when the
    # virtual environment is not activated.
    path = f"{Path(program).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path}
    sys.stdout.flush()
    if address == "none":
        os.execve(program, [program, *cmd[1:]], env)
    from fedhead.cli.exporter import supervise

    return supervise([program, *cmd[1:]], [role], address, env)


def _exporter(args: argparse.Namespace) -> int:
    import signal
    import threading

    from fedhead.cli.exporter import Exporter, prepare_spool

    spool = prepare_spool(Path(args.spool).expanduser())
    exporter = Exporter([args.role], spool)
    default = DEFAULT_SERVER_ADDRESS if args.role == "server" else DEFAULT_SITE_ADDRESS
    args.address = args.address or default
    exporter.serve(args.address)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"metrics for the {args.role} on http://{args.address}/metrics; events from {spool}")
    stop.wait()
    exporter.stop()
    return 0


def _tls_args(args: argparse.Namespace, role: str) -> list[str]:
    if args.insecure:
        print(
            f"WARNING: starting the {role} WITHOUT TLS: traffic is readable and nodes are not "
            "authenticated. Use this only on a trusted test network.",
            file=sys.stderr,
        )
        return ["--insecure"]
    return []


def _node(args: argparse.Namespace) -> int:
    data = Path(args.data).expanduser().resolve()
    if not data.exists():
        raise ConfigError([f"--data: {data} does not exist (image folder, .csv or .npz)"])
    config = {"data-path": str(data), "device": args.device}
    if args.cache_dir:
        config["cache-dir"] = str(Path(args.cache_dir).expanduser().resolve())
    if args.audit_log:
        config["audit-log"] = str(Path(args.audit_log).expanduser().resolve())
    node_config = " ".join(f"{k}={_toml_str(v)}" for k, v in config.items())
    cmd = ["flower-supernode", "--superlink", args.superlink, "--port", str(args.port)]
    cmd += ["--node-config", node_config]
    if args.insecure and (args.root_certificates or args.auth_key):
        raise ConfigError(["--insecure: cannot be combined with --root-certificates/--auth-key"])
    if not args.insecure and not (args.root_certificates and args.auth_key):
        raise ConfigError(
            [
                "--root-certificates and --auth-key: a node needs the federation's CA "
                "certificate and its own key (from `fedhead certs`), or --insecure for a "
                "test setup without TLS"
            ]
        )
    for flag, value in (
        ("--root-certificates", args.root_certificates),
        ("--auth-key", args.auth_key),
    ):
        if value and not Path(value).expanduser().is_file():
            raise SetupError(f"{flag} {value} does not exist", "copy the file from the operator")
    cmd += _tls_args(args, "site node")
    if args.root_certificates:
        cmd += ["--root-certificates", str(Path(args.root_certificates).expanduser())]
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", str(Path(args.auth_key).expanduser())]
    return _exec(cmd, args.dry_run, metrics=("site", args.metrics_address))


def _superlink(args: argparse.Namespace) -> int:
    cmd = ["flower-superlink", "--disable-runtime-dependency-installation"]
    cmd += ["--host", args.host, "--port", str(args.port)]
    if args.database:
        cmd += ["--database", args.database]
    if not args.insecure and not args.certs_dir:
        raise ConfigError(
            [
                "--certs-dir: a SuperLink needs TLS (create certificates with `fedhead certs`), "
                "or --insecure for a test setup"
            ]
        )
    cmd += _tls_args(args, "SuperLink")
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
    return _exec(cmd, args.dry_run, metrics=("server", args.metrics_address))


def add_parser(sub: Subparsers) -> None:
    """``fedhead node``, ``fedhead superlink`` and ``fedhead exporter``."""
    n = sub.add_parser(
        "node",
        help="start this site's Flower SuperNode",
        description="Starts flower-supernode pointed at this site's data "
        "(becomes that process). Only head updates and scalar metrics leave.",
    )
    n.add_argument("--superlink", required=True, help="SuperLink Fleet address HOST:PORT")
    n.add_argument("--data", required=True, help="image folder, .csv manifest or .npz")
    n.add_argument(
        "--port",
        type=int,
        default=9094,
        help="local runtime port; each node on one host needs its own (9094)",
    )
    n.add_argument("--cache-dir", help="weights and feature cache (default ~/.cache/fedhead)")
    n.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    n.add_argument("--audit-log", help="JSON-lines record of every message this site sends")
    n.add_argument("--root-certificates", help="the federation's CA certificate (TLS)")
    n.add_argument("--auth-key", help="this site's private key for node authentication")
    n.add_argument("--insecure", action="store_true", help="no TLS (test setups only)")
    n.add_argument(
        "--metrics-address",
        default=DEFAULT_SITE_ADDRESS,
        help="serve this site's Prometheus metrics here, on the site's own network "
        f"({DEFAULT_SITE_ADDRESS}; none to switch off)",
    )
    n.add_argument("--dry-run", action="store_true", help="print the command, do not start")
    n.set_defaults(handler=_node)

    s = sub.add_parser(
        "superlink",
        help="start the operator's Flower SuperLink",
        description="Starts flower-superlink (becomes that process) with "
        "runtime dependency installation disabled. TLS is required unless "
        "--insecure is given.",
    )
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 to accept remote sites (127.0.0.1)",
    )
    s.add_argument("--port", type=int, default=8000, help="port of the SuperLink (8000)")
    s.add_argument("--certs-dir", help="folder with ca.crt, server.crt, server.key")
    s.add_argument("--database", help="SuperLink state database (default: in memory)")
    s.add_argument("--insecure", action="store_true", help="no TLS (test setups only)")
    s.add_argument(
        "--metrics-address",
        default=DEFAULT_SERVER_ADDRESS,
        help="serve the federation's Prometheus metrics here, across runs "
        f"({DEFAULT_SERVER_ADDRESS}; none to switch off)",
    )
    s.add_argument("--dry-run", action="store_true", help="print the command, do not start")
    s.set_defaults(handler=_superlink)

    e = sub.add_parser(
        "exporter",
        help="serve metrics for a SuperLink or SuperNode started the Flower way",
        description=f"Reads the statistics events that fedhead's ServerApp or ClientApp "
        f"write to the spool folder named by {SPOOL_ENV} (set it for flower-superlink "
        "or flower-supernode) and serves them as Prometheus metrics.",
    )
    e.add_argument("--role", choices=["server", "site"], required=True)
    e.add_argument("--spool", required=True, help=f"the folder {SPOOL_ENV} points to")
    e.add_argument("--address", default=None, help="HOST:PORT (default: the role's port)")
    e.set_defaults(handler=_exporter)
