"""DICOM files read as a radiologist sees them: one grayscale picture in [0, 1].

The pixel pipeline follows the DICOM standard's grayscale chain (PS3.3 C.11):
stored values -> Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence)
-> VOI LUT (a VOI LUT Sequence item, else Window Center/Width; the first by default)
-> MONOCHROME1 inverted so that higher always means brighter -> float32 in [0, 1],
the same range the 8-bit path reaches by dividing by 255, so the same X-ray gives
the same features whichever way it was stored.

Size: a picture is refused before anything decodes it when the header's Rows x
Columns exceed the node's ``max-image-pixels``, when an encapsulated frame's own
header (``common.codestreams``) declares another size than Rows x Columns, and a
deflated data set when it would inflate beyond ``DEFLATED_BYTES_PER_PIXEL`` bytes per
pixel of that limit: what a decoder allocates follows from the limit, never from a
number only the compressed bytes hold.

Privacy: only the tags that the pixel pipeline and ``fedhead data check`` need are
parsed at all (``specific_tags``); patient name, IDs and dates are never read into
memory, and pydicom's own warnings (which may quote header values) are kept out of
the site's logs.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedhead.common.codestreams import CodestreamError, frame_size
from fedhead.common.config import DEFAULT_MAX_IMAGE_PIXELS
from fedhead.common.images import IMAGE_EXTENSIONS, ImageDecodeError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom", ".dic"})
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
# A deflated data set may inflate to at most this many bytes per pixel of the limit
# (a frame of max-image-pixels 64-bit values) before pydicom is given it.
DEFLATED_BYTES_PER_PIXEL = 8

# The only tags ever parsed from a file (besides the file meta group): the image
# pixel module, the grayscale pipeline and pixel spacing. Nothing that names a person.
_HEADER_TAGS = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
)
_PIXEL_TAGS = (*_HEADER_TAGS, "FloatPixelData", "DoubleFloatPixelData", "PixelData")


class UnsupportedDicomError(ImageDecodeError):
    """A readable DICOM file fedhead does not turn into a picture (colour, no pixels,
    a transfer syntax without an installed decoder, a missing window or frame)."""


@dataclass(frozen=True)
class ReaderSettings:
    """How a site turns DICOM files into pictures.

    Part of every DICOM image's feature-cache key and meant to travel in a model
    package, so a site predicts with the windowing it trained with.
    ``window``: which VOI LUT Sequence item, or else which Window Center/Width pair,
    to apply (0 = the first); -1 applies none and maps the full stored range.
    ``frame``: which frame of a multi-frame file is the example (0 = the first).
    """

    window: int = 0
    frame: int = 0

    VERSION: ClassVar[int] = 1  # bump when the pixel pipeline changes what it returns

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < -1:
            raise ValueError(f"window must be an integer >= -1, got {self.window!r}")
        if not isinstance(self.frame, int) or isinstance(self.frame, bool) or self.frame < 0:
            raise ValueError(f"frame must be an integer >= 0, got {self.frame!r}")

    def to_dict(self) -> dict[str, int]:
        return {"version": self.VERSION, "window": self.window, "frame": self.frame}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReaderSettings:
        """The inverse of ``to_dict``; unknown keys or another version are errors."""
        unknown = sorted(set(data) - {"version", "window", "frame"})
        if unknown:
            raise ValueError(f"reader settings: unknown key(s) {', '.join(unknown)}")
        version = data.get("version", cls.VERSION)
        if version != cls.VERSION:
            raise ValueError(
                f"reader settings: version {version!r} is not {cls.VERSION} "
                "(written by another fedhead version)"
            )
        return cls(window=data.get("window", 0), frame=data.get("frame", 0))

    def fingerprint(self) -> str:
        return f"dicom-v{self.VERSION}|window={self.window}|frame={self.frame}"

    def image_key(self, content_sha256: str) -> str:
        """The cache key of a DICOM file's picture: its content and these settings."""
        return hashlib.sha256(f"{content_sha256}|{self.fingerprint()}".encode()).hexdigest()


@dataclass(frozen=True)
class DicomInfo:
    """The few header values ``fedhead data check`` reports (kept on the site)."""

    photometric: str
    bits_stored: int
    rows: int
    columns: int
    frames: int
    pixel_spacing_mm: float | None  # the smaller of row and column spacing


