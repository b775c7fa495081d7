"""``fedhead predict|evaluate|export``: using a run's model package at a site.

All three read the package, verify the trunk's sha256 on this machine and refuse a
package that is altered, of an unknown format version, or whose tensors do not fit
its architecture, with one line and an exit code.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedhead.cli.types import Subparsers, add_command

if TYPE_CHECKING:
    from fedhead.common.dicom import ReaderSettings
    from fedhead.common.inference import Predictions, SiteModel

_SHOWN = 10  # unreadable images named on the terminal (all go to the side file)


def _refuse_existing(path: Path, force: bool) -> None:
    from fedhead.common.errors import SetupError

    if path.exists() and not force:
        raise SetupError(f"{path} already exists", "choose another --out, or pass --force")


def _load(args: argparse.Namespace) -> SiteModel:
    from fedhead.common.inference import load_site_model
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


def _report_unreadable(preds: Predictions, describe: Any, side_file: Path) -> list[dict[str, str]]:
    """Name unreadable images on stderr (the first few) and in ``side_file`` (all)."""
    from fedhead.common.files import atomic_writer

    rows = [{"path": describe(i), "error": why} for i, why in preds.unreadable]
    if not rows:
        return rows
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "error"])
    writer.writeheader()
    writer.writerows(rows)
    with atomic_writer(side_file) as f:
        f.write(buf.getvalue().encode())
    print(
        f"warning: {len(rows)} of {preds.total} images could not be read and have no "
        f"prediction; all are listed in {side_file}:",
        file=sys.stderr,
    )
    for row in rows[:_SHOWN]:
        print(f"  {row['error']}", file=sys.stderr)
    if len(rows) > _SHOWN:
        print(f"  ... and {len(rows) - _SHOWN} more", file=sys.stderr)
    return rows


def _no_predictions(preds: Predictions, data: str) -> None:
    from fedhead.common.errors import DataError

    if len(preds.ok) == 0:
        raise DataError(
            f"none of the {preds.total} images in {data} could be read",
            "check the files (see the list above)",
        )


def _side_file(out: Path) -> Path:
    return out.with_name(out.stem + ".unreadable.csv")


def _predict(args: argparse.Namespace) -> int:
    """predict classes for images with a model package

    Predict with a run's model package, preprocessing images exactly as the sites did in
    training. --data: an image file, a folder (searched recursively, class folders
    included), a .csv with a 'path' column, or an .npz with an 'images' array. Writes a CSV
    with columns path, prediction and one p_<class> per class. Images that cannot be read
    get no row: they are counted, named on stderr and all listed in <out>.unreadable.csv
    beside --out.
    """
    from fedhead.common.datasets import read_images
    from fedhead.common.device import select_device
    from fedhead.common.files import atomic_writer
    from fedhead.common.inference import predict

    out = Path(args.out)
    _refuse_existing(out, args.force)
    images = read_images(Path(args.data), _reader(args))  # a bad path fails before the trunk
    site = _load(args)
    preds = predict(site, images, select_device(args.device), args.batch_size)
    _report_unreadable(preds, images.describe, _side_file(out))
    _no_predictions(preds, args.data)
    classes = site.classes
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "prediction", *(f"p_{c}" for c in classes)])
    for i, p in zip(preds.ok, preds.probabilities, strict=True):
        writer.writerow(
            [images.describe(int(i)), classes[int(p.argmax())], *(f"{x:.6f}" for x in p)]
        )
    with atomic_writer(out) as f:
        f.write(buf.getvalue().encode())
    counts = {c: 0 for c in classes}
    for k in preds.predicted:
        counts[classes[int(k)]] += 1
    summary = ", ".join(f"{c} {n}" for c, n in counts.items())
    print(f"predicted {len(preds.ok)} of {preds.total} images ({summary}): {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """measure a model package on labelled images

    Evaluate a run's model package on labelled data: accuracy, balanced accuracy, per-class
    precision and recall, AUROC (one-vs-rest for more than two classes), sensitivity and
    specificity (two classes), expected calibration error (15 bins), each with a 95%
    percentile bootstrap interval, and the confusion matrix. --data: class folders, a .csv
    with path and label columns, or an .npz with images and labels (its test split when it
    names one). Prints a table and writes the metrics as JSON.
    """
    from fedhead.common.datasets import load_test_set
    from fedhead.common.device import select_device
    from fedhead.common.errors import ConfigError
    from fedhead.common.evaluation import evaluate_predictions
    from fedhead.common.files import atomic_writer
    from fedhead.common.inference import predict
    from fedhead.common.package import ModelPackage

    out = Path(args.out)
    _refuse_existing(out, args.force)
    if args.bootstrap < 0:
        raise ConfigError([f"--bootstrap: must be >= 0 (got {args.bootstrap})"], "arguments")
    # The package's classes first: wrong labels or arguments fail before the trunk loads.
    classes = list(ModelPackage.load(Path(args.model)).classes)
    positive = 1
    if args.positive is not None:
        if len(classes) != 2 or args.positive not in classes:
            raise ConfigError(
                [f"--positive: must be one of the two classes {classes} (got {args.positive!r})"],
                "arguments",
            )
        positive = classes.index(args.positive)
    data = load_test_set(
        Path(args.data), classes, what="labelled data", fix="--data", reader=_reader(args)
    )
    site = _load(args)
    preds = predict(site, data.images, select_device(args.device), args.batch_size)
    unreadable = _report_unreadable(preds, data.images.describe, _side_file(out))
    _no_predictions(preds, args.data)
    result = evaluate_predictions(
        data.labels[preds.ok],
        preds.probabilities,
        classes,
        positive=positive,
        resamples=args.bootstrap,
        seed=args.seed,
    )
    doc = {
        "model": str(Path(args.model).resolve()),
        "data": str(Path(args.data).resolve()),
        "images": preds.total,
        "unreadable": unreadable,
        **result.to_json(),
    }
    with atomic_writer(out) as f:
        f.write((json.dumps(doc, indent=2) + "\n").encode())
    print(f"{result.examples} labelled images, {len(unreadable)} unreadable")
    print(result.table())
    print(f"metrics: {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """export a model package as one ONNX or TorchScript file

    Write trunk, head and preprocessing (channel handling, resize and centre crop,
    normalisation) as one file. Input: a uint8 tensor N x C x H x W with values 0..255, C =
    --channels (1 grayscale, 3 RGB), H x W = --height x --width (default: the model's input
    size; other sizes are resized inside the model as in training); any batch size N.
    Output: N x classes probabilities, in the package's class order. The file is checked
    against the package on sample images and only kept when the largest difference is at
    most 1e-4. ONNX needs the export extra: pip install 'fedhead[export]'. TorchScript is
    deprecated by PyTorch but still loads with torch.jit.load.
    """
    from fedhead.common.errors import ConfigError
    from fedhead.common.export import TOLERANCE, export_model

    out = Path(args.out)
    _refuse_existing(out, args.force)
    bad = [
        f"--{name}: must be >= {low} (got {value})"
        for name, value, low in (
            ("height", args.height, 0),
            ("width", args.width, 0),
            ("samples", args.samples, 2),
        )
        if value < low
    ]
    if bad:
        raise ConfigError(bad, "arguments")
    site = _load(args)
    result = export_model(
        site,
        args.format,
        out,
        channels=args.channels,
        height=args.height,
        width=args.width,
        samples=args.samples,
        overwrite=args.force,
    )
    c, h, w = result.input_shape
    print(
        f"exported {result.format}: {result.path} (input uint8 N x {c} x {h} x {w}, "
        f"output N x {len(site.classes)} probabilities: {', '.join(site.classes)})"
    )
    print(
        f"largest difference from the package on {result.samples} sample images: "
        f"{result.max_abs_diff:.2e} (tolerance {TOLERANCE:g})"
    )
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model package folder (holds model.json)")
    p.add_argument(
        "--weights",
        help="the trunk's weights file, when it is not installed "
        "(default: fedhead's and torch's caches; `fedhead weights install NAME`)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out file")


def _reader(args: argparse.Namespace) -> ReaderSettings:
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


def _dicom(p: argparse.ArgumentParser) -> None:
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


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=int, default=64, help="images per trunk batch (64)")


def add_parser(sub: Subparsers) -> None:
    """``fedhead predict``, ``fedhead evaluate``, ``fedhead export``."""
    pr = add_command(sub, "predict", _predict)
    _common(pr)
    pr.add_argument("--data", required=True, help="image file, folder, .csv or .npz")
    pr.add_argument("--out", required=True, help="predictions CSV to write")
    _dicom(pr)
    _device(pr)

    ev = add_command(sub, "evaluate", _evaluate)
    _common(ev)
    ev.add_argument("--data", required=True, help="labelled folder, .csv or .npz")
    ev.add_argument("--out", required=True, help="metrics JSON to write")
    _dicom(ev)
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (0)")
    ev.add_argument(
        "--positive",
        help="two classes: the class sensitivity refers to (default: the second class)",
    )
    _device(ev)

    ex = add_command(sub, "export", _export)
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    ex.add_argument("--out", required=True, help="file to write (.onnx or .pt)")
    _common(ex)
    ex.add_argument("--channels", type=int, choices=[1, 3], default=3, help="input channels (3)")
    ex.add_argument("--height", type=int, default=0, help="input height (model's input size)")
    ex.add_argument("--width", type=int, default=0, help="input width (model's input size)")
    ex.add_argument("--samples", type=int, default=8, help="sample images for the check (8)")
