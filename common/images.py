"""Image sources with content keys, and the one preprocessing pipeline fedhead uses.

An ``ImageSource`` is an indexable collection of images that can name each image by
the sha256 of its content (the feature cache key) and decode it to an array: uint8
for 8-bit images, float32 in [0, 1] for deeper ones (16-bit PNG/TIFF, DICOM), so
nothing is lost to 8-bit rounding.
Files and in-memory arrays go through the same ``Preprocessor``, so the same picture
yields the same features whichever way it arrived.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fedhead.common.config import DEFAULT_MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from fedhead.common.dicom import ReaderSettings

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


# Files are decoded reduced while their shorter side stays at least this many times the
# model's input side, so a large photo costs memory and time in proportion to the
# model's input rather than to its own pixel count.
DECODE_SIDE_FACTOR = 2


class ImageDecodeError(Exception):
    """An image that cannot be read or decoded (it is skipped and counted)."""


@dataclass(frozen=True)
class DecodeLimits:
    """How far image files are decoded: a pixel budget, and a side to reduce them to."""

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are refused before decoding
    min_side: int = 0  # decode reduced while the shorter side stays >= this; 0 = full size

    @classmethod
    def for_input(cls, input_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DecodeLimits:
        return cls(max_pixels, DECODE_SIDE_FACTOR * input_size)


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def key(self, i: int) -> str:
        """sha256 hex of the image content (raises ImageDecodeError if unreadable)."""
        ...

    def load(self, i: int) -> np.ndarray:
        """The image as uint8 HxW or HxWxC, or float32 HxW in [0, 1] for images
        deeper than 8 bits (raises ImageDecodeError)."""
        ...

    def describe(self, i: int) -> str:
        """Where image ``i`` comes from, for messages (a path, or file[index])."""
        ...


class ArrayImages:
    """Images held in a uint8 array of shape (N, H, W) or (N, H, W, C)."""

    def __init__(self, images: np.ndarray, origin: str) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"{origin}: images must be uint8 (N,H,W) or (N,H,W,C), got "
                f"{images.dtype} {images.shape}"
            )
        self.images = images
        self.origin = origin
        self._keys: list[str] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def key(self, i: int) -> str:
        if self._keys is None:
            shape = repr(self.images.shape[1:]).encode()
            self._keys = [
                hashlib.sha256(shape + np.ascontiguousarray(img).tobytes()).hexdigest()
                for img in self.images
            ]
        return self._keys[i]

    def load(self, i: int) -> np.ndarray:
        return np.asarray(self.images[i])

    def describe(self, i: int) -> str:
        return f"{self.origin}[{i}]"


HashLookup = Callable[[Path, int, int], str | None]
HashStore = Callable[[Path, int, int, str], None]


@dataclass(frozen=True)
class HashMemo:
    """Where file content hashes are remembered by (path, size, mtime), if anywhere."""

    lookup: HashLookup | None = None
    store: HashStore | None = None


class FileImages:
    """Image files on disk; content hashes can be memoised by (path, size, mtime).

    DICOM files are read by ``fedhead.common.dicom`` with ``reader`` settings, which
    are part of their keys: the same file windowed differently is another picture.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        memo: HashMemo | None = None,
        reader: ReaderSettings | None = None,
        limits: DecodeLimits | None = None,
    ) -> None:
        from fedhead.common.dicom import ReaderSettings

        self.paths = list(paths)
        self.memo = memo or HashMemo()
        self.reader = reader or ReaderSettings()
        self.limits = limits or DecodeLimits()
        self._keys: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, i: int) -> str:
        if i in self._keys:
            return self._keys[i]
        path = self.paths[i]
        try:
            st = os.stat(path)
            lookup, store = self.memo.lookup, self.memo.store
            digest = lookup(path, st.st_size, st.st_mtime_ns) if lookup else None
            if digest is None:
                with path.open("rb") as f:  # streamed: a large file is not read into memory
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                if store:
                    store(path, st.st_size, st.st_mtime_ns, digest)
        except OSError as err:
            raise ImageDecodeError(f"{path}: cannot read ({err.strerror or err})") from err
        if self._is_dicom(i):
            digest = self.reader.image_key(digest)
        self._keys[i] = digest
        return digest

    def _is_dicom(self, i: int) -> bool:
        from fedhead.common.dicom import is_dicom_path

        return is_dicom_path(self.paths[i])

    def load(self, i: int) -> np.ndarray:
        if self._is_dicom(i):
            from fedhead.common.dicom import read_dicom

            return read_dicom(self.paths[i], self.reader, self.limits.max_pixels)
        return decode_image_file(self.paths[i], self.limits)

    def describe(self, i: int) -> str:
        return str(self.paths[i])


