from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedhead.common.images import (
    ArrayImages,
    DecodeLimits,
    FileImages,
    HashMemo,
    ImageDecodeError,
    LabeledImages,
    Preprocessor,
    concat,
    decode_image_file,
)
from tests.conftest import write_png

PRE = Preprocessor(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_gray_and_rgb_copies_of_an_image_give_the_same_tensor(
    xray_arrays: tuple[np.ndarray, np.ndarray],
) -> None:
    gray = xray_arrays[0][0]
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    a, b = PRE([gray]), PRE([rgb])
    assert a.shape == (1, 3, 64, 64)
    torch.testing.assert_close(a, b)


def test_png_file_and_array_preprocess_identically(
    tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    img = xray_arrays[0][1]
    write_png(tmp_path / "x.png", img)
    torch.testing.assert_close(PRE([decode_image_file(tmp_path / "x.png")]), PRE([img]))


def test_non_square_images_are_centre_cropped_to_square() -> None:
    wide = np.zeros((40, 80), np.uint8)
    wide[:, 20:60] = 255  # the centre 40 columns are white
    out = PRE([wide])
    assert out.shape == (1, 3, 64, 64)
    white = (1 - 0.5) / 0.25
    inner = out[..., 2:-2]  # resampling blends the outermost columns with their neighbours
    assert torch.allclose(inner, torch.full_like(inner, white), atol=1e-3)


def test_mixed_sizes_in_one_batch() -> None:
    out = PRE([np.zeros((28, 28), np.uint8), np.full((100, 90, 3), 255, np.uint8)])
    assert out.shape == (2, 3, 64, 64)


def test_sixteen_bit_png_keeps_its_depth_scaled_to_0_1(tmp_path: Path) -> None:
    from PIL import Image

    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    out = decode_image_file(tmp_path / "deep.png")
    assert out.dtype == np.float32 and out.shape == (64, 64)
    np.testing.assert_allclose(out, arr / 65535.0, atol=1e-7)  # by bit depth, not by max
    assert len(np.unique(out)) == 64 * 64  # no value merged by 8-bit rounding


def test_sixteen_bit_tiff_reads_like_the_sixteen_bit_png(tmp_path: Path) -> None:
    from PIL import Image

    arr = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 61).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.tif")
    Image.fromarray(arr).save(tmp_path / "deep.png")
    tif = decode_image_file(tmp_path / "deep.tif")
    np.testing.assert_array_equal(tif, decode_image_file(tmp_path / "deep.png"))
    np.testing.assert_allclose(tif, arr / 65535.0, atol=1e-7)


def test_float_and_uint8_images_preprocess_identically(
    xray_arrays: tuple[np.ndarray, np.ndarray],
) -> None:
    img = xray_arrays[0][3]
    torch.testing.assert_close(PRE([img.astype(np.float32) / 255.0]), PRE([img]))


def test_augmented_views_of_a_deep_image_stay_float_in_range(
    xray_arrays: tuple[np.ndarray, np.ndarray],
) -> None:
    from fedhead.common.images import Augmenter

    img = xray_arrays[0][0].astype(np.float32) / 255.0
    view = Augmenter(2, flip=True).apply(img, "k", 1)
    assert view.dtype == np.float32 and view.min() >= 0.0 and view.max() <= 1.0


def test_corrupt_file_raises_decode_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageDecodeError, match=r"bad\.png"):
        decode_image_file(bad)


def test_array_keys_follow_content() -> None:
    a = np.zeros((3, 8, 8), np.uint8)
    a[1, 0, 0] = 1
    src = ArrayImages(a, "t")
    assert src.key(0) == src.key(2) != src.key(1)


