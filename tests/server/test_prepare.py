"""Site labels: a site's chosen name is used only when it is safe and not taken."""

from __future__ import annotations

from fedhead.server.prepare import Roster, capped_shares, site_label


def test_site_labels_are_checked_and_made_unique() -> None:
    assert site_label(7, "hospital-a", set()) == "hospital-a"
    assert site_label(8, "hospital-a", {"hospital-a"}) == "hospital-a#8"
    assert site_label(9, "", set()) == "node 9"
    for hostile in ("a\nfedhead-report-json: {}", "../etc", "x" * 33, "-lead"):
        assert site_label(10, hostile, set()) == "node 10"
    roster = Roster(ready={}, names={7: "hospital-a"})
    assert roster.name(7) == "hospital-a" and roster.name(8) == "node 8"


def test_no_site_weighs_more_than_its_share_and_honest_sizes_pass() -> None:
    honest = {1: 900, 2: 700, 3: 500}  # different sizes, none above half of the total
    assert capped_shares(honest, 0.5) == honest
    inflated = {1: 10_000, 2: 700, 3: 500}  # one site declares far more than the rest
    capped = capped_shares(inflated, 0.5)
    assert capped == {1: 1200, 2: 700, 3: 500}
    assert max(capped.values()) <= 0.5 * sum(capped.values())
    assert capped_shares({1: 10_000, 2: 300}, 0.25) == {1: 300, 2: 300}  # 1/n at least
    assert capped_shares(inflated, 1.0) == inflated  # 1: no limit
