"""``fedhead models``: at a site, the models it holds and the runs whose model it lacks.

Reads the site's fedhead data folder (``fedhead node --cache-dir``): ``models/<run-id>/``
(the packages the server delivered) and ``runs/<run-id>.json`` (the runs this site
trained in). A run without a model is one the site missed, offline when the run ended:
the node asks the server for it at the next run, or the operator sends it with a
delivery-only run (run-config ``deliver-from``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedhead.cli.types import Subparsers, add_command


@dataclass(frozen=True)
class HeldModel:
    run_id: str
    head_sha256: str  # "" when the package does not read back
    classes: str
    backbone: str
    path: str


@dataclass(frozen=True)
class MissingModel:
    run_id: int
    rounds: list[int]
    trained: float  # time of the last round it trained in (Unix seconds)


def held_models(cache_dir: Path) -> list[HeldModel]:
    """Every model package under ``models/``, with its head sha256."""
    from fedhead.client.models import MODELS, package_sha256
    from fedhead.common.errors import FedheadError
    from fedhead.common.package import ModelPackage

    folder = cache_dir / MODELS
    held = []
    for path in sorted(folder.iterdir() if folder.is_dir() else [], key=lambda p: p.name):
        if not path.is_dir():
            continue
        try:
            pkg = ModelPackage.load(path)
        except FedheadError as err:
            held.append(HeldModel(path.name, "", "", f"unreadable: {err.title}", str(path)))
            continue
        sha = package_sha256(path)
        held.append(HeldModel(path.name, sha, ",".join(pkg.classes), pkg.backbone.name, str(path)))
    return held


def missing_models(cache_dir: Path) -> list[MissingModel]:
    from fedhead.client.models import SiteModels

    shelf = SiteModels(cache_dir)
    return [
        MissingModel(r.run_id, list(r.rounds), r.updated)
        for r in shelf.runs()
        if not shelf.holds_model(r.run_id)
    ]


def _models(args: argparse.Namespace) -> int:
    """at a site: the models it holds, and the runs whose model it missed

    Lists the model packages this site holds (models/<run-id>/ in its fedhead data folder,
    each with its head sha256, the one the server logs) and the runs it trained in whose
    model it lacks because it was offline when the run ended. The node asks for those at
    the start of the next run; the operator can also send one at once with a delivery-only
    run (run-config deliver-from).
    """
    from fedhead.common.weights import fedhead_cache_dir

    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else fedhead_cache_dir()
    if args.forget is not None:
        return _forget(cache_dir, args.forget)
    held, missing = held_models(cache_dir), missing_models(cache_dir)
    if args.json:
        doc = {
            "cache_dir": str(cache_dir),
            "held": [asdict(m) for m in held],
            "missing": [asdict(m) for m in missing],
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(f"models held in {cache_dir / 'models'}:")
    for m in held:
        print(f"  run {m.run_id:<20}  {m.head_sha256 or '-':<64}  {m.backbone}  [{m.classes}]")
    if not held:
        print("  none")
    if missing:
        print("runs this site trained in without their model (missed when the run ended):")
        for r in missing:
            rounds = ",".join(str(x) for x in r.rounds)
            print(f"  run {r.run_id:<20}  trained in rounds {rounds}")
        print(
            "  the node asks the server for them at the next run; or ask the operator to "
            "send them now (run-config deliver-from=<the run's out-dir>). A run that "
            "failed, or was resumed under another run id, has no model: `fedhead models "
            "--forget RUN_ID` stops asking for it"
        )
    return 0


def _forget(cache_dir: Path, run_id: int) -> int:
    """Stop asking for a run's model: remove its record (never a model)."""
    from fedhead.client.models import SiteModels
    from fedhead.common.errors import ConfigError

    shelf = SiteModels(cache_dir)
    path = shelf.run_file(run_id)
    if not path.is_file():
        raise ConfigError([f"--forget: {cache_dir} holds no record of run {run_id}"], "arguments")
    path.unlink()
    kept = " (its model stays in models/)" if shelf.holds_model(run_id) else ""
    print(f"forgot run {run_id}: this site no longer asks for its model{kept}")
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead models``."""
    p = add_command(sub, "models", _models)
    p.add_argument(
        "--cache-dir",
        help="the site's fedhead data folder, as given to `fedhead node --cache-dir` "
        "(default ~/.cache/fedhead)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--forget",
        type=int,
        metavar="RUN_ID",
        help="remove this site's record of a run, so it no longer asks for that run's "
        "model (a model already held stays)",
    )
