"""Site mods: message kinds for the metrics, and the update check's place before masking."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from flwr.app import ConfigRecord, ConfigScalar, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod.utils import make_ffn
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedhead.cli.metrics import SITE_MESSAGE_KINDS
from fedhead.client.mods import MESSAGE_KINDS, message_kind, train_mods
from fedhead.common.errors import FederationError
from fedhead.common.telemetry import SiteRefusedUpdate
from tests.conftest import round_settings
from tests.loopback import RUN_ID, set_task_identity


def _msg(message_type: str, stage: ConfigScalar | None = None) -> Message:
    set_task_identity()
    content = RecordDict()
    if stage is not None:
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: stage})
    return Message(content, dst_node_id=1, message_type=message_type)


@pytest.mark.parametrize(
    ("message_type", "stage", "kind"),
    [
        ("train", None, "train"),
        ("train", "setup", "secagg_setup"),
        ("train", "share_keys", "secagg_share_keys"),
        ("train", "collect_masked_vectors", "train"),  # the stage that trains
        ("train", "unmask", "secagg_unmask"),
        ("train", "steal", "other"),
        ("train", 3, "other"),
        ("evaluate", None, "evaluate"),
        ("query.prepare", None, "prepare"),
        ("query.models", None, "models"),
        ("query.outcome", None, "outcome"),
        ("query.anything_a_server_makes_up", None, "other"),
    ],
)
def test_a_message_kind_is_one_of_a_bounded_set(
    message_type: str, stage: ConfigScalar | None, kind: str
) -> None:
    assert message_kind(_msg(message_type, stage)) == kind


def test_the_exporter_pre_initialises_every_kind() -> None:
    assert set(MESSAGE_KINDS) == set(SITE_MESSAGE_KINDS)


# --- an honest site's non-finite update never reaches SecAgg+'s quantizer ----------------
def _chain(mods: list[Mod], handler: ClientAppCallable) -> ClientAppCallable:
    """``handler`` wrapped in ``mods`` (outermost first), as a ClientApp wraps it."""
    return make_ffn(handler, mods)


def _collect_stage(arrays: list[np.ndarray], dp_clip: bool) -> tuple[Message, Context]:
    """The SecAgg+ train message that trains and masks (stage collect_masked_vectors),
    for a node whose SecAgg+ state has shared its keys."""
    set_task_identity()
    config = round_settings(clipping_range=8.0).to_config()
    if dp_clip:
        config[KEY_CLIPPING_NORM] = 1.0
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), config), True)
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
        {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []}
    )
    state = RecordDict(
        {
            RECORD_KEY_STATE: ConfigRecord(
                {
                    "current_stage": Stage.SHARE_KEYS,
                    "clipping_range": 8.0,
                    "target_range": 2**22,
                    "max_weight": 1000.0,
                }
            )
        }
    )
    msg = Message(content, dst_node_id=5, message_type=MessageType.TRAIN, group_id="1")
    return msg, Context(RUN_ID, 5, node_config={}, state=state, run_config={})


class _Quantized(Exception):
    """Raised by the quantizer stand-in: the update reached it."""


# DP clipping scales an infinite update by clip / inf = 0, and numpy warns on inf * 0.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("dp_clip", [False, True])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_update_is_refused_before_masking(
    monkeypatch: pytest.MonkeyPatch, bad: float, dp_clip: bool
) -> None:
    """Flower's quantizer clips inf to the clipping range (a maximal poison): the site's
    update check, inside the SecAgg+ mod and outside DP clipping, refuses it first."""
    secaggplus = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    reached: list[list[np.ndarray]] = []

    def quantize(parameters: list[np.ndarray], *args: object) -> list[np.ndarray]:
        reached.append(parameters)
        raise _Quantized

    monkeypatch.setattr(secaggplus, "quantize", quantize)
    start = [np.zeros(4, np.float32)]

    def trainer(trained: np.ndarray) -> ClientAppCallable:
        def handler(msg: Message, ctx: Context) -> Message:
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([trained]), 7, {})
            return Message(compat.fitres_to_recorddict(res, False), reply_to=msg)

        return handler

    honest = _chain(train_mods(), trainer(np.array([0.1, 0.2, 0.0, 0.0], np.float32)))
    with pytest.raises(_Quantized):  # the control: a finite update is masked
        honest(*_collect_stage(start, dp_clip))
    assert len(reached) == 1 and all(np.isfinite(a).all() for a in reached[0])

    diverged = _chain(train_mods(), trainer(np.array([0.1, bad, 0.0, 0.0], np.float32)))
    refused: list[object] = []
    monkeypatch.setattr("fedhead.client.mods.emit", refused.append)
    with pytest.raises(FederationError, match="non-finite values in tensor 0; not sending it"):
        diverged(*_collect_stage(start, dp_clip))
    assert len(reached) == 1  # never quantized
    assert refused == [SiteRefusedUpdate("non_finite")]


def test_inner_train_mods_change_what_the_site_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train_mods(inner=...)`` puts a mod just inside SecAgg+, outside the site's own
    update check: the update it passes on is the one Flower quantizes, even one the
    check refuses when the handler itself produces it (how tests' attacking sites send
    what an honest site never would)."""
    secaggplus = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    reached: list[list[np.ndarray]] = []

    def quantize(parameters: list[np.ndarray], *args: object) -> list[np.ndarray]:
        reached.append([a.copy() for a in parameters])
        raise _Quantized

    def trainer(scale: float) -> ClientAppCallable:
        def handler(msg: Message, ctx: Context) -> Message:
            trained = [scale * np.array([0.25, 0.5, 0.0, 0.0], np.float32)]
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(trained), 7, {})
            return Message(compat.fitres_to_recorddict(res, False), reply_to=msg)

        return handler

    def inflated(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctx)
        res = compat.recorddict_to_fitres(reply.content, False)
        res.parameters = ndarrays_to_parameters(
            [100 * a for a in parameters_to_ndarrays(res.parameters)]
        )
        return Message(compat.fitres_to_recorddict(res, False), reply_to=msg)

    monkeypatch.setattr(secaggplus, "quantize", quantize)
    start = [np.zeros(4, np.float32)]  # the update is the trained tensor itself
    with pytest.raises(FederationError, match=r"50 lies outside the SecAgg\+ clipping range"):
        _chain(train_mods(), trainer(100.0))(*_collect_stage(start, dp_clip=False))
    for inner in ([], [inflated]):
        with pytest.raises(_Quantized):
            _chain(train_mods(inner), trainer(1.0))(*_collect_stage(start, dp_clip=False))
    plain, changed = reached
    assert np.abs(plain[0]).max() > 0
    np.testing.assert_allclose(changed[0], 100 * plain[0], rtol=1e-6)
