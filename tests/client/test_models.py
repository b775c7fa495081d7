"""A site's record of the runs it trained in, and the requests it makes for missed models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedhead.client.models import SiteModels
from fedhead.common.protocol import (
    MAX_MODEL_REQUESTS,
    MODEL_HELD,
    MODEL_NOT_TRAINED,
    MODEL_OTHER,
    MODEL_WANTED,
    ModelOffer,
    ModelRequest,
    RunSpec,
    format_model_requests,
    parse_model_requests,
)
from tests.client.test_untrusted_inputs import _spec

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


def spec() -> RunSpec:
    return _spec()


def hold_model(shelf: SiteModels, run_id: int) -> None:
    folder = shelf.model_dir(run_id)
    folder.mkdir(parents=True)
    (folder / "head.safetensors").write_bytes(b"stand-in: only its presence is read here")


def test_requests_round_trip_and_bad_lists_are_refused_whole() -> None:
    requests = [ModelRequest(7, SHA_A), ModelRequest(2**64 - 1, SHA_B)]
    text = format_model_requests(requests)
    assert parse_model_requests(text) == requests
    assert parse_model_requests("") == []
    too_many = [ModelRequest(i, SHA_A) for i in range(MAX_MODEL_REQUESTS + 3)]
    assert len(parse_model_requests(format_model_requests(too_many))) == MAX_MODEL_REQUESTS
    bad = [
        "7",  # no proof
        f"7:{SHA_A[:-1]}",  # short
        f"7:{SHA_A.upper()}",  # not lowercase hex
        f"../etc:{SHA_A}",  # not a run id
        f"-1:{SHA_A}",
        f"{2**64}:{SHA_A}",  # beyond a run id's range
        f"7:{SHA_A},7:{SHA_B}",  # a run twice
        f"7:{SHA_A},",  # an empty entry
        ",".join(f"{i}:{SHA_A}" for i in range(MAX_MODEL_REQUESTS + 1)),
        "9" * 5000,
    ]
    for text in bad:
        with pytest.raises(ValueError):
            parse_model_requests(text)


def test_a_site_records_the_runs_it_trains_in_with_the_latest_head_as_proof(
    tmp_path: Path,
) -> None:
    shelf = SiteModels(tmp_path)
    assert shelf.runs() == [] and shelf.missing() == []
    shelf.trained(11, spec(), 1, SHA_A)
    shelf.trained(11, spec(), 3, SHA_C)
    shelf.trained(11, spec(), 2, SHA_B)  # a late write of an earlier round keeps the latest
    run = shelf.run(11)
    assert run is not None
    assert run.rounds == (1, 2, 3) and run.proof == SHA_C and run.model_sha256 == ""
    assert run.run_spec() == spec()
    assert shelf.missing() == [ModelRequest(11, SHA_C)]

    shelf.trained(12, spec(), 1, SHA_A)
    hold_model(shelf, 12)
    shelf.kept(12, spec(), SHA_B)
    assert shelf.missing() == [ModelRequest(11, SHA_C)]  # 12's model is held
    record = shelf.run(12)
    assert record is not None and (record.model_sha256, record.proof) == (SHA_B, SHA_A)


def test_missing_models_are_asked_for_newest_first_and_bounded(tmp_path: Path) -> None:
    shelf = SiteModels(tmp_path)
    for run_id in range(1, MAX_MODEL_REQUESTS + 5):
        shelf.trained(run_id, spec(), 1, SHA_A)
    missing = shelf.missing()
    assert len(missing) == MAX_MODEL_REQUESTS
    assert missing[0].run_id == MAX_MODEL_REQUESTS + 4  # the newest record first


def test_unreadable_or_foreign_files_in_runs_are_ignored(tmp_path: Path) -> None:
    shelf = SiteModels(tmp_path)
    shelf.trained(5, spec(), 1, SHA_A)
    (tmp_path / "runs" / "6.json").write_text("{not json")
    (tmp_path / "runs" / "7.json").write_text(json.dumps({"run_id": 7}))
    (tmp_path / "runs" / "notes.txt").write_text("hello")
    assert [r.run_id for r in shelf.runs()] == [5]


def test_a_site_answers_an_offer_held_wanted_other_or_not_trained(tmp_path: Path) -> None:
    shelf = SiteModels(tmp_path)
    assert shelf.answer(ModelOffer(1, SHA_A)).state == MODEL_NOT_TRAINED
    shelf.trained(1, spec(), 2, SHA_B)
    wanted = shelf.answer(ModelOffer(1, SHA_A))
    assert (wanted.state, wanted.proof) == (MODEL_WANTED, SHA_B)
    hold_model(shelf, 1)
    shelf.kept(1, spec(), SHA_A)
    assert shelf.answer(ModelOffer(1, SHA_A)).state == MODEL_HELD
    assert shelf.answer(ModelOffer(1, SHA_C)).state == MODEL_OTHER  # never replaced
