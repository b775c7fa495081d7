"""Flower mods wrapping the site's handlers: audit, errors, secure aggregation, encoding.

Order matters (outermost first). App-wide: ``audit_mod`` records the message that
finally leaves the site; ``metrics_mod`` counts and times it; ``errors_mod`` turns a
fedhead error into one log line and an error reply; ``head_check_mod`` refuses a head
that is not the run's trainable set before anything decodes it. Around ``train``:

1. ``secagg_mod``: Flower's SecAgg+ client protocol, when the server runs SecAgg+;
   the update is masked after everything below has run.
2. ``update_check_mod``: refuses to send an update that is not finite, exceeds the
   run's norm bound, or would be clipped by SecAgg+'s quantization range.
3. ``delta_mod``: sends the change from the global tensors instead of raw weights
   (small values that fit SecAgg+'s clipping range).
4. ``dp_clip_mod``: Flower's client-side fixed clipping, when the run uses DP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import (
    FitIns,
    FitRes,
    bytes_to_ndarray,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedhead.client.guard import check_declared, prepared_trainable, refuse
from fedhead.common.errors import FederationError, FedheadError
from fedhead.common.files import append_line
from fedhead.common.heads import global_norm
from fedhead.common.protocol import (
    MSG_OUTCOME,
    RECORD_OUTCOME_HEAD,
    TASK_KEY,
    TASK_STATISTICS,
    FitSettings,
)
from fedhead.common.telemetry import SiteMessage, SiteRefusedUpdate, emit

log = logging.getLogger(__name__)

# Error codes fedhead puts in error replies: base + the error's process exit code.
ERROR_CODE_BASE = 1000


def errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A FedheadError becomes one clear line in the site's log and an error reply.

    The reply names only the kind of problem: the full line can hold local paths and
    file names, which stay on the site.
    """
    try:
        return call_next(msg, context)
    except FedheadError as err:
        log.error("%s: %s", err.title, err)
        reason = f"{type(err).__name__}: {err.title} (details in the site's log)"
        return Message(Error(code=ERROR_CODE_BASE + err.exit_code, reason=reason), reply_to=msg)
    except Exception as err:  # a bug or an unforeseen failure: its text may name local files
        log.exception("unexpected error while handling a %s message", msg.metadata.message_type)
        reason = f"{type(err).__name__}: unexpected error (details in the site's log)"
        return Message(Error(code=ERROR_CODE_BASE + 1, reason=reason), reply_to=msg)


# The kinds a site's message metrics are labelled with (a bounded set: ``cli.metrics``
# pre-initialises them): fedhead's messages, and the SecAgg+ stages of a train message
# other than the one that trains (key setup, key sharing, unmasking); anything else the
# server sends is "other".
_KINDS = {
    MessageType.TRAIN: "train",
    MessageType.EVALUATE: "evaluate",
    **{
        f"query.{k}": k
        for k in ("prepare", "weights", "model", "models", "outcome", "validate")  # client.app's
    },
}
_SECAGG_KINDS = {
    Stage.SETUP: "secagg_setup",
    Stage.SHARE_KEYS: "secagg_share_keys",
    Stage.COLLECT_MASKED_VECTORS: "train",  # the stage that trains and masks the update
    Stage.UNMASK: "secagg_unmask",
}
MESSAGE_KINDS = (*dict.fromkeys([*_KINDS.values(), *_SECAGG_KINDS.values()]), "other")


def message_kind(msg: Message) -> str:
    """What a message from the server is, as a metrics label (one of MESSAGE_KINDS)."""
    kind = _KINDS.get(msg.metadata.message_type, "other")
    if kind == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
        stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
        return _SECAGG_KINDS.get(stage, "other") if isinstance(stage, str) else "other"
    return kind


