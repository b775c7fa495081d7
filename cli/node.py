"""``fedhead node``: this site's Flower SuperNode, started after checks of the site's
data, TLS choice and runtime port, supervised (restarted when its SuperLink goes away
or forgets it), with the warm worker and the site's metrics exporter beside it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fedhead.cli import launch, preflight
from fedhead.cli.types import Subparsers, add_command
from fedhead.common.config import DEFAULT_MAX_IMAGE_PIXELS
from fedhead.common.errors import ConfigError, SetupError
from fedhead.common.telemetry import DEFAULT_SITE_ADDRESS


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


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
    node_config = " ".join(f"{k}={toml_str(v)}" for k, v in config.items())
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
    cmd += launch.tls_args(args, "site node")
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
            f" worker-socket={toml_str(worker.path)} worker-key-file={toml_str(worker.key_file)}"
        )
    try:
        # Flower's SuperNode exits when its SuperLink forgets it (a restart without a
        # state database): the supervisor starts it again, so the site stays in the
        # federation, unless the watcher saw a failure a restart cannot fix (TLS
        # mismatch, refused key).
        return launch.launch(
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
    """Refuse to join with a taken runtime port, a TLS mismatch or unusable data:
    cheapest first, the images (read one by one) last."""
    from fedhead.cli.data import parse_classes

    preflight.ensure_port_free("127.0.0.1", args.port, "the node's runtime (--port)")
    preflight.require_data(data)
    preflight.probe_tls(args.superlink, args.insecure)
    classes = parse_classes(args.classes) if args.classes else None
    if classes is None:
        return
    from fedhead.cli.data import read_settings  # imports torch: after the cheap checks

    policy, reader = read_settings(
        args.data_roots,
        args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS,
        args.dicom_window or 0,
        args.dicom_frame or 0,
    )
    preflight.check_node_data(data, classes, policy, reader)


def add_parser(sub: Subparsers) -> None:
    """``fedhead node``."""
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
    launch.serving_options(
        n, "this site's Prometheus metrics here, on the site's own network", DEFAULT_SITE_ADDRESS
    )
