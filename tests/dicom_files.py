"""Synthetic DICOM files made with pydicom from the bundled demo X-rays (no real patients).

Every file carries recognisable fake identifiers (PHI_VALUES) so tests can assert that
none of them ever reaches a log, a report or a command's output.

An 8-bit image ``v`` is stored at 12 bits as ``16 * v`` (0..4080); the window tags are
chosen so that the windowed result, divided by its output range, is exactly ``v / 255``,
the value the 8-bit PNG path gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PATIENT_NAME = "Zzyzx^Phiperson^Q"
PATIENT_ID = "PHI-ID-739146"
BIRTH_DATE = "19010203"
STUDY_DATE = "20990708"
INSTITUTION = "Phiville General Hospital"
PHI_VALUES = (PATIENT_NAME, "Zzyzx", "Phiperson", PATIENT_ID, BIRTH_DATE, STUDY_DATE, INSTITUTION)

STORED_MAX = 16 * 255  # the 12-bit value of an 8-bit 255


def _base(rows: int, cols: int, photometric: str, samples: int = 1) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.StudyDate = STUDY_DATE
    ds.SeriesDate = STUDY_DATE
    ds.InstitutionName = INSTITUTION
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.PixelSpacing = [0.15, 0.15]
    return ds


def _set_pixels(ds: Dataset, stored: np.ndarray, bits: int) -> None:
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    dtype = np.uint16 if bits > 8 else np.uint8
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def linear_window(slope: float, intercept: float) -> tuple[float, float]:
    """(center, width) of a LINEAR window mapping stored 0..STORED_MAX onto 0..1."""
    lo, hi = intercept, intercept + slope * STORED_MAX
    width = hi - lo + 1
    return lo + 0.5 + (width - 1) / 2, width


def write_gray(
    path: Path,
    image8: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    window: bool = True,
    extra_windows: int = 0,
) -> Path:
    """A 12-bit grayscale file whose displayed picture is ``image8 / 255``.

    MONOCHROME1 stores the inverted values. ``rescale`` = (slope, intercept) adds a
    Modality LUT; the window is expressed in the rescaled values. ``extra_windows``
    adds further (different) window pairs after the first.
    """
    stored = image8.astype(np.int64) * 16
    if photometric == "MONOCHROME1":
        stored = STORED_MAX - stored
    rows, cols = image8.shape
    ds = _base(rows, cols, photometric)
    _set_pixels(ds, stored, 12)
    slope, intercept = rescale or (1.0, 0.0)
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.RescaleType = "US"
    if window:
        center, width = linear_window(slope, intercept)
        centers, widths = [center], [width]
        for k in range(extra_windows):
            centers.append(center / (k + 2))
            widths.append(width / (k + 2))
        ds.WindowCenter = centers if len(centers) > 1 else center
        ds.WindowWidth = widths if len(widths) > 1 else width
    return _save(ds, path)


def write_voi_lut(path: Path, image8: np.ndarray, with_window: bool = True) -> Path:
    """A 12-bit MONOCHROME2 file with a VOI LUT Sequence mapping 16*v -> v (8-bit LUT);
    with_window adds a (deliberately wrong) window that the LUT must take precedence over."""
    rows, cols = image8.shape
    ds = _base(rows, cols, "MONOCHROME2")
    _set_pixels(ds, image8.astype(np.int64) * 16, 12)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 8])
    item.add_new("LUTData", "US", [min(255, x // 16) for x in range(4096)])
    item.LUTExplanation = "identity"
    ds.VOILUTSequence = Sequence([item])
    if with_window:
        ds.WindowCenter, ds.WindowWidth = 100.0, 50.0
    return _save(ds, path)


def write_modality_lut(path: Path, image8: np.ndarray) -> Path:
    """A 12-bit MONOCHROME2 file with a Modality LUT Sequence (16-bit entries) mapping
    stored 16*v to 257*v, and no window: the full 16-bit LUT range is v / 255."""
    rows, cols = image8.shape
    ds = _base(rows, cols, "MONOCHROME2")
    _set_pixels(ds, image8.astype(np.int64) * 16, 12)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "US", [min(65535, (x // 16) * 257) for x in range(4096)])
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    return _save(ds, path)


def write_signed_ct(path: Path, hu: np.ndarray, center: float, width: float) -> Path:
    """A signed 16-bit CT slice: stored = HU + 1024 - 2048 (so negative values occur),
    rescale intercept -1024 + 2048, and one window in HU."""
    rows, cols = hu.shape
    ds = _base(rows, cols, "MONOCHROME2")
    ds.Modality = "CT"
    stored = hu.astype(np.int64) - 1024
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(stored.astype(np.int16)).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1.0, 1024.0, "HU"
    ds.WindowCenter, ds.WindowWidth = center, width
    return _save(ds, path)


def write_enhanced_multiframe(path: Path, frames8: list[np.ndarray]) -> Path:
    """A multi-frame file that keeps rescale in the shared functional groups and one
    window per frame in the per-frame groups (as enhanced CT/MR/XA objects do).
    Frame 0 stores 16*v, frame 1 stores 8*v with its own window: both display v/255."""
    rows, cols = frames8[0].shape
    ds = _base(rows, cols, "MONOCHROME2")
    ds.NumberOfFrames = len(frames8)
    scale = [16 // (k + 1) for k in range(len(frames8))]
    stored = np.stack([f.astype(np.int64) * s for f, s in zip(frames8, scale, strict=True)])
    _set_pixels(ds, stored, 12)
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1.0, 0.0, "US"
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for s in scale:
        voi = Dataset()
        lo, hi = 0.0, float(s * 255)
        voi.WindowCenter, voi.WindowWidth = lo + 0.5 + (hi - lo) / 2, hi - lo + 1
        group = Dataset()
        group.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return _save(ds, path)


def write_multiframe(path: Path, frames8: list[np.ndarray]) -> Path:
    """A 12-bit MONOCHROME2 multi-frame file, frame i = frames8[i] / 255."""
    rows, cols = frames8[0].shape
    ds = _base(rows, cols, "MONOCHROME2")
    ds.NumberOfFrames = len(frames8)
    _set_pixels(ds, np.stack(frames8).astype(np.int64) * 16, 12)
    ds.WindowCenter, ds.WindowWidth = linear_window(1.0, 0.0)
    return _save(ds, path)


def write_rgb(path: Path, image8: np.ndarray) -> Path:
    """An 8-bit RGB file (to be refused)."""
    rows, cols = image8.shape
    ds = _base(rows, cols, "RGB", samples=3)
    ds.PlanarConfiguration = 0
    _set_pixels(ds, np.repeat(image8[:, :, None], 3, axis=2), 8)
    return _save(ds, path)


def write_encapsulated(path: Path, image8: np.ndarray, syntax: str) -> Path:
    """A MONOCHROME2 file whose (not really encoded) pixel data is encapsulated under
    ``syntax``: fedhead must refuse a syntax it has no decoder for before decoding."""
    from pydicom.encaps import encapsulate

    rows, cols = image8.shape
    ds = _base(rows, cols, "MONOCHROME2")
    _set_pixels(ds, image8.astype(np.int64), 8)
    ds.PixelData = encapsulate([image8.tobytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return _save(ds, path)


def write_compressed(path: Path, image8: np.ndarray, syntax: str) -> Path:
    """A 12-bit MONOCHROME2 file compressed with pydicom's encoders (lossless)."""
    rows, cols = image8.shape
    ds = _base(rows, cols, "MONOCHROME2")
    _set_pixels(ds, image8.astype(np.int64) * 16, 12)
    ds.WindowCenter, ds.WindowWidth = linear_window(1.0, 0.0)
    ds.compress(UID(syntax))
    return _save(ds, path)


