"""`fedhead run`, `fedhead node` and `fedhead superlink` refuse bad input before Flower
starts: real processes, no SuperLink needed."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from fedhead.cli.run import parse_overrides
from fedhead.common.errors import ConfigError, DataError, SetupError
from tests.cli.test_cli import fedhead, one_line_error
from tests.conftest import REPO
from tests.e2e.procs import free_port


def run_nowhere(flwr_home: Path, *run_configs: str) -> subprocess.CompletedProcess[str]:
    """``fedhead run`` on a connection that ``flwr_home`` does not have."""
    overrides = [arg for config in run_configs for arg in ("--run-config", config)]
    return fedhead(
        "run", "nowhere", "--app", str(REPO), *overrides, env={"FLWR_HOME": str(flwr_home)}
    )


def node_without_a_superlink(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``fedhead node`` on ``data`` pointed at a port where no SuperLink listens."""
    return fedhead(
        "node",
        "--superlink",
        "127.0.0.1:9",
        "--data",
        str(data),
        *args,
        "--insecure",
        "--allow-unsigned-apps",
        "--metrics-address",
        "none",
        "--port",
        str(free_port()),
    )


def test_run_names_every_unknown_key_and_bad_value_at_once(tmp_path: Path) -> None:
    result = run_nowhere(
        tmp_path,
        "num-server-rouns=3 local-epochs=0 backbone='resnet9000' classes=normal",
        "seed=abc",
    )
    one_line_error(
        result,
        ConfigError.exit_code,
        "num-server-rouns: unknown key (did you mean 'num-server-rounds'?)",
        "local-epochs: must be > 0",
        "backbone: unknown backbone 'resnet9000'",
        "classes: text needs quotes: classes='normal'",
        "seed: expected int",
    )
    assert "Traceback" not in result.stderr


def test_run_with_a_good_config_names_a_missing_connection(tmp_path: Path) -> None:
    result = run_nowhere(tmp_path, "strategy='fedavg' num-server-rounds=2 classes='cat,dog'")
    one_line_error(result, ConfigError.exit_code, "'nowhere'", "config.toml")


def test_run_refuses_rounds_for_the_closed_form_head(tmp_path: Path) -> None:
    """The default closed-form head takes one round: a round count is a mistake, named."""
    result = run_nowhere(tmp_path, "num-server-rounds=3 classes='cat,dog'")
    one_line_error(
        result, ConfigError.exit_code, "num-server-rounds: counts FedAvg rounds", "fine-tune-rounds"
    )
    # a head without a closed form trains in rounds: the count is its
    result = run_nowhere(tmp_path, "num-server-rounds=3 head='mlp' classes='cat,dog'")
    one_line_error(result, ConfigError.exit_code, "'nowhere'")


def test_run_config_pairs_parse_like_flwr() -> None:
    values, problems, unquoted = parse_overrides(["a=1 b=2.5 c=true d='x y' e=\"z\"", "f=plain"])
    assert values == {"a": 1, "b": 2.5, "c": True, "d": "x y", "e": "z", "f": "plain"}
    assert problems == [] and unquoted == {"f"}
    _, problems, _ = parse_overrides(["a=1 dangling"])
    assert problems == ["--run-config: 'dangling' is not KEY=VALUE"]


def test_node_on_an_empty_folder_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = node_without_a_superlink(tmp_path / "empty")
    assert result.returncode == DataError.exit_code, result.stderr
    assert result.stderr.splitlines()[-1].startswith("fedhead: data problem: ")
    assert "holds no files" in result.stderr


def test_node_with_classes_runs_the_full_data_check(tmp_path: Path) -> None:
    (tmp_path / "site" / "normal").mkdir(parents=True)
    (tmp_path / "site" / "normal" / "x.png").write_bytes(b"not an image")
    (tmp_path / "site" / "pneumonia").mkdir()
    (tmp_path / "site" / "pneumonia" / "y.png").write_bytes(b"nor this")
    result = node_without_a_superlink(tmp_path / "site", "--classes", "normal,pneumonia")
    assert result.returncode == DataError.exit_code, result.stderr
    assert "0 usable image(s), 2 unreadable" in result.stdout
    assert "no usable images" in result.stderr


def test_superlink_on_a_busy_port_exits_7() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = fedhead(
            "superlink", "--insecure", "--port", str(port), "--metrics-address", "none"
        )
    assert result.returncode == SetupError.exit_code, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("fedhead: setup problem: ") and f"127.0.0.1:{port}" in last


