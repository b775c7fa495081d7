"""The `fedhead` command: help, one-line errors with their exit codes, wrappers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedhead.common.errors import ConfigError, DataError, UnknownBackboneError, WeightsError
from tests.conftest import write_png
from tests.e2e.procs import alive, descendant_commands, poll_until

FEDHEAD = [sys.executable, "-m", "fedhead.cli.main"]


def fedhead(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [*FEDHEAD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedhead: ")
    title = lines[0].split(": ")[1]
    assert lines[0].count(title) == 1, f"the error's title is repeated: {lines[0]}"
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_commands_and_exit_codes() -> None:
    result = fedhead("--help")
    assert result.returncode == 0
    for word in ("demo", "weights", "node", "superlink", "data", "exit codes"):
        assert word in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        pytest.param(
            ["demo", "--backbone", "resnet9000", "--out"],
            UnknownBackboneError.exit_code,
            ["unknown backbone 'resnet9000'", "mobilenet_v2"],
            id="unknown-backbone-in-demo",
        ),
        pytest.param(
            ["demo", "--rounds", "0", "--clients", "1", "--out"],
            ConfigError.exit_code,
            ["--rounds", "--clients"],  # reported together
            id="bad-demo-options",
        ),
        pytest.param(
            ["demo", "--rounds", "5", "--out"],
            ConfigError.exit_code,
            ["--rounds", "--fine-tune-rounds", "--strategy fedavg"],
            id="fedavg-rounds-for-the-closed-form-demo",
        ),
        pytest.param(
            ["weights", "install", "resnet18", "--dest"],
            WeightsError.exit_code,
            ["--file", "--download"],
            id="weights-install-without-a-source",
        ),
    ],
)
def test_bad_options_are_one_line_errors(
    tmp_path: Path, args: list[str], code: int, needles: list[str]
) -> None:
    """``args`` end with the option naming a folder; the test's own folder goes there."""
    one_line_error(fedhead(*args, str(tmp_path)), code, *needles)


def test_demo_passes_its_strategy_and_refuses_a_bad_proximal_mu(tmp_path: Path) -> None:
    from fedhead.cli.demo_job import DemoOptions

    cfg = DemoOptions(out=tmp_path, strategy="fedyogi", proximal_mu=0.1).run_config()
    assert (cfg.strategy, cfg.proximal_mu) == ("fedyogi", 0.1)
    one_line_error(
        fedhead("demo", "--proximal-mu", "-1", "--out", str(tmp_path)),
        ConfigError.exit_code,
        "proximal-mu: must be in [0, 1000]",
    )
    unknown = fedhead("demo", "--strategy", "fedsgd", "--out", str(tmp_path))
    assert unknown.returncode == 2 and "fedadam" in unknown.stderr


def test_demo_refuses_an_out_with_checkpoints_unless_resumed(tmp_path: Path) -> None:
    one_line_error(
        fedhead("demo", "--resume", "--out", str(tmp_path)),
        ConfigError.exit_code,
        "--resume",
        "holds no checkpoints",
    )
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "round-0003.safetensors").write_bytes(b"earlier demo")
    one_line_error(
        fedhead("demo", "--out", str(tmp_path)), ConfigError.exit_code, "--out", "--resume"
    )
    assert (tmp_path / "checkpoints" / "round-0003.safetensors").read_bytes() == b"earlier demo"


def test_missing_weights_say_how_to_get_them(tmp_path: Path) -> None:
    env = {"TORCH_HOME": str(tmp_path / "t"), "FEDHEAD_CACHE": str(tmp_path / "c")}
    result = fedhead("demo", "--out", str(tmp_path / "o"), env=env)
    one_line_error(
        result, WeightsError.exit_code, "not found", "fedhead weights install mobilenet_v2"
    )
    assert not (tmp_path / "o" / "report.json").exists()


