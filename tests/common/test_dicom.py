"""The DICOM reader: each tag path of the grayscale pipeline, refusals, and data paths."""

from __future__ import annotations

import ast
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedhead.common.config import NodeConfig
from fedhead.common.datasets import read_parts
from fedhead.common.dicom import (
    ReaderSettings,
    UnsupportedDicomError,
    is_dicom_path,
    read_dicom,
    read_info,
)
from fedhead.common.errors import ConfigError, DataError
from fedhead.common.images import DecodeLimits, FileImages, ImageDecodeError
from tests import dicom_files as dcm
from tests.conftest import write_png

CLASSES = ("normal", "pneumonia")
EXACT = 1e-6  # float32 rounding only
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"


@pytest.fixture
def xray(xray_arrays: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """One real 8-bit chest X-ray using most of the 0..255 range."""
    img: np.ndarray = xray_arrays[0][0]
    assert img.min() < 30 and img.max() > 200
    return img


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR windowing onto [0, 1], written out independently."""
    y = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(y, 0.0, 1.0)


def test_monochrome2_window_gives_the_8_bit_picture(tmp_path: Path, xray: np.ndarray) -> None:
    out = read_dicom(dcm.write_gray(tmp_path / "a.dcm", xray))
    assert out.dtype == np.float32 and out.shape == xray.shape
    np.testing.assert_allclose(out, xray / 255.0, atol=EXACT)


def test_monochrome1_is_inverted_to_the_same_picture(tmp_path: Path, xray: np.ndarray) -> None:
    path = dcm.write_gray(tmp_path / "m1.dcm", xray, photometric="MONOCHROME1")
    from pydicom import dcmread

    stored = dcmread(path).pixel_array
    assert stored.max() == dcm.STORED_MAX - 16 * int(xray.min())  # dark pixels stored high
    np.testing.assert_allclose(read_dicom(path), xray / 255.0, atol=EXACT)


def test_rescale_is_applied_before_the_window(tmp_path: Path, xray: np.ndarray) -> None:
    # the window is written in rescaled units: it only lands on v/255 if the
    # Modality LUT (slope 0.5, intercept -100) was applied first
    path = dcm.write_gray(tmp_path / "r.dcm", xray, rescale=(0.5, -100.0))
    np.testing.assert_allclose(read_dicom(path), xray / 255.0, atol=EXACT)


def test_without_a_window_the_full_rescaled_range_is_used(tmp_path: Path, xray: np.ndarray) -> None:
    path = dcm.write_gray(tmp_path / "r.dcm", xray, rescale=(0.5, -100.0), window=False)
    # stored s -> 0.5 s - 100 over the 12-bit range [-100, 0.5 * 4095 - 100]
    expected = (0.5 * (16.0 * xray) - 100 + 100) / (0.5 * 4095)
    np.testing.assert_allclose(read_dicom(path), expected, atol=EXACT)


def test_window_index_is_configurable_and_minus_one_means_none(
    tmp_path: Path, xray: np.ndarray
) -> None:
    path = dcm.write_gray(tmp_path / "w.dcm", xray, extra_windows=1)
    center, width = dcm.linear_window(1.0, 0.0)
    stored = 16.0 * xray
    np.testing.assert_allclose(read_dicom(path, ReaderSettings(window=0)), xray / 255, atol=EXACT)
    second = read_dicom(path, ReaderSettings(window=1))
    np.testing.assert_allclose(second, linear_window(stored, center / 2, width / 2), atol=EXACT)
    assert np.abs(second - xray / 255).max() > 0.2
    np.testing.assert_allclose(read_dicom(path, ReaderSettings(window=-1)), stored / 4095)
    with pytest.raises(UnsupportedDicomError, match=r"w\.dcm.*2 Window.*dicom-window=2"):
        read_dicom(path, ReaderSettings(window=2))


def test_voi_lut_sequence_takes_precedence_over_the_window(
    tmp_path: Path, xray: np.ndarray
) -> None:
    # 8-bit LUT of 4096 entries: indices above 255 must not wrap
    path = dcm.write_voi_lut(tmp_path / "voi.dcm", xray, with_window=True)
    np.testing.assert_allclose(read_dicom(path), xray / 255.0, atol=EXACT)
    none = read_dicom(path, ReaderSettings(window=-1))
    np.testing.assert_allclose(none, 16.0 * xray / 4095, atol=EXACT)


def test_multi_frame_reads_the_chosen_frame(tmp_path: Path, xray: np.ndarray) -> None:
    frames = [xray, 255 - xray, np.zeros_like(xray)]
    path = dcm.write_multiframe(tmp_path / "mf.dcm", frames)
    np.testing.assert_allclose(read_dicom(path), xray / 255.0, atol=EXACT)
    np.testing.assert_allclose(read_dicom(path, ReaderSettings(frame=1)), frames[1] / 255.0)
    np.testing.assert_allclose(read_dicom(path, ReaderSettings(frame=2)), 0.0)
    with pytest.raises(UnsupportedDicomError, match=r"mf\.dcm: has 3 frame.*dicom-frame=3"):
        read_dicom(path, ReaderSettings(frame=3))


def test_modality_lut_sequence_without_a_window_uses_the_lut_range(
    tmp_path: Path, xray: np.ndarray
) -> None:
    path = dcm.write_modality_lut(tmp_path / "mlut.dcm", xray)
    np.testing.assert_allclose(read_dicom(path), xray / 255.0, atol=EXACT)


def test_signed_ct_is_windowed_in_hounsfield_units(tmp_path: Path) -> None:
    hu = np.linspace(-1200, 1500, 32 * 32).reshape(32, 32).round()
    path = dcm.write_signed_ct(tmp_path / "ct.dcm", hu, center=40.0, width=400.0)
    expected = linear_window(hu, 40.0, 400.0)  # soft-tissue window, computed in HU
    np.testing.assert_allclose(read_dicom(path), expected, atol=EXACT)
    # no window: the signed 16-bit range, rescaled, mapped linearly
    full = read_dicom(path, ReaderSettings(window=-1))
    np.testing.assert_allclose(full, (hu - 1024 + 32768) / 65535, atol=EXACT)


def test_enhanced_multi_frame_takes_rescale_and_window_from_functional_groups(
    tmp_path: Path, xray: np.ndarray
) -> None:
    frames = [xray, 255 - xray]
    path = dcm.write_enhanced_multiframe(tmp_path / "enh.dcm", frames)
    np.testing.assert_allclose(read_dicom(path), xray / 255.0, atol=EXACT)
    # frame 1 is stored at half the scale with its own window: still v / 255
    np.testing.assert_allclose(
        read_dicom(path, ReaderSettings(frame=1)), frames[1] / 255.0, atol=EXACT
    )


def test_colour_is_refused_naming_the_file_and_the_tag(tmp_path: Path, xray: np.ndarray) -> None:
    path = dcm.write_rgb(tmp_path / "colour.dcm", xray)
    with pytest.raises(UnsupportedDicomError) as err:
        read_dicom(path)
    line = str(err.value)
    assert "colour.dcm" in line and "(0028,0004)" in line and "RGB" in line
    assert "\n" not in line


@pytest.mark.parametrize(
    "syntax",
    ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"],  # RLE Lossless, JPEG 2000 Lossless
)
def test_compressed_transfer_syntaxes_decode(tmp_path: Path, xray: np.ndarray, syntax: str) -> None:
    big = np.kron(xray, np.ones((2, 2), np.uint8))  # OpenJPEG needs more than 32 px
    path = dcm.write_compressed(tmp_path / "c.dcm", big, syntax)
    np.testing.assert_allclose(read_dicom(path), big / 255.0, atol=EXACT)


@pytest.mark.parametrize(
    "name",
    [
        "JPEGBaseline8Bit",
        "JPEGExtended12Bit",
        "JPEGLosslessSV1",
        "JPEGLSLossless",
        "JPEGLSNearLossless",
        "JPEG2000Lossless",
        "JPEG2000",
        "HTJ2KLossless",
        "RLELossless",
        "DeflatedExplicitVRLittleEndian",
    ],
)
def test_the_installed_plugins_decode_the_common_compressed_syntaxes(name: str) -> None:
    """The pinned pylibjpeg plugins are installed and pydicom finds them."""
    import pydicom.uid
    from pydicom.pixels.decoders.base import get_decoder

    decoder = get_decoder(getattr(pydicom.uid, name))
    assert decoder.is_available, decoder.missing_dependencies


def test_a_syntax_whose_plugin_is_missing_is_refused_by_name(
    tmp_path: Path, xray: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydicom.pixels.decoders.base import Decoder

    path = dcm.write_compressed(tmp_path / "rle.dcm", xray, "1.2.840.10008.1.2.5")
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(UnsupportedDicomError, match=r"rle\.dcm: transfer syntax RLE Lossless "):
        read_dicom(path)


def test_a_transfer_syntax_without_a_decoder_is_refused_by_name(
    tmp_path: Path, xray: np.ndarray
) -> None:
    path = dcm.write_encapsulated(tmp_path / "video.dcm", xray, "1.2.840.10008.1.2.4.100")
    with pytest.raises(UnsupportedDicomError, match=r"video\.dcm: transfer syntax MPEG2.*\.4\.100"):
        read_dicom(path)


def test_corrupt_and_non_dicom_files_raise_decode_errors(tmp_path: Path, xray: np.ndarray) -> None:
    with pytest.raises(ImageDecodeError, match=r"scrambled\.dcm"):
        read_dicom(dcm.write_corrupt(tmp_path / "scrambled.dcm", xray))
    short = dcm.write_gray(tmp_path / "short.dcm", xray)
    short.write_bytes(short.read_bytes()[:-300])
    with pytest.raises(ImageDecodeError, match=r"short\.dcm: cannot decode the DICOM pixel data"):
        read_dicom(short)
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"not dicom" * 50)
    with pytest.raises(ImageDecodeError, match=r"fake\.dcm: not a DICOM file"):
        read_dicom(fake)


def test_an_invalid_window_is_a_decode_error_not_a_crash(tmp_path: Path, xray: np.ndarray) -> None:
    from pydicom import dcmread

    path = dcm.write_gray(tmp_path / "w.dcm", xray)
    ds = dcmread(path)
    ds.WindowWidth = 0.5  # LINEAR windowing needs a width >= 1
    ds.save_as(path)
    with pytest.raises(ImageDecodeError, match=r"w\.dcm: cannot decode.*\(0028,1051\)"):
        read_dicom(path)


def test_header_facts_for_the_data_check(tmp_path: Path, xray: np.ndarray) -> None:
    info = read_info(dcm.write_gray(tmp_path / "a.dcm", xray, photometric="MONOCHROME1"))
    assert (info.photometric, info.bits_stored, info.rows, info.columns) == (
        "MONOCHROME1",
        12,
        *xray.shape,
    )
    assert info.frames == 1 and info.pixel_spacing_mm == pytest.approx(0.15)


def test_dicom_files_are_recognised_with_or_without_a_suffix(
    tmp_path: Path, xray: np.ndarray
) -> None:
    plain = dcm.write_gray(tmp_path / "IM0001", xray)
    uid_named = dcm.write_gray(tmp_path / "1.2.826.0.1.3680043.8.498.1", xray)
    other = tmp_path / "notes"
    other.write_bytes(b"x" * 200)
    dicomdir = dcm.write_gray(tmp_path / "DICOMDIR", xray)
    assert is_dicom_path(plain) and is_dicom_path(uid_named)
    assert is_dicom_path(tmp_path / "x.dcm")
    assert not is_dicom_path(other) and not is_dicom_path(dicomdir)
    assert not is_dicom_path(tmp_path / "x.png")


def test_reader_settings_round_trip_and_validation() -> None:
    s = ReaderSettings(window=-1, frame=2)
    assert ReaderSettings.from_dict(s.to_dict()) == s
    assert ReaderSettings.from_dict({}) == ReaderSettings()
    assert s.fingerprint() != ReaderSettings().fingerprint()
    for bad in ({"window": -2}, {"frame": -1}, {"frame": "0"}, {"colour": 1}, {"version": 99}):
        with pytest.raises(ValueError):
            ReaderSettings.from_dict(bad)
    node = NodeConfig.from_mapping({"data-path": "/d", "dicom-window": -1, "dicom-frame": 1})
    assert node.reader_settings() == ReaderSettings(window=-1, frame=1)
    with pytest.raises(ConfigError, match="dicom-window"):
        NodeConfig.from_mapping({"dicom-window": -3})


def test_reader_settings_are_part_of_dicom_keys_only(tmp_path: Path, xray: np.ndarray) -> None:
    d = dcm.write_gray(tmp_path / "a.dcm", xray)
    write_png(tmp_path / "a.png", xray)
    a = FileImages([d, tmp_path / "a.png"], reader=ReaderSettings())
    b = FileImages([d, tmp_path / "a.png"], reader=ReaderSettings(window=-1))
    assert a.key(0) != b.key(0)  # same file, other windowing: another cache entry
    assert a.key(1) == b.key(1)  # a PNG is read the same way whatever the settings
    assert FileImages([d]).key(0) == a.key(0)


def test_folder_of_series_gives_one_example_per_file(tmp_path: Path, xray: np.ndarray) -> None:
    root = tmp_path / "site"
    dcm.write_gray(root / "normal" / "study1" / "series1" / "1.dcm", xray)
    dcm.write_gray(root / "normal" / "study1" / "series1" / "IM0002", xray)
    dcm.write_gray(root / "pneumonia" / "study2" / "1.dcm", xray, photometric="MONOCHROME1")
    dcm.write_png16(root / "pneumonia" / "export.png", xray)
    parts = read_parts(root, CLASSES, reader=ReaderSettings(window=-1))
    images = parts.train.images
    assert isinstance(images, FileImages) and images.reader == ReaderSettings(window=-1)
    assert [p.name for p in images.paths] == ["1.dcm", "IM0002", "export.png", "1.dcm"]
    assert parts.train.labels.tolist() == [0, 0, 1, 1]


def test_csv_row_naming_a_series_folder_stands_for_its_files(
    tmp_path: Path, xray: np.ndarray
) -> None:
    root = tmp_path / "site"
    for i in range(3):
        dcm.write_gray(root / "seriesA" / f"{i}.dcm", xray)
    dcm.write_gray(root / "single.dcm", xray, photometric="MONOCHROME1")
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["path", "label", "split"], ["seriesA", "pneumonia", "train"]])
        w.writerow(["single.dcm", "normal", "val"])
    parts = read_parts(manifest, CLASSES)
    assert parts.train.labels.tolist() == [1, 1, 1]
    (root / "empty").mkdir()
    with manifest.open("a", newline="") as f:
        csv.writer(f).writerow(["empty", "normal", "train"])
    with pytest.raises(DataError, match=r"'empty' names a folder without image files"):
        read_parts(manifest, CLASSES)
    assert parts.val is not None and parts.val.labels.tolist() == [0]
    for i in range(3):
        np.testing.assert_allclose(parts.train.images.load(i), xray / 255.0, atol=EXACT)


# --- decode bounds -------------------------------------------------------------------
def test_an_encapsulated_jpeg_frame_of_the_header_size_decodes(
    tmp_path: Path, xray: np.ndarray
) -> None:
    frame = dcm.jpeg_frame(xray)
    path = dcm.write_frame(tmp_path / "ok.dcm", xray.shape, frame, JPEG_BASELINE)
    np.testing.assert_allclose(read_dicom(path), xray / 255.0, atol=0.05)  # lossy


def test_a_jpeg_frame_larger_than_its_header_is_refused_undecoded(
    tmp_path: Path, xray: np.ndarray
) -> None:
    """The attack of a small file whose header says 64x64 and whose JPEG frame is
    12000x12000: refused from the frame's own header, before any decoder runs."""
    bomb = dcm.with_jpeg_size(dcm.jpeg_frame(xray), 12000, 12000)
    path = dcm.write_frame(tmp_path / "bomb.dcm", xray.shape, bomb, JPEG_BASELINE)
    with pytest.raises(ImageDecodeError) as err:
        read_dicom(path)
    line = str(err.value)
    assert "bomb.dcm: frame 1 is compressed as 12000x12000 pixels" in line
    assert f"says {xray.shape[1]}x{xray.shape[0]}; refused undecoded" in line
    # through the site's image source it is one more unreadable image
    images = FileImages([path, dcm.write_gray(tmp_path / "fine.dcm", xray)])
    assert images.load(1).shape == xray.shape
    with pytest.raises(ImageDecodeError, match="refused undecoded"):
        images.load(0)
    # refusing costs no memory: measured in a fresh process
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, str(path)], capture_output=True, text=True, check=True
    )
    grown_kib, what = ast.literal_eval(out.stdout.strip())
    assert "refused undecoded" in what and grown_kib < 10_000