def test_only_the_last_report_line_of_a_completed_run_is_kept() -> None:
    from fedhead.cli.flwr_cli import LogFilter, RunStatus
    from fedhead.server.report import REPORT_LOG_PREFIX

    keep = LogFilter()
    # a site's error text that imitates the report line, then the ServerApp's own
    fake = '{"run_id": 7, "final_eval_accuracy": 1.0}'
    lines = [
        f"12:00:00 ERROR fedhead.server.distribution: node 3 cannot take part: x\n"
        f"{REPORT_LOG_PREFIX}{fake}",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "ValueError: boom",
        "12:00:09 INFO fedhead.server.federation: round 1",
        f'12:00:10 INFO fedhead.server.app: {REPORT_LOG_PREFIX}{{"run_id": 7, "clients": 2}}',
    ]
    shown = [s for line in lines for part in line.split("\n") if (s := keep(part)) is not None]
    assert shown == [
        "12:00:00 ERROR fedhead.server.distribution: node 3 cannot take part: x",
        "12:00:09 INFO fedhead.server.federation: round 1",
    ]
    assert keep.report_for(RunStatus("7", "finished:completed", "", 1.0)) == {
        "run_id": 7,
        "clients": 2,
    }
    assert keep.report_for(RunStatus("7", "finished:failed", "", 1.0)) is None
    assert keep.report_for(RunStatus("8", "finished:completed", "", 1.0)) is None


def test_flowers_crash_banner_of_a_refused_run_is_not_shown() -> None:
    """A ServerApp that refuses (resume-from with nothing left to train) gets Flower's
    'raised an exception' banner, traceback and exit-code help in the run's log;
    `fedhead run` shows the reason once, in its last line."""
    from flwr.supercore.exit.exit_code import EXIT_CODE_HELP, ExitCode

    from fedhead.cli.flwr_cli import LogFilter, RunStatus

    red, plain = "\x1b[91mERROR \x1b[0m:      ", "\x1b[92mINFO \x1b[0m:      "
    lines = [
        f"{plain}starting run 5",
        "12:00:01 ERROR fedhead.server.app: federation problem: nothing is left to train",
        f"{red}ServerApp raised an exception",
        "Traceback (most recent call last):",
        '  File "run_serverapp.py", line 1, in run_serverapp',
        "fedhead.common.errors.FederationError: nothing is left to train",
        "",
        "During handling of the above exception, another exception occurred:",
        "",
        "Traceback (most recent call last):",
        '  File "app.py", line 2, in main',
        "RuntimeError: x",
        f"{red}Exit Code: {ExitCode.SERVERAPP_EXCEPTION}",
        EXIT_CODE_HELP[ExitCode.SERVERAPP_EXCEPTION],
        "",
        "For more information, visit: <https://flower.ai/docs/framework/ref-exit-codes/201.html>",
        f"{plain}the next run's line",
    ]
    keep = LogFilter()
    shown = [s for line in lines if (s := keep(line)) is not None]
    assert shown == [lines[0], lines[1], lines[-1]]
    status = RunStatus(
        "5", "finished:failed", "ServerApp failed with exception: nothing is left to train", 3.0
    )
    assert status.reason == "nothing is left to train"


def test_a_node_checks_its_port_before_it_reads_any_image(tmp_path: Path) -> None:
    (tmp_path / "site" / "normal").mkdir(parents=True)
    (tmp_path / "site" / "normal" / "x.png").write_bytes(b"not an image")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = fedhead(
            *("node", "--superlink", "127.0.0.1:9", "--data", str(tmp_path / "site")),
            *("--classes", "normal,pneumonia", "--insecure", "--allow-unsigned-apps"),
            *("--metrics-address", "none", "--port", str(port)),
        )
    assert result.returncode == SetupError.exit_code, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("fedhead: setup problem: ") and f"127.0.0.1:{port}" in last
    assert "usable image" not in result.stdout  # refused before the data check


def test_data_with_no_file_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    """An empty site folder is refused at once: reading images needs torch, whose import
    takes a minute on a busy machine."""
    import sys

    (tmp_path / "site" / "normal").mkdir(parents=True)  # class folders, no images
    (tmp_path / "site" / "pneumonia").mkdir()
    probe = (
        "import sys; from fedhead.cli.main import main\n"
        f"code = main(['data', 'check', {str(tmp_path / 'site')!r}, '--classes', 'a,b'])\n"
        "print('torch' in sys.modules); sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == DataError.exit_code, result.stderr
    assert "holds no files" in result.stderr and result.stdout.strip() == "False"


def test_superlink_with_its_public_address_in_use_exits_7_in_one_line(tmp_path: Path) -> None:
    from fedhead.cli.certs import CertsPlan, create

    create(CertsPlan(tmp_path / "certs", ["fl.example.org"], []))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = fedhead(
            *("superlink", "--certs-dir", str(tmp_path / "certs"), "--port", str(free_port())),
            *("--public-address", f"127.0.0.1:{port}", "--metrics-address", "none"),
            env={"FEDHEAD_HOME": str(tmp_path / "home")},
        )
    one_line_error(result, SetupError.exit_code, f"127.0.0.1:{port}", "--public-address")
    assert "[emerg]" not in result.stderr
