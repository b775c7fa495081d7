"""A trained head on disk and on the wire: its tensors, safetensors bytes and sha256.

``TrainableSet`` names the tensors that are trained and exchanged (names, shapes,
dtypes). The server's checkpoints, the final model it delivers and the copy each site
writes all hold them in the same canonical form, so one sha256 names the model
everywhere (server log, report, site log, audit log). Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedhead.common.errors import ModelMismatchError

if TYPE_CHECKING:
    from torch.nn import Module


def head_bytes(
    names: Sequence[str], arrays: Sequence[np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The tensors as one safetensors blob (safetensors orders them itself: the bytes
    depend only on names, shapes, dtypes and values)."""
    if len(names) != len(arrays):
        raise ValueError(f"{len(names)} names for {len(arrays)} tensors")
    tensors = {n: np.ascontiguousarray(a) for n, a in zip(names, arrays, strict=True)}
    return bytes(st_save(tensors, metadata=dict(metadata) if metadata else None))


def head_sha256(names: Sequence[str], arrays: Sequence[np.ndarray]) -> str:
    """The model's identity: sha256 of its tensors' canonical safetensors bytes."""
    return hashlib.sha256(head_bytes(names, arrays)).hexdigest()


def read_head(data: bytes, names: Sequence[str]) -> list[np.ndarray]:
    """The tensors ``names`` from safetensors bytes, in that order."""
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error type for damaged input
        raise ModelMismatchError(
            f"not a readable safetensors file ({type(err).__name__})", "the file is damaged"
        ) from err
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ModelMismatchError(
            f"tensors missing from the file: {', '.join(missing[:3])}",
            "it was written for another model",
        )
    return [tensors[n] for n in names]


def global_norm(arrays: Sequence[np.ndarray]) -> float:
    """L2 norm over all tensors together."""
    return math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in arrays))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class TrainableSet:
    """The names, shapes and dtypes of the tensors that are trained and exchanged."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, model: Module) -> TrainableSet:
        """The parameters of ``model`` (a torch module) that require gradients."""
        return cls(
            tuple(
                TensorSpec(n, tuple(p.shape), str(p.dtype).removeprefix("torch."))
                for n, p in model.named_parameters()
                if p.requires_grad
            )
        )

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in self.tensors)

    def to_json(self) -> str:
        """Names, shapes and dtypes as JSON: what the fingerprint is the sha256 of."""
        return json.dumps([[t.name, list(t.shape), t.dtype] for t in self.tensors])

    @classmethod
    def from_json(cls, text: str) -> TrainableSet:
        """The inverse of ``to_json`` (ValueError when ``text`` is not one)."""
        entries = json.loads(text)
        try:
            return cls(
                tuple(TensorSpec(str(n), tuple(int(d) for d in s), str(t)) for n, s, t in entries)
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"not a trainable set: {err}") from err

    def fingerprint(self) -> str:
        """sha256 over names, shapes and dtypes: equal on both sides or no training."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def problems(self, arrays: Sequence[np.ndarray]) -> list[str]:
        """Why ``arrays`` is not a valid payload for this set (empty list: it is)."""
        if len(arrays) != len(self.tensors):
            return [f"expected {len(self.tensors)} tensors, got {len(arrays)}"]
        out = []
        for spec, arr in zip(self.tensors, arrays, strict=True):
            if tuple(arr.shape) != spec.shape:
                out.append(f"{spec.name}: shape {tuple(arr.shape)}, expected {spec.shape}")
            elif arr.dtype != np.dtype(spec.dtype):
                out.append(f"{spec.name}: dtype {arr.dtype}, expected {spec.dtype}")
        return out

    def get(self, model: Module) -> list[np.ndarray]:
        params = dict(model.named_parameters())
        return [params[t.name].detach().cpu().numpy().copy() for t in self.tensors]

    def set(self, model: Module, arrays: Sequence[np.ndarray]) -> None:
        """Load ``arrays`` into the model; a mismatch raises ModelMismatchError."""
        import torch

        if problems := self.problems(arrays):
            raise ModelMismatchError(
                "tensors received do not match this model's trainable set: "
                + "; ".join(problems[:3]),
                "server and site must use the same backbone, head and classes",
            )
        params = dict(model.named_parameters())
        with torch.no_grad():
            for spec, arr in zip(self.tensors, arrays, strict=True):
                params[spec.name].copy_(torch.from_numpy(np.ascontiguousarray(arr)))
