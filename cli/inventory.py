"""What a site's images are made of, for ``fedhead data check``: formats, bit depths,
photometric interpretations, image sizes and pixel spacing.

Only these technical values are read (DICOM through ``fedhead.common.dicom.read_info``,
which parses no other tag); the summary stays on the site's console.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedhead.common.dicom import is_dicom_path, read_info
from fedhead.common.images import (
    ConcatImages,
    FileImages,
    ImageDecodeError,
    ImageSource,
    SubsetImages,
)

_MODE_BITS = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "I": 32, "F": 32}


@dataclass(frozen=True)
class ImageFacts:
    format: str  # DICOM, PNG, TIFF, JPEG, ... or "array" for images held in an .npz
    bits: int  # bits per sample (DICOM: Bits Stored)
    photometric: str  # DICOM Photometric Interpretation, else the image mode (L, I;16, RGB)
    rows: int
    columns: int
    spacing_mm: float | None = None  # DICOM Pixel Spacing, where the file states it


def source_file(images: ImageSource, i: int) -> Path | None:
    """The file behind image ``i`` of a source, or None for in-memory images."""
    if isinstance(images, SubsetImages):
        return source_file(images.base, images.indices[i])
    if isinstance(images, ConcatImages):
        return source_file(*images._locate(i))
    if isinstance(images, FileImages):
        return images.paths[i]
    return None


def file_facts(path: Path) -> ImageFacts:
    """Facts about one image file, from its header only (raises ImageDecodeError)."""
    if is_dicom_path(path):
        info = read_info(path)
        return ImageFacts(
            "DICOM",
            info.bits_stored,
            info.photometric,
            info.rows,
            info.columns,
            info.pixel_spacing_mm,
        )
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            bits = 16 if img.mode.startswith("I;16") else _MODE_BITS.get(img.mode, 8)
            return ImageFacts(
                img.format or path.suffix.upper()[1:], bits, img.mode, img.height, img.width
            )
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageDecodeError(f"{path}: not a readable image ({err})") from err


def array_facts(image: np.ndarray) -> ImageFacts:
    """Facts about a decoded in-memory image (an .npz entry)."""
    photometric = "L" if image.ndim == 2 else "RGB"
    return ImageFacts("array", image.dtype.itemsize * 8, photometric, *image.shape[:2])


@dataclass
class Inventory:
    """Counts of facts over a site's usable images."""

    formats: Counter[str] = field(default_factory=Counter)
    bits: Counter[tuple[str, int]] = field(default_factory=Counter)
    photometric: Counter[tuple[str, str]] = field(default_factory=Counter)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    spacings: list[float] = field(default_factory=list)

    def add(self, facts: ImageFacts) -> None:
        self.formats[facts.format] += 1
        self.bits[facts.format, facts.bits] += 1
        self.photometric[facts.format, facts.photometric] += 1
        self.sizes.append((facts.rows, facts.columns))
        if facts.spacing_mm is not None:
            self.spacings.append(facts.spacing_mm)

    def lines(self) -> list[str]:
        if not self.sizes:
            return []

        def per_format(counts: Counter[tuple[str, str]]) -> str:
            out = []
            for fmt in sorted(self.formats):
                items = sorted((v, n) for (f, v), n in counts.items() if f == fmt)
                out.append(f"{fmt} " + ", ".join(f"{v} {n}" for v, n in items))
            return "; ".join(out)

        bits = Counter({(f, f"{b}-bit"): n for (f, b), n in self.bits.items()})

        areas = [r * c for r, c in self.sizes]
        small, large = self.sizes[int(np.argmin(areas))], self.sizes[int(np.argmax(areas))]
        lines = [
            "formats: " + ", ".join(f"{f} {n}" for f, n in sorted(self.formats.items())),
            "bits per sample: " + per_format(bits),
            "photometric interpretation / mode: " + per_format(self.photometric),
            f"image size (rows x columns): {small[0]}x{small[1]} to {large[0]}x{large[1]}",
        ]
        dicom = self.formats.get("DICOM", 0)
        if self.spacings:
            lines.append(
                f"pixel spacing: {min(self.spacings):.3g} to {max(self.spacings):.3g} mm "
                f"({len(self.spacings)} of {dicom} DICOM file(s) state it)"
            )
        elif dicom:
            lines.append(f"pixel spacing: none of {dicom} DICOM file(s) state it")
        return lines
