"""``fedhead run``: start a federated run, watch it, collect its report.

It checks the run configuration here first (every unknown key and bad value named at
once), submits the run through Flower (``flwr run APP CONNECTION``), streams its log
(``flwr log``), keeps the report the ServerApp logs at the end, and exits with the
run's real outcome (``flwr ls``): Flower's own ``flwr run --stream`` exits 0 also for a
failed run. Connections are Flower's, in ``$FLWR_HOME/config.toml`` (default
``~/.flwr``).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import socket
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from fedhead.cli.flwr_cli import (
    LogFilter,
    RunStatus,
    connection_address,
    flwr_json,
    save_report,
    stream_log,
    superlink_answers,
    wait_finished,
)
from fedhead.cli.types import Subparsers, add_command
from fedhead.common.errors import ConfigError, FederationError, SetupError

# flwr's --run-config syntax: space-separated key=value pairs, values TOML
# (flwr.common.config.parse_config_args uses the same pattern).
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def app_defaults(app: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the Flower App at ``app`` (what a run starts from)."""
    path = app / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text())
        config = data["tool"]["flwr"]["app"]["config"]
    except FileNotFoundError as err:
        raise SetupError(
            f"{app} is not a Flower App (no pyproject.toml)",
            "run this in fedhead's folder, or point --app at it",
        ) from err
    except (tomllib.TOMLDecodeError, KeyError) as err:
        raise SetupError(
            f"{path} has no [tool.flwr.app.config]", "point --app at fedhead's folder"
        ) from err
    return dict(config)


def signed_app_name(app: Path) -> str:
    """``@publisher/name`` of the Flower App at ``app``: what sites that trust only the
    operator's signed app run (the SuperLink fetches it, with its signature, from the
    app store ``fedhead superlink --signed-app`` serves)."""
    data = tomllib.loads((app / "pyproject.toml").read_text())
    return f"@{data['tool']['flwr']['app']['publisher']}/{data['project']['name']}"


def parse_overrides(texts: list[str]) -> tuple[dict[str, Any], list[str], set[str]]:
    """``k=v`` pairs as ``flwr run --run-config`` reads them -> (values, problems, keys
    whose value is no TOML value: kept as text, which flwr would refuse unquoted)."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    unquoted: set[str] = set()
    for text in texts:
        if text.endswith(".toml"):
            try:
                values |= tomllib.loads(Path(text).expanduser().read_text())
            except (OSError, tomllib.TOMLDecodeError) as err:
                problems.append(f"--run-config {text}: cannot read it as TOML ({err})")
            continue
        rest = _PAIR.sub("", text).strip()
        if rest:
            problems.append(f"--run-config: {rest!r} is not KEY=VALUE")
        for key, raw in _PAIR.findall(text):
            try:
                values |= tomllib.loads(f"{key} = {raw}")
            except tomllib.TOMLDecodeError:
                values[key] = raw
                unquoted.add(key)
    return values, problems, unquoted


def check_run_config(app: Path, texts: list[str]) -> dict[str, Any]:
    """The run's full configuration (app defaults + overrides), or ConfigError naming
    every unknown key and bad value at once."""
    from fedhead.common.config import RunConfig

    defaults = app_defaults(app)
    overrides, problems, unquoted = parse_overrides(texts)
    text_keys = {k for k, v in RunConfig().to_mapping().items() if isinstance(v, str)}
    for key in sorted(unquoted & text_keys):
        problems.append(f"{key}: text needs quotes: {key}='{overrides[key]}'")
    for key, value in overrides.items():
        if isinstance(value, dict):  # dotted keys: flwr flattens them
            problems.append(f"{key}: not a run configuration key (no dotted keys here)")
    mapping = {**defaults, **{k: v for k, v in overrides.items() if not isinstance(v, dict)}}
    try:
        cfg = RunConfig.from_mapping(mapping)
    except ConfigError as err:
        problems.extend(err.problems)
    else:
        if "num-server-rounds" in overrides and cfg.closed_form_applies():
            problems.append(
                "num-server-rounds: counts FedAvg rounds; the closed-form head (strategy="
                "'closed-form', the default) takes one round of summed statistics: add "
                "FedAvg rounds after it with fine-tune-rounds=N, or set strategy='fedavg'"
            )
        if not problems:
            return cfg.to_mapping()
    raise ConfigError(problems, "run configuration")


def wait_for_superlink(address: str, seconds: float) -> None:
    """Wait up to ``seconds`` for the SuperLink to accept connections (it may be starting)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return  # not HOST:PORT: let flwr say what it makes of it
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise SetupError(
                    f"no SuperLink answers at {address} ({err.strerror or err})",
                    "start it (fedhead superlink), or check the connection's address",
                ) from err
            time.sleep(0.5)


