"""Staleness bookkeeping: caught-up-as-of times from head probes, versions behind."""

from __future__ import annotations

import math

from streamhps.worker.staleness import LagTracker


def test_never_caught_up_is_infinitely_stale() -> None:
    t = LagTracker({"user": 2})
    secs, _ = t.max_seconds("user", now=100.0)
    assert math.isinf(secs)


def test_caught_up_as_of_the_probe_once_position_reaches_it() -> None:
    t = LagTracker({"user": 1})
    t.probed("user", 0, high_watermark=10, sent_at=50.0)
    assert math.isinf(t.max_seconds("user", now=51.0)[0])  # lagging: nothing applied yet
    t.consumed("user", 0, 6)
    assert math.isinf(t.max_seconds("user", now=51.0)[0])
    t.consumed("user", 0, 10)
    assert t.max_seconds("user", now=51.0)[0] == 1.0
    # no further probe answers (broker gone): staleness keeps growing
    assert t.max_seconds("user", now=60.0)[0] == 10.0
    t.probed("user", 0, high_watermark=10, sent_at=59.5)
    assert t.max_seconds("user", now=60.0)[0] == 0.5
    # a new message: until it is applied, still caught up only as of 59.5
    t.probed("user", 0, high_watermark=11, sent_at=59.9)
    assert t.max_seconds("user", now=60.0)[0] == 0.5
    rep = t.report(now=60.0)["user"][0]
    assert rep["lag_messages"] == 1 and rep["offset"] == 10 and rep["high_watermark"] == 11


def test_versions_behind_counts_from_newest_known_commit() -> None:
    t = LagTracker({"user": 3})
    t.marker("user", 0, 5)
    t.marker("user", 1, 3)
    rep = t.report(now=0.0)["user"]
    assert [rep[p]["versions_behind"] for p in range(3)] == [0, 2, 5]
    assert rep[2]["applied_version"] is None
    t.store_applied("user", {2: 7})
    rep = t.report(now=0.0)["user"]
    assert [rep[p]["versions_behind"] for p in range(3)] == [2, 4, 7]
