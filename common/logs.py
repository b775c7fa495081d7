"""Logging set-up shared by the CLI, the ServerApp and the ClientApp."""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)s fedhead.%(name_short)s: %(message)s"


class _ShortName(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.name_short = record.name.removeprefix("fedhead.")
        return True


def setup_logging(level: str | None = None) -> None:
    """Log fedhead's messages to stderr once per process (level from FEDHEAD_LOG_LEVEL)."""
    logger = logging.getLogger("fedhead")
    if any(getattr(h, "_fedhead", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler._fedhead = True  # type: ignore[attr-defined]
    handler.addFilter(_ShortName())
    handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level or os.environ.get("FEDHEAD_LOG_LEVEL", "INFO"))
    logger.propagate = False
