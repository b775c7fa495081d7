"""What ``fedhead predict``, ``evaluate`` and ``export`` share: their options for the
model package, DICOM reading and the device, loading the package onto its verified
trunk, and naming the images that could not be read.

All three read the package, verify the trunk's sha256 on this machine and refuse a
package that is altered, of an unknown format version, or whose tensors do not fit
its architecture, with one line and an exit code.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedhead.cli.inference import Predictions, SiteModel
    from fedhead.common.dicom import ReaderSettings

_SHOWN = 10  # unreadable images named on the terminal (all go to the side file)


def refuse_existing(path: Path, force: bool) -> None:
    """SetupError when ``--out`` exists and ``--force`` was not given."""
    from fedhead.common.errors import SetupError

    if path.exists() and not force:
        raise SetupError(f"{path} already exists", "choose another --out, or pass --force")


def load_site(args: argparse.Namespace) -> SiteModel:
    """The package of ``--model`` on its sha256-verified trunk, described on stderr."""
    from fedhead.cli.inference import load_site_model
    from fedhead.common.logs import setup_logging

    setup_logging("WARNING")
    # This command names every unreadable image itself; the extractor's per-image
    # warnings would repeat them.
    logging.getLogger("fedhead.common.features").setLevel(logging.ERROR)
    weights = Path(args.weights).expanduser() if args.weights else None
    site = load_site_model(Path(args.model), weights)
    pkg = site.package
    print(
        f"model {args.model}: {pkg.backbone.name} trunk (sha256 {pkg.backbone.sha256[:12]}… "
        f"verified), {pkg.architecture.head} head, classes {', '.join(pkg.classes)}, "
        f"{pkg.preprocessing.input_size} px",
        file=sys.stderr,
    )
    return site


def report_unreadable(preds: Predictions, describe: Any, listing: Path) -> list[dict[str, str]]:
    """Name unreadable images on stderr (the first few) and in ``listing`` (all)."""
    from fedhead.common.files import atomic_writer

    rows = [{"path": describe(i), "error": why} for i, why in preds.unreadable]
    if not rows:
        return rows
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "error"])
    writer.writeheader()
    writer.writerows(rows)
    with atomic_writer(listing) as f:
        f.write(buf.getvalue().encode())
    print(
        f"warning: {len(rows)} of {preds.total} images could not be read and have no "
        f"prediction; all are listed in {listing}:",
        file=sys.stderr,
    )
    for row in rows[:_SHOWN]:
        print(f"  {row['error']}", file=sys.stderr)
    if len(rows) > _SHOWN:
        print(f"  ... and {len(rows) - _SHOWN} more", file=sys.stderr)
    return rows


def require_predictions(preds: Predictions, data: str) -> None:
    """DataError when not one image of ``data`` could be read."""
    from fedhead.common.errors import DataError

    if len(preds.ok) == 0:
        raise DataError(
            f"none of the {preds.total} images in {data} could be read",
            "check the files (see the list above)",
        )


def side_file(out: Path) -> Path:
    """Where the unreadable images are listed: ``<out>.unreadable.csv`` beside ``out``."""
    return out.with_name(out.stem + ".unreadable.csv")


def package_options(p: argparse.ArgumentParser) -> None:
    """--model, --weights and --force."""
    p.add_argument("--model", required=True, help="model package folder (holds model.json)")
    p.add_argument(
        "--weights",
        help="the trunk's weights file, when it is not installed "
        "(default: fedhead's and torch's caches; `fedhead weights install NAME`)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out file")


def reader_settings(args: argparse.Namespace) -> ReaderSettings:
    """How DICOM files are read: the package's settings, or the site's own overrides."""
    from fedhead.common.dicom import ReaderSettings
    from fedhead.common.errors import ConfigError
    from fedhead.common.package import ModelPackage

    pre = ModelPackage.load(Path(args.model)).preprocessing
    window = pre.dicom_window if args.dicom_window is None else args.dicom_window
    frame = pre.dicom_frame if args.dicom_frame is None else args.dicom_frame
    try:
        return ReaderSettings(window=window, frame=frame)
    except ValueError as err:
        raise ConfigError([f"--dicom-window/--dicom-frame: {err}"], "arguments") from err


def dicom_options(p: argparse.ArgumentParser) -> None:
    """--dicom-window and --dicom-frame."""
    p.add_argument(
        "--dicom-window",
        type=int,
        help="DICOM: which VOI LUT / window to apply (-1 = none); default: the package's, "
        "which is the sites' default (0, the first); give your node's dicom-window if set",
    )
    p.add_argument(
        "--dicom-frame",
        type=int,
        help="DICOM: which frame of a multi-frame file; default: the package's (0)",
    )


def device_options(p: argparse.ArgumentParser) -> None:
    """--device and --batch-size."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=int, default=64, help="images per trunk batch (64)")
