"""A site's private data: an image folder, a CSV manifest or an .npz file.

The run names the classes; each site maps its own labels onto them by name, and may
lack some classes. A validation split is taken from the data when it has one (a
``val/`` folder, a ``split`` column, ``val_images`` arrays), otherwise held out per
class with a fixed seed so it is the same in every round and every run.

Formats (``data-path`` in the node config):
- folder of class folders: ``<path>/<class>/<image>``; or ``<path>/train/<class>/...``
  with ``<path>/val/<class>/...`` beside it. Class folders may hold sub-folders (a
  study's DICOM series): every image file below a class folder is one example with
  that class's label.
- ``.csv`` with a header naming ``path`` and ``label`` columns (optional ``split``
  column: ``train``, ``val`` or ``test``); paths relative to the CSV's folder; labels
  are class names. A row may name a folder (a DICOM series): each image file below
  it is one example with the row's label and split.

- ``.npz`` with ``images``/``labels`` (or ``train_images``/``train_labels``), optional
  ``val_images``/``val_labels`` and ``test_images``/``test_labels``, and optional
  ``class_names`` (label i = class_names[i]; without it, integer labels are indices
  into the run's classes, string labels are names). Images uint8 (N,H,W[,C]).

Image files are PNG/JPEG/TIFF/... (8 or 16 bit) and DICOM (``.dcm``, or files without
an image suffix that carry the DICOM 'DICM' mark); see ``fedhead.common.dicom``.

A site trains on the training part and validates on the validation part; a test part
is only used for server-side evaluation.

Every image path, symlinks followed, must lead into the data folder (the folder given,
or the CSV manifest's folder) or a folder the node lists in ``data-roots``: a manifest
naming ``/etc/passwd`` or ``../other/x.png``, or a symlink leading out, stops the site
with a line naming the path.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedhead.common.dicom import ReaderSettings, is_dicom_path
from fedhead.common.errors import DataError
from fedhead.common.images import (
    IMAGE_EXTENSIONS,
    ArrayImages,
    ConcatImages,
    DecodeLimits,
    FileImages,
    HashMemo,
    ImageSource,
    LabeledImages,
    concat,
)

_VAL_NAMES = ("val", "validation")


@dataclass(frozen=True)
class Parts:
    """What a data path holds: training images and, where the data names them, splits."""

    train: LabeledImages
    val: LabeledImages | None = None
    test: LabeledImages | None = None


@dataclass(frozen=True)
class ReadPolicy:
    """Where a site's image files may lie besides its data folder, and how they decode."""

    data_roots: tuple[Path, ...] = ()  # further folders image paths may lead into
    decode: DecodeLimits = field(default_factory=DecodeLimits)


@dataclass(frozen=True)
class _Files:
    """Makes image sources of file paths, refusing paths that lead outside the allowed
    folders (the data folder, then the node's data-roots; all resolved)."""

    base: Path
    allowed: tuple[Path, ...]
    memo: HashMemo | None
    decode: DecodeLimits
    reader: ReaderSettings | None

    @classmethod
    def of(
        cls,
        base: Path,
        policy: ReadPolicy,
        memo: HashMemo | None,
        reader: ReaderSettings | None = None,
    ) -> _Files:
        allowed = tuple(r.resolve() for r in (base, *policy.data_roots))
        return cls(base, allowed, memo, policy.decode, reader)

    def images(self, paths: list[Path], where: str) -> FileImages:
        outside = []
        for p in paths:
            try:
                target = p.resolve()
            except (OSError, RuntimeError):  # a symlink loop: unreadable, counted later
                continue
            if not any(target.is_relative_to(root) for root in self.allowed):
                outside.append(str(p) if target == p.absolute() else f"{p} -> {target}")
        if outside:
            raise DataError(
                f"{where}: {len(outside)} image path(s) lead outside the data folder "
                f"{self.base}, e.g. {', '.join(outside[:3])}",
                "move the images into the data folder, or list the folder they lie in "
                "under the node's data-roots",
            )
        return FileImages(paths, self.memo, self.reader, self.decode)


