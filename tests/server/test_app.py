"""The ServerApp's refusals read as one line, not as a crash."""

from __future__ import annotations

import logging

from fedhead.common.errors import FederationError
from fedhead.server.app import HandledRefusal


def _record(message: str, error: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(error), error, None) if error else None
    return logging.LogRecord("flwr", logging.ERROR, __file__, 1, message, (), exc_info)


def test_flowers_crash_banner_is_dropped_for_a_handled_refusal_only() -> None:
    refusal = FederationError("only 1 of the 2 required site(s) connected", "start more")
    dropped = HandledRefusal()
    assert not dropped.filter(_record("ServerApp raised an exception", refusal))
    assert not dropped.filter(_record("Exit Code: 201\nServerApp failed"))
    assert dropped.filter(_record("another line"))
    crash = HandledRefusal()  # a real bug keeps Flower's traceback and exit message
    assert crash.filter(_record("ServerApp raised an exception", KeyError("x")))
    assert crash.filter(_record("Exit Code: 201\nServerApp failed"))
