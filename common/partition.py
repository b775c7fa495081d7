"""Splitting a labelled dataset across simulated sites (IID or Dirichlet non-IID)."""

from __future__ import annotations

import numpy as np


def dirichlet_partition(
    labels: np.ndarray, num_sites: int, alpha: float, seed: int = 0, min_size: int = 10
) -> list[np.ndarray]:
    """Index sets, one per site: each class is spread over sites with Dir(alpha) shares.

    Small ``alpha`` (0.1-0.5) gives sites skewed label mixes; large alpha tends to IID.
    Draws again (up to 100 times) until every site has at least ``min_size`` examples.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if len(labels) < num_sites * min_size:
        raise ValueError(
            f"{len(labels)} examples cannot give {num_sites} sites {min_size} examples each"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"could not draw a Dirichlet({alpha}) split giving every one of {num_sites} sites "
        f"{min_size} examples; raise alpha or lower the number of sites"
    )


def iid_partition(n: int, num_sites: int, seed: int = 0) -> list[np.ndarray]:
    """Index sets of near-equal size drawn uniformly at random."""
    if num_sites < 1 or n < num_sites:
        raise ValueError(f"cannot split {n} examples over {num_sites} sites")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_sites)]
