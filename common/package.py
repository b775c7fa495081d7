"""A run's result as a model package a site can use: ``model.json``, ``head.safetensors``,
``MODEL_CARD.md``.

Like torchvision's ``Weights`` (weights carry their transforms and metadata), the
package carries everything that turns an image into a prediction except the trunk
weights themselves, which are referenced by name and sha256 and obtained with
``fedhead weights install``: the preprocessing (input size, resize and crop,
mean/std, channel handling), the class names in order, the head architecture and
the trained tensors (head, plus unfrozen trunk blocks), and what the run was
(rounds, sites, examples, final federated metrics).

A package is written atomically: into a temporary folder beside its destination,
fsynced, then renamed into place, so a reader sees either no package, the previous
one, or the complete new one. An existing package is only replaced when asked.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhead.common import __version__
from fedhead.common.backbones import BackboneSpec, get_spec
from fedhead.common.config import RunConfig
from fedhead.common.dicom import ReaderSettings
from fedhead.common.errors import (
    ConfigError,
    ModelMismatchError,
    PackageError,
    PackageExistsError,
    PackageFormatError,
)
from fedhead.common.files import fsync_dir
from fedhead.common.heads import head_bytes
from fedhead.common.images import Preprocessor
from fedhead.common.model import FedHeadModel, TensorSpec, TrainableSet, weights_ref
from fedhead.common.weights import WeightsRef

FORMAT = "fedhead-model"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

MODEL_JSON = "model.json"
TENSORS_FILE = "head.safetensors"
MODEL_CARD = "MODEL_CARD.md"
_MAX_JSON_BYTES = 1 << 20  # model.json is metadata: refuse anything larger unread


@dataclass(frozen=True)
class BackboneRef:
    """The trunk a package needs, referenced (never included) by file name and sha256."""

    name: str
    weights_file: str
    sha256: str
    custom: bool  # a custom checkpoint, not the registered ImageNet file
    url: str
    install: str  # how a site obtains the file

    def weights_ref(self) -> WeightsRef:
        return WeightsRef(
            filename=self.weights_file,
            sha256=self.sha256,
            url=self.url,
            label=f"backbone {self.name}" + (" (custom checkpoint)" if self.custom else ""),
            install_hint=self.install,
        )


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the trunk's input; equal to what the sites trained with."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shorter side to input_size, bilinear with antialiasing"
    crop: str = "centre input_size x input_size"
    scale: str = "uint8 / 255 to [0, 1], then (x - mean) / std"
    channels: str = "grayscale replicated to 3 channels; alpha dropped; RGB order"
    features: str = "trunk output rounded to float16 before the head (as in training)"
    fingerprint: str = ""  # Preprocessor.fingerprint(): the exact pipeline and its version
    # DICOM files: which VOI LUT / window (-1: none) and which frame, as the sites'
    # dicom-window and dicom-frame; a site that trained otherwise overrides them
    dicom_window: int = 0
    dicom_frame: int = 0

    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.input_size, self.mean, self.std)

    def reader_settings(self) -> ReaderSettings:
        return ReaderSettings(window=self.dicom_window, frame=self.dicom_frame)


@dataclass(frozen=True)
class HeadArchitecture:
    """The trained part: head type and width, unfrozen trunk blocks, the tensors."""

    head: str
    hidden: int
    dropout: float
    unfreeze_blocks: int
    trunk_blocks: int  # blocks the trunk is cut into (the last unfreeze_blocks trained)
    tensors: tuple[TensorSpec, ...]

    def trainable(self) -> TrainableSet:
        return TrainableSet(self.tensors)


@dataclass(frozen=True)
class TrainingSummary:
    """What the run was: who trained the model on how much data."""

    run_id: int
    rounds: int
    sites: int
    examples: int  # training examples over all sites
    class_counts: tuple[int, ...] | None = None  # per class, where known (sites do not report)
    secure_aggregation: str = "none"
    differential_privacy: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ModelPackage:
    """One trained fedhead model, as written to and read from a package folder."""

    backbone: BackboneRef
    preprocessing: Preprocessing
    classes: tuple[str, ...]
    architecture: HeadArchitecture
    training: TrainingSummary
    metrics: Mapping[str, float | None]  # final federated metrics (None: not measured)
    tensors: Mapping[str, np.ndarray] = field(repr=False, compare=False)
    created: str = ""
    fedhead_version: str = __version__

    # --- writing ----------------------------------------------------------------------
    def to_json(self, tensors_sha256: str) -> dict[str, Any]:
        arch = asdict(self.architecture)
        arch["tensors"] = [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
            for t in self.architecture.tensors
        ]
        arch["fingerprint"] = self.architecture.trainable().fingerprint()
        training = asdict(self.training)
        training["differential_privacy"] = (
            dict(self.training.differential_privacy)
            if self.training.differential_privacy is not None
            else None
        )
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fedhead_version": self.fedhead_version,
            "created": self.created,
            "backbone": asdict(self.backbone),
            "preprocessing": asdict(self.preprocessing),
            "classes": list(self.classes),
            "architecture": arch,
            "training": training,
            "metrics": {k: _finite(v) for k, v in self.metrics.items()},
            "tensors_file": TENSORS_FILE,
            "tensors_sha256": tensors_sha256,
        }

    def write(self, dest: Path, *, card: str, overwrite: bool = False) -> Path:
        """Write the package folder ``dest`` atomically, with ``card`` as its
        MODEL_CARD.md (the server renders it: ``fedhead.server.model_card``); refuse an
        existing folder unless ``overwrite`` (then the previous package stays whole until
        the new one is)."""
        dest = Path(dest)
        if dest.exists() and not overwrite:
            raise PackageExistsError(
                f"{dest} already exists",
                "choose another folder, or replace it explicitly (--force)",
            )
        self.check_tensors()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
        try:
            # the canonical head bytes: the file's sha256 is the model's one identity
            # (server log, report, checkpoints, the copies the sites keep)
            names = [t.name for t in self.architecture.tensors]
            blob = head_bytes(names, [self.tensors[n] for n in names])
            doc = self.to_json(hashlib.sha256(blob).hexdigest())
            _write_synced(tmp / TENSORS_FILE, blob)
            _write_synced(tmp / MODEL_JSON, (json.dumps(doc, indent=2) + "\n").encode())
            _write_synced(tmp / MODEL_CARD, card.encode())
            os.chmod(tmp, 0o755)
            fsync_dir(tmp)
            _swap_into_place(tmp, dest, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(dest.parent)
        return dest

    def check_tensors(self) -> None:
        """Every tensor the architecture names is there with its shape and dtype."""
        expected = self.architecture.trainable()
        missing = [n for n in expected.names if n not in self.tensors]
        extra = sorted(set(self.tensors) - set(expected.names))
        if missing or extra:
            raise ModelMismatchError(
                f"package tensors do not match the architecture: missing {missing[:3]}, "
                f"unexpected {extra[:3]}",
                "the package is damaged or altered: get a fresh copy",
            )
        if problems := expected.problems([self.tensors[n] for n in expected.names]):
            raise ModelMismatchError(
                "package tensors do not match the architecture: " + "; ".join(problems[:3]),
                "the package is damaged or altered: get a fresh copy",
            )
        out_dim = self.architecture.tensors[-1].shape[0] if self.architecture.tensors else 0
        if out_dim != len(self.classes):
            raise ModelMismatchError(
                f"the head has {out_dim} outputs but the package names "
                f"{len(self.classes)} classes ({', '.join(self.classes)})",
                "the package is damaged or altered: get a fresh copy",
            )

    # --- reading ----------------------------------------------------------------------
    @classmethod
    def load(cls, src: Path) -> ModelPackage:
        """Read and check a package folder; every problem is a typed, one-line error."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        src = Path(src)
        meta_path = src / MODEL_JSON
        if not src.is_dir():
            raise PackageError(
                f"{src} is not a model package folder",
                "give the folder a run wrote (it holds model.json and head.safetensors)",
            )
        if not meta_path.is_file():
            raise PackageError(f"{src} has no {MODEL_JSON}", "it is not a fedhead model package")
        if meta_path.stat().st_size > _MAX_JSON_BYTES:
            raise PackageError(f"{meta_path} is implausibly large", "it is not a fedhead package")
        try:
            doc = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PackageError(f"{meta_path} is not readable JSON ({err})") from err
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise PackageError(f"{meta_path} is not a fedhead model description")
        version = doc.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise PackageFormatError(
                f"{src}: package format version {version!r} is not one this fedhead "
                f"{__version__} reads (it reads {sorted(SUPPORTED_VERSIONS)})",
                "use the fedhead version that wrote the package",
            )
        try:
            pkg = _from_json(doc)
            tensors_sha = str(doc["tensors_sha256"])
        except (KeyError, TypeError, ValueError) as err:
            raise PackageError(
                f"{meta_path} is malformed ({type(err).__name__}: {err})",
                "the package is damaged or altered: get a fresh copy",
            ) from err
        tensors_path = src / TENSORS_FILE
        try:
            blob = tensors_path.read_bytes()
        except OSError as err:
            raise PackageError(f"{tensors_path} is not readable ({err.strerror or err})") from err
        if hashlib.sha256(blob).hexdigest() != tensors_sha:
            raise PackageError(
                f"{tensors_path} does not have the sha256 recorded in {MODEL_JSON}",
                "the package is damaged or altered: get a fresh copy",
            )
        try:
            tensors = load(blob)
        except (SafetensorError, ValueError) as err:
            raise PackageError(f"{tensors_path} is not a safetensors file ({err})") from err
        order = [t.name for t in pkg.architecture.tensors]  # safetensors sorts by name
        ranked = sorted(tensors, key=lambda n: order.index(n) if n in order else len(order))
        pkg = replace(pkg, tensors={n: tensors[n] for n in ranked})
        pkg.check_tensors()
        return pkg

    # --- using ------------------------------------------------------------------------
    def spec(self) -> BackboneSpec:
        return get_spec(self.backbone.name)

    def build_model(self, backbone: torch.nn.Module) -> FedHeadModel:
        """The package's model on ``backbone`` (a loaded trunk), with its trained tensors.

        The architecture is rebuilt from the package's own description and its
        trainable set must equal the one recorded: a package that does not fit this
        fedhead's model is refused rather than half loaded.
        """
        a = self.architecture
        try:
            model = FedHeadModel(
                self.spec(),
                backbone,
                num_classes=len(self.classes),
                head=a.head,
                hidden=a.hidden,
                dropout=a.dropout,
                unfreeze_blocks=a.unfreeze_blocks,
            )
        except ValueError as err:
            raise ModelMismatchError(f"the package's architecture cannot be built: {err}") from err
        built = TrainableSet.of(model)
        if built != a.trainable():
            raise ModelMismatchError(
                f"the package's tensors ({a.trainable().fingerprint()[:12]}…) do not fit "
                f"the model this fedhead builds for it ({built.fingerprint()[:12]}…)",
                "use the fedhead version that wrote the package",
            )
        built.set(model, [self.tensors[n] for n in built.names])
        model.train(False)
        return model


