"""Metrics: exposition of each exporter, the event spool, the HTTP exporter."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fedhead.cli.exporter import Exporter
from fedhead.cli.metrics import ServerMetrics, SiteMetrics
from fedhead.cli.preflight import parse_address
from fedhead.cli.supervisor import supervise
from fedhead.common import telemetry
from fedhead.common.errors import ConfigError
from fedhead.common.rounds import RoundResult
from fedhead.common.telemetry import SPOOL_ENV, SpoolReader, decode, emit, encode


def samples(registry: CollectorRegistry) -> dict[str, float]:
    """{'name{label="v"}': value} for every sample in the registry's exposition."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def families(registry: CollectorRegistry) -> dict[str, tuple[str, str]]:
    text = generate_latest(registry).decode()
    return {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text)}


@pytest.mark.parametrize("cls", [ServerMetrics, SiteMetrics])
def test_naming_help_and_preinitialised_series(cls: type) -> None:
    registry = CollectorRegistry()
    cls(registry)
    fams = families(registry)
    assert fams
    for name, (kind, doc) in fams.items():
        assert name.startswith("fedhead_"), name
        assert len(doc) > 20, f"{name} needs a HELP text a dashboard user understands"
        if kind == "counter":
            assert not name.endswith("_total")  # the parser strips it; samples carry it
    values = samples(registry)
    # labelled series exist at 0 before any event
    if cls is ServerMetrics:
        for reason in ("structure", "non_finite", "norm", "no_examples"):
            assert values[f'fedhead_updates_rejected_total{{reason="{reason}"}}'] == 0
        assert values['fedhead_traffic_bytes_total{direction="to_sites"}'] == 0
        assert values['fedhead_secagg_stage_duration_seconds_count{stage="unmask"}'] == 0
    else:
        assert values['fedhead_site_messages_total{kind="train",outcome="error"}'] == 0
        assert values['fedhead_site_feature_cache_lookups_total{result="miss"}'] == 0


def test_server_events_become_metrics() -> None:
    registry = CollectorRegistry()
    m = ServerMetrics(registry)
    m.apply(telemetry.RunStarted("mobilenet_v2", "secagg+"))
    m.apply(telemetry.RunPrepared("b0353104" + "0" * 56, 3, 2562))
    m.apply(telemetry.RoundStarted(1))
    assert samples(registry)["fedhead_round_current"] == 1
    m.apply(
        RoundResult(
            1,
            seconds=12.5,
            aggregated=True,
            sites_selected=3,
            sites_replied=2,
            sites_failed=0,
            sites_dropped=1,
            updates_rejected={"norm": 1},
            bytes_to_sites=3000,
            bytes_from_sites=2000,
            eval_loss=0.6,
            eval_accuracy=0.7,
            secagg_seconds={"setup": 0.2, "unmask": 0.1},
        )
    )
    m.apply(telemetry.RoundStarted(2))
    assert not any(k.startswith("fedhead_dp_epsilon") for k in samples(registry))  # DP off
    m.apply(
        RoundResult(
            2,
            seconds=8.0,
            sites_selected=3,
            sites_replied=3,
            bytes_to_sites=3000,
            bytes_from_sites=2000,
            eval_loss=0.5,
            eval_accuracy=0.65,
            eval_metrics={"auroc": 0.9, "sensitivity": 0.8, "specificity": float("nan")},
            server_eval_metrics={"balanced_accuracy": 0.7},
            dp_epsilon=2.5,
            dp_delta=1e-5,
        )
    )
    m.apply(telemetry.RunFinished(ok=True))
    v = samples(registry)
    assert v["fedhead_runs_started_total"] == v["fedhead_runs_completed_total"] == 1
    assert v["fedhead_runs_failed_total"] == 0 and v["fedhead_round_current"] == 0
    assert v["fedhead_round_last_completed"] == 2 and v["fedhead_run_sites"] == 3
    assert v["fedhead_round_last_completed_timestamp_seconds"] > 1.7e9
    assert v['fedhead_rounds_total{outcome="aggregated"}'] == 1
    assert v['fedhead_rounds_total{outcome="unchanged"}'] == 1
    assert v["fedhead_round_duration_seconds_count"] == 2
    assert v["fedhead_round_duration_seconds_sum"] == 20.5
    assert v['fedhead_round_sites_total{state="selected"}'] == 6
    assert v['fedhead_round_sites_total{state="dropped"}'] == 1
    assert v['fedhead_last_round_sites{state="replied"}'] == 3
    assert v['fedhead_updates_rejected_total{reason="norm"}'] == 1
    assert v['fedhead_traffic_bytes_total{direction="to_sites"}'] == 6000
    assert v['fedhead_secagg_stage_duration_seconds_count{stage="setup"}'] == 1
    assert v['fedhead_eval_accuracy_ratio{scope="federated"}'] == 0.65
    assert v['fedhead_eval_accuracy_change_ratio{scope="federated"}'] == pytest.approx(-0.05)
    assert v['fedhead_dp_epsilon{delta="1e-05"}'] == 2.5
    assert v['fedhead_eval_clinical_ratio{metric="auroc",scope="federated"}'] == 0.9
    assert v['fedhead_eval_clinical_ratio{metric="sensitivity",scope="federated"}'] == 0.8
    assert v['fedhead_eval_clinical_ratio{metric="balanced_accuracy",scope="server"}'] == 0.7
    # an undefined metric (NaN) has no series rather than a misleading value
    assert not any('metric="specificity"' in k for k in v)
    info = next(k for k in v if k.startswith("fedhead_backbone_info"))
    assert 'name="mobilenet_v2"' in info and 'secure_aggregation="secagg+"' in info


