"""Frame sizes read from codestream headers (JPEG, JPEG-LS, JPEG 2000), never decoded."""

from __future__ import annotations

import numpy as np
import pytest

from fedhead.common.codestreams import (
    RLE_SYNTAX,
    CodestreamError,
    FrameSize,
    frame_size,
    j2k_frame_size,
    jpeg_frame_size,
)
from tests import dicom_files as dcm

JPEG_LS = "1.2.840.10008.1.2.4.80"
HTJ2K = "1.2.840.10008.1.2.4.201"


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def _jpeg_ls(rows: int, cols: int) -> bytes:
    """SOI, an APP segment, padding, then a JPEG-LS frame header (SOF55) and a scan."""
    sof55 = _segment(
        0xF7, bytes([8]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    )
    return (
        b"\xff\xd8"
        + _segment(0xE0, b"JFIF\x00")
        + b"\xff\xff"
        + sof55
        + _segment(0xDA, b"\x01\x01\x00\x00\x00\x00")
    )


def test_a_real_jpeg_gives_its_size() -> None:
    image = np.zeros((48, 80), np.uint8)
    assert jpeg_frame_size(dcm.jpeg_frame(image)) == FrameSize(48, 80)
    assert frame_size(
        "1.2.840.10008.1.2.4.50", dcm.with_jpeg_size(dcm.jpeg_frame(image), 7, 9)
    ) == FrameSize(7, 9)


def test_a_jpeg_ls_frame_header_gives_its_size() -> None:
    assert frame_size(JPEG_LS, _jpeg_ls(12000, 11000)) == FrameSize(12000, 11000)


def test_real_and_wrapped_j2k_give_their_size() -> None:
    code = dcm.j2k_frame(np.zeros((40, 70), np.uint8))
    assert j2k_frame_size(code) == FrameSize(40, 70)
    assert frame_size(HTJ2K, dcm.with_j2k_size(code, 30000, 20000)) == FrameSize(30000, 20000)
    jp2 = (
        b"\x00\x00\x00\x0cjP  \r\n\x87\n"
        + (20).to_bytes(4, "big")
        + b"ftypjp2 "
        + bytes(8)
        + (len(code) + 8).to_bytes(4, "big")
        + b"jp2c"
        + code
    )
    assert j2k_frame_size(jp2) == FrameSize(40, 70)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "no SOI marker"),
        (b"\xff\xd8\x00\x00\x00\x00", "no JPEG marker at byte 2"),
        (b"\xff\xd8" + _segment(0xDA, b"\x00\x00"), "no JPEG frame header"),
        (b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x00\x00\x10\x01", "0x16 lines"),  # height by DNL
        (b"\xff\xd8\xff\xc0\x00\x0b\x08\x00", "truncated"),
        (b"\xff\xd8\xff\xe0\x00\x01", "length 1"),
    ],
)
def test_a_jpeg_header_that_does_not_say_the_size_is_refused(data: bytes, problem: str) -> None:
    with pytest.raises(CodestreamError, match=problem):
        jpeg_frame_size(data)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\xff\x4f\xff\x52", "no SOC and SIZ"),
        (b"\xff\x4f\xff\x51\x00\x29\x00\x00", "truncated"),
        (
            b"\xff\x4f\xff\x51\x00\x29\x00\x00"
            + (5).to_bytes(4, "big") * 2
            + (5).to_bytes(4, "big") * 2,
            "area of 0x0",
        ),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(8), "without a codestream box"),
    ],
)
def test_a_j2k_header_that_does_not_say_the_size_is_refused(data: bytes, problem: str) -> None:
    with pytest.raises(CodestreamError, match=problem):
        j2k_frame_size(data)


def test_rle_frames_carry_no_size_and_unknown_syntaxes_are_refused() -> None:
    assert frame_size(RLE_SYNTAX, b"anything") is None
    with pytest.raises(CodestreamError, match=r"1\.2\.840\.10008\.1\.2\.4\.110 is not known"):
        frame_size("1.2.840.10008.1.2.4.110", b"\xff\x0a")
