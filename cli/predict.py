"""``fedhead predict``: class probabilities for a site's images from a run's model package."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from fedhead.cli import package_options as opts
from fedhead.cli.types import Subparsers, add_command


def _predict(args: argparse.Namespace) -> int:
    """predict classes for images with a model package

    Predict with a run's model package, preprocessing images exactly as the sites did in
    training. --data: an image file, a folder (searched recursively, class folders
    included), a .csv with a 'path' column, or an .npz with an 'images' array. Writes a CSV
    with columns path, prediction and one p_<class> per class. Images that cannot be read
    get no row: they are counted, named on stderr and all listed in <out>.unreadable.csv
    beside --out.
    """
    from fedhead.cli.inference import predict
    from fedhead.common.datasets import read_images
    from fedhead.common.device import select_device
    from fedhead.common.files import atomic_writer

    out = Path(args.out)
    opts.refuse_existing(out, args.force)
    images = read_images(
        Path(args.data), opts.reader_settings(args)
    )  # a bad path fails before the trunk
    site = opts.load_site(args)
    preds = predict(site, images, select_device(args.device), args.batch_size)
    opts.report_unreadable(preds, images.describe, opts.side_file(out))
    opts.require_predictions(preds, args.data)
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


def add_parser(sub: Subparsers) -> None:
    """``fedhead predict``."""
    pr = add_command(sub, "predict", _predict)
    opts.package_options(pr)
    pr.add_argument("--data", required=True, help="image file, folder, .csv or .npz")
    pr.add_argument("--out", required=True, help="predictions CSV to write")
    opts.dicom_options(pr)
    opts.device_options(pr)
