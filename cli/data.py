"""``fedhead data check``: read every image of a site's data before it joins."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedhead.cli.types import Subparsers
from fedhead.common.errors import ConfigError


def parse_classes(text: str, flag: str = "--classes") -> list[str]:
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if len(classes) < 2:
        raise ConfigError([f"{flag}: needs at least two comma-separated class names"])
    return classes


def check_site_data(
    path: Path, classes: list[str], val_fraction: float = 0.15, seed: int = 0
) -> int:
    """Read and decode every image at ``path``; print counts and unreadable files.

    Returns the number of usable images; DataError when there are none (or the data
    cannot be read at all). ``fedhead node`` runs the same check before it joins.
    """
    from fedhead.common.datasets import load_site_data
    from fedhead.common.errors import DataError
    from fedhead.common.images import ImageDecodeError

    data = load_site_data(path.expanduser(), classes, val_fraction, seed)
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
        raise DataError(f"no usable images at {path}", "fix or replace the image files")
    return usable


def _data_check(args: argparse.Namespace) -> int:
    check_site_data(Path(args.path), parse_classes(args.classes), args.val_fraction, args.seed)
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead data check``."""
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
