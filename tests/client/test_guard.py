"""The heads a site accepts: the run's own initial head, then bounded steps (client.guard)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedhead.client.guard import HeadGuard
from fedhead.client.models import SiteModels
from fedhead.common.errors import RefusedHeadError
from fedhead.common.heads import TensorSpec, TrainableSet
from fedhead.common.protocol import FitSettings
from tests.conftest import round_settings

SET = TrainableSet((TensorSpec("w", (2, 3), "float32"), TensorSpec("b", (2,), "float32")))
INITIAL = [np.full((2, 3), 0.1, np.float32), np.zeros(2, np.float32)]
BOUNDED = round_settings(max_update_norm=1.0, num_server_rounds=5)  # FedAvg: 1 a round


def _moved(head: list[np.ndarray], distance: float, at: int = 0) -> list[np.ndarray]:
    """``head`` moved by ``distance`` (L2) along its value ``at`` (of the first tensor)."""
    out = [a.copy() for a in head]
    out[0].reshape(-1)[at] += distance
    return out


@pytest.fixture
def guard(tmp_path: Path) -> HeadGuard:
    g = HeadGuard(SiteModels(tmp_path), 7, SET)
    g.keep_initial(INITIAL)
    return g


@pytest.fixture
def refusals(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    seen: list[object] = []
    monkeypatch.setattr("fedhead.client.guard.emit", lambda e: seen.append(e.reason))
    return seen


def _accept(g: HeadGuard, index: int, head: list[np.ndarray], s: FitSettings | None) -> None:
    g.check(index, head, s)
    g.take(index, head, s)


def test_the_first_head_must_be_the_runs_initial_head(
    guard: HeadGuard, refusals: list[object]
) -> None:
    with pytest.raises(RefusedHeadError, match="not run 7's initial head"):
        guard.check(0, _moved(INITIAL, 1e-6), BOUNDED)
    _accept(guard, 0, [a.copy() for a in INITIAL], BOUNDED)
    assert refusals == ["initial"]


def test_a_site_without_the_initial_head_refuses(tmp_path: Path, refusals: list[object]) -> None:
    with pytest.raises(RefusedHeadError, match="holds no initial head of run 7"):
        HeadGuard(SiteModels(tmp_path), 7, SET).check(0, INITIAL, BOUNDED)
    assert refusals == ["initial"]


def test_each_round_may_move_the_head_by_the_bound_and_no_further(
    guard: HeadGuard, refusals: list[object]
) -> None:
    _accept(guard, 0, INITIAL, BOUNDED)
    one = _moved(INITIAL, 0.999)
    _accept(guard, 1, one, None)  # an evaluation of round 1's head: the pinned settings
    # 1.8 from the initial head (2 rounds away), 1.5 from round 1's (1 round away)
    with pytest.raises(RefusedHeadError, match=r"lies 1\.5 from the head of round 1"):
        guard.check(2, _moved(one, 1.5, at=1), dataclasses.replace(BOUNDED, server_round=3))
    # a round later the same head is within reach of both
    _accept(guard, 3, _moved(one, 1.5, at=1), dataclasses.replace(BOUNDED, server_round=4))
    with pytest.raises(RefusedHeadError, match=r"a head of round 2 after .* round 3"):
        guard.check(2, one, None)
    assert refusals == ["step", "stale"]


def test_a_late_first_head_is_held_to_the_initial_one(
    guard: HeadGuard, refusals: list[object]
) -> None:
    """A site first sent a head of round 4 (restarted, or not sampled before): it must
    lie within 4 rounds of the run's initial head."""
    _accept(guard, 4, _moved(INITIAL, 3.9), BOUNDED)
    with pytest.raises(RefusedHeadError, match="holds no initial head of run 8"):
        HeadGuard(guard.models, 8, SET).check(4, INITIAL, BOUNDED)  # another run
    guard.models.head_file(7, "head").unlink()
    with pytest.raises(RefusedHeadError, match=r"lies 4\.1 from the head of round 0"):
        guard.check(4, _moved(INITIAL, 4.1), BOUNDED)
    assert refusals[-1] == "step"