def write_corrupt(path: Path, image8: np.ndarray) -> Path:
    """A file with a valid DICOM preamble whose header bytes are then scrambled."""
    write_gray(path, image8)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    start = 132 + 200  # past the preamble and the file meta group
    data[start:] = rng.integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def write_png16(path: Path, image8: np.ndarray) -> Path:
    """A 16-bit grayscale PNG of an 8-bit image (v * 257, exact in 16 bits)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image8.astype(np.uint16) * 257).astype(np.uint16)).save(path)
    return path


def write_frame(path: Path, shape: tuple[int, int], frame: bytes, syntax: str) -> Path:
    """An 8-bit MONOCHROME2 file whose header says ``shape`` (rows, columns) and whose
    one encapsulated frame is ``frame`` (a codestream under ``syntax``), whatever size
    that codestream declares itself."""
    from pydicom.encaps import encapsulate

    rows, cols = shape
    ds = _base(rows, cols, "MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return _save(ds, path)


def jpeg_frame(image8: np.ndarray) -> bytes:
    """A real baseline JPEG codestream of an 8-bit grayscale image."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image8).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def with_jpeg_size(codestream: bytes, rows: int, cols: int) -> bytes:
    """``codestream`` with its JPEG frame header (SOF0) claiming ``rows`` x ``cols``: a
    small file announcing a huge picture, as a decompression bomb does."""
    at = codestream.index(b"\xff\xc0")
    return (
        codestream[: at + 5]
        + rows.to_bytes(2, "big")
        + cols.to_bytes(2, "big")
        + codestream[at + 9 :]
    )


def j2k_frame(image8: np.ndarray) -> bytes:
    """A real JPEG 2000 (lossless) codestream of an 8-bit grayscale image."""
    from pydicom.encaps import get_frame
    from pydicom.uid import JPEG2000Lossless

    rows, cols = image8.shape
    ds = _base(rows, cols, "MONOCHROME2")
    _set_pixels(ds, image8.astype(np.int64), 8)
    ds.compress(JPEG2000Lossless)
    return get_frame(ds.PixelData, 0, number_of_frames=1)


def with_j2k_size(codestream: bytes, rows: int, cols: int) -> bytes:
    """``codestream`` with its SIZ segment claiming an image area of ``rows`` x ``cols``."""
    at = codestream.index(b"\xff\x4f\xff\x51") + 4 + 4  # past SOC, SIZ, Lsiz, Rsiz
    area = cols.to_bytes(4, "big") + rows.to_bytes(4, "big") + bytes(8)  # no offsets
    return codestream[:at] + area + codestream[at + 16 :]


def write_deflated(path: Path, image8: np.ndarray) -> Path:
    """An 8-bit MONOCHROME2 file in Deflated Explicit VR Little Endian: the whole data
    set is deflated, so a uniform image inflates to many times the file's size."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    rows, cols = image8.shape
    ds = _base(rows, cols, "MONOCHROME2")
    _set_pixels(ds, image8.astype(np.int64), 8)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return _save(ds, path)