@dataclass(frozen=True)
class SiteData:
    train: LabeledImages
    val: LabeledImages
    source: str  # what was read, for logs
    val_held_out: bool  # True when the validation split was drawn from the training data

    def summary(self, classes: Sequence[str]) -> str:
        def counts(part: LabeledImages) -> str:
            c = part.class_counts(len(classes))
            return ", ".join(f"{name} {n}" for name, n in zip(classes, c, strict=True))

        return (
            f"{self.source}: train {len(self.train)} ({counts(self.train)}), "
            f"validation {len(self.val)} ({counts(self.val)})"
        )


def _expected(classes: Sequence[str]) -> str:
    return ", ".join(classes)


def map_label_names(names: Sequence[str], classes: Sequence[str], where: str) -> np.ndarray:
    """Class names -> indices into ``classes``; an unknown name lists the expected ones."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({n for n in names if n not in index})
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5])
        raise DataError(
            f"{where}: label(s) {shown} are not among the run's classes ({_expected(classes)})",
            "rename the labels or folders to the run's class names",
        )
    return np.array([index[n] for n in names], dtype=np.int64)


def held_out_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), stratified per class, deterministic."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = math.ceil(fraction * len(idx)) if len(idx) >= 2 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_site_data(
    path: Path,
    classes: Sequence[str],
    val_fraction: float = 0.15,
    seed: int = 0,
    memo: HashMemo | None = None,
    policy: ReadPolicy | None = None,
    reader: ReaderSettings | None = None,
) -> SiteData:
    """Read a site's data path; see the module docstring for the formats."""
    if not str(path):
        raise DataError(
            "no data path is set for this site",
            "start the node with --node-config \"data-path='/path/to/data'\"",
        )
    if not path.exists():
        raise DataError(
            f"data path {path} does not exist",
            "set data-path to the site's image folder, .csv manifest or .npz file",
        )
    parts = read_parts(path, classes, memo, policy, reader)
    train, val = parts.train, parts.val
    if len(train) == 0:
        raise DataError(f"no training images found in {path}", "check the data path and layout")
    held_out = val is None
    if val is None:
        tr, va = held_out_split(train.labels, val_fraction, seed)
        train, val = train.subset(tr), train.subset(va)
    return SiteData(train, val, str(path), held_out)


def read_parts(
    path: Path,
    classes: Sequence[str],
    memo: HashMemo | None = None,
    policy: ReadPolicy | None = None,
    reader: ReaderSettings | None = None,
) -> Parts:
    """Read any supported data path into its parts (no held-out split yet)."""
    policy = policy or ReadPolicy()
    if path.is_dir():
        return _load_folder(path, classes, _Files.of(path, policy, memo, reader))
    if path.suffix.lower() == ".csv":
        return _load_csv(path, classes, _Files.of(path.parent, policy, memo, reader))
    if path.suffix.lower() == ".npz":
        return _load_npz(path, classes)
    raise DataError(
        f"data path {path} is neither a folder, a .csv nor an .npz file",
        "point it at one of those",
    )


def load_test_set(
    path: Path,
    classes: Sequence[str],
    policy: ReadPolicy | None = None,
    what: str = "server test data",
    fix: str = "server-test-data",
    reader: ReaderSettings | None = None,
) -> LabeledImages:
    """Labelled images for evaluation: the data's test split if it names one (a
    ``test/`` folder, ``split`` = test, ``test_images`` in an .npz), else all of its
    images. ``what`` and ``fix`` name the data and the setting in messages."""
    if not path.exists():
        raise DataError(f"{what} {path} does not exist", f"fix {fix}")
    parts = read_parts(path, classes, None, policy, reader)
    if parts.test is not None:
        return parts.test
    test = concat([p for p in (parts.train, parts.val) if p is not None])
    if len(test) == 0:
        raise DataError(f"{what} {path} holds no images", f"fix {fix}")
    return test


