"""A real federation: flower-superlink, two flower-supernode processes, `flwr run`.

Everything listens on 127.0.0.1 with free ports; processes are stopped by PID.
The sites start without the backbone (empty torch cache): the server sends it.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedhead.common import demo_data
from fedhead.common.protocol import MSG_VALIDATE
from tests.conftest import REPO, write_png
from tests.e2e import procs as e2e
from tests.reports import read_report

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

TRAINABLE_SHAPES = [[2, 1280], [2]]


def _site_arrays(
    site: int, n_train: int = 160, n_val: int = 40
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    share = demo_data.shares(2, alpha=1.0, seed=5)[site]
    rng = np.random.default_rng(site)
    tr = rng.choice(len(share.train.labels), n_train, replace=False)
    va = rng.choice(len(share.val.labels), n_val, replace=False)
    return (
        share.train.images[tr],
        share.train.labels[tr],
        share.val.images[va],
        share.val.labels[va],
    )


def make_folder_site(root: Path) -> Path:
    """Site 0 keeps PNGs in train/<class>/ and val/<class>/ folders."""
    xtr, ytr, xva, yva = _site_arrays(0)
    for part, xs, ys in (("train", xtr, ytr), ("val", xva, yva)):
        for i, (img, lab) in enumerate(zip(xs, ys, strict=True)):
            write_png(root / part / demo_data.CLASSES[lab] / f"{i:04d}.png", img)
    return root


def make_csv_site(root: Path) -> Path:
    """Site 1 keeps PNGs anywhere and lists them in a CSV manifest with a split column."""
    xtr, ytr, xva, yva = _site_arrays(1)
    rows = []
    for part, xs, ys in (("train", xtr, ytr), ("val", xva, yva)):
        for i, (img, lab) in enumerate(zip(xs, ys, strict=True)):
            rel = f"scans/{part}-{i:04d}.png"
            write_png(root / rel, img)
            rows.append([rel, demo_data.CLASSES[lab], part])
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return root / "labels.csv"


def _flwr_run(flwr_home: Path, run_config: str) -> subprocess.CompletedProcess[str]:
    return e2e.flwr(flwr_home, "run", str(REPO), "e2e", "--stream", "--run-config", run_config)


def test_superlink_two_supernodes_and_flwr_run(tmp_path: Path, mobilenet_weights: Path) -> None:
    server_cache = e2e.server_cache(tmp_path, mobilenet_weights)
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    link_port = e2e.free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    sites = [make_folder_site(tmp_path / "hospital-a"), make_csv_site(tmp_path / "hospital-b")]
    empty_torch = str(tmp_path / "empty-torch-home")
    out = tmp_path / "run-out"

    with e2e.processes(tmp_path / "logs") as procs:
        procs.start_listening(
            "superlink",
            e2e.plain_superlink(link_port),
            e2e.base_env(
                flwr_home / "link", FEDHEAD_CACHE=str(server_cache), TORCH_HOME=empty_torch
            ),
            link_port,
        )
        for i, data in enumerate(sites):
            node_config = (
                f'data-path="{data}" cache-dir="{tmp_path / f"node{i}"}" '
                f'audit-log="{tmp_path / f"audit{i}.jsonl"}" device="cpu" '
                f"threads={e2e.site_threads(len(sites))}"
            )
            procs.start(
                f"node{i}",
                e2e.plain_supernode(link_port, node_config),
                e2e.base_env(flwr_home / f"node{i}", TORCH_HOME=empty_torch),
            )
        # the default training: the closed-form head, from one round of summed statistics
        run_config = (
            f"input-size=64 min-sites=2 join-timeout=120.0 round-timeout=300.0 out-dir='{out}'"
        )
        result = _flwr_run(flwr_home, run_config)
        assert result.returncode == 0, result.stdout + result.stderr + procs.log("superlink")
        # node1 lacks the model, as a site offline at the end would (the loopback tests
        # miss the message itself): a delivery-only run sends node1, and only node1, the
        # very package the server wrote
        run_id = read_report(out)["run_id"]
        shutil.rmtree(tmp_path / "node1" / "models" / str(run_id))
        deliver = f"deliver-from='{out}' min-sites=2 join-timeout=120.0 round-timeout=300.0"
        delivery = _flwr_run(flwr_home, deliver)
        logs = {name: procs.log(name) for name in ("superlink", "node0", "node1")}
    assert delivery.returncode == 0, delivery.stdout + delivery.stderr + logs["superlink"][-3000:]
    (entry,) = [json.loads(line) for line in (out / "deliveries.jsonl").read_text().splitlines()]
    assert len(entry["delivered_to"]) == 1 and len(entry["already_held"]) == 1, entry
    for name in ("head.safetensors", "model.json"):
        server_copy = (out / "model" / name).read_bytes()
        for i in range(2):
            assert (
                tmp_path / f"node{i}" / "models" / str(run_id) / name
            ).read_bytes() == server_copy

    report = read_report(out)
    assert report["clients"] == 2
    assert len(report["rounds"]) == 1  # the statistics round
    # the sites started without the backbone: the server sent it, they verified it
    assert len(report["setup"]["backbone_sent_to"]) == 2
    for i in range(2):
        assert (tmp_path / f"node{i}" / "weights" / "mobilenet_v2-b0353104.pth").is_file()
    # the federation learned: the head the sites' validation chose, kept by the server,
    # is well above chance (a balanced accuracy of 0.5) on the sites' pooled validation
    closed = report["closed_form"]
    (chosen,) = [row for row in closed["grid"] if row["chosen"]]
    assert chosen["candidate"] == closed["chosen"]
    assert chosen["balanced_accuracy"] == max(r["balanced_accuracy"] for r in closed["grid"])
    assert chosen["balanced_accuracy"] > 0.6, closed["grid"]
    assert report["final_eval_accuracy"] == pytest.approx(chosen["eval_accuracy"])
    assert all(r["aggregated"] and r["sites_replied"] == 2 for r in report["rounds"])
    # only the statistics (masked), the candidates' count tables and scalars left each site
    for i in range(2):
        types = e2e.check_audit(tmp_path / f"audit{i}.jsonl", TRAINABLE_SHAPES, closed_form=True)
        assert types == {
            "query.prepare",
            "query.weights",
            "train",
            MSG_VALIDATE,
            "query.model",
            "query.models",
        }
    # and both sites verified and kept the final model
    assert len(report["delivery"]["delivered_to"]) == 2
    assert report["secure_aggregation"] == "secagg+"  # the default
    assert all(
        set(r["secagg_seconds"]) == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
        for r in report["rounds"]
    )
    assert "Traceback" not in logs["node0"] + logs["node1"]
