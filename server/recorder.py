"""Records a run as it happens: the report, the log lines and the statistics events.

A ``RunObserver`` of the round loop: it never changes what the loop does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from fedhead.common.config import RunConfig
from fedhead.common.model import count_params
from fedhead.common.protocol import RunSpec
from fedhead.common.rounds import RoundResult
from fedhead.common.telemetry import RoundStarted, RunPrepared, emit
from fedhead.server.aggregation import Arrays
from fedhead.server.distribution import PrepareOutcome
from fedhead.server.report import TABLE_HEADER, RunReport, table_row
from fedhead.server.setup import ServerModel

log = logging.getLogger(__name__)

RoundCallback = Callable[[RoundResult], None]


def new_report(run_id: int, cfg: RunConfig, sm: ServerModel, spec: RunSpec) -> RunReport:
    """A run's report before any site joined: the backbone, the head and the config."""
    return RunReport(
        run_id=run_id,
        backbone={
            "name": sm.spec.name,
            "sha256": sm.sha256,
            "weights_file": spec.weights_file,
            "custom": spec.custom_weights,
            "trunk_params": count_params(sm.model.frozen) + count_params(sm.model.tuned),
            "head_params": sm.trainable.num_params,
            "head_bytes": sm.trainable.nbytes,
            "trainable_tensors": sm.trainable.names,
        },
        clients=0,
        input_size=spec.input_size,
        config=cfg.to_mapping(),
    )


class RunRecorder:
    """Fills the run's report round by round and emits the matching events."""

    def __init__(
        self, cfg: RunConfig, sm: ServerModel, report: RunReport, on_round: RoundCallback | None
    ) -> None:
        self.cfg = cfg
        self.sm = sm
        self.report = report
        self.on_round = on_round

    def prepared(self, outcome: PrepareOutcome) -> None:
        self.report.clients = len(outcome.ready)
        self.report.setup = {
            "sites_ready": sorted(outcome.ready),
            "sites_failed": {str(k): v for k, v in outcome.failed.items()},
            "backbone_sent_to": sorted(outcome.weights_sent_to),
            "bytes_to_sites": outcome.bytes_to_sites,
            "bytes_from_sites": outcome.bytes_from_sites,
            "train_examples": outcome.train_examples,
            # who took part, by the label each site chose (site-labels=true) or node id
            "sites": [
                {
                    "node_id": node,
                    "name": outcome.name(node),
                    "train_examples": reply.train_examples,
                    "val_examples": reply.val_examples,
                    "device": reply.device,
                }
                for node, reply in sorted(outcome.ready.items())
            ],
        }
        emit(RunPrepared(self.sm.sha256, len(outcome.ready), self.sm.trainable.num_params))

    def round_started(self, server_round: int) -> None:
        emit(RoundStarted(server_round))

    def round_trained(self, result: RoundResult, arrays: Arrays) -> None:
        pass  # the report records complete rounds only

    def round_finished(self, result: RoundResult, arrays: Arrays) -> None:
        self.report.final_arrays = [a.copy() for a in arrays]
        if result.round == 0:
            self.report.initial_eval = result
            log.info("initial head: federated eval accuracy %.4f", result.eval_accuracy)
            log.info("%s", TABLE_HEADER)
            return
        if result.dp_epsilon is not None:
            log.info(
                "round %d: privacy spent epsilon %.4g at delta %g",
                result.round,
                result.dp_epsilon,
                result.dp_delta,
            )
        self.report.rounds.append(result)
        emit(result)
        log.info("%s", table_row(result))
        if self.on_round:
            self.on_round(result)

    def finish(self, seconds: float) -> RunReport:
        """The report once the last round is done: final metrics and run time."""
        report = self.report
        finals = [r for r in report.rounds if math.isfinite(r.eval_accuracy)]
        if finals:
            report.final_eval_accuracy = finals[-1].eval_accuracy
            report.final_eval_loss = finals[-1].eval_loss
        tested = [r for r in report.rounds if math.isfinite(r.server_eval_accuracy)]
        if tested:
            report.final_server_eval_accuracy = tested[-1].server_eval_accuracy
            report.final_server_eval_loss = tested[-1].server_eval_loss
        report.seconds = seconds
        return report
