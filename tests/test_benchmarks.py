"""benchmarks/run.py works and prints `name: value` lines (bytes only: no timings here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from flwr.app import Context, RecordDict, UserConfig

from tests.conftest import REPO
from tests.e2e.procs import npz_site


def test_quick_bytes_figures() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--only", "bytes"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    figures = dict(re.findall(r"^(\w+): ([0-9.e+]+)$", result.stdout, re.M))
    assert set(figures) == {"bytes_ratio_mobilenet_v2", "bytes_ratio_resnet50"}
    # message sizes are deterministic: head-only traffic is far below the full model
    assert all(float(v) >= 100 for v in figures.values()), figures


def test_the_canonical_flower_client_sends_the_whole_model_and_trains_the_head_only(
    tmp_path: Path, mobilenet_weights: Path
) -> None:
    """The reference of the deployment benchmark is what it claims: every tensor of
    the model travels, the trunk's weights stay frozen, the new last layer learns."""
    sys.path.insert(0, str(REPO / "benchmarks" / "canonical"))
    try:
        import canonical_app as canonical
    finally:
        sys.path.remove(str(REPO / "benchmarks" / "canonical"))
    sites = tmp_path / "site-0.npz"
    npz_site(sites, 0, 2, n_train=24, n_val=8)
    cfg: UserConfig = {
        "weights": str(mobilenet_weights),
        "classes": 2,
        "input-size": 32,
        "local-epochs": 1,
        "batch-size": 8,
        "learning-rate": 0.01,
        "momentum": 0.9,
    }
    context = Context(1, 1, {"data-path": str(sites), "threads": 1}, RecordDict(), cfg)
    site = canonical.TransferClient(context)
    names = list(site.model.state_dict())
    start = [a.copy() for a in canonical.get_weights(site.model)]
    trained, examples, _ = site.fit([a.copy() for a in start], {})
    assert examples == 24 and len(trained) == len(start) == len(names) > 300
    changed = {n for n, a, b in zip(names, start, trained, strict=True) if not np.array_equal(a, b)}
    assert {"classifier.1.weight", "classifier.1.bias"} <= changed
    assert not {n for n in changed if n.startswith("features.") and n.endswith(".weight")}
    loss, n_val, metrics = site.evaluate(trained, {})
    accuracy = metrics["accuracy"]
    assert n_val == 8 and loss > 0 and isinstance(accuracy, float) and 0 <= accuracy <= 1