def test_weights_install_verifies_and_refuses_a_wrong_file(
    tmp_path: Path, mobilenet_weights: Path
) -> None:
    dest = tmp_path / "dest"
    ok = fedhead(
        "weights", "install", "mobilenet_v2", "--file", str(mobilenet_weights), "--dest", str(dest)
    )
    assert ok.returncode == 0 and (dest / "mobilenet_v2-b0353104.pth").is_file()
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(b"nope")
    bad = fedhead(
        "weights", "install", "mobilenet_v2", "--file", str(wrong), "--dest", str(tmp_path / "d2")
    )
    one_line_error(bad, WeightsError.exit_code, "sha256")
    assert not (tmp_path / "d2" / "mobilenet_v2-b0353104.pth").exists()


def test_weights_list_shows_every_backbone() -> None:
    result = fedhead("weights", "list")
    assert result.returncode == 0
    for name in ("mobilenet_v2", "resnet18", "resnet50", "efficientnet_b0", "vit_b_16"):
        assert name in result.stdout


def test_data_check_counts_and_reports_unreadable(
    tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    for i, img in enumerate(xray_arrays[0][:6]):
        write_png(tmp_path / "site" / ("normal" if i < 3 else "pneumonia") / f"{i}.png", img)
    (tmp_path / "site" / "normal" / "broken.png").write_bytes(b"xx")
    result = fedhead("data", "check", str(tmp_path / "site"), "--classes", "normal,pneumonia")
    assert result.returncode == 0, result.stderr
    assert "6 usable image(s), 1 unreadable" in result.stdout and "broken.png" in result.stdout


def test_data_check_bad_label(tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray]) -> None:
    write_png(tmp_path / "site" / "covid" / "0.png", xray_arrays[0][0])
    one_line_error(
        fedhead("data", "check", str(tmp_path / "site"), "--classes", "normal,pneumonia"),
        DataError.exit_code,
        "'covid'",
        "normal, pneumonia",
    )