_PEAK_PROBE = """
import sys
from pathlib import Path
from fedhead.common.dicom import read_dicom
from fedhead.common.images import ImageDecodeError

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Linux: reset the peak resident size to the current one
def peak_kib():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])
import pydicom.encaps, pydicom.pixels  # imported before the measurement
before = peak_kib()
try:
    what = str(read_dicom(Path(sys.argv[1])).shape)
except ImageDecodeError as err:
    what = str(err)
print(repr((peak_kib() - before, what)))
"""


def test_a_j2k_frame_larger_than_its_header_is_refused_undecoded(
    tmp_path: Path, xray: np.ndarray
) -> None:
    big = np.kron(xray, np.ones((2, 2), np.uint8))  # OpenJPEG needs more than 32 px
    frame = dcm.j2k_frame(big)
    fine = dcm.write_frame(tmp_path / "fine.dcm", big.shape, frame, J2K_LOSSLESS)
    np.testing.assert_array_equal(read_dicom(fine), big / np.float32(255.0))
    bomb = dcm.with_j2k_size(frame, 20000, 9000)
    path = dcm.write_frame(tmp_path / "bomb.dcm", big.shape, bomb, J2K_LOSSLESS)
    with pytest.raises(ImageDecodeError, match=r"compressed as 9000x20000 pixels"):
        read_dicom(path)


