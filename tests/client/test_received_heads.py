"""A site refuses a head that is not exactly the run's trainable tensors, from the
tensors' declared shapes, before anything decodes them."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import EvaluateIns, FitIns, ndarray_to_bytes, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fedhead.client.app import app as client_app
from fedhead.client.guard import RECORD_TRAINABLE, check_declared, declared, keep_trainable
from fedhead.client.mods import head_check_mod
from fedhead.common.backbones import get_spec
from fedhead.common.config import RunConfig
from fedhead.common.errors import FederationError, ModelMismatchError, RefusedHeadError
from fedhead.common.model import FedHeadModel, TrainableSet
from fedhead.common.protocol import (
    MSG_OUTCOME,
    MSG_PREPARE,
    RECORD_OUTCOME_HEAD,
    RECORD_RUN,
)
from fedhead.common.telemetry import SiteRefusedHead
from fedhead.server.server_model import build_server_model, fit_settings, run_spec
from tests.conftest import REPO, round_settings
from tests.loopback import RUN_ID, LoopbackGrid, set_task_identity

SET = TrainableSet.of(FedHeadModel(get_spec("mobilenet_v2"), None, num_classes=2))
HEAD = [np.zeros((2, 1280), np.float32), np.zeros(2, np.float32)]


def _context(trainable: TrainableSet | None = SET) -> Context:
    state = RecordDict()
    if trainable is not None:
        state.config_records[RECORD_TRAINABLE] = ConfigRecord({"set": trainable.to_json()})
    return Context(RUN_ID, 5, node_config={}, state=state, run_config={})


def _train(arrays: list[np.ndarray]) -> Message:
    set_task_identity()
    ins = FitIns(ndarrays_to_parameters(arrays), round_settings().to_config())
    return Message(compat.fitins_to_recorddict(ins, True), dst_node_id=5, message_type="train")


def _evaluate(arrays: list[np.ndarray]) -> Message:
    set_task_identity()
    ins = EvaluateIns(ndarrays_to_parameters(arrays), {"server_round": 1})
    content = compat.evaluateins_to_recorddict(ins, True)
    return Message(content, dst_node_id=5, message_type="evaluate")


def _decoded(msg: Message, ctx: Context) -> Message:
    raise AssertionError("the head reached the handler")


@pytest.fixture
def refusals(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    seen: list[object] = []
    monkeypatch.setattr("fedhead.client.guard.emit", seen.append)
    return seen


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ([np.zeros((2, 1280), np.float32)], "holds 1 tensors, the run's trainable set 2"),
        ([np.zeros((3, 1280), np.float32), HEAD[1]], r"tensor 0 is float32\[3, 1280\]"),
        ([HEAD[0].astype(np.float64), HEAD[1]], r"tensor 0 is float64\[2, 1280\]"),
        ([HEAD[0], np.zeros(25_000_000, np.float32)], r"tensor 1 is float32\[25000000\]"),
    ],
)
def test_a_train_or_evaluate_head_of_another_shape_is_refused_undecoded(
    arrays: list[np.ndarray], problem: str, refusals: list[object]
) -> None:
    for msg in (_train(arrays), _evaluate(arrays)):
        with pytest.raises(RefusedHeadError, match=problem):
            head_check_mod(msg, _context(), _decoded)
    assert refusals == [SiteRefusedHead("shape")] * 2


def test_the_run_s_own_head_passes(refusals: list[object]) -> None:
    def handler(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict(), reply_to=msg)

    for msg in (_train(HEAD), _evaluate(HEAD)):
        assert not head_check_mod(msg, _context(), handler).has_error()
    assert refusals == []


def test_a_declaration_that_the_bytes_contradict_is_refused(refusals: list[object]) -> None:
    """An outcome request's Array declares float32[2, 1280], its bytes hold more."""
    set_task_identity()
    big = ndarray_to_bytes(np.zeros((200, 1280), np.float32))
    lying = Array(data=big, dtype="float32", stype="numpy.ndarray", shape=(2, 1280))
    record = ArrayRecord({"0": lying, "1": Array(HEAD[1])})
    msg = Message(
        RecordDict({RECORD_OUTCOME_HEAD: record}), dst_node_id=5, message_type=MSG_OUTCOME
    )
    with pytest.raises(RefusedHeadError, match=r"declared float32\[2, 1280\] holding"):
        head_check_mod(msg, _context(), _decoded)
    trailing = Array(
        data=ndarray_to_bytes(HEAD[1]) + b"\0" * 64, dtype="", stype="numpy.ndarray", shape=()
    )
    with pytest.raises(ValueError, match=r"a float32\[2\] tensor in 200 bytes"):
        declared(trailing)
    with pytest.raises(ValueError, match="not numpy"):
        declared(Array(data=b"x", dtype="", stype="torch.Tensor", shape=()))