class SubsetImages:
    """A view of some images of another source."""

    def __init__(self, base: ImageSource, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, i: int) -> str:
        return self.base.key(self.indices[i])

    def load(self, i: int) -> np.ndarray:
        return self.base.load(self.indices[i])

    def describe(self, i: int) -> str:
        return self.base.describe(self.indices[i])


@dataclass(frozen=True)
class LabeledImages:
    """Images with integer labels (indices into the run's class list)."""

    images: ImageSource
    labels: np.ndarray  # int64, one per image

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabeledImages:
        idx = np.asarray(indices, dtype=np.int64)
        return LabeledImages(SubsetImages(self.images, idx.tolist()), self.labels[idx])

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()  # type: ignore[no-any-return]


def _deep_gray(img: PILImage) -> np.ndarray:
    """A 16/32-bit grayscale image as float32 in [0, 1], scaled by its bit depth.

    PNG and TIFF store 16-bit samples over the full 0..65535 range (PNG scales
    fewer significant bits up to it), so 65535 is the divisor; a 32-bit integer
    image uses 65535 when its values fit 16 bits, else 2**32 - 1.
    """
    arr = np.asarray(img, dtype=np.float64)
    fits_16 = img.mode.startswith("I;16") or arr.max(initial=0) <= 65535
    scale = 65535.0 if fits_16 else 2.0**32 - 1
    return np.clip(arr / scale, 0.0, 1.0).astype(np.float32)


