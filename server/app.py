"""fedhead's Flower ServerApp: reads the run configuration and runs the federation
(``server.run``), or, with ``deliver-from``, only delivers a finished run's model to
sites that lack it (``server.delivery``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhead.common.config import RunConfig
from fedhead.common.errors import FedheadError
from fedhead.common.logs import setup_logging
from fedhead.server.delivery import deliver_only
from fedhead.server.grids import PromptGrid
from fedhead.server.recorder import ReportCallback
from fedhead.server.report import REPORT_LOG_PREFIX
from fedhead.server.run import run_federation

log = logging.getLogger(__name__)


class HandledRefusal(logging.Filter):
    """Flower's crash banner, dropped for a refusal the ServerApp already said in one
    line (a ``FedheadError``: a refused resume or delivery, too few sites): Flower logs
    "ServerApp raised an exception" with the traceback, then "Exit Code: 201" with its
    help text. The run still ends failed, with the reason in its details."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        if message.endswith("raised an exception") and isinstance(error, FedheadError):
            self.dropped = True
            return False
        return not (self.dropped and message.startswith("Exit Code:"))


def make_server_app(
    config: RunConfig | None = None,
    out_dir: Path | None = None,
    on_report: ReportCallback | None = None,
) -> ServerApp:
    """A ServerApp for ``config`` (default: the run config Flower passes in), writing to
    ``out_dir`` (default: the config's); ``on_report`` gets the report as the run goes."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        grid = PromptGrid(grid)  # replies are read as they arrive, not up to 3 s later
        try:
            cfg = config or RunConfig.from_mapping(context.run_config)
            if cfg.deliver_from:
                deliver_only(grid, context, cfg)
                return
            report = run_federation(grid, context, cfg, out_dir, on_report)
        except FedheadError as err:
            log.error("%s: %s", err.title, err)
            logging.getLogger("flwr").addFilter(HandledRefusal())
            raise
        # The report travels to the operator in the run's log (`fedhead run` keeps it).
        log.info("%s%s", REPORT_LOG_PREFIX, json.dumps(report.to_json(), separators=(",", ":")))

    return server_app


setup_logging()
app = make_server_app()
