"""The commands the container deployment uses: `fedhead health` (HEALTHCHECK, probes) and
`fedhead data demo-split` (the compose stack's trial sites)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedhead.common import demo_data
from fedhead.common.datasets import load_site_data
from fedhead.common.errors import ConfigError, FederationError, SetupError
from tests.cli.test_cli import fedhead, one_line_error


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/metrics" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    """A real HTTP server on 127.0.0.1: /metrics answers 200, anything else 503."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_health_is_ok_when_every_url_answers(server: int) -> None:
    ok = fedhead("health", f"http://127.0.0.1:{server}/metrics")
    assert ok.returncode == 0 and ok.stdout.strip() == "healthy", ok.stderr
    from_env = fedhead("health", env={"FEDHEAD_HEALTH_URL": f"http://127.0.0.1:{server}/metrics"})
    assert from_env.returncode == 0, from_env.stderr


def test_health_fails_in_one_line_naming_what_is_down(server: int) -> None:
    down = fedhead("health", f"http://127.0.0.1:{server}/metrics", f"http://127.0.0.1:{server}/x")
    one_line_error(down, FederationError.exit_code, "not healthy", "/x: HTTP 503")
    assert "/metrics:" not in down.stderr
    bad = fedhead("health", "file:///etc/passwd")
    one_line_error(bad, ConfigError.exit_code, "'file:///etc/passwd'", "http://")


def test_demo_split_writes_one_readable_npz_per_site(tmp_path: Path) -> None:
    result = fedhead("data", "demo-split", "--out", str(tmp_path), "--sites", "a,b,c")
    assert result.returncode == 0, result.stderr
    total = 0
    for site in "abc":
        data = load_site_data(tmp_path / site / "data.npz", list(demo_data.CLASSES), 0.15, 0)
        assert len(data.train) > 0 and len(data.val) > 0
        total += len(data.train) + len(data.val)
        with np.load(tmp_path / site / "data.npz") as npz:
            assert list(npz["class_names"]) == list(demo_data.CLASSES)
    # the sites share the demo train split between them (training and validation parts),
    # nothing twice; the test split stays with nobody
    assert total == len(demo_data.load("train").labels)


def test_demo_split_never_overwrites_and_checks_names(tmp_path: Path) -> None:
    assert fedhead("data", "demo-split", "--out", str(tmp_path)).returncode == 0
    before = (tmp_path / "site-1" / "data.npz").read_bytes()
    again = fedhead("data", "demo-split", "--out", str(tmp_path))
    one_line_error(again, SetupError.exit_code, "refusing to overwrite", "site-1")
    assert (tmp_path / "site-1" / "data.npz").read_bytes() == before
    bad = fedhead("data", "demo-split", "--out", str(tmp_path / "x"), "--sites", "../up,a,a")
    one_line_error(bad, ConfigError.exit_code, "'../up'", "unique")
    assert not (tmp_path / "up").exists() and not (tmp_path / "x").exists()
