"""Per-site outcome (query.outcome): local-only vs federated vs personalized heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedhead.client.app import app as client_app
from fedhead.common import demo_data
from fedhead.common.package import ModelPackage
from fedhead.common.simulation import write_site_npz
from tests.conftest import write_share_npz
from tests.loopback import LoopbackGrid
from tests.server.conftest import nodes, run


def _permute_labels(path: Path) -> Path:
    """The same images with the two classes swapped: a site whose task contradicts the
    others', where federation must hurt (negative transfer)."""
    with np.load(path) as z:
        train = demo_data.Split(z["images"], 1 - z["labels"])
        val = demo_data.Split(z["val_images"], 1 - z["val_labels"])
    return write_site_npz(path, train, val)


@pytest.mark.slow
def test_a_site_with_permuted_labels_is_flagged_negative_transfer(offline_world: Path) -> None:
    tmp = offline_world
    # near-IID shares: the two honest sites agree and outweigh the small permuted one
    # (FedAvg weighs by examples), so only the permuted site is hurt
    shares = demo_data.shares(3, alpha=100.0, seed=3)
    sizes = [120, 120, 30]
    sites = [
        write_share_npz(tmp / f"site-{i}.npz", s, n, 60, seed=i)
        for i, (s, n) in enumerate(zip(shares, sizes, strict=True))
    ]
    _permute_labels(sites[2])
    configs = nodes(tmp, sites)
    for i, node in enumerate(sorted(configs)):
        configs[node]["site-name"] = f"hospital-{i}"
    grid = LoopbackGrid(client_app, configs)
    report = run(
        grid,
        tmp,
        **{
            "num-server-rounds": 3,
            "local-epochs": 3,
            "local-baseline": True,
            "personalize-epochs": 3,
            "secure-aggregation": False,
        },
    )
    by_site = {s["site"]: s for s in report["sites"]}
    assert sorted(by_site) == ["hospital-0", "hospital-1", "hospital-2"]
    assert report["sites_failed"] == {}
    bad = by_site["hospital-2"]
    assert bad["negative_transfer"] is True
    assert bad["gain"]["ci95"][1] < 0
    assert bad["local_only"]["accuracy"] > bad["federated"]["accuracy"]
    for name in ("hospital-0", "hospital-1"):
        assert by_site[name]["negative_transfer"] is False, by_site[name]
    # the mismatched site gains most from personalizing; a kept head is a usable package
    assert bad["personalized"] is not None
    for i, name in enumerate(sorted(by_site)):
        kept = tmp / f"node{i}" / "models" / "4242" / f"personalized-{name}"
        assert kept.is_dir() == by_site[name]["personalized_kept"]
        if kept.is_dir():
            assert ModelPackage.load(kept).classes == tuple(demo_data.CLASSES)
            card = (kept / "MODEL_CARD.md").read_text()
            delivered = (kept.parent / "MODEL_CARD.md").read_text()
            assert card.startswith(delivered.rstrip()) and "## Personalized at this site" in card


def _entry(site: str, local: float, fed: float, kept: bool) -> dict[str, object]:
    from fedhead.common.outcome import HeadMetrics, SiteOutcome

    def head(a: float) -> HeadMetrics:
        return HeadMetrics(a, a - 0.05, a + 0.05, a, a - 0.1, a + 0.1, 0.9, 0.8, 0.95, 0.4)

    d = fed - local
    outcome = SiteOutcome(
        40, head(fed), head(local), head(fed + 0.01), kept, d, d - 0.05, d + 0.05, d, d - 0.1, d
    )
    return outcome.to_report(site)


def test_the_sites_table_and_plot_show_every_site_and_the_flag(tmp_path: Path) -> None:
    from fedhead.server.report import RunReport, plot_sites, sites_table

    sites = [_entry("hospital-a", 0.80, 0.90, True), _entry("hospital-b", 0.90, 0.60, False)]
    lines = sites_table(sites, {"hospital-c": "no reply within 60s"})
    assert lines[0].split()[:4] == ["site", "local-only", "federated", "personal."]
    assert lines[1].startswith("hospital-a") and "NEGATIVE TRANSFER" not in lines[1]
    assert "+0.1000" in lines[1] and "0.9100" in lines[1]
    assert lines[2].startswith("hospital-b") and lines[2].endswith("NEGATIVE TRANSFER")
    assert "(0.6100)" in lines[2]  # a personalized head not kept is shown in brackets
    assert lines[3] == f"{'hospital-c':<20}  no outcome: no reply within 60s"
    report = RunReport(run_id=1, backbone={}, clients=2, input_size=64, config={}, sites=sites)
    png = plot_sites(report, tmp_path / "sites.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sites_that_time_out_or_send_implausible_outcomes_are_named(offline_world: Path) -> None:
    from flwr.app import ConfigRecord, Context, Message

    from fedhead.common.protocol import MSG_OUTCOME, RECORD_OUTCOME_REPLY

    tmp = offline_world
    shares = demo_data.shares(3, alpha=100.0, seed=3)
    sites = [
        write_share_npz(tmp / f"site-{i}.npz", s, 60, 30, seed=i) for i, s in enumerate(shares)
    ]
    configs = nodes(tmp, sites)
    for i, node in enumerate(sorted(configs)):
        configs[node]["site-name"] = f"hospital-{i}"

    def boastful(msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        if msg.metadata.message_type == MSG_OUTCOME and not reply.has_error():
            record = dict(reply.content.config_records[RECORD_OUTCOME_REPLY])
            record["federated.accuracy"] = 1.5  # beyond [0, 1]
            reply.content.config_records[RECORD_OUTCOME_REPLY] = ConfigRecord(record)
        return reply

    grid = LoopbackGrid(client_app, configs, node_apps={101: boastful})

    def silent_at_outcome(node: int, msg: Message) -> None:
        if node == 100 and msg.metadata.message_type == MSG_OUTCOME:
            grid.dead.add(node)

    grid.before_delivery = silent_at_outcome
    report = run(
        grid, tmp, **{"num-server-rounds": 1, "local-baseline": True, "secure-aggregation": False}
    )
    assert [s["site"] for s in report["sites"]] == ["hospital-2"]
    assert report["sites_failed"]["hospital-0"].startswith("no reply within")
    assert (
        "federated accuracy or its interval lies outside [0, 1]"
        in (report["sites_failed"]["hospital-1"])
    )
