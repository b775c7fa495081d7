"""Using a model package at a site: load it onto its verified trunk, predict.

Prediction runs exactly training's path: the package's ``Preprocessor``, the frozen
trunk through ``FeatureExtractor`` (features rounded to float16 as the feature cache
stores them), then the trained part as evaluation runs it. Images that cannot be
read are returned by index and reason, never dropped silently.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedhead.common.device import Device
from fedhead.common.features import FeatureExtractor
from fedhead.common.images import ImageDecodeError, ImageSource, Preprocessor, SubsetImages
from fedhead.common.model import FedHeadModel, load_backbone
from fedhead.common.package import ModelPackage
from fedhead.common.training import head_logits
from fedhead.common.weights import default_search_dirs, find_weights


@dataclass(frozen=True)
class SiteModel:
    """A package loaded onto this machine's verified copy of its trunk."""

    package: ModelPackage
    model: FedHeadModel
    preprocess: Preprocessor
    weights_path: Path

    @property
    def classes(self) -> list[str]:
        return list(self.package.classes)


def load_site_model(
    package_dir: Path,
    weights: Path | None = None,
    search_dirs: Iterable[Path] | None = None,
) -> SiteModel:
    """Read the package, find and sha256-verify its trunk, build the model.

    Raises PackageError (format, integrity), WeightsError (trunk missing or another
    sha256) or ModelMismatchError (tensors that do not fit the architecture).
    """
    pkg = ModelPackage.load(package_dir)
    dirs = list(search_dirs) if search_dirs is not None else default_search_dirs()
    path = find_weights(pkg.backbone.weights_ref(), dirs, weights)
    model = pkg.build_model(load_backbone(pkg.spec(), path))
    return SiteModel(pkg, model, pkg.preprocessing.preprocessor(), path)


@dataclass(frozen=True)
class Predictions:
    """Class probabilities for the readable images of a source, in source order."""

    probabilities: np.ndarray  # (len(ok), classes) float64
    ok: np.ndarray  # indices into the source of the images predicted
    unreadable: list[tuple[int, str]]  # (index, why) of every image that could not be read
    total: int

    @property
    def predicted(self) -> np.ndarray:
        return np.asarray(self.probabilities.argmax(axis=1), dtype=np.int64)


def predict(
    site: SiteModel,
    images: ImageSource,
    device: Device,
    batch_size: int = 64,
    progress: bool | None = None,
) -> Predictions:
    """Probabilities for every readable image of ``images``.

    ``progress``: a tqdm bar on stderr (None: only for 256 images or more, on a terminal).
    """
    from tqdm import tqdm

    extractor = FeatureExtractor(
        site.model,
        site.preprocess,
        device,
        site.package.backbone.sha256,
        cache=None,
        batch_size=batch_size,
        progress=False,
    )
    n = len(images)
    # Images per extraction call: bounds memory and paces the progress bar (below the
    # size at which the extractor would print progress of its own).
    chunk = 1024 if device.kind == "cuda" else 256
    probs: list[np.ndarray] = []
    ok: list[np.ndarray] = []
    show = progress if progress is not None else (n >= 256 and sys.stderr.isatty())
    with tqdm(total=n, unit="img", desc="predicting", disable=not show, file=sys.stderr) as bar:
        for start in range(0, n, chunk):
            idx = list(range(start, min(start + chunk, n)))
            feats = extractor(SubsetImages(images, idx))
            if len(feats.ok):
                logits = head_logits(site.model, feats.values, device)
                probs.append(torch.softmax(logits, dim=1).cpu().double().numpy())
                ok.append(feats.ok + start)
            bar.update(len(idx))
    done = np.concatenate(ok) if ok else np.empty(0, np.int64)
    missing = sorted(set(range(n)) - set(done.tolist()))
    return Predictions(
        probabilities=np.concatenate(probs) if probs else np.empty((0, len(site.classes))),
        ok=done,
        unreadable=[(i, _why(images, i)) for i in missing],
        total=n,
    )


def _why(images: ImageSource, i: int) -> str:
    """Why image ``i`` could not be used (read again: failures are few)."""
    try:
        images.key(i)
        images.load(i)
    except ImageDecodeError as err:
        return str(err)
    return f"{images.describe(i)}: could not be read"