def package_from_run(
    cfg: RunConfig,
    model: FedHeadModel,
    arrays: Sequence[np.ndarray],
    training: TrainingSummary,
    metrics: Mapping[str, float | None],
) -> ModelPackage:
    """The package for what the server holds at the end of a run: its configuration, the
    run's model (for its architecture), the final global trainable tensors (in the
    order of ``TrainableSet.of(model)``) and the run's final metrics."""
    trainable = TrainableSet.of(model)
    trunk_blocks = len(model.frozen) + len(model.tuned)
    if problems := trainable.problems(arrays):
        raise ModelMismatchError(
            "final tensors do not match the run's trainable set: " + "; ".join(problems[:3])
        )
    spec = get_spec(cfg.backbone)
    ref = weights_ref(spec, cfg.backbone_sha256)
    size = cfg.resolved_input_size()
    return ModelPackage(
        backbone=BackboneRef(
            name=spec.name,
            weights_file=ref.filename,
            sha256=ref.sha256,
            custom=bool(cfg.backbone_sha256),
            url=ref.url,
            install=(
                f"fedhead weights install {spec.name}"
                if not cfg.backbone_sha256
                else "ask the operator for the custom checkpoint and pass it with --weights"
            ),
        ),
        preprocessing=Preprocessing(
            input_size=size,
            mean=spec.mean,
            std=spec.std,
            fingerprint=Preprocessor(size, spec.mean, spec.std).fingerprint(),
        ),
        classes=tuple(cfg.class_names()),
        architecture=HeadArchitecture(
            head=cfg.head,
            hidden=cfg.head_hidden,
            dropout=cfg.head_dropout,
            unfreeze_blocks=cfg.unfreeze_blocks,
            trunk_blocks=trunk_blocks,
            tensors=trainable.tensors,
        ),
        training=training,
        metrics=dict(metrics),
        tensors={t.name: np.asarray(a) for t, a in zip(trainable.tensors, arrays, strict=True)},
        created=datetime.now(UTC).replace(microsecond=0).isoformat(),
    )


