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

    train: Split  # a Dirichlet(alpha) non-IID share of the train split
    val: Split  # an IID share of the test split


def shares(num_sites: int, alpha: float, seed: int = 0) -> list[Share]:
    """Split the demo data over ``num_sites`` simulated hospitals.

    Validation shares partition the bundled test split, so federated evaluation over
    all hospitals is exactly the test-split accuracy.
    """
    from fedhead.common.partition import dirichlet_partition, iid_partition

    train, test = load("train"), load("test")
    tr = dirichlet_partition(train.labels, num_sites, alpha, seed)
    te = iid_partition(len(test.labels), num_sites, seed)
    return [
        Share(Split(train.images[a], train.labels[a]), Split(test.images[b], test.labels[b]))
        for a, b in zip(tr, te, strict=True)
    ]
