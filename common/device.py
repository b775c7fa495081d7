"""Choosing where tensors live: CUDA when available (with mixed precision), else CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedhead.common.errors import ConfigError


@dataclass(frozen=True)
class Device:
    torch_device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype for the frozen trunk, None = full precision

    @property
    def kind(self) -> str:
        return self.torch_device.type

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.amp_dtype is None:
            yield
        else:
            with torch.autocast(self.torch_device.type, dtype=self.amp_dtype):
                yield

    def describe(self) -> str:
        if self.kind == "cuda":
            name = torch.cuda.get_device_name(self.torch_device)
            return f"cuda ({name}, autocast {str(self.amp_dtype).removeprefix('torch.')})"
        return f"cpu ({torch.get_num_threads()} threads)"


def select_device(choice: str = "auto") -> Device:
    """``auto``: CUDA if present, else CPU. ``cuda`` without a GPU is a config error."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ConfigError([f"device: must be auto, cpu or cuda (got {choice!r})"])
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["device: cuda requested but no CUDA device is visible"])
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        dev = torch.device("cuda")
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Device(dev, amp)
    return Device(torch.device("cpu"), None)