def is_dicom_path(path: Path) -> bool:
    """A file to read as DICOM: a DICOM suffix, or no image suffix and the DICM mark.

    DICOM files often have no suffix or a UID as their name (``1.2.840...5.1``), so
    those are recognised by the 'DICM' prefix after the 128-byte preamble.
    """
    suffix = path.suffix.lower()
    if suffix in DICOM_EXTENSIONS:
        return True
    if suffix in IMAGE_EXTENSIONS or path.name.upper() == "DICOMDIR":
        return False
    if suffix and not suffix[1:].isdigit():
        return False
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


_configured = False


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep pydicom's warnings, which can quote header values, out of logs and stderr."""
    global _configured
    if not _configured:
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        _configured = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _read(path: Path, pixels: bool, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Dataset:
    """Parse the needed tags only; an unreadable file is one line naming the problem."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    tags = list(_PIXEL_TAGS if pixels else _HEADER_TAGS)
    try:
        _check_inflated_size(path, DEFLATED_BYTES_PER_PIXEL * max_pixels)
        return dcmread(path, stop_before_pixels=not pixels, specific_tags=tags)
    except ImageDecodeError:
        raise
    except InvalidDicomError as err:
        raise ImageDecodeError(
            f"{path}: not a DICOM file (no 'DICM' file header); export it from the PACS "
            "as a DICOM Part 10 file"
        ) from err
    except OSError as err:
        raise ImageDecodeError(
            f"{path}: cannot read ({err.strerror or type(err).__name__})"
        ) from err
    except Exception as err:  # pydicom raises many types on damaged files
        # The message is left out on purpose: it may quote raw header bytes.
        raise ImageDecodeError(
            f"{path}: damaged DICOM file ({type(err).__name__} while parsing the header)"
        ) from err


def _check_inflated_size(path: Path, limit: int) -> None:
    """Refuse a deflated data set that inflates beyond ``limit`` bytes, counting in a
    stream before pydicom inflates it whole into memory (a deflate bomb)."""
    import zlib

    from pydicom.filereader import read_file_meta_info

    meta = read_file_meta_info(path)
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        return
    if "FileMetaInformationGroupLength" not in meta:
        raise ImageDecodeError(
            f"{path}: a deflated DICOM file without File Meta Information Group Length "
            "(0002,0000); export it again"
        )
    start = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)  # preamble, DICM, (0002,0000)
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    with path.open("rb") as f:
        f.seek(start)
        while size <= limit and (chunk := inflate.unconsumed_tail or f.read(1 << 16)):
            size += len(inflate.decompress(chunk, 1 << 20))
            if inflate.eof:
                break
    if size > limit:
        raise ImageDecodeError(
            f"{path}: its deflated data set inflates to more than {limit} bytes, "
            f"{DEFLATED_BYTES_PER_PIXEL} bytes per pixel of max-image-pixels; refused unread"
        )


def _int(ds: Dataset, name: str, default: int) -> int:
    value = ds.get(name)
    return default if value is None or value == "" else int(value)


def _check_grayscale(path: Path, ds: Dataset) -> None:
    if not any(name in ds for name in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnsupportedDicomError(
            f"{path}: no Pixel Data (7FE0,0010) found: a report, a DICOMDIR or a "
            "damaged file; leave it out of the data or export the image again"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in GRAYSCALE:
        shown = photometric or "missing"
        raise UnsupportedDicomError(
            f"{path}: Photometric Interpretation (0028,0004) is {shown}; only grayscale "
            "MONOCHROME1/MONOCHROME2 DICOM images are read (leave colour images out)"
        )
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise UnsupportedDicomError(
            f"{path}: Samples per Pixel (0028,0002) is {samples}; only single-sample "
            "grayscale DICOM images are read"
        )


def read_info(path: Path) -> DicomInfo:
    """The header values ``fedhead data check`` reports, without decoding pixels."""
    with _quiet():
        ds = _read(path, pixels=False)
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper() or "missing"
        try:
            spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
            spacing_mm = min(float(v) for v in spacing) if spacing else None
            return DicomInfo(
                photometric=photometric,
                bits_stored=_int(ds, "BitsStored", _int(ds, "BitsAllocated", 0)),
                rows=_int(ds, "Rows", 0),
                columns=_int(ds, "Columns", 0),
                frames=_int(ds, "NumberOfFrames", 1),
                pixel_spacing_mm=spacing_mm,
            )
        except (ValueError, TypeError) as err:
            raise ImageDecodeError(
                f"{path}: invalid image pixel module values ({type(err).__name__})"
            ) from err


def read_dicom(
    path: Path, settings: ReaderSettings | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """A DICOM file's picture as float32 HxW in [0, 1] (raises ImageDecodeError); a
    picture of more than ``max_pixels`` pixels is refused before decoding."""
    settings = settings or ReaderSettings()
    with _quiet():
        ds = _read(path, pixels=True, max_pixels=max_pixels)
        try:
            _check_grayscale(path, ds)
            return _picture(path, ds, settings, max_pixels)
        except ImageDecodeError:
            raise
        except (
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            IndexError,
            RuntimeError,
            ArithmeticError,
        ) as err:
            # Raised while decoding pixels or reading the pixel-module tags, the only
            # ones parsed, none of which holds personal data.
            raise ImageDecodeError(f"{path}: cannot decode the DICOM pixel data ({err})") from err


def _check_frame_size(path: Path, ds: Dataset, frame: int, frames: int) -> None:
    """An encapsulated frame must declare, in its own header, the size the DICOM
    header gives (decoders allocate what the frame declares)."""
    from pydicom.encaps import get_frame

    uid = str(ds.file_meta.TransferSyntaxUID)
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    data = get_frame(ds.PixelData, frame, extended_offsets=offsets, number_of_frames=frames)
    try:
        size = frame_size(uid, data)
    except CodestreamError as err:
        raise ImageDecodeError(f"{path}: frame {frame + 1}: {err}; refused undecoded") from err
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if size is not None and (size.rows, size.columns) != (rows, cols):
        raise ImageDecodeError(
            f"{path}: frame {frame + 1} is compressed as {size.columns}x{size.rows} pixels "
            f"but the header (Rows, Columns) says {cols}x{rows}; refused undecoded "
            "(export the image again)"
        )


def _check_decoder(path: Path, ds: Dataset) -> None:
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    uid = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if not uid:
        raise ImageDecodeError(f"{path}: the file meta has no Transfer Syntax UID (0002,0010)")
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as err:
        raise UnsupportedDicomError(
            f"{path}: transfer syntax {uid.name} ({uid}) cannot be decoded by fedhead; "
            "export the image uncompressed (Explicit VR Little Endian)"
        ) from err
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise UnsupportedDicomError(
            f"{path}: transfer syntax {uid.name} ({uid}) needs {missing}; install it "
            "or export the image uncompressed"
        )


def _lift_functional_groups(ds: Dataset, frame: int) -> None:
    """Enhanced multi-frame files keep rescale and window per frame (or shared) in
    functional groups; copy the chosen frame's values to where the LUT functions look."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for seq, names in (
        ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
        ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
    ):
        item = next((g.get(seq)[0] for g in groups if g.get(seq)), None)
        if item is None:
            continue
        for name in names:
            if name in item and name not in ds:
                setattr(ds, name, item[name].value)


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = _int(ds, "BitsStored", _int(ds, "BitsAllocated", 16))
    if _int(ds, "PixelRepresentation", 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """The range the Modality LUT maps the stored range onto (PS3.3 C.11.1)."""
    from pydicom.pixels.processing import apply_modality_lut

    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    ends = apply_modality_lut(np.array(_stored_range(ds), dtype=np.float64), ds)
    return float(np.min(ends)), float(np.max(ends))


def _voi_choices(ds: Dataset) -> tuple[bool, str, int]:
    """(is a LUT, what it is called, how many) for the file's VOI transforms; a VOI
    LUT Sequence takes precedence over Window Center/Width, as in pydicom."""
    seq = ds.get("VOILUTSequence")
    if seq:
        return True, "VOI LUT Sequence (0028,3010) item", len(seq)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        count = min(ds["WindowCenter"].VM, ds["WindowWidth"].VM)
        return False, "Window Center/Width (0028,1050/1051) pair", count
    return False, "", 0


def _lookup(path: Path, ds: Dataset, item: Dataset, arr: np.ndarray) -> np.ndarray:
    """A VOI LUT Sequence item applied to modality values, scaled to [0, 1].

    Done here rather than with pydicom's ``apply_voi``, which (3.0) indexes the LUT
    through an array of the LUT's own dtype and so wraps indices above 255 for the
    common 8-bit LUTs of 4096 entries.
    """
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16
    if _int(ds, "PixelRepresentation", 0) == 1 and first >= 2**15:
        first -= 2**16  # the first mapped value is signed for signed pixels
    data = item.LUTData
    lut = np.frombuffer(data, "<u2") if isinstance(data, bytes) else np.asarray(data)
    lut = lut.astype(np.float64)[:entries]
    if not len(lut):
        raise ImageDecodeError(f"{path}: a VOI LUT Sequence (0028,3010) item has no LUT Data")
    top = max(2**bits - 1, float(lut.max()))  # some files understate their entries' bits
    index = np.clip(np.rint(arr).astype(np.int64) - first, 0, len(lut) - 1)
    return np.asarray(lut[index] / max(top, 1.0), dtype=np.float64)


def _apply_voi(path: Path, arr: np.ndarray, ds: Dataset, settings: ReaderSettings) -> np.ndarray:
    """Modality values -> [0, 1] through the chosen VOI transform (or the full range)."""
    from pydicom.pixels.processing import apply_windowing

    is_lut, kind, count = _voi_choices(ds)
    if settings.window < 0 or count == 0:
        lo, hi = _modality_range(ds)
        return (arr.astype(np.float64) - lo) / max(hi - lo, 1e-12)
    if settings.window >= count:
        raise UnsupportedDicomError(
            f"{path}: has {count} {kind}(s) but dicom-window={settings.window} asks for "
            f"number {settings.window + 1}; set dicom-window to 0 (the first) or -1 (none)"
        )
    if is_lut:
        return _lookup(path, ds, ds.VOILUTSequence[settings.window], arr)
    # apply_windowing maps onto an output range it derives from the header; the
    # extremes of two infinite inputs give that range exactly.
    ends = apply_windowing(np.array([-np.inf, np.inf]), ds, settings.window)
    y_lo, y_hi = float(ends[0]), float(ends[1])
    out = np.asarray(apply_windowing(arr, ds, settings.window), dtype=np.float64)
    return (out - y_lo) / max(y_hi - y_lo, 1e-12)


def _picture(path: Path, ds: Dataset, settings: ReaderSettings, max_pixels: int) -> np.ndarray:
    from pydicom.pixels.processing import apply_modality_lut
    from pydicom.pixels.utils import pixel_array

    frames = _int(ds, "NumberOfFrames", 1)
    if settings.frame >= frames:
        raise UnsupportedDicomError(
            f"{path}: has {frames} frame(s) but dicom-frame={settings.frame} asks for "
            f"frame {settings.frame + 1}; set dicom-frame to 0 (the first)"
        )
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows * cols > max_pixels:
        raise ImageDecodeError(
            f"{path}: image of {cols}x{rows} pixels is larger than the limit of "
            f"{max_pixels} pixels (max-image-pixels); refused unread"
        )
    if "PixelData" not in ds:
        raise UnsupportedDicomError(
            f"{path}: float pixel data (7FE0,0008/0009) is not supported; only integer "
            "Pixel Data (7FE0,0010) is read"
        )
    _check_decoder(path, ds)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        _check_frame_size(path, ds, settings.frame, frames)
    arr = pixel_array(ds, index=settings.frame if frames > 1 else None)
    if arr.ndim != 2:
        raise UnsupportedDicomError(f"{path}: decoded to shape {arr.shape}, not one 2-D frame")
    _lift_functional_groups(ds, settings.frame)
    modality = apply_modality_lut(arr, ds)
    out = np.clip(_apply_voi(path, modality, ds, settings), 0.0, 1.0)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1: the lowest value is displayed white
    return np.ascontiguousarray(out, dtype=np.float32)
