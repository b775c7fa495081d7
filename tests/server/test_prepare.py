"""Site labels: a site's chosen name is used only when it is safe and not taken."""

from __future__ import annotations

from fedhead.server.prepare import Roster, site_label


def test_site_labels_are_checked_and_made_unique() -> None:
    assert site_label(7, "hospital-a", set()) == "hospital-a"
    assert site_label(8, "hospital-a", {"hospital-a"}) == "hospital-a#8"
    assert site_label(9, "", set()) == "node 9"
    for hostile in ("a\nfedhead-report-json: {}", "../etc", "x" * 33, "-lead"):
        assert site_label(10, hostile, set()) == "node 10"
    roster = Roster(ready={}, names={7: "hospital-a"})
    assert roster.name(7) == "hospital-a" and roster.name(8) == "node 8"