def read_images(path: Path, reader: ReaderSettings | None = None) -> ImageSource:
    """Unlabelled images to predict on: one image file, a folder (searched recursively,
    class folders included), a .csv with a ``path`` column (other columns ignored;
    paths relative to the CSV's folder) or an .npz with ``images`` (else its
    ``train_images``, ``val_images`` and ``test_images``, in that order).

    Files listed but missing or undecodable stay in the source: reading them raises
    ImageDecodeError, so callers count and name them instead of losing them. DICOM files
    are read with ``reader`` settings (window, frame).
    """
    if not path.exists():
        raise DataError(f"{path} does not exist", "give an image file, a folder, a .csv or an .npz")
    suffix = path.suffix.lower()
    if path.is_dir():
        source: ImageSource = FileImages(
            sorted(p for p in path.rglob("*") if _is_image(p)), reader=reader
        )
    elif suffix == ".csv":
        source = FileImages(_csv_paths(path), reader=reader)
    elif suffix == ".npz":
        source = _npz_images(path)
    elif _is_image(path):
        source = FileImages([path], reader=reader)
    else:
        raise DataError(
            f"{path} is neither an image, a folder, a .csv nor an .npz file",
            "point it at one of those",
        )
    if len(source) == 0:
        raise DataError(f"no images found in {path}", "check the path and the layout")
    return source


