"""The same X-ray as 8-bit PNG, DICOM MONOCHROME2, DICOM MONOCHROME1 and 16-bit PNG gives
the same cached features through the real MobileNetV2 trunk, and the same predictions
through a trained head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedhead.common.backbones import get_spec
from fedhead.common.device import select_device
from fedhead.common.dicom import ReaderSettings
from fedhead.common.features import FeatureCache, FeatureExtractor
from fedhead.common.images import FileImages, Preprocessor
from fedhead.common.model import FedHeadModel, load_backbone
from fedhead.common.training import TrainParams, train_head
from tests import dicom_files as dcm
from tests.conftest import write_png

SPEC = get_spec("mobilenet_v2")
CPU = select_device("cpu")
FORMATS = ("png8", "dicom-mono2", "dicom-mono1", "png16")


def write_all(root: Path, images: np.ndarray) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {f: [] for f in FORMATS}
    for i, img in enumerate(images):
        write_png(root / "png8" / f"{i}.png", img)
        out["png8"].append(root / "png8" / f"{i}.png")
        out["dicom-mono2"].append(dcm.write_gray(root / "m2" / f"{i}.dcm", img))
        out["dicom-mono1"].append(
            dcm.write_gray(root / "m1" / f"{i}.dcm", img, photometric="MONOCHROME1")
        )
        out["png16"].append(dcm.write_png16(root / "png16" / f"{i}.png", img))
    return out


@pytest.fixture(scope="module")
def model(mobilenet_weights: Path) -> FedHeadModel:
    torch.manual_seed(0)
    return FedHeadModel(SPEC, load_backbone(SPEC, mobilenet_weights), num_classes=2)


def test_every_storage_of_an_xray_gives_the_same_features_and_predictions(
    tmp_path: Path, model: FedHeadModel, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = xray_arrays
    files = write_all(tmp_path, images)
    cache = FeatureCache(tmp_path / "features.sqlite")
    extractor = FeatureExtractor(
        model, Preprocessor(64, SPEC.mean, SPEC.std), CPU, SPEC.sha256, cache, batch_size=8
    )
    feats = {}
    for fmt in FORMATS:
        first = extractor(FileImages(files[fmt]))
        assert first.stats.cache_misses == len(images) and first.stats.skipped == 0
        again = extractor(FileImages(files[fmt]))  # read back from the cache
        assert again.stats.cache_hits == len(images) and again.stats.extracted == 0
        torch.testing.assert_close(again.values, first.values, rtol=0, atol=0)
        feats[fmt] = again.values
    reference = feats["png8"]
    assert reference.shape == (20, 1280) and reference.abs().max() > 0.5
    for fmt in FORMATS[1:]:
        # inputs agree to float32 rounding; cached as float16, so 1e-3 relative
        torch.testing.assert_close(feats[fmt], reference, rtol=1e-3, atol=1e-3, msg=fmt)

    # a head trained on the PNG features predicts the same from every storage
    y = torch.from_numpy(labels)
    train_head(model, reference, y, TrainParams(30, 8, 0.01, "adam"), CPU)
    model.eval()
    with torch.no_grad():
        probs = {f: torch.softmax(model.forward_from_features(v), 1) for f, v in feats.items()}
    assert probs["png8"][:, 1].std() > 0.1  # a trained head, not a constant
    for fmt in FORMATS[1:]:
        assert (probs[fmt] - probs["png8"]).abs().max() < 0.02, fmt


def test_another_window_is_another_cache_entry(
    tmp_path: Path, model: FedHeadModel, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images = xray_arrays[0][:6]
    paths = [
        dcm.write_gray(tmp_path / f"{i}.dcm", img, extra_windows=1) for i, img in enumerate(images)
    ]
    extractor = FeatureExtractor(
        model,
        Preprocessor(64, SPEC.mean, SPEC.std),
        CPU,
        SPEC.sha256,
        FeatureCache(tmp_path / "features.sqlite"),
    )
    first = extractor(FileImages(paths, reader=ReaderSettings(window=0)))
    other = extractor(FileImages(paths, reader=ReaderSettings(window=1)))
    assert (other.stats.cache_hits, other.stats.cache_misses) == (0, len(images))
    assert (first.values - other.values).abs().max() > 0.1  # really another picture
    back = extractor(FileImages(paths, reader=ReaderSettings(window=0)))
    assert back.stats.cache_hits == len(images)
    torch.testing.assert_close(back.values, first.values, rtol=0, atol=0)


def test_dicom_decodes_the_same_in_dataloader_workers(
    tmp_path: Path, model: FedHeadModel, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    """On CUDA, images are decoded in DataLoader workers; tested here on the CPU."""
    images = xray_arrays[0][:4]
    paths = [
        dcm.write_gray(tmp_path / f"{i}.dcm", img, photometric="MONOCHROME1")
        for i, img in enumerate(images)
    ]
    paths.append(dcm.write_rgb(tmp_path / "colour.dcm", images[0]))
    pre = Preprocessor(64, SPEC.mean, SPEC.std)
    plain = FeatureExtractor(model, pre, CPU, SPEC.sha256, workers=0, batch_size=4)
    pooled = FeatureExtractor(model, pre, CPU, SPEC.sha256, workers=2, batch_size=4)
    a, b = plain(FileImages(paths)), pooled(FileImages(paths))
    assert a.ok.tolist() == b.ok.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(a.values, b.values)


def test_every_storage_predicts_the_same_through_the_model_package(
    tmp_path: Path,
    model: FedHeadModel,
    xray_arrays: tuple[np.ndarray, np.ndarray],
    mobilenet_weights: Path,
) -> None:
    """`fedhead predict` with a package: the same X-ray as 8-bit PNG, DICOM MONOCHROME2
    and MONOCHROME1 (12-bit, window tags) and 16-bit PNG gets the same probabilities."""
    import csv

    from fedhead.cli.main import main
    from fedhead.common.config import RunConfig
    from fedhead.common.model import TrainableSet
    from fedhead.common.package import TrainingSummary, package_from_run
    from tests.packages import CARD

    images, labels = xray_arrays
    files = write_all(tmp_path / "data", images)
    pre = Preprocessor(64, SPEC.mean, SPEC.std)
    feats = FeatureExtractor(model, pre, CPU, SPEC.sha256)(FileImages(files["png8"])).values
    train_head(model, feats, torch.from_numpy(labels), TrainParams(30, 8, 0.01, "adam"), CPU)
    cfg = RunConfig.from_mapping({"classes": "normal,pneumonia", "input-size": 64})
    summary = TrainingSummary(run_id=1, rounds=1, sites=1, examples=len(labels))
    arrays = TrainableSet.of(model).get(model)
    package = package_from_run(cfg, model, arrays, summary, {}).write(tmp_path / "model", card=CARD)

    probs: dict[str, np.ndarray] = {}
    for fmt in FORMATS:
        out = tmp_path / f"{fmt}.csv"
        folder = files[fmt][0].parent
        argv = ["predict", "--model", str(package), "--data", str(folder), "--out", str(out)]
        assert main([*argv, "--weights", str(mobilenet_weights), "--device", "cpu"]) == 0
        with out.open() as f:
            rows = sorted(csv.DictReader(f), key=lambda r: int(Path(r["path"]).stem))
        assert len(rows) == len(images), fmt  # every file read, none skipped
        probs[fmt] = np.array([[float(r["p_normal"]), float(r["p_pneumonia"])] for r in rows])
    assert probs["png8"][:, 1].std() > 0.1  # a trained head, not a constant
    for fmt in FORMATS[1:]:
        assert np.abs(probs[fmt] - probs["png8"]).max() < 0.02, fmt