def test_site_events_become_metrics() -> None:
    registry = CollectorRegistry()
    m = SiteMetrics(registry)
    m.apply(telemetry.SiteMessage("train", True, 3.0))
    m.apply(telemetry.SiteMessage("evaluate", False, 1.0))
    m.apply(telemetry.SiteTrained(0.4, 900))
    features = telemetry.SiteFeatures(
        images=1000, extracted=400, extract_seconds=2.0, cache_hits=600, cache_misses=400, skipped=3
    )
    m.apply(features)
    m.apply(telemetry.SiteDevice("cuda", "cuda (H100)", 123456))
    m.apply(telemetry.SiteRefusedUpdate("norm"))
    v = samples(registry)
    assert v['fedhead_site_messages_total{kind="train",outcome="ok"}'] == 1
    assert v['fedhead_site_messages_total{kind="evaluate",outcome="error"}'] == 1
    assert v["fedhead_site_train_examples_total"] == 900
    assert v["fedhead_site_training_duration_seconds_count"] == 1
    assert v["fedhead_site_feature_extraction_images_per_second"] == 200
    assert v['fedhead_site_feature_cache_lookups_total{result="hit"}'] == 600
    assert v["fedhead_site_images_skipped_total"] == 3
    assert v["fedhead_site_gpu_peak_memory_bytes"] == 123456
    assert v['fedhead_site_updates_refused_total{reason="norm"}'] == 1


def test_events_roundtrip_and_emit_without_a_spool_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = RoundResult(
        3, seconds=1.5, aggregated=True, updates_rejected={"norm": 2}, secagg_seconds={"a": 1}
    )
    back = decode(encode(event))
    assert isinstance(back, RoundResult) and encode(back) == encode(event)  # NaN != NaN
    assert back.updates_rejected == {"norm": 2} and math.isnan(back.train_loss)
    monkeypatch.delenv(SPOOL_ENV, raising=False)
    emit(event)
    monkeypatch.setenv(SPOOL_ENV, str(tmp_path))
    emit(event)
    emit(telemetry.SiteTrained(1.0, 5))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"server-{os.getpid()}.jsonl",
        f"site-{os.getpid()}.jsonl",
    ]


def test_spool_reader_reads_complete_lines_and_cleans_up(tmp_path: Path) -> None:
    gone_pid = _exited_pid()
    live = tmp_path / f"site-{os.getpid()}.jsonl"
    finished = tmp_path / f"server-{gone_pid}.jsonl"
    live.write_text(
        encode(telemetry.SiteTrained(1.0, 5)) + "\n" + encode(telemetry.SiteTrained(2.0, 6))[:10]
    )
    finished.write_text(encode(telemetry.RunFinished(True)) + "\nnot json\n")
    reader = SpoolReader(tmp_path)
    events = reader.poll()
    assert (
        telemetry.SiteTrained(1.0, 5) in events
        and telemetry.RunFinished(True) in events
        and len(events) == 2
    )
    assert reader.bad_lines == 1
    assert not finished.exists() and live.exists()  # a finished writer's file goes
    with live.open("a") as f:  # the live writer completes its line
        f.write(encode(telemetry.SiteTrained(2.0, 6))[10:] + "\n")
    assert reader.poll() == [telemetry.SiteTrained(2.0, 6)]
    assert reader.poll() == []


def _exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_exporter_serves_metrics_from_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = Exporter(["server"], tmp_path, poll_seconds=0.05)
    port = _free_port()
    assert exporter.start(f"127.0.0.1:{port}")
    try:
        monkeypatch.setenv(SPOOL_ENV, str(tmp_path))
        emit(telemetry.RunStarted("resnet18", "none"))
        exporter.poll()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "fedhead_runs_started_total 1.0" in body
        assert 'fedhead_build_info{roles="server"' in body
        assert "fedhead_site_" not in body  # a server exporter shows no site metrics
    finally:
        exporter.stop()


