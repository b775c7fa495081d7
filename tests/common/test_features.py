from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedhead.common.backbones import get_spec
from fedhead.common.device import select_device
from fedhead.common.features import FeatureCache, FeatureExtractor, cache_namespace
from fedhead.common.images import ArrayImages, FileImages, Preprocessor
from fedhead.common.model import FedHeadModel, load_backbone
from tests.conftest import write_png

SPEC = get_spec("mobilenet_v2")


def png_files(folder: Path, images: np.ndarray) -> list[Path]:
    """Each image as ``folder``/<index>.png, in order."""
    for i, image in enumerate(images):
        write_png(folder / f"{i}.png", image)
    return [folder / f"{i}.png" for i in range(len(images))]


def test_cache_roundtrip_and_namespaces(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "f.sqlite")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    cache.put_many("ns1", [("k", x)])
    assert np.array_equal(cache.get_many("ns1", ["k", "missing"])["k"], x)
    assert cache.get_many("ns2", ["k"]) == {}


def test_cache_evicts_least_recently_used_past_its_budget(tmp_path: Path) -> None:
    row = np.zeros(256, np.float32)  # 512 bytes once stored as float16
    cache = FeatureCache(tmp_path / "f.sqlite", max_bytes=512 * 10)
    cache.put_many("ns", [(f"k{i}", row) for i in range(8)])
    cache.get_many("ns", ["k0"])  # k0 becomes recently used
    cache.put_many("ns", [(f"n{i}", row) for i in range(6)])
    assert cache.total_bytes() <= 512 * 10
    assert "k0" in cache.get_many("ns", ["k0"])
    assert cache.get_many("ns", ["k1"]) == {}


def test_corrupt_cache_is_moved_aside_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    cache = FeatureCache(path)
    cache.put_many("ns", [("k", np.ones(3, np.float32))])
    assert "k" in cache.get_many("ns", ["k"])
    assert list(tmp_path.glob("f.corrupt-*"))


def test_a_crashed_write_leaves_no_partial_rows(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "f.sqlite")

    def rows() -> Iterator[tuple[str, np.ndarray]]:
        yield "a", np.ones(3, np.float32)
        raise RuntimeError("crash while producing the batch")

    with pytest.raises(RuntimeError):
        cache.put_many("ns", rows())
    assert (
        sqlite3.connect(tmp_path / "f.sqlite")
        .execute("SELECT COUNT(*) FROM features")
        .fetchone()[0]
        == 0
    )


def test_namespace_depends_on_backbone_preprocessing_and_cut() -> None:
    pre = Preprocessor(64, SPEC.mean, SPEC.std)
    base = cache_namespace("a" * 64, pre, 0)
    assert base != cache_namespace("b" * 64, pre, 0)
    assert base != cache_namespace("a" * 64, Preprocessor(96, SPEC.mean, SPEC.std), 0)
    assert base != cache_namespace("a" * 64, pre, 1)


@pytest.fixture(scope="module")
def model(mobilenet_weights: Path) -> FedHeadModel:
    return FedHeadModel(SPEC, load_backbone(SPEC, mobilenet_weights), num_classes=2)


def test_extraction_is_cached_and_identical_when_read_back(
    tmp_path: Path, model: FedHeadModel, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images = ArrayImages(xray_arrays[0], "x")

    def make() -> FeatureExtractor:
        return FeatureExtractor(
            model,
            Preprocessor(64, SPEC.mean, SPEC.std),
            select_device("cpu"),
            SPEC.sha256,
            FeatureCache(tmp_path / "f.sqlite"),
            batch_size=8,
        )

    first = make()(images)
    assert first.values.shape == (20, 1280)
    assert (first.stats.cache_hits, first.stats.cache_misses) == (0, 20)
    second = make()(images)
    assert (second.stats.cache_hits, second.stats.cache_misses, second.stats.extracted) == (
        20,
        0,
        0,
    )
    torch.testing.assert_close(first.values, second.values, rtol=0, atol=0)
    # and the cached features are the trunk's output (to float16 precision)
    direct = model.extract(Preprocessor(64, SPEC.mean, SPEC.std)(list(xray_arrays[0][:2])))
    torch.testing.assert_close(first.values[:2], direct, rtol=2e-3, atol=2e-3)


def test_changed_image_is_recomputed(
    tmp_path: Path, model: FedHeadModel, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    pre = Preprocessor(64, SPEC.mean, SPEC.std)
    ex = FeatureExtractor(
        model, pre, select_device("cpu"), SPEC.sha256, FeatureCache(tmp_path / "c")
    )
    imgs = xray_arrays[0][:4].copy()
    ex(ArrayImages(imgs, "x"))
    imgs[2] = 255 - imgs[2]
    again = ex(ArrayImages(imgs, "x"))
    assert (again.stats.cache_hits, again.stats.cache_misses) == (3, 1)


def test_unreadable_images_are_skipped_and_counted(
    tmp_path: Path, model: FedHeadModel, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    paths = png_files(tmp_path, xray_arrays[0][:4])
    (tmp_path / "1.png").write_bytes(b"broken")
    paths.append(tmp_path / "missing.png")
    ex = FeatureExtractor(
        model, Preprocessor(64, SPEC.mean, SPEC.std), select_device("cpu"), SPEC.sha256
    )
    out = ex(FileImages(paths))
    assert out.ok.tolist() == [0, 2, 3]
    assert out.stats.skipped == 2
    assert any("1.png" in s for s in out.stats.skipped_examples)


def test_dataloader_workers_give_the_same_features_and_skip_the_same_images(
    tmp_path: Path, model: FedHeadModel, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    """The CUDA path decodes in DataLoader workers; on CPU it is tested with workers=2."""
    paths = png_files(tmp_path, xray_arrays[0][:10])
    (tmp_path / "3.png").write_bytes(b"broken")
    pre = Preprocessor(64, SPEC.mean, SPEC.std)
    plain = FeatureExtractor(model, pre, select_device("cpu"), SPEC.sha256, workers=0, batch_size=4)
    pooled = FeatureExtractor(
        model, pre, select_device("cpu"), SPEC.sha256, workers=2, batch_size=4
    )
    a, b = plain(FileImages(paths)), pooled(FileImages(paths))
    assert a.ok.tolist() == b.ok.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert a.stats.skipped == b.stats.skipped == 1
    torch.testing.assert_close(a.values, b.values)
