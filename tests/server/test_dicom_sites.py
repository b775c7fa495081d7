"""A federation of DICOM sites: it trains, and no patient identifier from a DICOM header
reaches a log record, the report, the metrics events, the audit logs or a message."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from fedhead.client.app import app as client_app
from fedhead.common import demo_data
from fedhead.common.telemetry import SPOOL_ENV
from tests import dicom_files as dcm
from tests.loopback import LoopbackGrid
from tests.server.conftest import run


def dicom_site(root: Path, site: int, n_per_class: int = 12) -> Path:
    """Class folders of study/series folders; MONOCHROME1 and 2, rescaled and windowed;
    one colour and one corrupt file to be skipped and logged."""
    data = demo_data.load("train")
    for c, name in enumerate(demo_data.CLASSES):
        idx = np.flatnonzero(data.labels == c)[site * n_per_class : (site + 1) * n_per_class]
        for k, i in enumerate(idx):
            series = root / name / f"study{i}" / "series1"
            photometric = "MONOCHROME1" if k % 2 else "MONOCHROME2"
            rescale = (0.5, -100.0) if k % 3 == 0 else None
            dcm.write_gray(
                series / f"IM{k:04d}", data.images[i], photometric=photometric, rescale=rescale
            )
    dcm.write_rgb(root / "normal" / "colour.dcm", data.images[0])
    dcm.write_corrupt(root / "pneumonia" / "broken.dcm", data.images[1])
    return root


def test_a_dicom_federation_trains_and_no_phi_leaves_the_header(
    offline_world: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tmp = offline_world
    spool = tmp / "spool"
    spool.mkdir()
    monkeypatch.setenv(SPOOL_ENV, str(spool))
    cfgs: dict[int, dict[str, object]] = {
        100 + i: {
            "data-path": str(dicom_site(tmp / f"site{i}", i)),
            "cache-dir": str(tmp / f"node{i}"),
            "audit-log": str(tmp / f"audit{i}.jsonl"),
        }
        for i in range(2)
    }
    grid = LoopbackGrid(client_app, cfgs)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run(grid, tmp, **{"num-server-rounds": 2})

    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["clients"] == 2
    assert "colour.dcm" in caplog.text  # the skipped files are logged, by path and reason
    everything = {
        "logs": caplog.text + "".join(str(r.args) for r in caplog.records),
        "warnings": "".join(str(w.message) for w in caught),
        "report": (tmp / "out" / "report.json").read_text(),
        "metrics": "".join(p.read_text() for p in spool.glob("*.jsonl")),
        "audit": "".join((tmp / f"audit{i}.jsonl").read_text() for i in range(2)),
        "messages": "".join(str(m.content) for m in grid.replies),
    }
    assert everything["metrics"] and everything["audit"] and everything["messages"]
    for where, text in everything.items():
        for secret in dcm.PHI_VALUES:
            assert secret not in text, f"{secret!r} found in {where}"
