"""A trained head on disk and on the wire: safetensors bytes and their sha256.

The server's checkpoints, the final model it delivers and the copy each site writes
all hold the trainable tensors in the same canonical form, so one sha256 names the
model everywhere (server log, report, site log, audit log).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedhead.common.errors import ModelMismatchError


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
