"""The embedded demo dataset: balanced PneumoniaMNIST, 28x28 chest X-rays (CC BY 4.0).

See data/ATTRIBUTION.md beside this file for provenance and licence.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from fedhead.common.errors import DataError
from fedhead.common.weights import sha256_file

CLASSES = ("normal", "pneumonia")
SHA256 = "f36c2b3e34de9d60c5c734118bc6daff281eaf76b67a57d26ad958da948274b0"


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # int64 (N,)


def path() -> Path:
    return Path(str(resources.files("fedhead.common") / "data" / "pneumoniamnist_balanced_28.npz"))


def load(split: str) -> Split:
    """One of the splits 'train', 'val', 'test', checked against the known sha256."""
    p = path()
    if sha256_file(p) != SHA256:
        raise DataError(f"embedded demo data {p} is corrupt (sha256 mismatch)", "reinstall fedhead")
    with np.load(p) as data:
        return Split(data[f"{split}_images"], data[f"{split}_labels"].reshape(-1).astype(np.int64))


@dataclass(frozen=True)
class Share:
    """One simulated hospital's part of the demo data."""

    train: Split  # its part of a Dirichlet(alpha) non-IID share of the train split
    val: Split  # held out from that same share (stratified), as a real site would


def shares(num_sites: int, alpha: float, seed: int = 0, val_fraction: float = 0.15) -> list[Share]:
    """Split the bundled training split over ``num_sites`` simulated hospitals, each
    holding out ``val_fraction`` of its share for validation.

    The bundled test split is not given to any hospital: it stays untouched for
    measuring the final accuracy (server-side, ``server-test-data``).
    """
    from fedhead.common.datasets import held_out_split
    from fedhead.common.partition import dirichlet_partition

    train = load("train")
    out = []
    for i, idx in enumerate(dirichlet_partition(train.labels, num_sites, alpha, seed)):
        images, labels = train.images[idx], train.labels[idx]
        tr, va = held_out_split(labels, val_fraction, seed * 1_000 + i)
        out.append(Share(Split(images[tr], labels[tr]), Split(images[va], labels[va])))
    return out