def decode_image_file(path: Path, limits: DecodeLimits | None = None) -> np.ndarray:
    """Decode an image file to uint8 HxW (grayscale) or HxWx3 (colour), or float32
    HxW in [0, 1] for 16-bit grayscale.

    The size is read from the header first: an image above ``limits.max_pixels`` is
    refused before any pixel is decoded. A large one is decoded reduced by a whole
    factor that keeps its shorter side >= ``limits.min_side`` (JPEG: scaled while
    decoding; other formats: averaged over blocks right after decoding).
    """
    from PIL import Image, UnidentifiedImageError

    limits = limits or DecodeLimits()
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageDecodeError(
                    f"{path}: image of {w}x{h} pixels is larger than the limit of "
                    f"{limits.max_pixels} pixels (max-image-pixels); refused unread"
                )
            factor = min(w, h) // limits.min_side if limits.min_side else 1
            if factor >= 2 and img.format == "JPEG":
                img.draft(img.mode, (w // factor, h // factor))  # DCT scaling by 1/2..1/8
            img.load()
            pic = _reduced(img, limits.min_side)
            if pic.mode in ("I;16", "I;16B", "I;16L", "I"):
                return _deep_gray(pic)
            if pic.mode in ("L", "RGB"):
                return np.array(pic, dtype=np.uint8)
            return np.array(pic.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageDecodeError(f"{path}: not a readable image ({err})") from err
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"{path}: image too large ({err})") from err


def _reduced(img: PILImage, min_side: int) -> PILImage:
    """``img`` reduced by the largest whole factor that keeps its shorter side >= min_side."""
    factor = min(img.size) // min_side if min_side else 1
    if factor < 2:
        return img
    if img.mode.startswith("I;16"):  # reduce() lacks these modes
        img = img.convert("I")
    elif img.mode not in ("L", "RGB", "I", "F"):  # as the full-size path would convert it
        img = img.convert("RGB")
    return img.reduce(factor)


class Preprocessor:
    """Images -> normalised float tensors of shape (N, 3, S, S).

    uint8 images are divided by 255 and float images (deeper than 8 bits) are taken
    as already in [0, 1], so both reach the same range. Grayscale is replicated to
    three channels; the shorter side is resized to S with antialiased bilinear
    interpolation, then the centre S x S is kept; ImageNet-style mean/std
    normalisation follows.
    """

    # 2: deep images arrive as float in [0, 1]; 3: files decoded reduced to
    # DECODE_SIDE_FACTOR x the input side
    VERSION = 3

    def __init__(
        self,
        size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.size = size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self._mean_t = mean
        self._std_t = std

    def fingerprint(self) -> str:
        return (
            f"v{self.VERSION}|files-reduced-{DECODE_SIDE_FACTOR}x|"
            f"short-side-bilinear-aa+center-crop|{self.size}|"
            f"{self._mean_t}|{self._std_t}"
        )

    def _to_chw(self, img: np.ndarray) -> torch.Tensor:
        """(3, H, W) float32 in [0, 1]."""
        t = torch.from_numpy(np.ascontiguousarray(img))
        t = t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()
        if t.ndim == 2:
            t = t.unsqueeze(0).expand(3, -1, -1)
        else:
            t = t.permute(2, 0, 1)
            if t.shape[0] == 1:
                t = t.expand(3, -1, -1)
            elif t.shape[0] == 4:
                t = t[:3]
        return t

    def _resize(self, batch: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) float in [0,1] of one shape -> (N,3,S,S)."""
        h, w = batch.shape[-2:]
        s = self.size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            batch = F.interpolate(batch, size=(nh, nw), mode="bilinear", antialias=True)
            top, left = (nh - s) // 2, (nw - s) // 2
            batch = batch[..., top : top + s, left : left + s]
        return batch

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        out = torch.empty(len(images), 3, self.size, self.size)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        for idx in by_shape.values():
            batch = torch.stack([self._to_chw(images[i]) for i in idx])
            out[idx] = self._resize(batch)
        return (out - self.mean) / self.std


class ConcatImages:
    """Several sources one after the other."""

    def __init__(self, parts: Sequence[ImageSource]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[ImageSource, int]:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k], i - int(self.offsets[k])

    def key(self, i: int) -> str:
        src, j = self._locate(i)
        return src.key(j)

    def load(self, i: int) -> np.ndarray:
        src, j = self._locate(i)
        return src.load(j)

    def describe(self, i: int) -> str:
        src, j = self._locate(i)
        return src.describe(j)


def concat(parts: Sequence[LabeledImages]) -> LabeledImages:
    if len(parts) == 1:
        return parts[0]
    return LabeledImages(
        ConcatImages([p.images for p in parts]), np.concatenate([p.labels for p in parts])
    )


class Augmenter:
    """A fixed number of deterministic augmented views per image.

    View ``v`` of an image is always the same picture (its random crop, flip and
    brightness/contrast are drawn from a generator seeded by the image's content key
    and ``v``), so its trunk features can be cached like the image's own: training
    with augmentation costs ``views`` extractions per image once, then cache reads.
    """

    VERSION = 1

    def __init__(
        self, views: int, flip: bool = False, min_area: float = 0.8, jitter: float = 0.1
    ) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.views = views
        self.flip = flip
        self.min_area = min_area
        self.jitter = jitter

    def fingerprint(self) -> str:
        return f"aug-v{self.VERSION}|flip={self.flip}|area={self.min_area}|jitter={self.jitter}"

    def apply(self, img: np.ndarray, key: str, view: int) -> np.ndarray:
        seed = hashlib.sha256(f"{key}|{self.fingerprint()}|{view}".encode()).digest()[:8]
        rng = np.random.default_rng(int.from_bytes(seed, "little"))
        h, w = img.shape[:2]
        side = float(np.sqrt(rng.uniform(self.min_area, 1.0)))
        ch, cw = max(1, round(h * side)), max(1, round(w * side))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out = img[top : top + ch, left : left + cw].astype(np.float32)
        if self.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        contrast = rng.uniform(1 - self.jitter, 1 + self.jitter)
        brightness = rng.uniform(1 - self.jitter, 1 + self.jitter)
        out = ((out - out.mean()) * contrast + out.mean()) * brightness
        if img.dtype != np.uint8:  # a deep image in [0, 1] stays float
            return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)
        return np.ascontiguousarray(np.clip(out, 0, 255).astype(np.uint8))


class AugmentedImages:
    """View ``view`` of every image of a source, with its own content keys."""

    def __init__(self, base: ImageSource, augmenter: Augmenter, view: int) -> None:
        self.base = base
        self.augmenter = augmenter
        self.view = view
        self._tag = f"|{augmenter.fingerprint()}|view={view}"

    def __len__(self) -> int:
        return len(self.base)

    def key(self, i: int) -> str:
        return hashlib.sha256((self.base.key(i) + self._tag).encode()).hexdigest()

    def load(self, i: int) -> np.ndarray:
        return self.augmenter.apply(self.base.load(i), self.base.key(i), self.view)

    def describe(self, i: int) -> str:
        return f"{self.base.describe(i)} (view {self.view})"