# --- model.json -> ModelPackage -----------------------------------------------------------
def _triple(v: Any) -> tuple[float, float, float]:
    a, b, c = (float(x) for x in v)
    return (a, b, c)


def _from_json(doc: dict[str, Any]) -> ModelPackage:
    b, p, a, t = doc["backbone"], doc["preprocessing"], doc["architecture"], doc["training"]
    classes = tuple(str(c) for c in doc["classes"])
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError("classes must be at least two unique names")
    pre = Preprocessing(
        input_size=int(p["input_size"]),
        mean=_triple(p["mean"]),
        std=_triple(p["std"]),
        fingerprint=str(p["fingerprint"]),
        dicom_window=int(p.get("dicom_window", 0)),
        dicom_frame=int(p.get("dicom_frame", 0)),
    )
    pre.reader_settings()  # ValueError for values no reader accepts
    if pre.input_size < 1:
        raise ValueError(f"input_size {pre.input_size}")
    if pre.preprocessor().fingerprint() != pre.fingerprint:
        raise PackageFormatError(
            f"the package was trained with preprocessing {pre.fingerprint!r}, "
            f"this fedhead has {pre.preprocessor().fingerprint()!r}",
            "use the fedhead version that wrote the package",
        )
    tensors = tuple(
        TensorSpec(str(x["name"]), tuple(int(d) for d in x["shape"]), str(x["dtype"]))
        for x in a["tensors"]
    )
    for ts in tensors:
        np.dtype(ts.dtype)  # an unknown dtype name raises TypeError
    cc = t.get("class_counts")
    dp = t.get("differential_privacy")
    try:
        get_spec(str(b["name"]))
    except ConfigError as err:
        raise PackageError(
            f"the package needs backbone {b['name']!r}, which this fedhead does not know",
            "use the fedhead version that wrote the package",
        ) from err
    return ModelPackage(
        backbone=BackboneRef(
            name=str(b["name"]),
            weights_file=str(b["weights_file"]),
            sha256=str(b["sha256"]),
            custom=bool(b["custom"]),
            url=str(b["url"]),
            install=str(b["install"]),
        ),
        preprocessing=pre,
        classes=classes,
        architecture=HeadArchitecture(
            head=str(a["head"]),
            hidden=int(a["hidden"]),
            dropout=float(a["dropout"]),
            unfreeze_blocks=int(a["unfreeze_blocks"]),
            trunk_blocks=int(a["trunk_blocks"]),
            tensors=tensors,
        ),
        training=TrainingSummary(
            run_id=int(t["run_id"]),
            rounds=int(t["rounds"]),
            sites=int(t["sites"]),
            examples=int(t["examples"]),
            class_counts=None if cc is None else tuple(int(x) for x in cc),
            secure_aggregation=str(t["secure_aggregation"]),
            differential_privacy=None if dp is None else dict(dp),
        ),
        metrics={str(k): None if v is None else float(v) for k, v in doc["metrics"].items()},
        tensors={},
        created=str(doc["created"]),
        fedhead_version=str(doc["fedhead_version"]),
    )


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


# --- files ------------------------------------------------------------------------------
def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)


def _swap_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Rename the finished folder ``tmp`` to ``dest``; a previous package (only with
    ``overwrite``) is moved aside first and restored if the rename fails."""
    if not dest.exists():
        try:
            os.rename(tmp, dest)  # fails if another writer created a non-empty dest
        except OSError as err:
            raise PackageExistsError(f"{dest} appeared while the package was written") from err
        return
    if not dest.is_dir() or not (dest / MODEL_JSON).is_file():
        raise PackageExistsError(
            f"{dest} exists and is not a model package", "it is never replaced: remove it yourself"
        )
    aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.rename(dest, aside / "package")
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(aside / "package", dest)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
