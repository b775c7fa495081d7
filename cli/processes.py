"""``fedhead superlink``, ``fedhead node`` and ``fedhead exporter``: Flower's long-lived
processes, started with fedhead's defaults and a metrics exporter beside them."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedhead.cli import preflight
from fedhead.cli.types import Subparsers, add_command
from fedhead.common.config import DEFAULT_MAX_IMAGE_PIXELS
from fedhead.common.errors import ConfigError, SetupError
from fedhead.common.telemetry import DEFAULT_SERVER_ADDRESS, DEFAULT_SITE_ADDRESS, SPOOL_ENV

if TYPE_CHECKING:
    from fedhead.cli.exporter import ChildWatcher


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


def _exec(
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
    program = _program(cmd[0])
    # Flower's programs start their helpers (flower-superexec, flwr-serverapp,
    # flwr-clientapp) by name: they must find them beside themselves, also when the
    # virtual environment is not activated.
    path = f"{Path(program).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, **(extra_env or {})}
    sys.stdout.flush()
    if address == "none" and companion is None and not restart and on_exit is None:
        os.execve(program, [program, *cmd[1:]], env)
    from fedhead.cli.exporter import supervise

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


def _exporter(args: argparse.Namespace) -> int:
    """serve metrics for a SuperLink or SuperNode started the Flower way"""
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
    """start this site's Flower SuperNode

    Checks this site's data and its TLS choice against the SuperLink, then starts
    flower-supernode pointed at the data and watches it. Only head updates and scalar
    metrics leave.
    """
    data = Path(args.data).expanduser().resolve()
    if not data.exists():
        raise ConfigError([f"--data: {data} does not exist (image folder, .csv or .npz)"])
    config = {"data-path": str(data), "device": args.device}
    if args.cache_dir:
        config["cache-dir"] = str(Path(args.cache_dir).expanduser().resolve())
    if args.audit_log:
        config["audit-log"] = str(Path(args.audit_log).expanduser().resolve())
    if args.data_roots:
        roots = [r.strip() for r in args.data_roots.split(",") if r.strip()]
        config["data-roots"] = ",".join(str(Path(r).expanduser().resolve()) for r in roots)
    if args.name:
        config["site-name"] = args.name
    node_config = " ".join(f"{k}={_toml_str(v)}" for k, v in config.items())
    for key, number, lowest in (
        ("dicom-window", args.dicom_window, -1),
        ("dicom-frame", args.dicom_frame, 0),
    ):
        if number is not None and number < lowest:
            raise ConfigError([f"--{key}: must be >= {lowest}, got {number}"])
        if number is not None:
            node_config += f" {key}={number}"
    threads = (os.cpu_count() or 1) if args.threads is None else args.threads
    if threads < 1:
        raise ConfigError([f"--threads: must be >= 1, got {threads}"])
    node_config += f" threads={threads}"
    if args.max_image_pixels is not None:
        if args.max_image_pixels <= 0:
            raise ConfigError([f"--max-image-pixels: must be > 0 (got {args.max_image_pixels})"])
        node_config += f" max-image-pixels={args.max_image_pixels}"
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
    if args.trusted_entities and args.allow_unsigned_apps:
        raise ConfigError(["--trusted-entities and --allow-unsigned-apps: give one of them"])
    if not args.trusted_entities and not args.allow_unsigned_apps:
        raise ConfigError(
            [
                "--trusted-entities: a node runs only apps signed by a key it trusts (a YAML "
                "file of ed25519 public keys, see SECURITY.md); pass --allow-unsigned-apps to "
                "run whatever app the SuperLink sends"
            ]
        )
    if args.trusted_entities:
        entities = Path(args.trusted_entities).expanduser()
        if not entities.is_file():
            raise SetupError(
                f"--trusted-entities {entities} does not exist", "copy the file from the operator"
            )
        cmd += ["--trusted-entities", str(entities)]
    else:
        print(
            "WARNING: this node runs ANY app the SuperLink sends: whoever can start runs "
            "there runs code here, with this site's data. Use --trusted-entities outside "
            "test setups.",
            file=sys.stderr,
        )
    cmd += _tls_args(args, "site node")
    if args.root_certificates:
        cmd += ["--root-certificates", str(Path(args.root_certificates).expanduser())]
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", str(Path(args.auth_key).expanduser())]
    if not args.dry_run:
        _node_preflight(args, data)
    watch = preflight.NodeWatch(args.superlink, args.insecure, bool(args.auth_key))
    # The warm worker lives in this process, as long as the node: the per-message
    # ClientApp processes hand it the site's training and evaluation (client.worker).
    worker = spool = None
    if not args.no_worker and not args.dry_run:
        from fedhead.cli.exporter import prepare_spool
        from fedhead.client.worker import WorkerService
        from fedhead.common.logs import setup_logging
        from fedhead.common.telemetry import SPOOL_ENV

        setup_logging()  # the worker's lines join the SuperNode's in the node's log
        spool = prepare_spool()
        os.environ[SPOOL_ENV] = str(spool)  # and its events the site's metrics
        worker = WorkerService().start()
        cmd[cmd.index("--node-config") + 1] += (
            f" worker-socket={_toml_str(worker.path)} worker-key-file={_toml_str(worker.key_file)}"
        )
    try:
        # Flower's SuperNode exits when its SuperLink forgets it (a restart without a
        # state database): the supervisor starts it again, so the site stays in the
        # federation, unless the watcher saw a failure a restart cannot fix (TLS
        # mismatch, refused key).
        return _exec(
            cmd,
            args.dry_run,
            metrics=("site", args.metrics_address),
            restart=True,
            on_exit=watch.explain,
            watcher=watch,
            spool=spool,
        )
    finally:
        if worker is not None:
            worker.stop()


def _node_preflight(args: argparse.Namespace, data: Path) -> None:
    """Refuse to join with unusable data, a TLS mismatch or a taken runtime port."""
    from fedhead.cli.data import parse_classes, read_settings
    from fedhead.common.config import DEFAULT_MAX_IMAGE_PIXELS

    classes = parse_classes(args.classes) if args.classes else None
    policy, reader = read_settings(
        args.data_roots,
        args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS,
        args.dicom_window or 0,
        args.dicom_frame or 0,
    )
    preflight.check_node_data(data, classes, policy, reader)
    preflight.ensure_port_free("127.0.0.1", args.port, "the node's runtime (--port)")
    preflight.probe_tls(args.superlink, args.insecure)


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
    metrics = ("server", args.metrics_address)
    if not args.dry_run:
        preflight.ensure_port_free(args.host, args.port, "the SuperLink's")
    if not args.public_address:
        return _exec(cmd, args.dry_run, metrics=metrics)
    upstream = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    if args.dry_run:
        print(
            f"nginx ({proxy.TEMPLATE}): {args.public_address} -> {upstream}, the Fleet API only",
        )
        return _exec(cmd, True, metrics=metrics)
    proxy.check_loopback_name(files["cert"])
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
        return _exec(cmd, False, metrics, fleet_proxy.command(), store)
    finally:
        shutil.rmtree(fleet_proxy.run_dir, ignore_errors=True)


def _serving_options(p: argparse.ArgumentParser, metrics: str, default_address: str) -> None:
    """--metrics-address and --dry-run, shared by the commands that start a Flower process."""
    p.add_argument(
        "--metrics-address",
        default=default_address,
        help=f"serve {metrics} ({default_address}; none to switch off)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command, do not start")


def add_parser(sub: Subparsers) -> None:
    """``fedhead node``, ``fedhead superlink`` and ``fedhead exporter``."""
    n = add_command(sub, "node", _node)
    n.add_argument("--superlink", required=True, help="SuperLink Fleet address HOST:PORT")
    n.add_argument("--data", required=True, help="image folder, .csv manifest or .npz")
    n.add_argument(
        "--classes",
        help="the run's classes, comma-separated: every image is checked before joining, "
        "as `fedhead data check` does (recommended; without it only that --data is "
        "readable and not empty)",
    )
    n.add_argument(
        "--name",
        type=preflight.site_name_arg,
        help="this site's label in the operator's logs and report (letters, digits, . _ -; "
        "at most 32); without it the site is known by its node id",
    )
    n.add_argument(
        "--port",
        type=int,
        default=9094,
        help="local runtime port; each node on one host needs its own (9094)",
    )
    n.add_argument(
        "--cache-dir",
        help="weights, feature cache, delivered models and run records (default ~/.cache/fedhead)",
    )
    n.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    n.add_argument("--audit-log", help="JSON-lines record of every message this site sends")
    n.add_argument(
        "--dicom-window",
        type=int,
        help="DICOM: which VOI LUT / window to apply (default 0 = the first; -1 = none)",
    )
    n.add_argument(
        "--dicom-frame", type=int, help="DICOM: which frame of a multi-frame file (default 0)"
    )
    n.add_argument(
        "--data-roots",
        help="comma-separated folders besides the data folder that image paths may lead "
        "into (CSV entries, symlinks); by default every image must lie inside the data "
        "folder",
    )
    n.add_argument(
        "--max-image-pixels",
        type=int,
        help="images with more pixels are refused unread and counted as unreadable "
        f"({DEFAULT_MAX_IMAGE_PIXELS})",
    )
    n.add_argument(
        "--threads",
        type=int,
        help="CPU threads this site's training may use (default: every core); nodes "
        "sharing a machine should split its cores between them",
    )
    n.add_argument(
        "--no-worker",
        action="store_true",
        help="no warm worker: every train and evaluate message imports torch and loads the "
        "site's data and features in its own process (seconds more per message)",
    )
    n.add_argument("--root-certificates", help="the federation's CA certificate (TLS)")
    n.add_argument("--auth-key", help="this site's private key for node authentication")
    n.add_argument("--insecure", action="store_true", help="no TLS (test setups only)")
    n.add_argument(
        "--trusted-entities",
        help="YAML file of ed25519 public keys: run only apps signed by one of them",
    )
    n.add_argument(
        "--allow-unsigned-apps",
        action="store_true",
        help="run any app the SuperLink sends (whoever can start runs there runs code here)",
    )
    _serving_options(
        n, "this site's Prometheus metrics here, on the site's own network", DEFAULT_SITE_ADDRESS
    )

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
    _serving_options(
        s, "the federation's Prometheus metrics here, across runs", DEFAULT_SERVER_ADDRESS
    )

    e = add_command(
        sub,
        "exporter",
        _exporter,
        description=f"Reads the statistics events that fedhead's ServerApp or ClientApp "
        f"write to the spool folder named by {SPOOL_ENV} (set it for flower-superlink "
        "or flower-supernode) and serves them as Prometheus metrics.",
    )
    e.add_argument("--role", choices=["server", "site"], required=True)
    e.add_argument("--spool", required=True, help=f"the folder {SPOOL_ENV} points to")
    e.add_argument("--address", default=None, help="HOST:PORT (default: the role's port)")
