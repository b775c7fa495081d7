"""Simulated sites: their data, the files that hold it, and Flower's simulation backend.

The demo, the benchmarks and the tests all simulate sites the same way: each simulated
node ``i`` reads ``site-<i>`` (.npz, .csv or a folder) from the run's
``simulation-data`` folder, or, without one, its share of the embedded demo data.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedhead.common import demo_data
from fedhead.common.datasets import ReadPolicy, SiteData, load_site_data
from fedhead.common.errors import DataError
from fedhead.common.files import atomic_writer
from fedhead.common.images import ArrayImages, HashMemo, LabeledImages


def write_site_npz(
    path: Path,
    train: demo_data.Split,
    val: demo_data.Split | None = None,
    class_names: tuple[str, ...] | None = demo_data.CLASSES,
) -> Path:
    """Write one site's images as an .npz file the site data readers accept (atomically)."""
    arrays: dict[str, np.ndarray] = {"images": train.images, "labels": train.labels}
    if val is not None:
        arrays |= {"val_images": val.images, "val_labels": val.labels}
    if class_names is not None:
        arrays["class_names"] = np.array(class_names)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    return path


def simulated_site_data(
    partition_id: int,
    num_partitions: int,
    classes: list[str],
    simulation_data: str,
    dirichlet_alpha: float,
    val_fraction: float,
    seed: int,
    memo: HashMemo | None = None,
    policy: ReadPolicy | None = None,
) -> SiteData:
    """The data of simulated node ``partition_id``: its file in ``simulation_data``, or
    its share of the embedded demo data when no folder is set."""
    if simulation_data:
        root = Path(simulation_data)
        pid = partition_id
        for candidate in (root / f"site-{pid}.npz", root / f"site-{pid}.csv", root / f"site-{pid}"):
            if candidate.exists():
                return load_site_data(candidate, classes, val_fraction, seed, memo, policy)
        raise DataError(
            f"simulation-data {root} has no site-{pid}(.npz|.csv|/) for simulated node {pid}"
        )
    return embedded_share(partition_id, num_partitions, classes, dirichlet_alpha, seed)


def embedded_share(
    pid: int, num_sites: int, classes: list[str], alpha: float, seed: int
) -> SiteData:
    """Simulated node ``pid``'s share of the embedded demo data (see demo_data.shares)."""
    if list(classes) != list(demo_data.CLASSES):
        raise DataError(
            f"the embedded demo data has classes {', '.join(demo_data.CLASSES)}, the run asks "
            f"for {','.join(classes)}",
            "set simulation-data, or give real nodes a data-path",
        )
    share = demo_data.shares(num_sites, alpha, seed)[pid]
    return SiteData(
        LabeledImages(
            ArrayImages(share.train.images, f"demo-train/site-{pid}"), share.train.labels
        ),
        LabeledImages(ArrayImages(share.val.images, f"demo-val/site-{pid}"), share.val.labels),
        f"embedded demo data, share {pid} of {num_sites}",
        val_held_out=True,
    )


def backend_config(num_gpus_per_site: float = 0.0, verbose: bool = False) -> dict[str, Any]:
    """Flower Simulation Engine (Ray) settings: one CPU per simulated site, quiet logs."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": num_gpus_per_site},
        "init_args": {
            "num_cpus": max(os.cpu_count() or 1, 1),
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": verbose,
        },
    }