def metrics_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Count and time every message the site handles (for the site's own exporter)."""
    kind = message_kind(msg)  # before the SecAgg+ mod takes the stage out of the message
    t0 = time.perf_counter()
    ok = False
    try:
        reply = call_next(msg, context)
        ok = not reply.has_error()
        return reply
    finally:
        emit(SiteMessage(kind, ok, time.perf_counter() - t0))


# Where a message that carries a head holds it (legacy Parameters in train and evaluate
# messages; the run's initial head in an outcome request).
_HEAD_RECORDS = {
    MessageType.TRAIN: "fitins.parameters",
    MessageType.EVALUATE: "evaluateins.parameters",
    MSG_OUTCOME: RECORD_OUTCOME_HEAD,
}


def head_check_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A head from the server must be exactly the run's trainable tensors: checked from
    the tensors' declared shapes and dtypes before anything decodes them, so an
    oversized head costs the site no more memory than the bytes it arrived in
    (``client.guard``). Nothing else may ride along in the message's array records."""
    where = _HEAD_RECORDS.get(msg.metadata.message_type)
    records = msg.content.array_records
    if where is not None and records and _statistics_request(msg):
        if set(records[where]) - {"_empty"}:  # a request for statistics carries no head
            # (Flower writes "_empty" for a legacy Parameters without tensors)
            raise refuse("shape", "a request for statistics carries tensors")
        return call_next(msg, context)
    if where is not None and records:
        kind = message_kind(msg)
        if other := sorted(set(records) - {where}):
            raise refuse(
                "shape",
                f"a {kind} message carries {len(other)} array record(s) besides its head, "
                f"e.g. {other[0][:40]!r}",
                "server and site must run the same fedhead version",
            )
        check_declared(records[where], prepared_trainable(context), f"the {kind} message's head")
    return call_next(msg, context)


def _statistics_request(msg: Message) -> bool:
    """A train message that asks for statistics (read before the FitIns is decoded)."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return False
    config = msg.content.config_records.get("fitins.config")
    return config is not None and config.get(TASK_KEY) == TASK_STATISTICS


def describe_message(msg: Message) -> dict[str, Any]:
    """What a message carries, without its secrets: names, shapes, sizes, scalar metrics."""
    out: dict[str, Any] = {
        "time": round(time.time(), 3),
        "message_type": msg.metadata.message_type,
        "run_id": msg.metadata.run_id,
        "src_node_id": msg.metadata.src_node_id,
        "dst_node_id": msg.metadata.dst_node_id,
        "group_id": msg.metadata.group_id,
    }
    if msg.has_error():
        out["error"] = {"code": msg.error.code, "reason": msg.error.reason}
        return out
    content = msg.content
    out["arrays"] = {
        rec_name: {key: _describe_array(arr) for key, arr in rec.items()}
        for rec_name, rec in content.array_records.items()
    }
    out["metrics"] = {name: dict(rec) for name, rec in content.metric_records.items()}
    out["configs"] = {
        name: {key: _describe_value(v) for key, v in rec.items()}
        for name, rec in content.config_records.items()
    }
    return out


def _describe_array(arr: Array) -> dict[str, Any]:
    shape, dtype = list(arr.shape), arr.dtype
    if not dtype and arr.stype == "numpy.ndarray":  # legacy Parameters: npy bytes
        decoded = bytes_to_ndarray(arr.data)
        shape, dtype = list(decoded.shape), str(decoded.dtype)
    return {
        "shape": shape,
        "dtype": dtype,
        "nbytes": len(arr.data),
        "sha256": hashlib.sha256(arr.data).hexdigest()[:16],
    }


def _describe_value(v: Any) -> Any:
    """Scalars as they are; bytes and lists by type and size (SecAgg+ key material)."""
    if isinstance(v, bytes):
        return {"type": "bytes", "len": len(v)}
    if isinstance(v, list):
        kinds = sorted({type(x).__name__ for x in v})
        return {
            "type": f"list[{'|'.join(kinds)}]",
            "len": len(v),
            "bytes": sum(len(x) if isinstance(x, bytes | str) else 8 for x in v),
        }
    return v


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Append a description of every message this site sends to the node's audit log."""
    reply = call_next(msg, context)
    path = str(context.node_config.get("audit-log", ""))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        append_line(Path(path), json.dumps(describe_message(reply), default=str))
    return reply


_DECODED: ContextVar[tuple[Message, FitIns] | None] = ContextVar("fedhead_fitins", default=None)


def fitins_of(msg: Message) -> FitIns:
    """A train message's FitIns, decoded once per message: the mods around the train
    handler and the handler itself all read it (nobody changes it)."""
    held = _DECODED.get()
    if held is not None and held[0] is msg:
        return held[1]
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    _DECODED.set((msg, fitins))
    return fitins


def asks_for_statistics(config: dict[str, Any]) -> bool:
    """Whether a train message asks for the site's closed-form statistics, not training."""
    return config.get(TASK_KEY) == TASK_STATISTICS


def _trained(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> tuple[FitIns, Message, FitRes | None]:
    """A train message's FitIns, the reply of the handlers below and, unless that reply
    is an error or statistics (no update), the FitRes in it."""
    fitins = fitins_of(msg)
    reply = call_next(msg, context)
    if asks_for_statistics(fitins.config):
        return fitins, reply, None
    if reply.has_error():
        return fitins, reply, None
    return fitins, reply, compat.recorddict_to_fitres(reply.content, keep_input=True)


def delta_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Replace the trained tensors in a FitRes by their change from the global tensors."""
    fitins, reply, fitres = _trained(msg, context, call_next)
    if fitres is None:
        return reply
    global_arrays = parameters_to_ndarrays(fitins.parameters)
    trained = parameters_to_ndarrays(fitres.parameters)
    if len(trained) != len(global_arrays):
        raise FederationError("local training returned another number of tensors than it got")
    fitres.parameters = ndarrays_to_parameters(
        [(t - g).astype(t.dtype) for t, g in zip(trained, global_arrays, strict=True)]
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _refusal(arrays: list[np.ndarray], settings: FitSettings) -> tuple[str, str, str] | None:
    """Why an update must not be sent: (reason label, the line, what to do); None if not."""
    for i, arr in enumerate(arrays):
        if not np.all(np.isfinite(arr)):
            return (
                "non_finite",
                f"local training produced non-finite values in tensor {i}; not sending it",
                "lower the learning rate",
            )
    norm = global_norm(arrays)
    if settings.max_update_norm and norm > settings.max_update_norm:
        return (
            "norm",
            f"this site's update has L2 norm {norm:.4g}, above the run's max-update-norm "
            f"{settings.max_update_norm:.4g}; not sending it",
            "lower the learning rate or raise max-update-norm",
        )
    largest = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    if settings.clipping_range and largest > settings.clipping_range:
        return (
            "clipping_range",
            f"an update value of {largest:.4g} lies outside the SecAgg+ clipping range "
            f"+-{settings.clipping_range:.4g} and would be clipped; not sending it",
            "lower the learning rate or raise secagg-clipping-range",
        )
    return None


def update_check_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Check this site's own update before it is masked or sent; refuse a bad one.

    Non-finite values, an L2 norm above the run's ``max-update-norm`` and values outside
    SecAgg+'s clipping range (they would be silently clipped) all stop the send. It sits
    inside the SecAgg+ mod and outside DP clipping (which turns an infinite update into
    NaN), so a non-finite value never reaches Flower's quantizer, which would clip an
    ``inf`` into the largest value the range allows.
    """
    fitins, reply, fitres = _trained(msg, context, call_next)
    if fitres is None:
        return reply
    settings = FitSettings.from_mapping(fitins.config)
    if refusal := _refusal(parameters_to_ndarrays(fitres.parameters), settings):
        reason, line, hint = refusal
        emit(SiteRefusedUpdate(reason))
        raise FederationError(line, hint)
    return reply


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ client protocol, for train messages of a SecAgg+ round."""
    is_secagg = (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )
    return secaggplus_mod(msg, context, call_next) if is_secagg else call_next(msg, context)


def dp_clip_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side fixed clipping, when the server's DP wrapper asks for it."""
    config = fitins_of(msg).config
    if KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def app_mods() -> list[Mod]:
    """Mods around every handler, outermost first (see the module docstring)."""
    return [audit_mod, metrics_mod, errors_mod, head_check_mod]


def train_mods(inner: Sequence[Mod] = ()) -> list[Mod]:
    """Mods around the train handler, outermost first (see the module docstring).

    ``inner`` mods sit just inside Flower's SecAgg+ client mod: what they change is what
    the site masks (tests build attacking sites with them; a real site has none)."""
    return [secagg_mod, *inner, update_check_mod, delta_mod, dp_clip_mod]
