"""``fedhead evaluate``: a run's model package measured on a site's labelled images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedhead.cli import package_options as opts
from fedhead.cli.types import Subparsers, add_command


def _evaluate(args: argparse.Namespace) -> int:
    """measure a model package on labelled images

    Evaluate a run's model package on labelled data: accuracy, balanced accuracy, per-class
    precision and recall, AUROC (one-vs-rest for more than two classes), sensitivity and
    specificity (two classes), expected calibration error (15 bins), each with a 95%
    percentile bootstrap interval, and the confusion matrix. --data: class folders, a .csv
    with path and label columns, or an .npz with images and labels (its test split when it
    names one). Prints a table and writes the metrics as JSON.
    """
    from fedhead.cli.inference import predict
    from fedhead.common.datasets import load_test_set
    from fedhead.common.device import select_device
    from fedhead.common.errors import ConfigError
    from fedhead.common.evaluation import evaluate_predictions
    from fedhead.common.files import atomic_writer
    from fedhead.common.package import ModelPackage

    out = Path(args.out)
    opts.refuse_existing(out, args.force)
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
        Path(args.data),
        classes,
        what="labelled data",
        fix="--data",
        reader=opts.reader_settings(args),
    )
    site = opts.load_site(args)
    preds = predict(site, data.images, select_device(args.device), args.batch_size)
    unreadable = opts.report_unreadable(preds, data.images.describe, opts.side_file(out))
    opts.require_predictions(preds, args.data)
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


def add_parser(sub: Subparsers) -> None:
    """``fedhead evaluate``."""
    ev = add_command(sub, "evaluate", _evaluate)
    opts.package_options(ev)
    ev.add_argument("--data", required=True, help="labelled folder, .csv or .npz")
    ev.add_argument("--out", required=True, help="metrics JSON to write")
    opts.dicom_options(ev)
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (0)")
    ev.add_argument(
        "--positive",
        help="two classes: the class sensitivity refers to (default: the second class)",
    )
    opts.device_options(ev)
