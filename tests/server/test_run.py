"""What makes a run fail though every message was answered: most rounds produced no
new global head (the model is not what the rounds were meant to train)."""

from __future__ import annotations

import pytest

from fedhead.common.errors import FederationError
from fedhead.common.rounds import RoundResult
from fedhead.server.report import RunReport
from fedhead.server.run import require_progress


def _report(*aggregated: bool) -> RunReport:
    report = RunReport(run_id=1, backbone={}, clients=3, input_size=64, config={})
    report.rounds = [
        RoundResult(i + 1, aggregated=a, secagg_halted="" if a else "unmask")
        for i, a in enumerate(aggregated)
    ]
    return report


def test_a_run_whose_rounds_mostly_halted_fails_naming_them() -> None:
    require_progress(_report(True, False))  # half the rounds: the run stands
    require_progress(_report(True, True, False))
    with pytest.raises(FederationError, match="2 of 3 rounds produced no new global head"):
        require_progress(_report(True, False, False))  # every round after the first halted
    with pytest.raises(FederationError, match="no round produced a new global head") as err:
        require_progress(_report(False))
    assert "round 1: secure aggregation halted at unmask" in str(err.value)
