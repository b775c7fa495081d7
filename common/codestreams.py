"""The size of one compressed picture, read from its codestream's header, not decoded.

A DICOM file's Rows and Columns describe its pictures, but an encapsulated frame
(JPEG, JPEG-LS, JPEG 2000) carries its own size in its own header, and a decoder
allocates what that header says: a 1.7 MB file announcing 64x64 can hold a JPEG frame
of 12000x12000 pixels. ``frame_size`` reads that header (a few dozen bytes) so the
DICOM reader can refuse such a frame before any decoder sees it:

- JPEG (ISO/IEC 10918-1) and JPEG-LS (ISO/IEC 14495-1): the frame header of the first
  SOFn marker (JPEG-LS: SOF55), Y lines x X samples per line;
- JPEG 2000 (ISO/IEC 15444-1, also High-Throughput JPEG 2000, 15444-15): the SIZ
  marker segment after SOC, (Xsiz - XOsiz) x (Ysiz - YOsiz); a JP2 file wrapper is
  walked to its contiguous codestream box.

RLE Lossless frames carry no size: their decoders produce what the DICOM header says.
"""

from __future__ import annotations

from dataclasses import dataclass

# Transfer syntax UIDs by codestream family (DICOM PS3.5 A.4).
JPEG_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
        "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 and 4)
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    }
)
J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)

RLE_SYNTAX = "1.2.840.10008.1.2.5"  # RLE Lossless: its frames carry no size

# JPEG markers that start a frame: SOF0-3, 5-7, 9-11, 13-15 (C4 DHT, C8 JPG and CC DAC
# are not), and JPEG-LS's SOF55 (F7).
_SOF = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})
_SOS = 0xDA
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class CodestreamError(ValueError):
    """A codestream header that does not say the picture's size."""


@dataclass(frozen=True)
class FrameSize:
    rows: int
    columns: int

    @property
    def pixels(self) -> int:
        return self.rows * self.columns


def frame_size(syntax: str, data: bytes) -> FrameSize | None:
    """The size one encapsulated frame declares under ``syntax`` (a transfer syntax
    UID); None for RLE, whose frames carry no size; CodestreamError when the header is
    missing, damaged or leaves the size open, or for a syntax not known here."""
    if syntax in JPEG_SYNTAXES:
        return jpeg_frame_size(data)
    if syntax in J2K_SYNTAXES:
        return j2k_frame_size(data)
    if syntax == RLE_SYNTAX:
        return None
    raise CodestreamError(f"the size of a frame of transfer syntax {syntax} is not known here")


def jpeg_frame_size(data: bytes) -> FrameSize:
    """Lines x samples per line from the first JPEG or JPEG-LS frame header."""
    if data[:2] != b"\xff\xd8":
        raise CodestreamError("not a JPEG codestream (no SOI marker)")
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise CodestreamError(f"no JPEG marker at byte {at}")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        if marker == _SOS:
            break
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _SOF:
            if length < 8 or at + 9 > len(data):
                raise CodestreamError("a truncated JPEG frame header")
            rows = int.from_bytes(data[at + 5 : at + 7], "big")
            columns = int.from_bytes(data[at + 7 : at + 9], "big")
            if rows == 0 or columns == 0:  # lines given later by a DNL marker
                raise CodestreamError(f"a JPEG frame header of {rows}x{columns} lines")
            return FrameSize(rows, columns)
        if length < 2:
            raise CodestreamError(f"a JPEG marker segment of length {length}")
        at += 2 + length
    raise CodestreamError("no JPEG frame header (SOF) before the image data")


def j2k_frame_size(data: bytes) -> FrameSize:
    """The reference grid's image area from a JPEG 2000 codestream's SIZ segment."""
    at = _jp2_codestream(data) if data.startswith(_JP2_SIGNATURE) else 0
    if data[at : at + 4] != b"\xff\x4f\xff\x51":
        raise CodestreamError("not a JPEG 2000 codestream (no SOC and SIZ markers)")
    siz = data[at + 4 : at + 4 + 2 + 2 + 16]  # Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz
    if len(siz) < 20:
        raise CodestreamError("a truncated JPEG 2000 SIZ segment")
    x, y, x0, y0 = (int.from_bytes(siz[i : i + 4], "big") for i in (4, 8, 12, 16))
    if x <= x0 or y <= y0:
        raise CodestreamError(f"a JPEG 2000 image area of {x - x0}x{y - y0}")
    return FrameSize(y - y0, x - x0)


def _jp2_codestream(data: bytes) -> int:
    """Where the contiguous codestream box's content starts in a JP2 file."""
    at = 0
    while at + 8 <= len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        header = 8
        if size == 1:  # the size follows as 8 bytes
            size, header = int.from_bytes(data[at + 8 : at + 16], "big"), 16
        if kind == b"jp2c":
            return at + header
        if size < header:  # 0: the last box, running to the end; anything smaller: damaged
            break
        at += size
    raise CodestreamError("a JP2 file without a codestream box")
