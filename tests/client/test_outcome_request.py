"""A site refuses an outcome request that asks the impossible or names another run."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fedhead.client.outcome import check_request
from fedhead.common.errors import RunSpecError
from fedhead.common.protocol import OutcomeRequest
from tests.conftest import round_settings

REQUEST = OutcomeRequest(
    run_id=7,
    head_sha256="0" * 64,
    rounds=10,
    lr_schedule="cosine",
    local_baseline=True,
    personalize_epochs=3,
    personalize_lr_scale=0.1,
    resamples=1000,
    closed_form="",
    class_counts="",
)
SETTINGS = round_settings(local_epochs=5, batch_size=64, learning_rate=0.01)


def test_an_honest_request_passes() -> None:
    check_request(REQUEST, SETTINGS, 7)


@pytest.mark.parametrize(
    ("request_changes", "settings_changes", "message"),
    [
        ({"run_id": 8}, {}, "names run 8"),
        ({"rounds": 10**6}, {}, "rounds"),
        ({"personalize_epochs": 10**6}, {}, "personalize_epochs"),
        ({"personalize_lr_scale": 5.0}, {}, "personalize_lr_scale"),
        ({"resamples": 10**9}, {}, "resamples"),
        ({"lr_schedule": "warp"}, {}, "lr_schedule"),
        ({}, {"local_epochs": 10**6}, "local epochs"),
        ({}, {"learning_rate": float("nan")}, "learning rate"),
    ],
)
def test_a_request_beyond_bounds_is_refused(
    request_changes: dict[str, Any], settings_changes: dict[str, Any], message: str
) -> None:
    request = dataclasses.replace(REQUEST, **request_changes)
    settings = dataclasses.replace(SETTINGS, **settings_changes)
    with pytest.raises(RunSpecError, match="outcome request is refused") as err:
        check_request(request, settings, 7)
    assert message in str(err.value)
