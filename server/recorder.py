"""Records a run as it happens: the report, the log lines and the statistics events.

The round loop calls it at each step of the run; it never changes what the run does.
Whoever watches the run in the same process (``fedhead demo``) gets the report through
one callback, called whenever a round completed and once the run finished.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from fedhead.common.config import RunConfig
from fedhead.common.model import count_params
from fedhead.common.protocol import RunSpec
from fedhead.common.rounds import RoundResult
from fedhead.common.telemetry import RoundStarted, RunPrepared, emit
from fedhead.server.aggregation import Arrays
from fedhead.server.checkpoints import Checkpoint
from fedhead.server.prepare import Roster
from fedhead.server.report import TABLE_HEADER, RunReport, table_row
from fedhead.server.resume import resumed_from
from fedhead.server.server_model import ServerModel

log = logging.getLogger(__name__)

ReportCallback = Callable[[RunReport], None]


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


class Recorder:
    """Fills the run's report step by step and emits the matching events."""

    def __init__(
        self, report: RunReport, sm: ServerModel, on_report: ReportCallback | None = None
    ) -> None:
        self.report = report
        self.sm = sm
        self.on_report = on_report
        self._table = False  # the table's header is in the log

    def resumed(self, ckpt: Checkpoint) -> None:
        """The run continues a checkpoint: the rounds before it are the report's too."""
        # a checkpoint's round that is not complete (a closed-form round before the sites
        # chose its head) is done again, and recorded then
        earlier = [r for r in ckpt.results if r.round < ckpt.round or ckpt.complete]
        self.report.initial_eval = next((r for r in earlier if r.round == 0), None)
        self.report.rounds = [r for r in earlier if r.round > 0]
        self.report.resumed_from = resumed_from(ckpt)

    def prepared(self, roster: Roster, bytes_to_sites: int, bytes_from_sites: int) -> None:
        """The sites were prepared (the traffic: every message until then, both ways)."""
        self.report.clients = len(roster.ready)
        self.report.setup = {  # sites by the labels the report uses; `sites` maps them
            "sites_ready": [roster.name(n) for n in sorted(roster.ready)],
            "sites_failed": {roster.name(k): v for k, v in sorted(roster.failed.items())},
            "backbone_sent_to": [roster.name(n) for n in sorted(roster.weights_sent_to)],
            "bytes_to_sites": bytes_to_sites,
            "bytes_from_sites": bytes_from_sites,
            "train_examples": roster.train_examples,
            # who took part, by the label each site chose (site-labels=true) or node id
            "sites": [self._site(roster, node) for node in sorted(roster.ready)],
        }
        emit(RunPrepared(self.sm.sha256, len(roster.ready), self.sm.trainable.num_params))

    def joined(self, roster: Roster, nodes: list[int]) -> None:
        """Sites that joined the run under way (prepared then): ``roster`` is the run's."""
        setup = self.report.setup
        setup["sites_ready"] = [roster.name(n) for n in sorted(roster.ready)]
        setup["sites_failed"] = {roster.name(k): v for k, v in sorted(roster.failed.items())}
        setup["backbone_sent_to"] = [roster.name(n) for n in sorted(roster.weights_sent_to)]
        setup.setdefault("sites", []).extend(
            self._site(roster, node, joined=True) for node in nodes if node in roster.ready
        )
        self.report.clients = len(roster.ready)

    @staticmethod
    def _site(roster: Roster, node: int, joined: bool = False) -> dict[str, Any]:
        """report.json's entry for a site (``joined``: it joined the run under way)."""
        reply = roster.ready[node]
        return {
            "node_id": node,
            "name": roster.name(node),
            "train_examples": reply.train_examples,
            "val_examples": reply.val_examples,
            "device": reply.device,
            "joined": joined,
        }

    def planned(
        self,
        secure_aggregation: dict[str, Any] | None,
        differential_privacy: dict[str, Any] | None,
        server_optimizer: dict[str, Any] | None,
        closed_form: dict[str, Any] | None = None,
    ) -> None:
        """How the rounds aggregate: SecAgg+'s parameters (None: plain), DP, optimizer,
        and a closed-form head's statistics round."""
        if secure_aggregation is not None:
            self.report.secure_aggregation = "secagg+"
            self.report.secure_aggregation_params = secure_aggregation
        self.report.differential_privacy = differential_privacy
        self.report.server_optimizer = server_optimizer
        self.report.closed_form = closed_form

    def round_started(self, server_round: int) -> None:
        emit(RoundStarted(server_round))

    def round_completed(self, result: RoundResult, arrays: Arrays) -> None:
        """A round (0: the initial head's evaluation) is complete, its evaluation in."""
        self.report.final_arrays = [a.copy() for a in arrays]
        if result.round == 0:
            self.report.initial_eval = result
            log.info("initial head: federated eval accuracy %.4f", result.eval_accuracy)
            self._table_header()
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
        self._table_header()  # a closed-form or resumed run has no round 0 before it
        log.info("%s", table_row(result))
        if self.on_report:
            self.on_report(self.report)

    def _table_header(self) -> None:
        if not self._table:
            log.info("%s", TABLE_HEADER)
            self._table = True

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

    def finished(self) -> None:
        """The run is done: whoever listens gets the final report."""
        if self.on_report:
            self.on_report(self.report)
