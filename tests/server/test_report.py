"""tests/reports.py's typed view of report.json names exactly what the report writes."""

from __future__ import annotations

import dataclasses

from fedhead.common.rounds import RoundResult
from fedhead.server.report import RunReport
from tests.reports import ReportJson, RoundJson

NEVER_WRITTEN = {"final_arrays"}  # kept for the model package, dropped by to_json()


def test_the_report_json_type_names_every_field_of_the_run_report() -> None:
    fields = {f.name for f in dataclasses.fields(RunReport)} - NEVER_WRITTEN
    assert set(ReportJson.__annotations__) == fields
    written = RunReport(run_id=1, backbone={}, clients=0, input_size=32, config={}).to_json()
    assert set(written) == fields


def test_the_round_json_type_names_every_field_of_a_round_result() -> None:
    fields = {f.name for f in dataclasses.fields(RoundResult)}
    assert set(RoundJson.__annotations__) == fields
    report = RunReport(1, {}, 0, 32, {}, initial_eval=RoundResult(0), rounds=[RoundResult(1)])
    written = report.to_json()
    assert set(written["initial_eval"]) == set(written["rounds"][0]) == fields
