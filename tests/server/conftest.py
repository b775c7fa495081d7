"""Fixtures for server tests: small real sites and a server holding the weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedhead.common import demo_data
from fedhead.common.config import RunConfig
from fedhead.server.run import run_federation
from tests.conftest import write_share_npz
from tests.loopback import LoopbackGrid
from tests.reports import ReportJson, read_report

CLASSES = ",".join(demo_data.CLASSES)


def write_sites(root: Path, n_sites: int, n_train: int = 120, n_val: int = 40) -> list[Path]:
    """Small non-IID sites cut from the real demo data."""
    return [
        write_share_npz(root / f"site-{i}.npz", share, n_train, n_val, seed=i)
        for i, share in enumerate(demo_data.shares(n_sites, alpha=1.0, seed=3))
    ]


@pytest.fixture
def offline_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mobilenet_weights: Path, isolated_cache: Path
) -> Path:
    """The server holds the weights in its fedhead cache; torch's cache is empty."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    (isolated_cache / "weights").mkdir()
    shutil.copy(mobilenet_weights, isolated_cache / "weights" / mobilenet_weights.name)
    return tmp_path


def nodes(tmp: Path, sites: list[Path], **extra: str) -> dict[int, dict[str, object]]:
    return {
        100 + i: {"data-path": str(p), "cache-dir": str(tmp / f"node{i}"), **extra}
        for i, p in enumerate(sites)
    }


def loopback_config(tmp: Path, **overrides: object) -> RunConfig:
    """A small run (64 px, 3 FedAvg rounds, 2 sites, short timeouts) writing to ``tmp``/out."""
    return RunConfig.from_mapping(
        {
            "classes": CLASSES,
            "strategy": "fedavg",
            "input-size": 64,
            "num-server-rounds": 3,
            "min-sites": 2,
            "round-timeout": 30.0,
            "join-timeout": 5.0,
            "out-dir": str(tmp / "out"),
            **overrides,
        }
    )


def server_context(run_id: int = 4242) -> Context:
    """The ServerApp's context, as Flower would give it for run ``run_id``."""
    return Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})


def run(grid: LoopbackGrid, tmp: Path, **overrides: object) -> ReportJson:
    """One federation over the loopback grid; returns report.json."""
    cfg = loopback_config(tmp, **overrides)
    run_federation(grid, server_context(), cfg)
    return read_report(Path(cfg.out_dir))