def test_file_keys_are_memoised_by_path_size_and_mtime(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    store: dict[tuple[str, int, int], str] = {}
    memo = HashMemo(
        lambda p, s, m: store.get((str(p), s, m)),
        lambda p, s, m, d: store.__setitem__((str(p), s, m), d),
    )
    key = FileImages([tmp_path / "a.png"], memo).key(0)
    assert list(store.values()) == [key]
    assert FileImages([tmp_path / "a.png"], memo).key(0) == key


def test_unreadable_file_key_is_a_decode_error(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="cannot read"):
        FileImages([tmp_path / "gone.png"]).key(0)


def test_concat_and_subset() -> None:
    a = LabeledImages(ArrayImages(np.zeros((2, 4, 4), np.uint8), "a"), np.array([0, 1]))
    b = LabeledImages(ArrayImages(np.ones((3, 4, 4), np.uint8), "b"), np.array([1, 1, 0]))
    both = concat([a, b])
    assert len(both) == 5 and both.labels.tolist() == [0, 1, 1, 1, 0]
    assert both.images.describe(3) == "b[1]"
    sub = both.subset([4, 0])
    assert sub.labels.tolist() == [0, 0] and sub.images.load(0).max() == 1


def test_augmented_views_are_deterministic_distinct_and_keyed_apart(
    xray_arrays: tuple[np.ndarray, np.ndarray],
) -> None:
    from fedhead.common.images import AugmentedImages, Augmenter

    base = ArrayImages(xray_arrays[0][:3], "x")
    aug = Augmenter(views=2, flip=True)
    v0, v1 = AugmentedImages(base, aug, 0), AugmentedImages(base, aug, 1)
    assert np.array_equal(v0.load(0), v0.load(0))  # same view, same picture
    assert not np.array_equal(v0.load(0), v1.load(0))
    assert len({base.key(0), v0.key(0), v1.key(0)}) == 3  # cached under different keys
    assert v0.load(1).dtype == np.uint8 and v0.load(1).ndim == 2
    assert AugmentedImages(base, Augmenter(2, flip=False), 0).key(0) != v0.key(0)


# --- large images ---------------------------------------------------------------------
_PEAK_PROBE = """
import sys
from pathlib import Path
from fedhead.common.images import DecodeLimits, ImageDecodeError, decode_image_file

def peak_kib():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])

def grown_kib(limit):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak resident size to the current one
    before = peak_kib()
    try:
        shape = decode_image_file(Path(sys.argv[1]), DecodeLimits(limit)).shape
    except ImageDecodeError as err:
        shape = str(err)
    return peak_kib() - before, shape

print(repr(grown_kib(50_000_000)))
print(repr(grown_kib(100_000_000)))
"""


def test_a_huge_image_in_a_small_file_is_refused_unread(tmp_path: Path) -> None:
    from PIL import Image

    huge = tmp_path / "huge.png"
    Image.new("L", (9000, 9000), 128).save(huge)  # 81 megapixels in a file of ~80 KB
    assert huge.stat().st_size < 200_000
    with pytest.raises(ImageDecodeError, match=r"9000x9000 pixels .* limit of 50000000"):
        decode_image_file(huge, DecodeLimits(50_000_000))
    # Peak memory, in a fresh process: refusing costs nothing; decoding (the control,
    # with a higher limit) raises the peak by at least the image's 81 MB.
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, str(huge)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    (refused_kib, refused), (decoded_kib, decoded) = (ast.literal_eval(line) for line in out)
    assert "refused unread" in refused and refused_kib < 10_000
    assert decoded == (9000, 9000) and decoded_kib > 60_000


def test_too_large_images_are_counted_as_unreadable(tmp_path: Path) -> None:
    write_png(tmp_path / "ok.png", np.zeros((40, 50), np.uint8))
    write_png(tmp_path / "big.png", np.zeros((300, 400), np.uint8))
    images = FileImages([tmp_path / "ok.png", tmp_path / "big.png"], limits=DecodeLimits(100_000))
    assert images.load(0).shape == (40, 50)
    with pytest.raises(ImageDecodeError, match="400x300 pixels"):
        images.load(1)


def _gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], -1).astype(np.uint8)


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [(".png", (334, 500, 3)), (".jpg", (500, 750, 3))],  # png: reduce(6); jpg: DCT 1/4
)
def test_large_images_are_decoded_reduced_for_the_input_size(
    tmp_path: Path, suffix: str, expected: tuple[int, int, int]
) -> None:
    path = tmp_path / f"large{suffix}"
    full = _gradient(2000, 3000)
    write_png(path, full)  # PIL picks the format from the suffix
    limits = DecodeLimits.for_input(160)  # keep the shorter side >= 320
    reduced = decode_image_file(path, limits)
    assert reduced.shape == expected
    assert 320 <= min(reduced.shape[:2]) < 2 * 320
    # the model sees nearly the same picture as from the full-size decode
    pre = Preprocessor(160, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    diff = (pre([reduced]) - pre([decode_image_file(path)])).abs()
    assert float(diff.mean()) < 0.02 and float(diff.max()) < 0.2
    # small images are untouched
    write_png(tmp_path / "small.png", full[:600, :900])  # shorter side < 2 x 320
    assert decode_image_file(tmp_path / "small.png", limits).shape == (600, 900, 3)