def test_settings_that_change_or_bound_nothing_are_refused(
    guard: HeadGuard, refusals: list[object]
) -> None:
    with pytest.raises(RefusedHeadError, match="nothing bounds how far a round moves the head"):
        guard.check(0, INITIAL, round_settings())  # FedAvg, no norm bound, no SecAgg+, no DP
    _accept(guard, 0, INITIAL, BOUNDED)
    looser = dataclasses.replace(BOUNDED, max_update_norm=100.0, server_round=2)
    with pytest.raises(RefusedHeadError, match="further than those this site was first sent"):
        guard.check(1, _moved(INITIAL, 50), looser)
    tighter = dataclasses.replace(looser, max_update_norm=0.5)  # bounds may tighten
    guard.check(1, _moved(INITIAL, 0.9), tighter)  # held to the pinned bound, 1 a round
    with pytest.raises(RefusedHeadError, match="strategy 'fedmagic'"):
        guard.check(1, INITIAL, dataclasses.replace(BOUNDED, strategy="fedmagic"))
    bad = _moved(INITIAL, 0.1)
    bad[1][0] = np.nan
    with pytest.raises(RefusedHeadError, match="non-finite values"):
        guard.check(1, bad, dataclasses.replace(BOUNDED, server_round=2))
    assert refusals == ["unbounded", "settings", "settings", "non_finite"]


def test_adaptive_server_optimizers_bound_the_step_without_a_norm_bound(guard: HeadGuard) -> None:
    adam = round_settings(strategy="fedadam")  # no max-update-norm: the optimizer bounds it
    guard.check(0, INITIAL, adam)
    guard.take(0, INITIAL, adam)
    # fedadam's first step at its default rate 0.1 moves each of the 8 values by <= 0.1
    guard.check(1, _moved(INITIAL, 0.25), dataclasses.replace(adam, server_round=2))
    with pytest.raises(RefusedHeadError, match="of fedadam can move it"):
        guard.check(1, _moved(INITIAL, 2.0), dataclasses.replace(adam, server_round=2))


def test_a_resumed_run_is_held_to_the_last_head_of_the_run_it_resumes(tmp_path: Path) -> None:
    models = SiteModels(tmp_path)
    earlier = HeadGuard(models, 7, SET)
    earlier.keep_initial(INITIAL)
    _accept(earlier, 0, INITIAL, BOUNDED)
    last = _moved(INITIAL, 2.5)
    _accept(earlier, 3, last, dataclasses.replace(BOUNDED, server_round=4))
    resumed = HeadGuard(models, 9, SET)
    resumed.keep_initial(INITIAL)
    first = dataclasses.replace(BOUNDED, server_round=5, resumes_run=7)  # after round 4
    resumed.check(4, _moved(last, 0.9), first)  # one round on from run 7's round 3
    with pytest.raises(RefusedHeadError, match="from the head of round 3"):
        resumed.check(4, _moved(last, -3.4), first)  # 0.9 from the initial head: fine there
    # without the earlier run's record only the initial head bounds it
    resumed.check(4, _moved(last, -3.4), dataclasses.replace(first, resumes_run=0))


def test_a_delivered_model_lies_within_the_runs_remaining_rounds(
    guard: HeadGuard, tmp_path: Path
) -> None:
    _accept(guard, 0, INITIAL, BOUNDED)
    _accept(guard, 2, _moved(INITIAL, 1.5), dataclasses.replace(BOUNDED, server_round=3))
    guard.check_final(_moved(INITIAL, 4.4))  # 4.4 from the initial (5 rounds), 2.9 from round 2
    with pytest.raises(RefusedHeadError, match="from the head of round 2"):
        guard.check_final(_moved(INITIAL, -1.6))  # 1.6 from the initial, 3.1 from round 2's
    with pytest.raises(RefusedHeadError, match="whose heads this site has no record of"):
        HeadGuard(SiteModels(tmp_path / "other"), 7, SET).check_final(INITIAL)
