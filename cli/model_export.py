"""Exporting a model package as one self-contained file: ONNX or TorchScript.

The exported model holds channel handling, resize and centre crop, normalisation,
the trunk, the float16 rounding of trunk features that training applies, the
trained blocks and head, and a softmax: it maps a uint8 image batch of shape
N x C x H x W (C and H x W fixed at export) to class probabilities N x classes,
exactly as ``fedhead predict`` does. After writing, the file is run on sample images
and compared with the package's own prediction path; the largest difference is
returned, and a file that differs by more than the tolerance is not kept.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedhead.cli.inference import SiteModel, predict
from fedhead.common.device import Device
from fedhead.common.errors import ExportError, SetupError
from fedhead.common.images import ArrayImages
from fedhead.common.model import FedHeadModel

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
_INSTALL_HINT = "install the export extra: pip install 'fedhead[export]'"


class ExportedModel(nn.Module):
    """uint8 (N, C, H, W) images -> class probabilities, for one fixed C, H and W.

    The resize sizes are computed here, at export, with the same arithmetic as
    ``Preprocessor``, so the graph holds constants only and needs no shape logic.
    """

    def __init__(self, site: SiteModel, channels: int, height: int, width: int) -> None:
        super().__init__()
        if channels not in (1, 3, 4):
            raise ValueError(f"channels must be 1, 3 or 4, got {channels}")
        s = site.preprocess.size
        scale = s / min(height, width)
        self.resized = (
            (max(s, round(height * scale)), max(s, round(width * scale)))
            if (height, width) != (s, s)
            else None
        )
        self.size = s
        self.model: FedHeadModel = site.model
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", site.preprocess.mean.clone())
        self.register_buffer("std", site.preprocess.std.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images[:, :3].float().div(255.0)
        x = x.expand(-1, 3, -1, -1)  # grayscale -> 3 channels; a no-op for RGB
        if self.resized is not None:
            nh, nw = self.resized
            s = self.size
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top : top + s, left : left + s]
        x = (x - self.mean) / self.std
        z = self.model.extract(x).half().float()  # as the feature cache stores it
        return torch.softmax(self.model.forward_from_features(z), dim=1)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    samples: int
    input_shape: tuple[int, int, int]  # C, H, W


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(
            f"ONNX export needs the onnx packages ({err.name} is missing)", _INSTALL_HINT
        ) from err


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TorchScript is deprecated upstream and the ONNX exporter is chatty: keep the
    terminal to fedhead's own lines."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            yield


def _write_onnx(module: ExportedModel, example: torch.Tensor, path: Path) -> None:
    from torch.export import Dim

    with _quiet():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"images": {0: Dim("batch", min=1, max=65536)}},
            external_data=False,
            verbose=False,
        )


def _run_onnx(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return cast(np.ndarray, session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])

    return run


def _write_torchscript(module: ExportedModel, example: torch.Tensor, path: Path) -> None:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)  # type: ignore[no-untyped-call]
        torch.jit.save(traced, str(path))


def _run_torchscript(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    with _quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return cast(np.ndarray, loaded(torch.from_numpy(x)).numpy())

    return run


def sample_images(n: int, channels: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, C, H, W) check images: smooth gradients and blobs plus noise, so the
    trunk sees image-like inputs rather than pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.empty((n, channels, height, width), np.uint8)
    for i in range(n):
        for c in range(channels):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            r = rng.uniform(0.1, 0.5) * max(height, width)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            ramp = (xx / max(width - 1, 1)) * rng.uniform(-1, 1) + rng.uniform(0, 1)
            img = 255 * (0.5 * blob + 0.3 * ramp) + rng.normal(0, 12, (height, width))
            out[i, c] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def export_model(
    site: SiteModel,
    fmt: str,
    out: Path,
    channels: int = 3,
    height: int = 0,
    width: int = 0,
    samples: int = 8,
    overwrite: bool = False,
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Write ``site``'s model to ``out`` in ``fmt`` and check it against the package.

    ``height``/``width`` 0 = the package's input size. The file lands under ``out``
    only once it reproduces the package's predictions within ``tolerance``.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    if out.exists() and not overwrite:
        raise SetupError(f"{out} already exists", "choose another file, or --force")
    if fmt == "onnx":
        _need_onnx()
    h = height or site.preprocess.size
    w = width or site.preprocess.size
    module = ExportedModel(site, channels, h, w).eval()
    module.to("cpu")
    module.requires_grad_(False)  # an inference graph: outputs need no autograd history
    batch = sample_images(max(2, samples), channels, h, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            if fmt == "onnx":
                _write_onnx(module, torch.from_numpy(batch[:2]), tmp)
                run = _run_onnx(tmp)
            else:
                _write_torchscript(module, torch.from_numpy(batch[:2]), tmp)
                run = _run_torchscript(tmp)
            got = run(batch)
        except ExportError:
            raise
        except Exception as err:  # exporter internals raise many types; report them in one line
            raise ExportError(
                f"{fmt} export failed ({type(err).__name__}: {str(err).splitlines()[0][:300]})",
                "report this with the package's model.json",
            ) from err
        as_images = batch[:, 0] if channels == 1 else batch.transpose(0, 2, 3, 1)
        cpu = Device(torch.device("cpu"), None)
        expected = predict(
            site, ArrayImages(np.ascontiguousarray(as_images), "check"), cpu, progress=False
        )
        if len(expected.ok) != len(batch):
            raise ExportError("the check images could not all be predicted by the package")
        diff = float(np.abs(got.astype(np.float64) - expected.probabilities).max())
        if not diff <= tolerance:
            raise ExportError(
                f"the exported {fmt} model differs from the package by up to {diff:.3g} "
                f"(tolerance {tolerance:g}); the file was not kept",
                "report this with the package's model.json",
            )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, fmt, diff, len(batch), (channels, h, w))