def test_exporter_address_problems_are_one_line_and_not_fatal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert not Exporter(["site"], tmp_path).start(f"127.0.0.1:{port}")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not available" in err[0] and "continuing without metrics" in err[0]
    assert not Exporter(["site"], tmp_path).start("localhost")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not HOST:PORT" in err[0]
    with pytest.raises(ConfigError):
        parse_address("127.0.0.1:99999")
    assert parse_address("[::1]:9400") == ("::1", 9400)


def test_supervise_runs_the_child_with_an_exporter_beside_it(tmp_path: Path) -> None:
    port = _free_port()
    child = (
        "import os\n"
        "from fedhead.common.telemetry import emit, SiteTrained\n"
        "emit(SiteTrained(0.5, 42))\n"
        "raise SystemExit(3 if os.environ.get('FEDHEAD_METRICS_SPOOL') else 1)\n"
    )
    # the child's exit code comes back, and it ran with a spool folder to write to
    assert supervise([sys.executable, "-c", child], ["site"], f"127.0.0.1:{port}") == 3


def test_supervise_keeps_a_companion_and_the_child_together(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    # the companion (the proxy) fails: the child is stopped and its failure comes back
    failing = [sys.executable, "-c", "raise SystemExit(5)"]
    assert supervise(sleeper, ["server"], "none", companion=failing) == 5
    # the child ends: the companion is stopped, and the child's code comes back
    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    companion = (
        "import pathlib, signal, sys, time\n"
        "def stop(*_):\n"
        "    pathlib.Path(sys.argv[2]).touch()\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "pathlib.Path(sys.argv[1]).touch()\n"
        "time.sleep(120)\n"
    )
    child = (
        "import pathlib, sys, time\n"
        "while not pathlib.Path(sys.argv[1]).exists():\n"
        "    time.sleep(0.05)\n"
        "sys.exit(4)\n"
    )
    code = supervise(
        [sys.executable, "-c", child, str(ready)],
        ["server"],
        "none",
        companion=[sys.executable, "-c", companion, str(ready), str(stopped)],
    )
    assert code == 4 and stopped.exists()


def test_a_series_without_a_value_is_absent_not_zero() -> None:
    """No server test set: no server-scope accuracy or loss; a new run (or an exporter
    that restarted) shows no accuracy until its first round is evaluated."""
    registry = CollectorRegistry()
    m = ServerMetrics(registry)

    def eval_series() -> dict[str, float]:
        return {k: v for k, v in samples(registry).items() if k.startswith("fedhead_eval_")}

    assert eval_series() == {}  # before any run
    m.apply(telemetry.RunStarted("mobilenet_v2", "none"))
    m.apply(telemetry.RoundStarted(1))
    assert eval_series() == {}  # training, nothing evaluated yet
    m.apply(RoundResult(1, eval_loss=0.6, eval_accuracy=0.7, eval_metrics={"auroc": 0.8}))
    assert eval_series() == {
        'fedhead_eval_loss{scope="federated"}': 0.6,
        'fedhead_eval_accuracy_ratio{scope="federated"}': 0.7,
        'fedhead_eval_clinical_ratio{metric="auroc",scope="federated"}': 0.8,
    }  # no server scope (no test set), no change (no previous round)
    m.apply(telemetry.RunFinished(ok=True))
    assert eval_series()  # the last run's figures stay until the next run starts
    m.apply(telemetry.RunStarted("mobilenet_v2", "none"))
    assert eval_series() == {}


def test_a_run_whose_serverapp_died_is_counted_failed_and_cut_off(tmp_path: Path) -> None:
    """The ServerApp never says it stopped when it is killed (with its SuperLink):
    the exporter sees its writer gone with a run open."""
    exporter = Exporter(["server"], tmp_path)
    killed, finished = _exited_pid(), _exited_pid()
    (tmp_path / f"server-{killed}.jsonl").write_text(
        encode(telemetry.RunStarted("mobilenet_v2", "secagg+"))
        + "\n"
        + encode(telemetry.RoundStarted(3))
        + "\n"
    )
    (tmp_path / f"server-{finished}.jsonl").write_text(
        encode(telemetry.RunStarted("mobilenet_v2", "secagg+"))
        + "\n"
        + encode(telemetry.RunFinished(ok=False))
        + "\n"
    )
    exporter.poll()
    v = samples(exporter.registry)
    assert v["fedhead_runs_started_total"] == 2
    assert v["fedhead_runs_failed_total"] == 2 and v["fedhead_runs_cut_off_total"] == 1
    assert v["fedhead_round_current"] == 0
    assert list(tmp_path.iterdir()) == []  # both writers' files are read and gone
    exporter.poll()
    assert samples(exporter.registry)["fedhead_runs_failed_total"] == 2  # counted once
