"""The ClientApp's composition: every query the server sends has a handler, and mods added
through ``build_app`` sit where its docstring says (tests' attacking sites rely on it)."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

import fedhead.common.protocol as protocol
from fedhead.client.app import QUERIES, build_app
from tests.conftest import round_settings
from tests.loopback import RUN_ID, set_task_identity


def test_every_query_the_server_sends_has_a_handler() -> None:
    sent = {
        value
        for name, value in vars(protocol).items()
        if name.startswith("MSG_") and isinstance(value, str) and value.startswith("query.")
    }
    assert {f"query.{action}" for action in QUERIES} == sent


def _spy(name: str, seen: list[str]) -> Mod:
    """A mod noting that a message reached it."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        seen.append(name)
        return call_next(msg, context)

    return mod


def _unprepared() -> Context:
    return Context(RUN_ID, 5, node_config={}, state=RecordDict(), run_config={})


def test_outer_mods_wrap_the_app_wide_mods_and_inner_ones_sit_inside_them() -> None:
    """A train message with a head, to a node that was never prepared: the head check
    (app-wide) refuses it before the train mods run, and the error mod turns that into
    the error reply the outer mod passes on."""
    set_task_identity()
    seen: list[str] = []
    app = build_app(outer=[_spy("outer", seen)], inner_train=[_spy("inner", seen)])
    ins = FitIns(ndarrays_to_parameters([np.zeros(2, np.float32)]), round_settings().to_config())
    msg = Message(compat.fitins_to_recorddict(ins, True), dst_node_id=5, message_type="train")
    reply = app(msg, _unprepared())
    assert reply.has_error() and "FederationError" in (reply.error.reason or "")
    assert seen == ["outer"]


def test_inner_train_mods_run_just_inside_secagg_around_the_train_handler() -> None:
    """A train message without a head passes the head check and reaches the inner mod;
    a query never does."""
    set_task_identity()
    seen: list[str] = []
    app = build_app(outer=[_spy("outer", seen)], inner_train=[_spy("inner", seen)])
    assert app(Message(RecordDict(), 5, MessageType.TRAIN), _unprepared()).has_error()
    assert seen == ["outer", "inner"]
    seen.clear()
    assert app(Message(RecordDict(), 5, protocol.MSG_MODELS), _unprepared()).has_error()
    assert seen == ["outer"]
