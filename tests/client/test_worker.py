"""The worker's connection: only key holders are served, and errors keep type and fields."""

from __future__ import annotations

from collections.abc import Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest

from fedhead.client.worker import RemoteSite, WorkerService, _describe_error, _error
from fedhead.common import errors
from fedhead.common.errors import ConfigError, FedheadError, RunSpecError
from fedhead.common.protocol import PROTOCOL_VERSION, RunSpec


@pytest.fixture
def worker() -> Iterator[WorkerService]:
    service = WorkerService().start()
    yield service
    service.stop()


def _every_error() -> list[FedheadError]:
    made: list[FedheadError] = []
    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, FedheadError):
            if issubclass(cls, errors.UnknownBackboneError):
                made.append(cls("nope", ["a", "b"]))
            elif issubclass(cls, ConfigError):
                made.append(cls(["x: bad", "y: worse"], "node configuration"))
            else:
                made.append(cls("what went wrong", "what to do"))
    return made


@pytest.mark.parametrize("err", _every_error(), ids=lambda e: type(e).__name__)
def test_an_error_crossing_keeps_its_type_and_fields(err: FedheadError) -> None:
    back = _error(_describe_error(err))
    assert type(back) is type(err)
    assert vars(back) == vars(err) and str(back) == str(err)
    assert back.exit_code == err.exit_code and back.title == err.title


def test_anything_else_is_an_unexpected_failure() -> None:
    for info in ({"type": "unexpected"}, {"type": "SystemExit", "fields": {}}, {}):
        assert isinstance(_error(info), RuntimeError)


def test_a_process_without_the_key_is_refused_and_the_worker_serves_on(
    worker: WorkerService,
) -> None:
    key_file = Path(worker.key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert worker.folder.stat().st_mode & 0o777 == 0o700
    with pytest.raises(AuthenticationError):
        Client(worker.path, family="AF_UNIX", authkey=b"a guess")
    # the next process with the key is served: its error arrives typed, with its title
    remote = RemoteSite(worker.path, worker.key_file, {"data-path": "/x"}, _spec(), 1)
    with pytest.raises(RunSpecError, match="run description is refused") as err:
        remote.evaluate([np.zeros(2, np.float32)], statistics=False)
    assert err.value.title == RunSpecError.title
    wrong = RemoteSite(worker.path, str(worker.folder / "missing.key"), {}, _spec(), 1)
    with pytest.raises(errors.FederationError, match=r"missing\.key cannot be read"):
        wrong.evaluate([np.zeros(2, np.float32)], statistics=False)


def test_a_stopped_worker_is_named_and_leaves_nothing(worker: WorkerService) -> None:
    worker.stop()
    assert not worker.folder.exists()
    remote = RemoteSite(worker.path, worker.key_file, {}, _spec(), 1)
    with pytest.raises(errors.FederationError, match=r"cannot be read|does not answer"):
        remote.evaluate([np.zeros(2, np.float32)], statistics=False)


def _spec() -> RunSpec:
    return RunSpec(
        PROTOCOL_VERSION,
        "mobilenet_v2",
        "w.pth",
        "0" * 64,
        False,
        "a,b",
        32,
        "linear",
        256,
        0.0,
        0,
        0,
        False,
        "fp",
        0.15,
        0,
        "",
        0.5,
    )