def test_nothing_may_ride_beside_the_head_and_an_unprepared_node_refuses(
    refusals: list[object],
) -> None:
    msg = _train(HEAD)
    msg.content.array_records["extra"] = ArrayRecord({"0": Array(np.zeros(10, np.uint8))})
    with pytest.raises(RefusedHeadError, match=r"besides its head, e\.g\. 'extra'"):
        head_check_mod(msg, _context(), _decoded)
    with pytest.raises(FederationError, match="not prepared for the run"):
        head_check_mod(_train(HEAD), _context(None), _decoded)


def test_a_prepared_node_keeps_the_set_it_computed_itself(mobilenet_weights: Path) -> None:
    other = TrainableSet.of(FedHeadModel(get_spec("mobilenet_v2"), None, num_classes=3))
    cfg = RunConfig.from_mapping({"classes": "a,b", "input-size": 32})
    spec = run_spec(cfg, build_server_model(cfg))
    ctx = _context(None)
    with pytest.raises(ModelMismatchError, match="other trainable tensors than the server's"):
        keep_trainable(ctx, other, spec)
    keep_trainable(ctx, SET, spec)
    check_declared(_train(HEAD).content.array_records["fitins.parameters"], SET, "a head")


def test_a_100_mb_head_reaches_a_prepared_site_and_is_refused(
    tmp_path: Path, image_folder: Path, mobilenet_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the real ClientApp: prepared by the server's own description, then sent a
    train message whose head is 100 MB: an error reply naming the kind of problem."""
    cfg = RunConfig.from_mapping({"classes": "normal,pneumonia", "input-size": 32})
    sm = build_server_model(cfg)
    node = {"data-path": str(image_folder), "cache-dir": str(tmp_path / "c")}
    grid = LoopbackGrid(client_app, {7: node})
    prepare = Message(
        RecordDict({RECORD_RUN: run_spec(cfg, sm).to_record()}),
        dst_node_id=7,
        message_type=MSG_PREPARE,
    )
    (ready,) = grid.send_and_receive([prepare], timeout=30)
    assert not ready.has_error()
    huge = [np.zeros((2, 1280), np.float32), np.zeros(25_000_000, np.float32)]
    ins = FitIns(ndarrays_to_parameters(huge), fit_settings(cfg, sm.trainable).to_config())
    msg = Message(compat.fitins_to_recorddict(ins, True), dst_node_id=7, message_type="train")
    (reply,) = grid.send_and_receive([msg], timeout=30)
    assert reply.has_error()
    assert reply.error.reason == "RefusedHeadError: refused head (details in the site's log)"
    assert "tensor 1 is float32[25000000], the run's head.0.bias is float32[2]" in caplog.text


_PEAK_PROBE = """
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from fedhead.client.guard import RECORD_TRAINABLE
from fedhead.client.mods import head_check_mod
from fedhead.common.backbones import get_spec
from fedhead.common.errors import RefusedHeadError
from fedhead.common.model import FedHeadModel, TrainableSet
from tests.conftest import round_settings
from tests.loopback import set_task_identity

def peak_kib():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

set_task_identity()
trainable = TrainableSet.of(FedHeadModel(get_spec("mobilenet_v2"), None, num_classes=2))
state = RecordDict({RECORD_TRAINABLE: ConfigRecord({"set": trainable.to_json()})})
ctx = Context(1, 5, node_config={}, state=state, run_config={})
params = ndarrays_to_parameters([np.zeros((2, 1280), np.float32), np.zeros(25_000_000, np.float32)])
msg = Message(compat.fitins_to_recorddict(FitIns(params, round_settings().to_config()), True),
              dst_node_id=5, message_type="train")
del params

def decode(m, c):
    fitins = compat.recorddict_to_fitins(m.content, keep_input=True)
    return [a.copy() for a in parameters_to_ndarrays(fitins.parameters)]

reset(); before = peak_kib()
try:
    head_check_mod(msg, ctx, decode)
    refused = False
except RefusedHeadError:
    refused = True
checked = peak_kib() - before
reset(); before = peak_kib()
decode(msg, ctx)
print(repr((refused, checked, peak_kib() - before)))
"""


def test_refusing_a_100_mb_head_costs_no_memory() -> None:
    """In a fresh process: the check grows the peak by under 10 MB; decoding the same
    head, the control, by at least its 100 MB."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True, check=True, cwd=REPO
    )
    refused, checked_kib, decoded_kib = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert refused and checked_kib < 10_000 and decoded_kib > 90_000