def test_node_wrapper_builds_the_flower_command(tmp_path: Path) -> None:
    (tmp_path / "my data").mkdir()
    result = fedhead(
        "node",
        "--superlink",
        "10.1.2.3:8000",
        "--data",
        str(tmp_path / "my data"),
        "--insecure",
        "--allow-unsigned-apps",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    cmd = result.stdout.strip()
    assert cmd.startswith("flower-supernode --superlink 10.1.2.3:8000 --port 9094")
    assert f'data-path="{tmp_path / "my data"}"' in cmd and "--insecure" in cmd


def test_node_wrapper_passes_the_data_options_as_node_config(tmp_path: Path) -> None:
    import shlex

    from flwr.common.config import parse_config_args

    from fedhead.common.config import NodeConfig

    result = fedhead(
        *(
            "node",
            "--superlink",
            "h:1",
            "--data",
            str(tmp_path),
            "--insecure",
            "--dry-run",
            "--allow-unsigned-apps",
        ),
        *("--data-roots", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--max-image-pixels", "1000"),
    )
    assert result.returncode == 0, result.stderr
    cmd = shlex.split(result.stdout.strip())
    node = NodeConfig.from_mapping(parse_config_args([cmd[cmd.index("--node-config") + 1]]))
    assert node.data_root_paths() == (tmp_path / "a", tmp_path / "b")
    assert node.max_image_pixels == 1000


def test_data_check_refuses_an_outward_symlink_unless_its_folder_is_a_data_root(
    tmp_path: Path, xray_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    for i, img in enumerate(xray_arrays[0][:4]):
        write_png(tmp_path / "site" / ("normal" if i < 2 else "pneumonia") / f"{i}.png", img)
    write_png(tmp_path / "elsewhere" / "x.png", xray_arrays[0][5])
    (tmp_path / "site" / "normal" / "x.png").symlink_to(tmp_path / "elsewhere" / "x.png")
    check = ("data", "check", str(tmp_path / "site"), "--classes", "normal,pneumonia")
    one_line_error(fedhead(*check), DataError.exit_code, "normal/x.png -> ", "data-roots")
    result = fedhead(*check, "--data-roots", str(tmp_path / "elsewhere"))
    assert result.returncode == 0, result.stderr
    assert "5 usable image(s), 0 unreadable" in result.stdout


@pytest.mark.parametrize("args", [["superlink"], ["node", "--superlink", "h:1", "--data", "."]])
def test_wrappers_refuse_to_run_without_tls_unless_told(args: list[str]) -> None:
    one_line_error(fedhead(*args, "--dry-run"), ConfigError.exit_code, "--insecure")


def test_superlink_insecure_warns_loudly() -> None:
    result = fedhead("superlink", "--insecure", "--dry-run")
    assert result.returncode == 0 and "WITHOUT TLS" in result.stderr
    assert "--disable-runtime-dependency-installation" in result.stdout


@pytest.mark.deployment
@pytest.mark.parametrize("metrics", ["none", "on"])
def test_superlink_starts_without_the_venv_on_path(tmp_path: Path, metrics: str) -> None:
    """`.venv/bin/fedhead superlink` must work when the venv is not activated: Flower
    starts its helper programs by name, so the wrapper puts them on PATH."""
    import os
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    address = "none" if metrics == "none" else f"127.0.0.1:{metrics_port}"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    proc = subprocess.Popen(
        [*FEDHEAD, "superlink", "--insecure", "--port", str(port), "--metrics-address", address],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        healthy = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    healthy = r.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        assert healthy, proc.communicate(timeout=30)[0].decode() if proc.poll() is not None else ""
        # its SuperExec helper starts after the API is up, found by name on PATH
        poll_until(
            lambda: any("superexec" in c for c in descendant_commands(proc.pid)),
            "running its SuperExec helper",
            proc=proc,
        )
        assert proc.poll() is None, "the SuperLink died after starting"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
    assert "No such file or directory" not in output, output


def test_node_refuses_to_run_unsigned_apps_unless_told(tmp_path: Path) -> None:
    base = ["node", "--superlink", "h:1", "--data", str(tmp_path), "--insecure", "--dry-run"]
    one_line_error(
        fedhead(*base), ConfigError.exit_code, "--trusted-entities", "--allow-unsigned-apps"
    )
    allowed = fedhead(*base, "--allow-unsigned-apps")
    assert allowed.returncode == 0 and "runs ANY app" in allowed.stderr
    assert "--trusted-entities" not in allowed.stdout
    entities = tmp_path / "trusted-entities.yaml"
    entities.write_text("fpk_x: 'ssh-ed25519 AAAA'\n")
    trusted = fedhead(*base, "--trusted-entities", str(entities))
    assert trusted.returncode == 0, trusted.stderr
    assert f"--trusted-entities {entities}" in trusted.stdout


def test_superlink_never_faces_the_sites_itself(tmp_path: Path) -> None:
    one_line_error(
        fedhead("superlink", "--insecure", "--host", "0.0.0.0", "--dry-run"),
        ConfigError.exit_code,
        "Control API",
        "--public-address",
    )
    one_line_error(
        fedhead("superlink", "--insecure", "--public-address", "0.0.0.0:9443", "--dry-run"),
        ConfigError.exit_code,
        "--certs-dir",
    )


def test_superlink_keeps_its_state_on_disk_by_default(tmp_path: Path) -> None:
    env = {"FEDHEAD_HOME": str(tmp_path / "home")}
    result = fedhead("superlink", "--insecure", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert f"--database {tmp_path / 'home' / 'superlink' / 'superlink.db'}" in result.stdout
    chosen = fedhead("superlink", "--insecure", "--dry-run", "--state-dir", str(tmp_path / "s"))
    assert f"--database {tmp_path / 's' / 'superlink.db'}" in chosen.stdout
    memory = fedhead("superlink", "--insecure", "--dry-run", "--database", ":memory:", env=env)
    assert "--database :memory:" in memory.stdout
    assert not (tmp_path / "home").exists()  # a dry run creates nothing


_FLAKY_CHILD = """
import pathlib, signal, sys, time
count = pathlib.Path(sys.argv[1])
n = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(n))
if n < 3:
    sys.exit(1)  # as a SuperNode does when its SuperLink forgot it
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(0.1)
"""


def test_the_node_supervisor_restarts_a_node_that_exits(tmp_path: Path) -> None:
    import signal
    import time

    count = tmp_path / "starts"
    child = [sys.executable, "-c", _FLAKY_CHILD, str(count)]
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from fedhead.cli.supervisor import supervise; "
            f"sys.exit(supervise({child!r}, ['site'], 'none', restart=True, backoff=(0.1, 1.0)))",
        ],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        for _ in range(600):  # polls, not a time bound on the behaviour
            if count.exists() and count.read_text() == "3":
                break
            time.sleep(0.1)
        assert count.read_text() == "3"
        assert supervisor.poll() is None  # still supervising the third start
        supervisor.send_signal(signal.SIGTERM)
        _, err = supervisor.communicate(timeout=30)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    assert supervisor.returncode == 0  # the child ended on the forwarded signal
    lines = [line for line in err.splitlines() if "starting it again" in line]
    assert len(lines) == 2 and "exited with code 1" in lines[0] and "(attempt 2)" in lines[1]


def test_the_supervisor_gives_up_on_a_bad_command_line(tmp_path: Path) -> None:
    from fedhead.cli.supervisor import supervise

    code = supervise(
        [sys.executable, "-c", "import sys; sys.exit(2)"], ["site"], "none", restart=True
    )
    assert code == 2


def test_node_gives_its_site_a_thread_count(tmp_path: Path) -> None:
    import os
    import shlex

    from flwr.common.config import parse_config_args

    from fedhead.common.config import NodeConfig

    def threads(*extra: str) -> int:
        result = fedhead(
            *("node", "--superlink", "h:1", "--data", str(tmp_path), "--insecure"),
            *("--allow-unsigned-apps", "--dry-run", *extra),
        )
        assert result.returncode == 0, result.stderr
        line = next(x for x in result.stdout.splitlines() if x.startswith("flower-supernode"))
        cmd = shlex.split(line)
        config = parse_config_args([cmd[cmd.index("--node-config") + 1]])
        return NodeConfig.from_mapping(config).threads

    assert threads() == os.cpu_count()  # by default every core
    assert threads("--threads", "1") == 1  # co-located sites split the cores
    result = fedhead(
        *("node", "--superlink", "h:1", "--data", str(tmp_path), "--insecure"),
        *("--allow-unsigned-apps", "--dry-run", "--threads", "0"),
    )
    assert result.returncode != 0 and "--threads" in result.stderr


def test_a_command_is_described_once_by_its_handler_docstring() -> None:
    import argparse

    from fedhead.cli.main import build_parser
    from fedhead.cli.types import add_command

    def handler(args: argparse.Namespace) -> int:
        """do the thing
        in one line

        How it is done."""
        return 0

    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_command(sub, "thing", handler, "Values: 3.")
    assert sub._choices_actions[0].help == "do the thing in one line"
    assert parser.description == "do the thing\nin one line\n\nHow it is done.\n\nValues: 3."
    with pytest.raises(ValueError, match="no docstring"):
        add_command(sub, "bare", lambda args: 0)
    listed = build_parser().format_help()
    for summary in ("run a complete federated job", "start this site's Flower SuperNode"):
        assert summary in listed


def test_each_command_lives_in_the_module_named_for_it() -> None:
    """``fedhead status`` is in cli/status.py (``weights list`` in cli/weights.py): a
    reader finds a command by its name."""
    import argparse

    from fedhead.cli.main import build_parser

    def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        subs = parser._subparsers._group_actions if parser._subparsers else []
        return {
            n: p
            for a in subs
            if isinstance(a, argparse._SubParsersAction)
            for n, p in a.choices.items()
        }

    found = {}
    for name, parser in commands(build_parser()).items():
        actions = commands(parser) or {name: parser}  # a group: its actions (weights list ...)
        found[name] = {p.get_default("handler").__module__ for p in actions.values()}
    assert len(found) == 16
    wrong = {name: mods for name, mods in found.items() if mods != {f"fedhead.cli.{name}"}}
    assert not wrong, wrong


# A stand-in for flower-superlink: it starts a "ServerApp" in a session of its own (as
# Flower's SuperExec does) and, the first time, dies (as a crashed SuperLink does); the
# second time it stays up, ignoring SIGTERM (as a SuperLink waiting for connections).
_LINK = """
import pathlib, signal, subprocess, sys, time
home = pathlib.Path(sys.argv[1])
starts = len(list(home.glob("app-*.pid")))
app = subprocess.Popen([sys.executable, str(home / "serverapp.py")], start_new_session=True)
(home / f"app-{starts}.pid").write_text(str(app.pid))
if starts == 0:
    sys.exit(1)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    time.sleep(0.1)
"""


def test_the_supervisor_stops_what_its_child_leaves_and_stops_in_seconds(tmp_path: Path) -> None:
    import signal

    (tmp_path / "serverapp.py").write_text("import time\nwhile True:\n    time.sleep(0.1)\n")
    link = [sys.executable, "-c", _LINK, str(tmp_path)]
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from fedhead.cli.supervisor import supervise; sys.exit(supervise("
            f"{link!r}, ['server'], 'none', restart=True, backoff=(0.1, 1.0), grace=1.0))",
        ],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pids: list[int] = []
    try:
        poll_until(lambda: (tmp_path / "app-1.pid").exists(), "restarted", proc=supervisor)
        pids = [int((tmp_path / f"app-{i}.pid").read_text()) for i in (0, 1)]
        assert not alive(pids[0])  # the crashed child's ServerApp was stopped
        assert alive(pids[1])
        supervisor.send_signal(signal.SIGTERM)
        _, err = supervisor.communicate(timeout=60)  # a bound against hanging, not a timing
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert supervisor.returncode == 0
    assert not any(alive(p) for p in pids)  # nothing it started is left
    lines = err.strip().splitlines()
    assert f"stopping serverapp.py (pid {pids[0]}), left running by python" in lines[0]
    assert "python exited with code 1; starting it again in 0s (attempt 1)" in lines[1]
    assert lines[2:] == [
        "fedhead: SIGTERM: stopping python and everything started beside it",
        "fedhead: python did not stop within 1 s; killed it",
        f"fedhead: stopping serverapp.py (pid {pids[1]}), left running by python",
    ]


def test_a_killed_supervisor_takes_its_child_with_it(tmp_path: Path) -> None:
    """A SuperLink or SuperNode never outlives its supervisor (killed, say, by the OOM
    killer) holding its port: the child gets SIGTERM when the supervisor dies."""
    import signal

    pid_file = tmp_path / "child.pid"
    child = [
        sys.executable,
        "-c",
        "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)",
        str(pid_file),
    ]
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from fedhead.cli.supervisor import supervise; "
            f"sys.exit(supervise({child!r}, ['site'], 'none', restart=True))",
        ],
        start_new_session=True,
    )
    pid = 0
    try:
        poll_until(lambda: pid_file.exists() and bool(pid_file.read_text()), "child started")
        pid = int(pid_file.read_text())
        os.killpg(supervisor.pid, signal.SIGKILL)  # the child has a session of its own
        supervisor.wait()
        poll_until(lambda: not alive(pid), "the child gone with its supervisor", timeout=30)
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_node_refused_as_it_joins_is_given_up_only_after_the_grace() -> None:
    """After a SuperLink restart (compose down/up) the SuperLink refuses a known key whose
    previous session it still counts online, for up to two heartbeats, with the error an
    unregistered key gets: the node tries again until the refusals outlast that."""
    from fedhead.cli import preflight

    watch = preflight.NodeWatch("127.0.0.1:1", False, True)
    exit_line = f"\x1b[91mERROR \x1b[0m:     Exit Code: {preflight.SUPERNODE_CONNECTION_ERROR}"
    watch.line(exit_line)
    assert not watch.permanent()  # the first refusal: maybe the old session
    assert watch.first_refused is not None
    watch.first_refused -= preflight.REFUSED_GRACE_SECONDS + 1  # refused for that long
    watch.line(exit_line)
    assert watch.permanent()  # an unregistered key: restarting cannot help