def _summary(status: RunStatus, report: dict[str, Any] | None, saved: Path | None) -> None:
    print(f"\nrun {status.run_id}: {status.status} after {status.elapsed:.0f} s")
    if report is not None:
        rounds = report.get("rounds") or []
        final = report.get("final_eval_accuracy")
        server = report.get("final_server_eval_accuracy")
        print(
            f"final accuracy: federated {_acc(final)}"
            + (f", server test set {_acc(server)}" if server is not None else "")
            + f" ({len(rounds)} rounds, {report.get('clients')} sites)"
        )
        sites = report.get("sites")
        if isinstance(sites, list):
            from fedhead.server.report import sites_table

            print("per site, validation accuracy on the site's own split (report.json: sites):")
            print("\n".join(sites_table(sites, report.get("sites_failed") or {})))
    if saved is not None and report is not None:
        print(f"report: {saved} (collected from the run's log)")
        where = report.get("config", {}).get("out-dir") or f"fedhead-runs/run-{status.run_id}"
        print(f"on the SuperLink's host it is in {where} (relative to where the SuperLink runs)")


def _acc(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) else "-"


def _run(args: argparse.Namespace) -> int:
    """start a federated run, watch it, collect its report

    Checks the run configuration, starts the run on the SuperLink of a Flower connection
    ($FLWR_HOME/config.toml, default ~/.flwr), streams its log and exits with its outcome
    (non-zero when the run fails). The report the ServerApp writes on the SuperLink's host
    is also collected from the run's log into --out.
    """
    from fedhead.common.config import RunConfig

    app = Path(args.app).expanduser().resolve()
    config = check_run_config(app, args.run_config)
    connection, address = connection_address(args.connection)
    wait_for_superlink(address, args.wait_superlink)
    cmd = ["run", signed_app_name(app) if args.signed else str(app), connection]
    for text in args.run_config:
        cmd += ["--run-config", text]
    run_id = str(flwr_json(cmd)["run-id"])
    print(
        f"run {run_id} started on {connection} ({address}): "
        f"{RunConfig.from_mapping(config).training_text()}, backbone {config['backbone']}, "
        f"classes {config['classes']}",
        flush=True,
    )
    keep = LogFilter()
    try:
        ended = stream_log(connection, run_id, keep)
    except KeyboardInterrupt:
        print(
            f"\nfedhead: stopped watching; run {run_id} goes on (stop it with "
            f"`.venv/bin/flwr stop {run_id} {connection}`)",
            file=sys.stderr,
        )
        return 130
    # A log stream that broke off, then a SuperLink that does not answer or does not
    # know the run finished: the SuperLink went away (and its supervisor may have
    # started it again, without the run's ServerApp).
    broke_off = ended.returncode != 0
    try:
        status = wait_finished(connection, run_id, 10.0 if broke_off else 60.0)
    except FederationError:
        if not broke_off and superlink_answers(address):
            raise
        raise cut_off(args, connection, run_id, config) from None
    if not status.finished or (broke_off and not status.ok):
        raise cut_off(args, connection, run_id, config)
    out = Path(args.out or f"fedhead-runs/run-{run_id}")
    report = keep.report_for(status)
    saved = save_report(report, out) if report is not None else None
    _summary(status, report, saved)
    if not status.ok:
        raise FederationError(
            f"run {run_id} {status.status}: {status.reason}",
            f"see `.venv/bin/flwr log {run_id} {connection} --show`",
        )
    return 0


def cut_off(
    args: argparse.Namespace, connection: str, run_id: str, config: dict[str, Any]
) -> FederationError:
    """The one line for a run whose SuperLink went away: what to run to resume it."""
    out = str(config.get("out-dir") or f"fedhead-runs/run-{run_id}")
    cmd = [".venv/bin/fedhead", "run", connection]
    cmd += ["--signed"] * bool(args.signed)
    cmd += ["--app", args.app] if args.app != "." else []
    for text in args.run_config:
        cmd += ["--run-config", text]
    cmd += ["--run-config", f"resume-from={json.dumps(out)}"]  # a TOML string
    return FederationError(
        f"the SuperLink went away; run {run_id} is cut off",
        f"resume it from its last checkpoint with `{shlex.join(cmd)}` (resume-from is its "
        "out-dir on the SuperLink's host; `fedhead status` there shows it)",
    )


def add_parser(sub: Subparsers) -> None:
    """``fedhead run``."""
    r = add_command(sub, "run", _run)
    r.add_argument("connection", nargs="?", help="the connection's name (default: its default)")
    r.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="'K=V ...'",
        help="run configuration overrides, as flwr run takes them (repeatable; or a .toml file)",
    )
    r.add_argument("--app", default=".", help="fedhead's folder, the Flower App (.)")
    r.add_argument(
        "--signed",
        action="store_true",
        help="run the operator's signed app (@fedhead/fedhead, served by `fedhead superlink "
        "--signed-app`) instead of uploading --app unsigned; sites with --trusted-entities "
        "run only that",
    )
    r.add_argument("--out", help="where the report goes here (fedhead-runs/run-<id>)")
    r.add_argument(
        "--wait-superlink",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait this long for the SuperLink to accept connections (30)",
    )
