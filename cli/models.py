"""``fedhead models``: at a site, the models it holds and the runs whose model it lacks.

Reads the site's fedhead data folder (``fedhead node --cache-dir``): ``models/<run-id>/``
(the packages the server delivered) and ``runs/<run-id>.json`` (the runs this site
trained in). A run without a model is one still going (its model comes when it ends),
one the site missed (offline when the run ended: the node asks the server for it at the
next run, or the operator sends it with a delivery-only run, run-config
``deliver-from``), one that failed, or one that was cut off and resumed under another
run id (which delivers the model).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedhead.cli.types import Subparsers, add_command

if TYPE_CHECKING:
    from fedhead.client.models import SiteModels, TrainedRun

# A run the site trained in this recently may still be going: its model is not "missing".
RECENT_SECONDS = 2 * 3600
NO_MODEL_YET, RESUMED, MISSING = "no model yet", "resumed", "missing"


@dataclass(frozen=True)
class HeldModel:
    run_id: str
    head_sha256: str  # "" when the package does not read back
    classes: str
    backbone: str
    path: str
    created: str  # when the server wrote the package (ISO 8601, UTC)
    rounds: int  # the run's rounds
    accuracy: float | None  # final federated evaluation accuracy, where measured
    trained_rounds: list[int]  # the rounds this site trained in (its record)


@dataclass(frozen=True)
class MissingModel:
    run_id: int
    rounds: list[int]  # the rounds this site trained in
    trained: float  # time of the last round it trained in (Unix seconds)
    state: str  # no model yet (trained in it recently), resumed, missing
    resumed_as: int | None  # the run that continued it, whose model this site holds


def held_models(cache_dir: Path) -> list[HeldModel]:
    """Every model package under ``models/``, with its head sha256."""
    from fedhead.client.models import MODELS, SiteModels, package_sha256
    from fedhead.common.errors import FedheadError
    from fedhead.common.package import ModelPackage

    shelf = SiteModels(cache_dir)
    folder = cache_dir / MODELS
    held = []
    for path in sorted(folder.iterdir() if folder.is_dir() else [], key=lambda p: p.name):
        if not path.is_dir():
            continue
        record = shelf.run(int(path.name)) if path.name.isdigit() else None
        trained = list(record.rounds) if record else []
        try:
            pkg = ModelPackage.load(path)
        except FedheadError as err:
            held.append(
                HeldModel(
                    path.name, "", "", f"unreadable: {err.title}", str(path), "", 0, None, trained
                )
            )
            continue
        accuracy = pkg.metrics.get("federated_eval_accuracy")
        held.append(
            HeldModel(
                path.name,
                package_sha256(path),
                ",".join(pkg.classes),
                pkg.backbone.name,
                str(path),
                pkg.created,
                pkg.training.rounds,
                accuracy,
                trained,
            )
        )
    return held


def _resumed_as(run: TrainedRun, runs: list[TrainedRun], shelf: SiteModels) -> int | None:
    """The run that continued ``run`` after it was cut off: the same run description,
    trained in later, starting at a round after 1 and at most one past ``run``'s last
    (a resumed run goes on after the last checkpoint), whose model this site holds."""
    for later in runs:
        if (
            later.run_id != run.run_id
            and later.spec == run.spec
            and later.updated > run.updated
            and later.rounds
            and run.rounds
            and 1 < min(later.rounds) <= max(run.rounds) + 1
            and shelf.holds_model(later.run_id)
        ):
            return later.run_id
    return None


def missing_models(cache_dir: Path, now: float | None = None) -> list[MissingModel]:
    """The runs this site trained in without their model, newest first, each with why
    (as far as the site can tell)."""
    from fedhead.client.models import SiteModels

    now = time.time() if now is None else now
    shelf = SiteModels(cache_dir)
    runs = shelf.runs()
    found = []
    for r in runs:
        if shelf.holds_model(r.run_id):
            continue
        resumed_as = _resumed_as(r, runs, shelf)
        if resumed_as is not None:
            state = RESUMED
        elif now - r.updated < RECENT_SECONDS:
            state = NO_MODEL_YET
        else:
            state = MISSING
        found.append(MissingModel(r.run_id, list(r.rounds), r.updated, state, resumed_as))
    return found


def _rounds(rounds: list[int]) -> str:
    """1,2,3,5 -> 1-3,5"""
    spans: list[list[int]] = []
    for r in sorted(rounds):
        if spans and r == spans[-1][-1] + 1:
            spans[-1].append(r)
        else:
            spans.append([r])
    return ",".join(f"{s[0]}-{s[-1]}" if len(s) > 1 else str(s[0]) for s in spans) or "-"


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(unix)) if unix else "-"


def _created(iso: str) -> str:
    from datetime import datetime

    try:
        return _when(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return iso or "-"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _models(args: argparse.Namespace) -> int:
    """at a site: the models it holds, and the runs whose model it missed

    Lists the model packages this site holds (models/<run-id>/ in its fedhead data folder:
    when the server made it, the run's rounds, its final federated accuracy and its head
    sha256, the one the server logs) and the runs it trained in without their model: one
    it trained in within the last two hours may still be going ("no model yet"); one cut
    off and resumed under another run id has its model under that id ("resumed"); the
    others it missed because it was offline when the run ended, or the run failed
    ("missing"). The node asks for missing models at the start of the next run; the
    operator can also send one at once with a delivery-only run (run-config deliver-from).
    """
    from fedhead.common.weights import fedhead_cache_dir

    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else fedhead_cache_dir()
    if args.forget is not None:
        return _forget(cache_dir, args.forget)
    now = time.time()
    held, missing = held_models(cache_dir), missing_models(cache_dir, now)
    if args.json:
        doc = {
            "cache_dir": str(cache_dir),
            "held": [asdict(m) for m in held],
            "missing": [asdict(m) for m in missing],
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(f"models held in {cache_dir / 'models'}:")
    if held:
        print(f"  {'run':<20}  {'made':<16}  {'rounds':>6}  {'accuracy':>8}  head sha256, model")
    for m in held:
        acc = f"{m.accuracy:.4f}" if m.accuracy is not None else "-"
        print(
            f"  {m.run_id:<20}  {_created(m.created):<16}  {m.rounds or '-':>6}  {acc:>8}  "
            f"{m.head_sha256 or '-'}  {m.backbone} [{m.classes}]"
        )
    if not held:
        print("  none")
    if not missing:
        return 0
    print("runs this site trained in without their model:")
    print(f"  {'run':<20}  {'last trained':<16}  {'rounds':>6}  state")
    for r in missing:
        if r.state == RESUMED:
            state = f"resumed as run {r.resumed_as}, whose model is held"
        elif r.state == NO_MODEL_YET:
            state = (
                f"no model yet: trained in it {_minutes(now - r.trained)} ago (a run still "
                "going delivers its model when it ends)"
            )
        else:
            state = "missing: the run ended while this site was offline, or failed"
        print(f"  {r.run_id:<20}  {_when(r.trained):<16}  {_rounds(r.rounds):>6}  {state}")
    if any(r.state == MISSING for r in missing):
        print(
            "  the node asks the server for missing models at the next run; or ask the "
            "operator to send one now (run-config deliver-from=<the run's out-dir>). A run "
            "that failed has no model: `fedhead models --forget RUN_ID` stops asking for it"
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