def test_the_exporter_pre_initialises_every_refusal() -> None:
    from fedhead.cli.metrics import SITE_HEAD_REFUSALS
    from fedhead.client.guard import REFUSALS

    assert set(REFUSALS) == set(SITE_HEAD_REFUSALS)


def test_a_crafted_initial_head_is_refused_and_the_runs_own_is_trained_from(
    tmp_path: Path, image_folder: Path, mobilenet_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The probe of issue 26: a round-0 head with one direction pointing at one image's
    features would show, through the site's evaluation, whether that image is in its
    split. The site recomputes the run's initial head from the seed and takes only it."""
    cfg = RunConfig.from_mapping({"classes": "normal,pneumonia", "input-size": 32, "seed": 4})
    sm = build_server_model(cfg)
    node = {"data-path": str(image_folder), "cache-dir": str(tmp_path / "c")}
    grid = LoopbackGrid(client_app, {7: node})
    prepare = Message(
        RecordDict({RECORD_RUN: run_spec(cfg, sm).to_record()}),
        dst_node_id=7,
        message_type=MSG_PREPARE,
    )
    (ready,) = grid.send_and_receive([prepare], timeout=30)
    assert not ready.has_error()
    honest = sm.trainable.get(sm.model)
    probe = [a.copy() for a in honest]
    features = np.random.default_rng(0).normal(size=(honest[0].shape[1],)).astype(np.float32)
    probe[0][1] += 5 * features / np.linalg.norm(features)  # "pneumonia" along one image
    settings = fit_settings(cfg, sm.trainable)

    def train(head: list[np.ndarray]) -> Message:
        config = dataclasses.replace(settings, server_round=1).to_config()
        ins = FitIns(ndarrays_to_parameters(head), config)
        msg = Message(compat.fitins_to_recorddict(ins, True), dst_node_id=7, message_type="train")
        (reply,) = grid.send_and_receive([msg], timeout=60)
        return reply

    def evaluate(head: list[np.ndarray]) -> Message:
        ins = EvaluateIns(ndarrays_to_parameters(head), {"server_round": 0})
        content = compat.evaluateins_to_recorddict(ins, True)
        (reply,) = grid.send_and_receive(
            [Message(content, dst_node_id=7, message_type="evaluate")], timeout=60
        )
        return reply

    for reply in (evaluate(probe), train(probe)):
        assert reply.error.reason == "RefusedHeadError: refused head (details in the site's log)"
    assert "the initial head sent is not run 4242's initial head" in caplog.text
    assert not evaluate(honest).has_error()
    assert not train(honest).has_error()