def _csv_paths(path: Path) -> list[Path]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = {(h or "").strip().lower(): h for h in reader.fieldnames or []}
            if "path" not in header:
                raise DataError(
                    f"{path}: the CSV header must name a 'path' column "
                    f"(found: {', '.join(header) or 'nothing'})",
                    "add a header line such as path",
                )
            column = header["path"]
            values = [(row.get(column) or "").strip() for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the CSV manifest ({err})") from err
    return [(path.parent / v).resolve() for v in values if v]


def _npz_images(path: Path) -> ImageSource:
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = (
                ["images"]
                if "images" in data.files
                else [k for k in ("train_images", "val_images", "test_images") if k in data.files]
            )
            arrays = {k: data[k] for k in keys}
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    if not arrays:
        raise DataError(
            f"{path}: no images array", "store the images as an array named images (uint8)"
        )
    try:
        parts: list[ImageSource] = [ArrayImages(a, f"{path.name}:{k}") for k, a in arrays.items()]
    except ValueError as err:
        raise DataError(str(err), "store images as uint8 arrays") from err
    return parts[0] if len(parts) == 1 else ConcatImages(parts)


def _is_image(p: Path) -> bool:
    return (
        p.is_file()
        and not p.name.startswith(".")
        and (p.suffix.lower() in IMAGE_EXTENSIONS or is_dicom_path(p))
    )


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_split(root: Path, classes: Sequence[str], files: _Files) -> LabeledImages:
    paths: list[Path] = []
    names: list[str] = []
    folders = _class_folders(root)
    if not folders:
        raise DataError(
            f"{root} has no class folders",
            f"put images in one folder per class ({_expected(classes)})",
        )
    map_label_names([f.name for f in folders], classes, str(root))  # fail early, list all
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if _is_image(p):
                paths.append(p)
                names.append(folder.name)
    return LabeledImages(
        files.images(paths, str(root)),
        map_label_names(names, classes, str(root)),
    )


def _load_folder(root: Path, classes: Sequence[str], files: _Files) -> Parts:
    sub = {p.name.lower(): p for p in _class_folders(root)}
    if "train" in sub and "train" not in classes:
        val_dir = next((sub[n] for n in _VAL_NAMES if n in sub), None)
        return Parts(
            _folder_split(sub["train"], classes, files),
            _folder_split(val_dir, classes, files) if val_dir else None,
            _folder_split(sub["test"], classes, files) if "test" in sub else None,
        )
    return Parts(_folder_split(root, classes, files))


def _load_csv(path: Path, classes: Sequence[str], files: _Files) -> Parts:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in reader.fieldnames or []]
            if "path" not in header or "label" not in header:
                raise DataError(
                    f"{path}: the CSV header must name 'path' and 'label' columns "
                    f"(found: {', '.join(header) or 'nothing'})",
                    "add a header line such as path,label",
                )
            rows = [
                {k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the CSV manifest ({err})") from err
    rows = [r for r in rows if r.get("path")]
    known = ("", "train", "test", *_VAL_NAMES)
    bad_split = sorted({r.get("split", "") for r in rows} - set(known))
    if bad_split:
        raise DataError(
            f"{path}: split values {bad_split} are not train, val or test", "fix the split column"
        )
    base = path.parent
    paths = [Path(os.path.abspath(base / r["path"])) for r in rows]  # symlinks kept
    rows, paths = _expand_series(rows, paths, path)
    labels = map_label_names([r["label"] for r in rows], classes, str(path))
    images = files.images(paths, str(path))
    everything = LabeledImages(images, labels)
    split = np.array([r.get("split", "") or "train" for r in rows])
    split[np.isin(split, _VAL_NAMES)] = "val"

    def part(name: str) -> LabeledImages | None:
        idx = np.flatnonzero(split == name)
        return everything.subset(idx) if len(idx) else None

    return Parts(part("train") or everything.subset([]), part("val"), part("test"))


def _expand_series(
    rows: list[dict[str, str]], paths: list[Path], manifest: Path
) -> tuple[list[dict[str, str]], list[Path]]:
    """A row naming a folder (a DICOM series) stands for every image file below it."""
    out_rows, out_paths = [], []
    for row, p in zip(rows, paths, strict=True):
        members = sorted(q for q in p.rglob("*") if _is_image(q)) if p.is_dir() else [p]
        if not members:
            raise DataError(
                f"{manifest}: the row for {row['path']!r} names a folder without image files",
                "point it at a series folder holding DICOM or image files, or remove the row",
            )
        out_rows += [row] * len(members)
        out_paths += members
    return out_rows, out_paths


def _npz_labels(
    raw: np.ndarray, names: np.ndarray | None, classes: Sequence[str], where: str
) -> np.ndarray:
    flat = raw.reshape(-1)
    if names is not None:
        if (
            not np.issubdtype(flat.dtype, np.integer)
            or flat.min(initial=0) < 0
            or (len(flat) and flat.max() >= len(names))
        ):
            raise DataError(f"{where}: labels must be integers indexing class_names")
        return map_label_names([str(names[i]) for i in flat], classes, where)
    if flat.dtype.kind in "US":
        return map_label_names([str(x) for x in flat], classes, where)
    if not np.issubdtype(flat.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers or class names, got {flat.dtype}")
    if len(flat) and (flat.min() < 0 or flat.max() >= len(classes)):
        raise DataError(
            f"{where}: label values {sorted(set(flat.tolist()) - set(range(len(classes))))[:5]} "
            f"are not indices of the run's classes ({_expected(classes)})",
            "add a class_names array to the .npz or fix the labels",
        )
    return flat.astype(np.int64)


def _load_npz(path: Path, classes: Sequence[str]) -> Parts:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    names = arrays.get("class_names")
    for img_key, lab_key in (("images", "labels"), ("train_images", "train_labels")):
        if img_key in arrays and lab_key in arrays:
            break
    else:
        raise DataError(
            f"{path}: no images/labels arrays (found: {', '.join(sorted(arrays)) or 'none'})",
            "store arrays named images and labels (or train_images and train_labels)",
        )

    def part(ik: str, lk: str) -> LabeledImages:
        imgs, labs = arrays[ik], arrays[lk]
        if len(imgs) != len(labs.reshape(-1)):
            raise DataError(f"{path}: {ik} has {len(imgs)} entries but {lk} has {labs.size}")
        try:
            source = ArrayImages(imgs, f"{path.name}:{ik}")
        except ValueError as err:
            raise DataError(str(err), "store images as uint8 arrays") from err
        return LabeledImages(source, _npz_labels(labs, names, classes, f"{path}:{lk}"))

    def optional(name: str) -> LabeledImages | None:
        return part(f"{name}_images", f"{name}_labels") if f"{name}_images" in arrays else None

    return Parts(part(img_key, lab_key), optional("val"), optional("test"))
