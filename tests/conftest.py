"""Shared fixtures: isolated caches, real backbone weights, small real image datasets."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedhead.common import demo_data
from fedhead.common.backbones import get_spec
from fedhead.common.errors import WeightsError
from fedhead.common.model import weights_ref
from fedhead.common.protocol import FitSettings
from fedhead.common.simulation import write_site_npz
from fedhead.common.weights import default_search_dirs, find_weights

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """A test session stopped with SIGTERM cleans up as one stopped with Ctrl-C."""
    from tests.e2e.procs import interrupt_on_sigterm

    interrupt_on_sigterm()


def round_settings(**changes: Any) -> FitSettings:
    """Round settings a site accepts, with ``changes``: round 1, one epoch of SGD in
    batches of 8 at rate 0.1, trainable set "fp", no norm bound, no SecAgg+, no DP."""
    honest = FitSettings(1, 1, 8, 0.1, "sgd", 0.9, 0.0, 0.1, 0, "fp", 0.0, 0.0, False, 1000)
    return dataclasses.replace(honest, **changes)  # any value: tests try wrong ones too


@pytest.fixture(autouse=True)
def isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test gets its own fedhead cache, so no test sees another's features."""
    cache = tmp_path_factory.mktemp("fedhead-cache")
    monkeypatch.setenv("FEDHEAD_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """The real ImageNet MobileNetV2 file, installed by the setup step (deploy/install.sh)."""
    try:
        return find_weights(weights_ref(get_spec("mobilenet_v2")), default_search_dirs())
    except WeightsError as err:
        pytest.fail(f"{err} (the test setup installs it: bash deploy/install.sh --dev)")


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A randomly initialised mobilenet_v2 state dict saved as a custom checkpoint."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "random_mobilenet_v2.pth"
    torch.save(get_spec("mobilenet_v2").build().state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _small_demo(n_per_class: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    data = demo_data.load(split)
    idx = np.concatenate([np.flatnonzero(data.labels == c)[:n_per_class] for c in (0, 1)])
    return data.images[idx], data.labels[idx]


@pytest.fixture
def xray_arrays() -> tuple[np.ndarray, np.ndarray]:
    """20 real chest X-rays (10 per class) from the embedded demo data."""
    return _small_demo(10)


def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


@pytest.fixture
def image_folder(tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray]) -> Path:
    """<root>/<class>/<n>.png with the 20 real X-rays."""
    images, labels = xray_arrays
    root = tmp_path / "folder"
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        write_png(root / demo_data.CLASSES[lab] / f"{i:03d}.png", img)
    return root


@pytest.fixture
def csv_manifest(tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray]) -> Path:
    """manifest.csv (path,label,split) over PNG files; the last 2 per class are 'val'."""
    images, labels = xray_arrays
    root = tmp_path / "csvsite"
    rows = []
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        rel = f"img/{i:03d}.png"
        write_png(root / rel, img)
        split = "val" if i % 10 >= 8 else "train"
        rows.append({"path": rel, "label": demo_data.CLASSES[lab], "split": split})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def write_share_npz(
    path: Path, share: demo_data.Share, n_train: int, n_val: int, seed: int
) -> Path:
    """A site's .npz file holding a random sample of one demo share (the one site-file
    writer of the tests: the product's own, fedhead.common.simulation.write_site_npz)."""
    rng = np.random.default_rng(seed)
    tr = rng.choice(len(share.train.labels), min(n_train, len(share.train.labels)), replace=False)
    va = rng.choice(len(share.val.labels), min(n_val, len(share.val.labels)), replace=False)
    return write_site_npz(
        path,
        demo_data.Split(share.train.images[tr], share.train.labels[tr]),
        demo_data.Split(share.val.images[va], share.val.labels[va]),
    )
