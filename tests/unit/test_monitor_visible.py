"""Issue 13, item 5: the stats views a scoped monitoring caller gets (``visible``): only the
collections it may read, ranked among themselves, ``"<other>"`` hidden; the grant matching is
the audit scope's (names, ``*``, ``?``, ``[...]``, ``[!...]``)."""

from __future__ import annotations

from proxy.http import monitor
from proxy.observe.batch import OTHER
from proxy.observe.stats import StatsRecorder
from proxy.pipeline import gate as guard
from proxy.pipeline.gate import Caller
from proxy.policy import Grant, ServicePolicy


def _caller(*patterns: str) -> Caller:
    grants = (
        Grant(patterns, frozenset({"read"})),
        Grant(("*",), frozenset({"monitor"})),
        Grant(("audit_only",), frozenset({"count"})),  # not read: not visible
    )
    return Caller("alpha", ServicePolicy("alpha", grants))


def test_scope_matches_names_and_globs() -> None:
    scope = guard.audit_scope(_caller("mine", "a_*", "b?", "c[0-9]", "d[!x]"))
    assert scope is not None
    seen = [
        n
        for n in ("mine", "a_1", "b1", "c7", "dy", "dx", "b12", "audit_only", "x")
        if scope.covers(n)
    ]
    assert seen == ["mine", "a_1", "b1", "c7", "dy"]
    assert guard.audit_scope(_caller("*")) is None  # read on "*": everything


def test_ranking_and_slow_log_are_of_the_visible_collections_only() -> None:
    rec = StatsRecorder("dbproxy", clock=lambda: 1000.0, slow_threshold_ms=100.0, max_patterns=2)
    rec.record_many("theirs", "find", "find theirs {}", [500.0] * 10, 10, True, None)
    rec.record_many("mine", "find", "find mine {}", [1.0, 150.0], 2, True, None)
    rec.record_many("third", "find", "find third {}", [1.0], 1, True, None)  # folds
    assert any(k[0] == OTHER for k in rec._registry)

    def visible(name: str) -> bool:
        return name == "mine"

    perf = rec.performance(now=1000.0, top=1, visible=visible)
    assert [r["collection"] for r in perf["top_patterns"]] == ["mine"]
    assert [r["collection"] for r in perf["operations"]] == ["mine"]
    assert [r["collection"] for r in perf["slow_queries"]] == ["mine"]
    assert set(rec.totals(visible=visible)["collections"]) == {"mine"}
    everything = rec.performance(now=1000.0, top=10)
    assert {r["collection"] for r in everything["operations"]} == {"theirs", "mine", OTHER}


def test_folded_names_are_shown_to_star_readers_only() -> None:
    visible = monitor._visible(_caller("*r"))  # a glob that matches "<other>"
    assert visible is not None
    assert visible("user") and not visible(OTHER)
    assert monitor._visible(_caller("*")) is None
    assert monitor._visible(guard.OPEN) is None  # open mode: unchanged
