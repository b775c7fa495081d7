"""The node's warm worker does a site's training and evaluation for the ClientApp: the
same results as in process, the same errors, and a clear failure when it is gone."""

from __future__ import annotations

from collections.abc import Iterator
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest

from fedhead.client.app import app as client_app
from fedhead.client.worker import RemoteSite, WorkerService
from fedhead.common.errors import DataError, FederationError
from fedhead.server.checkpoints import CheckpointStore
from fedhead.server.server_model import build_server_model, fit_settings, run_spec
from tests.loopback import LoopbackGrid
from tests.server.conftest import loopback_config, nodes, run, write_sites

pytestmark = pytest.mark.slow  # whole federations (seconds each)


@pytest.fixture
def worker() -> Iterator[WorkerService]:
    service = WorkerService().start()
    yield service
    service.stop()


def test_a_run_through_the_worker_ends_where_the_in_process_one_does(
    offline_world: Path, worker: WorkerService
) -> None:
    tmp = offline_world
    sites = write_sites(tmp, 2)
    settings = {"num-server-rounds": 2, "seed": 5}
    here = run(LoopbackGrid(client_app, nodes(tmp, sites)), tmp, **settings)
    cfgs = nodes(tmp, sites, **{"worker-socket": worker.path, "worker-key-file": worker.key_file})
    for i, cfg in enumerate(cfgs.values()):
        cfg["cache-dir"] = str(tmp / f"worker-node{i}")
    there = run(LoopbackGrid(client_app, cfgs), tmp, **settings, **{"out-dir": str(tmp / "w")})
    assert len(worker.worker.sites) == 2  # one warm site per node of this run
    for a, b in zip(
        [here["initial_eval"], *here["rounds"]],
        [there["initial_eval"], *there["rounds"]],
        strict=True,
    ):
        assert a["eval_accuracy"] == pytest.approx(b["eval_accuracy"], abs=1e-6)
        assert a["eval_confusion"] == b["eval_confusion"]
    for a, b in zip(here["rounds"], there["rounds"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    heads = [CheckpointStore(tmp / d / "checkpoints").load() for d in ("out", "w")]
    for x, y in zip(heads[0].arrays, heads[1].arrays, strict=True):
        # another thread, another thread pool: float32 sums in another order
        np.testing.assert_allclose(x, y, rtol=0, atol=5e-5)
    # each worker-trained site kept its run record (its proof for a missed model)
    assert (tmp / "worker-node0" / "runs" / f"{4242}.json").exists()


def test_worker_errors_arrive_as_the_same_error_and_a_stopped_worker_is_named(
    offline_world: Path, worker: WorkerService
) -> None:
    cfg = loopback_config(offline_world)
    sm = build_server_model(cfg)
    spec = run_spec(cfg, sm)
    node = {"data-path": str(offline_world / "no-such-data"), "cache-dir": str(offline_world)}
    remote = RemoteSite(worker.path, worker.key_file, node, spec, 4242)
    head = sm.trainable.get(sm.model)
    with pytest.raises(DataError, match="no-such-data does not exist"):
        remote.train(head, fit_settings(cfg, sm.trainable), evaluates=False)

    # a request it cannot read leaves it serving the next one
    with Client(worker.path, family="AF_UNIX", authkey=Path(worker.key_file).read_bytes()) as c:
        c.send_bytes(b"nojson")
        # closed, without an answer (a send may already find it closed)
        with pytest.raises((EOFError, ConnectionResetError, BrokenPipeError)):
            c.send_bytes(b"x")
            c.recv_bytes()
    with pytest.raises(DataError):
        remote.evaluate(head, statistics=False)
    with pytest.raises(FederationError, match="does not know the request 'steal'"):
        remote._call({"op": "steal"}, head)

    worker.stop()
    with pytest.raises(FederationError, match=r"worker key .* cannot be read|does not answer"):
        remote.evaluate(head, statistics=False)
    assert not Path(worker.path).exists()
