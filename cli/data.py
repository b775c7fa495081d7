"""``fedhead data check``: read every image of a site's data before it joins;
``fedhead data demo-split``: the embedded demo data as trial sites' data.

The check reports formats, bit depths, photometric interpretations, sizes and pixel
spacing; from DICOM headers it reads nothing else (no names, IDs or dates).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from fedhead.cli.types import Subparsers, add_command, add_group
from fedhead.common.config import DEFAULT_MAX_IMAGE_PIXELS
from fedhead.common.errors import ConfigError

if TYPE_CHECKING:
    from fedhead.common.datasets import ReadPolicy
    from fedhead.common.dicom import ReaderSettings

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")  # a folder name, as in `certs`


def parse_classes(text: str, flag: str = "--classes") -> list[str]:
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if len(classes) < 2:
        raise ConfigError([f"{flag}: needs at least two comma-separated class names"])
    return classes


def read_settings(
    data_roots: str | None, max_image_pixels: int, dicom_window: int, dicom_frame: int
) -> tuple[ReadPolicy, ReaderSettings]:
    """The node's reading options (as `fedhead node` takes them) for a data check."""
    from fedhead.common.config import MAX_INPUT_SIZE, NodeConfig
    from fedhead.common.datasets import ReadPolicy
    from fedhead.common.dicom import ReaderSettings
    from fedhead.common.images import DecodeLimits

    try:
        reader = ReaderSettings(window=dicom_window, frame=dicom_frame)
    except ValueError as err:
        raise ConfigError([f"--dicom-window/--dicom-frame: {err}"]) from err
    node = NodeConfig.from_mapping(
        {
            "data-roots": ",".join(
                str(Path(r.strip()).expanduser().resolve())
                for r in (data_roots or "").split(",")
                if r.strip()
            ),
            "max-image-pixels": max_image_pixels,
        }
    )
    # checking needs no detail: images are decoded only as far as the largest input needs
    policy = ReadPolicy(
        node.data_root_paths(), DecodeLimits.for_input(MAX_INPUT_SIZE, node.max_image_pixels)
    )
    return policy, reader


def check_site_data(
    path: Path,
    classes: list[str],
    val_fraction: float = 0.15,
    seed: int = 0,
    policy: ReadPolicy | None = None,
    reader: ReaderSettings | None = None,
) -> int:
    """Read and decode every image at ``path``; print counts, formats and unreadable files.

    Returns the number of usable images; DataError when there are none (or the data
    cannot be read at all). ``fedhead node`` runs the same check before it joins.
    """
    from fedhead.cli.preflight import require_data

    require_data(path.expanduser(), "data")  # before the imports that take seconds
    from fedhead.cli.inventory import Inventory, array_facts, file_facts, source_file
    from fedhead.common.datasets import load_site_data
    from fedhead.common.errors import DataError
    from fedhead.common.images import ImageDecodeError

    data = load_site_data(path.expanduser(), classes, val_fraction, seed, None, policy, reader)
    print(data.summary(classes))
    bad: list[str] = []
    inventory = Inventory()
    for part in (data.train, data.val):
        for i in range(len(part)):
            try:
                part.images.key(i)
                image = part.images.load(i)
                source = source_file(part.images, i)
                inventory.add(file_facts(source) if source else array_facts(image))
            except ImageDecodeError as err:
                bad.append(str(err))
    for line in inventory.lines():
        print(line)
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
    """read and decode every image; count per class, format, bit depth and size

    Formats: folder of class folders (or train/ and val/ with class folders), CSV manifest
    with path,label[,split], .npz with images/labels[/val_images/val_labels/class_names].
    Images: PNG/JPEG/TIFF (8 or 16 bit) and grayscale DICOM.
    """
    from fedhead.cli.preflight import require_data

    require_data(Path(args.path).expanduser(), "data")  # before reading settings (torch)
    policy, reader = read_settings(
        args.data_roots, args.max_image_pixels, args.dicom_window, args.dicom_frame
    )
    check_site_data(
        Path(args.path), parse_classes(args.classes), args.val_fraction, args.seed, policy, reader
    )
    return 0


def _demo_split(args: argparse.Namespace) -> int:
    """write the embedded demo X-rays as one .npz per site (for a trial federation)

    Splits the embedded demo data (PneumoniaMNIST) over the given sites, non-IID
    (Dirichlet), and writes OUT/<site>/data.npz for each: the data a trial site's `fedhead
    node --data` reads. Existing files are never overwritten.
    """
    import numpy as np

    from fedhead.common import demo_data
    from fedhead.common.errors import SetupError
    from fedhead.common.files import atomic_writer

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    problems = [
        f"--sites: {site!r} must be letters, digits, '.', '_' or '-'"
        for site in sites
        if not _SITE_NAME.match(site)
    ]
    if not sites or len(set(sites)) != len(sites):
        problems.append("--sites: give one or more unique names, comma-separated")
    if not 0 < args.alpha <= 1000:
        problems.append(f"--alpha: must be in (0, 1000] (got {args.alpha})")
    if problems:
        raise ConfigError(problems, "demo-split options")
    out = Path(args.out).expanduser()
    targets = [out / site / "data.npz" for site in sites]
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise SetupError(
            f"refusing to overwrite {', '.join(existing)}", "remove them or choose another --out"
        )
    shares = demo_data.shares(len(sites), alpha=args.alpha, seed=args.seed)
    for share, target in zip(shares, targets, strict=True):
        with atomic_writer(target) as f:
            np.savez(
                f,
                images=share.train.images,
                labels=share.train.labels,
                val_images=share.val.images,
                val_labels=share.val.labels,
                class_names=np.array(demo_data.CLASSES),
            )
        print(f"wrote {target} ({len(share.train.labels)} train, {len(share.val.labels)} val)")
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead data check`` and ``fedhead data demo-split``."""
    dsub = add_group(sub, "data", help="check a site's data before joining a federation")
    dk = add_command(dsub, "check", _data_check)
    dk.add_argument("path", help="image folder, .csv manifest or .npz file")
    dk.add_argument("--classes", required=True, help="the run's classes, comma-separated")
    dk.add_argument("--val-fraction", type=float, default=0.15)
    dk.add_argument("--seed", type=int, default=0)
    dk.add_argument(
        "--dicom-window",
        type=int,
        default=0,
        help="DICOM: which VOI LUT / window to apply, as the node's dicom-window "
        "(0 = the first, -1 = none)",
    )
    dk.add_argument(
        "--dicom-frame",
        type=int,
        default=0,
        help="DICOM: which frame of a multi-frame file, as the node's dicom-frame",
    )
    dk.add_argument(
        "--data-roots",
        help="comma-separated folders besides the data folder that image paths may lead "
        "into, as the node's data-roots",
    )
    dk.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"as the node's max-image-pixels ({DEFAULT_MAX_IMAGE_PIXELS})",
    )
    ds = add_command(dsub, "demo-split", _demo_split)
    ds.add_argument("--out", required=True, help="folder to write <site>/data.npz into")
    ds.add_argument("--sites", default="site-1,site-2", help="site names, comma-separated")
    ds.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration (1.0)")
    ds.add_argument("--seed", type=int, default=0)
