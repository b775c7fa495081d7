"""The container test's helpers clean up after an interruption (no podman needed): a
command stopped midway is stopped with every process it started, as podman-compose's
podman calls are when Ctrl-C or SIGTERM reaches the test during `podman-compose up`."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.deploy import podman as pm
from tests.e2e.procs import alive, poll_until

# A stand-in for podman-compose: it starts a "podman run" child, then waits for it.
_COMPOSE = """
import pathlib, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
pathlib.Path(sys.argv[1]).write_text(str(child.pid))
child.wait()
"""


def test_an_interrupted_command_is_stopped_with_what_it_started(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"

    def ctrl_c_once_started(_signum: int, _frame: object) -> None:
        if marker.exists():
            raise KeyboardInterrupt
        signal.setitimer(signal.ITIMER_REAL, 0.2)

    previous = signal.signal(signal.SIGALRM, ctrl_c_once_started)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(KeyboardInterrupt):
            pm.run([sys.executable, "-c", _COMPOSE, str(marker)], timeout=300)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    child = int(marker.read_text())
    poll_until(lambda: not alive(child), "its child stopped", timeout=60)


def test_images_and_projects_are_named_for_the_session() -> None:
    names = (pm.BASE_IMAGE, pm.FEDHEAD_IMAGE, pm.PROMETHEUS_IMAGE)
    assert all(name.startswith("localhost/") and pm.SESSION in name for name in names)
