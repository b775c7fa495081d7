"""Per-site outcome values: what a site may send, and the negative-transfer flag."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedhead.common.errors import FederationError
from fedhead.common.evaluation import paired_difference
from fedhead.common.outcome import HeadMetrics, SiteOutcome


def _head(acc: float) -> HeadMetrics:
    return HeadMetrics(acc, acc - 0.05, acc + 0.05, acc, acc - 0.1, acc + 0.1, 0.9, 0.8, 0.95, 0.4)


def _outcome(gain: tuple[float, float, float] | None) -> SiteOutcome:
    if gain is None:
        return SiteOutcome(50, _head(0.8))
    return SiteOutcome(50, _head(0.8), _head(0.8 - gain[0]), None, False, *gain, *gain)


def test_an_outcome_goes_over_the_wire_and_back_unchanged() -> None:
    sent = SiteOutcome(
        50, _head(0.8), _head(0.7), _head(0.85), True, 0.1, 0.02, 0.18, -0.05, -0.2, 0.1
    )
    assert SiteOutcome.from_mapping(sent.to_record(), 50) == sent
    fed_only = _outcome(None)
    back = SiteOutcome.from_mapping(fed_only.to_record(), 50)
    assert back.local is None and back.personalized is None and math.isnan(back.gain)


@pytest.mark.parametrize(
    ("gain", "flagged"),
    [
        ((-0.2, -0.3, -0.1), True),  # below local-only beyond the interval
        ((-0.1, -0.25, 0.05), False),  # below, but within the interval: no evidence
        ((0.0, 0.0, 0.0), False),
        ((0.2, 0.1, 0.3), False),
    ],
)
def test_negative_transfer_needs_the_whole_interval_below_zero(
    gain: tuple[float, float, float], flagged: bool
) -> None:
    outcome = _outcome(gain)
    assert outcome.negative_transfer is flagged
    entry = outcome.to_report("hospital-a")
    assert entry["negative_transfer"] is flagged and entry["site"] == "hospital-a"
    assert entry["gain"]["accuracy"] == gain[0] and entry["gain"]["ci95"] == [gain[1], gain[2]]


def test_without_a_local_baseline_there_is_no_flag() -> None:
    assert _outcome(None).negative_transfer is False
    assert _outcome(None).to_report("x")["gain"] is None


def _tampered(**changes: Any) -> dict[str, Any]:
    record = SiteOutcome(
        50, _head(0.8), _head(0.7), _head(0.85), True, 0.1, 0.02, 0.18, -0.05, -0.2, 0.1
    )
    return record.to_record() | changes


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"federated.accuracy": math.nan}, "not a finite number"),
        ({"federated.accuracy": 1.5, "federated.accuracy_hi": 1.6}, "outside [0, 1]"),
        ({"local.auroc": math.inf}, "outside [0, 1]"),
        ({"local.accuracy": 0.99}, "outside its interval"),
        ({"federated.loss": -1.0}, "loss"),
        ({"federated.loss": math.nan}, "loss"),
        ({"gain": 2.0, "gain_hi": 2.0}, "gain"),
        ({"gain": 0.5}, "outside its interval"),
        ({"gain_lo": math.nan}, "gain"),
        ({"balanced_gain": 0.5}, "balanced gain"),
        ({"balanced_gain_hi": math.inf}, "balanced gain"),
        ({"examples": 0}, "validation examples"),
        ({"examples": 51}, "validation examples"),
        ({"examples": True}, "examples"),
        ({"federated.accuracy": "0.8"}, "expected float"),
        ({"personalized_kept": 1}, "personalized_kept"),
    ],
)
def test_implausible_site_values_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(FederationError, match="site outcome") as err:
        SiteOutcome.from_mapping(_tampered(**changes), max_examples=50)
    assert message in str(err.value)


def test_missing_keys_and_inconsistent_heads_are_refused() -> None:
    record = _tampered()
    del record["federated.loss"]
    with pytest.raises(FederationError, match=r"missing key 'federated\.loss'"):
        SiteOutcome.from_mapping(record, 50)
    partial = {k: v for k, v in _tampered().items() if k != "local.loss"}
    with pytest.raises(FederationError, match=r"missing key 'local\.loss'"):
        SiteOutcome.from_mapping(partial, 50)
    no_local = {k: v for k, v in _tampered().items() if not k.startswith("local.")}
    with pytest.raises(FederationError, match="a gain without a local-only head"):
        SiteOutcome.from_mapping(no_local, 50)
    kept_without = {k: v for k, v in _tampered().items() if not k.startswith("personalized.")}
    with pytest.raises(FederationError, match="kept without its metrics"):
        SiteOutcome.from_mapping(kept_without, 50)


def test_an_undefined_auroc_is_allowed() -> None:
    record = _tampered(**{"federated.auroc": math.nan, "federated.auroc_lo": math.nan})
    record["federated.auroc_hi"] = math.nan
    assert math.isnan(SiteOutcome.from_mapping(record, 50).federated.auroc)


def test_the_paired_difference_interval_holds_the_difference() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    good = np.eye(2)[np.where(rng.random(200) < 0.9, y, 1 - y)]
    poor = np.eye(2)[np.where(rng.random(200) < 0.6, y, 1 - y)]
    diff, lo, hi = paired_difference(y, good, poor, resamples=300)
    accuracy = (good.argmax(1) == y).mean() - (poor.argmax(1) == y).mean()
    assert diff == pytest.approx(accuracy)
    assert 0 < lo <= diff <= hi
    assert paired_difference(y, good, good, resamples=50) == (0.0, 0.0, 0.0)


def test_balanced_accuracy_sees_through_a_majority_class_head() -> None:
    y = np.array([1] * 90 + [0] * 10)
    majority = np.eye(2)[np.ones(100, dtype=int)]  # always class 1: accuracy 0.9
    ranks = np.eye(2)[np.r_[np.ones(70, dtype=int), np.zeros(30, dtype=int)]]
    acc, _, _ = paired_difference(y, ranks, majority, resamples=200)
    balanced, lo, hi = paired_difference(
        y, ranks, majority, resamples=200, metric="balanced_accuracy"
    )
    assert acc == pytest.approx(0.8 - 0.9)  # worse by accuracy
    assert balanced == pytest.approx((70 / 90 + 1.0) / 2 - 0.5)  # better balanced
    assert 0 < lo <= balanced <= hi