def test_a_frame_whose_size_cannot_be_read_is_refused(tmp_path: Path, xray: np.ndarray) -> None:
    path = dcm.write_frame(tmp_path / "odd.dcm", xray.shape, b"\x00" * 64, JPEG_BASELINE)
    with pytest.raises(ImageDecodeError, match=r"odd\.dcm: frame 1: not a JPEG codestream"):
        read_dicom(path)


def test_max_image_pixels_applies_to_dicom(tmp_path: Path, xray: np.ndarray) -> None:
    native = dcm.write_gray(tmp_path / "native.dcm", xray)
    jpeg = dcm.write_frame(tmp_path / "jpeg.dcm", xray.shape, dcm.jpeg_frame(xray), JPEG_BASELINE)
    pixels = xray.size
    for path in (native, jpeg):
        assert read_dicom(path, max_pixels=pixels).shape == xray.shape
        with pytest.raises(ImageDecodeError, match=rf"limit of {pixels - 1} pixels \(max-image"):
            read_dicom(path, max_pixels=pixels - 1)
        images = FileImages([path], limits=DecodeLimits(pixels - 1))
        with pytest.raises(ImageDecodeError, match="refused unread"):
            images.load(0)


def test_a_deflated_data_set_is_bounded_before_it_is_inflated(
    tmp_path: Path, xray: np.ndarray
) -> None:
    small = dcm.write_deflated(tmp_path / "small.dcm", xray)
    assert read_dicom(small).shape == xray.shape
    # 16 MB of one grey value deflate to a few kilobytes
    bomb = dcm.write_deflated(tmp_path / "bomb.dcm", np.full((4000, 4000), 7, np.uint8))
    assert bomb.stat().st_size < 100_000
    limit = 100_000  # pixels: at 8 bytes a pixel, the data set may inflate to 800 kB
    with pytest.raises(ImageDecodeError, match=r"bomb\.dcm: its deflated data set inflates"):
        read_dicom(bomb, max_pixels=limit)
    with pytest.raises(ImageDecodeError, match="inflates to more than"):
        FileImages([bomb], limits=DecodeLimits(limit)).load(0)
