"""The stats recorder: request shapes, percentiles from buckets, bounded memory, windows,
slow log, and delta batches that add up to the totals."""

from __future__ import annotations

import itertools
import math
import random
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.collector.protocol import parse_push_batch as parse_batch
from proxy.observe.batch import OTHER
from proxy.observe.buckets import BUCKET_BOUNDS_MS, NUM_BUCKETS, bucket_index, percentile
from proxy.observe.patterns import PATTERN_MAX_CHARS, query_pattern
from proxy.observe.stats import StatsRecorder

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def recorder(clock: FakeClock | None = None, **kwargs: Any) -> StatsRecorder:
    return StatsRecorder("orders-svc", clock or FakeClock(), instance="pod-1:7", **kwargs)


# ---- patterns ------------------------------------------------------------------------------


def test_pattern_example_from_the_design() -> None:
    body = {"filter": {"tags": "admin", "age": {"$gt": 30}}, "sort": "-age", "limit": 10}
    assert query_pattern("find", "users", body) == 'find users {"age":{"$gt":?},"tags":?} sort=-age'


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"filter": {"age": {"$gt": 1}}}, {"filter": {"age": {"$gt": 99.5}}}),
        ({"filter": {"a": 1, "b": "x"}}, {"filter": {"b": None, "a": True}}),  # key order
        ({"filter": {"id": {"$in": [1]}}}, {"filter": {"id": {"$in": [1, 2, 3, 4, 5]}}}),
        ({"filter": {"tags": ["x"]}}, {"filter": {"tags": ["x", "y", "z"]}}),
        ({"filter": {"a": {"$in": [{"x": 1}]}}}, {"filter": {"a": {"$in": [1, {"y": 2}]}}}),
        (
            {"filter": {"$or": [{"a": 1}, {"b": {"$lt": 2}}]}},
            {"filter": {"$or": [{"a": "z"}, {"b": {"$lt": -7}}]}},
        ),
        (
            {"filter": {"a": 1}, "sort": "-age,name"},
            {"filter": {"a": 2}, "sort": {"age": -1, "name": 1}},
        ),
        ({"filter": {"a": 1}, "limit": 5, "skip": 2}, {"filter": {"a": 1}, "limit": 50}),
        ({"$set": {"a": 1}, "$inc": {"n": 2}}, {"$inc": {"n": 7}, "$set": {"a": "q"}}),
        ({"$push": {"t": {"$each": [1]}}}, {"$push": {"t": {"$each": [1, 2, 3]}}}),
        (
            {"filter": {"s": {"$regex": "^a", "$options": "i"}}},
            {"filter": {"s": {"$regex": "b$", "$options": "m"}}},
        ),
    ],
)
def test_same_shape_same_pattern(a: Any, b: Any) -> None:
    assert query_pattern("find", "users", a) == query_pattern("find", "users", b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"filter": {"age": {"$gt": 1}}}, {"filter": {"age": {"$gte": 1}}}),
        ({"filter": {"age": 1}}, {"filter": {"name": 1}}),
        ({"filter": {"age": 1}}, {"filter": {"age": 1, "name": 1}}),
        ({"filter": {"age": 1}}, {"filter": {"age": {"$eq": 1}}}),
        ({"filter": {"a": 1}, "sort": "age"}, {"filter": {"a": 1}, "sort": "-age"}),
        ({"filter": {"a": 1}}, {"filter": {"a": 1}, "fields": "name"}),
        ({"filter": {"$or": [{"a": 1}]}}, {"filter": {"$or": [{"a": 1}, {"a": 2}]}}),
        ({"filter": {"$or": [{"a": 1}]}}, {"filter": {"$and": [{"a": 1}]}}),
        ({"filter": {"address": {"city": "x"}}}, {"filter": {"address": {"zip": "x"}}}),
        ({"$set": {"a": 1}}, {"$unset": {"a": 1}}),
    ],
)
def test_different_shape_different_pattern(a: Any, b: Any) -> None:
    assert query_pattern("find", "users", a) != query_pattern("find", "users", b)


def test_operation_and_collection_are_part_of_the_pattern() -> None:
    body = {"filter": {"a": 1}}
    patterns = {
        query_pattern("find", "users", body),
        query_pattern("count", "users", body),
        query_pattern("find", "orders", body),
    }
    assert len(patterns) == 3
    assert query_pattern("get", "users", None) == "get users"


def test_values_never_appear_in_patterns() -> None:
    secret = "s3cr3t-value"
    body = {
        "filter": {"a": secret, "b": {"$in": [secret]}, "$or": [{"c": secret}]},
        "update": {"$set": {"d": secret}},
    }
    assert secret not in query_pattern("update", "users", body)
    assert secret not in query_pattern("insert", "users", {"name": secret, "tags": [secret]})


def test_pattern_length_is_bounded_and_walk_stops_early() -> None:
    huge = {f"field_{i}": {"$gt": i} for i in range(100_000)}
    started = time.perf_counter()
    pattern = query_pattern("find", "users", {"filter": huge})
    assert time.perf_counter() - started < 0.5  # sorting 100k keys, not shaping them all
    assert len(pattern) == PATTERN_MAX_CHARS
    assert pattern.endswith("...")
    deep: Any = 1
    for _ in range(500):
        deep = {"a": deep}
    assert len(query_pattern("find", "users", deep)) <= PATTERN_MAX_CHARS


# ---- buckets and percentiles -------------------------------------------------------------


def test_bucket_bounds_cover_the_range() -> None:
    assert BUCKET_BOUNDS_MS[0] == 0.1
    assert 60_000 <= BUCKET_BOUNDS_MS[-1] < 70_000
    assert list(BUCKET_BOUNDS_MS) == sorted(BUCKET_BOUNDS_MS)
    assert bucket_index(0.0) == 0
    assert bucket_index(0.1) == 0
    assert bucket_index(0.11) == 1
    assert bucket_index(1e7) == NUM_BUCKETS - 1


def test_percentile_interpolates_inside_one_bucket() -> None:
    counts = [0] * NUM_BUCKETS
    i = bucket_index(10.0)
    counts[i] = 100
    lower, upper = BUCKET_BOUNDS_MS[i - 1], BUCKET_BOUNDS_MS[i]
    assert percentile(counts, 0.5) == pytest.approx(lower + (upper - lower) * 0.5)
    assert percentile(counts, 1.0) == pytest.approx(upper)
    assert percentile(counts, 1.0, max_ms=9.9) == pytest.approx(9.9)  # never above the max
    assert percentile([0] * NUM_BUCKETS, 0.5) is None


def _exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _same_or_adjacent_bucket(estimate: float, exact: float) -> bool:
    return abs(bucket_index(estimate) - bucket_index(exact)) <= 1


@pytest.mark.parametrize("seed", range(5))
def test_percentiles_from_buckets_within_bucket_accuracy(seed: int) -> None:
    rng = random.Random(seed)
    values = [10 ** rng.uniform(-0.5, 3.5) for _ in range(20_000)]  # 0.3 ms .. 3 s
    rec = recorder()
    for v in values:
        rec.record("users", "find", v, 1, "find users", True, None)
    (row,) = rec.performance()["operations"]
    for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
        exact = _exact(values, q)
        assert _same_or_adjacent_bucket(row[key], exact), (key, row[key], exact)
        assert row[key] / exact == pytest.approx(1.0, rel=0.26)  # one bucket is 10**0.1 wide
    assert row["max_ms"] == pytest.approx(max(values), abs=0.001)
    assert row["calls"] == len(values)


# ---- bounded memory ----------------------------------------------------------------------


def test_one_hundred_thousand_distinct_patterns_stay_bounded() -> None:
    rec = recorder(max_patterns=1000)
    for i in range(100_000):
        rec.record("users", "find", 1.0, 1, f'find users {{"f{i}":?}}', True, None)
    assert rec.pattern_count <= 1000 + 1  # the 1000 admitted, and one "<other>"
    batch = rec.drain_batch()
    assert batch is not None
    assert len(batch["patterns"]) == 1001
    other = [p for p in batch["patterns"] if p["pattern"] == OTHER]
    assert other[0]["calls"] == 99_000
    assert sum(p["calls"] for p in batch["patterns"]) == 100_000
    assert len(rec.performance(top=10_000)["top_patterns"]) <= 1001


def test_many_collections_fold_into_other() -> None:
    rec = recorder(max_patterns=10)
    for i in range(1000):
        rec.record(f"c{i}", "find", 1.0, 0, f"find c{i}", True, None)
    rec.record("bad name!", "find", 1.0, 0, "x", True, None)
    totals = rec.totals()["collections"]
    assert len(totals) <= 11
    assert totals[OTHER]["find"]["calls"] == 991
    assert rec.pattern_count <= 10 + 2


def test_patterns_expire_with_their_windows() -> None:
    clock = FakeClock()
    rec = recorder(clock, max_patterns=2, window_seconds=10, windows=2)
    rec.record("users", "find", 1.0, 0, "p1", True, None)
    rec.record("users", "find", 1.0, 0, "p2", True, None)
    rec.record("users", "find", 1.0, 0, "p3", True, None)  # folded
    assert rec.drain_batch() is not None
    clock.now += 30  # both windows gone, delta drained: the patterns are forgotten
    rec.record("users", "find", 1.0, 0, "p4", True, None)
    batch = rec.drain_batch()
    assert batch is not None
    assert [p["pattern"] for p in batch["patterns"]] == ["p4"]


def test_slow_log_is_bounded_and_keeps_the_pattern() -> None:
    rec = recorder(slow_threshold_ms=100, max_slow=5)
    for i in range(20):
        rec.record("users", "find", 150.0 + i, 3, "find users {}", i % 2 == 0, "statement_timeout")
    rec.record("users", "find", 99.0, 3, "find users {}", True, None)  # not slow
    slow = rec.performance()["slow_queries"]
    assert len(slow) == 5
    assert slow[0]["execution_time_ms"] == 169.0  # newest first
    assert all(s["query_pattern"] == "find users {}" for s in slow)
    assert slow[0]["success"] is False and slow[0]["error_code"] == "statement_timeout"
    assert slow[1]["success"] is True and slow[1]["error_code"] is None


def test_note_plan_is_attached_to_slow_queries_and_patterns() -> None:
    rec = recorder(slow_threshold_ms=10)
    rec.record("users", "find", 50.0, 1, 'find users {"a":?}', True, None)
    rec.note_plan('find users {"a":?}', False, "Seq Scan on users")
    perf = rec.performance()
    assert perf["slow_queries"][0]["index_used"] is False
    assert perf["slow_queries"][0]["plan"] == "Seq Scan on users"
    assert perf["top_patterns"][0]["index_used"] is False
    batch = rec.drain_batch()
    assert batch is not None
    assert batch["patterns"][0]["index_used"] is False
    assert batch["slow"][0]["plan"] == "Seq Scan on users"


def test_bad_inputs_cannot_poison_a_batch() -> None:
    rec = recorder(slow_threshold_ms=1e8)
    rec.record("users", "find", float("nan"), -5, "p", True, None)
    rec.record("users", "find", float("inf"), 1, "p", False, "Not A Code")
    rec.record("users", "find", -3.0, 1, "p" * 600, False, None)
    rec.record("users", "Find Me", 1.0, 1, "p\x00", True, None)
    for i in range(100):
        rec.record("users", "find", 1.0, 1, "p", False, f"code_{i}")
    rec.note_plan("p", None, "")
    rec.note_plan("q", True, "\x00")
    rec.record("users", "find", 2e12, 1, "q", True, None)  # slow, with its plan
    batch = rec.drain_batch()
    assert batch is not None
    parse_batch(batch)  # the collector accepts it
    assert sum(p["calls"] for p in batch["patterns"]) == 105
    assert max(len(p["errors"]) for p in batch["patterns"]) <= 64


def test_service_name_is_checked_up_front() -> None:
    with pytest.raises(ValueError, match="service name"):
        StatsRecorder("bad service", FakeClock())


# ---- windows and views -------------------------------------------------------------------


def test_performance_covers_only_recent_windows() -> None:
    clock = FakeClock()
    rec = recorder(clock, window_seconds=60, windows=5)
    rec.record("users", "find", 5.0, 1, "find users", True, None)
    clock.now += 120
    rec.record("users", "find", 7.0, 1, "find users", True, None)
    rec.record("users", "count", 2.0, 0, "count users", False, "invalid_query")
    ops = {(o["operation"], o["collection"]): o for o in rec.performance()["operations"]}
    assert ops[("find", "users")]["calls"] == 2
    assert ops[("count", "users")]["errors"] == 1
    assert rec.performance(now=clock.now + 200)["operations"][0]["calls"] == 1  # one left
    assert rec.performance(now=clock.now + 400)["operations"] == []
    assert rec.totals()["collections"]["users"]["find"]["calls"] == 2  # totals stay


def test_top_patterns_ranked_by_total_time() -> None:
    rec = recorder()
    for _ in range(10):
        rec.record("users", "find", 1.0, 1, "cheap", True, None)
    rec.record("users", "find", 50.0, 1, "expensive", True, None)
    top = rec.performance()["top_patterns"]
    assert [t["pattern"] for t in top] == ["expensive", "cheap"]
    assert top[1]["calls"] == 10 and top[1]["total_ms"] == 10.0


def test_totals_count_errors_by_code() -> None:
    rec = recorder()
    rec.record("users", "get", 1.0, 1, "get users", True, None)
    rec.record("users", "get", 1.0, 0, "get users", False, "not_found")
    rec.record("users", "get", 1.0, 0, "get users", False, "not_found")
    rec.record("users", "get", 1.0, 0, "get users", False, None)
    assert rec.totals() == {
        "service": "orders-svc",
        "instance": "pod-1:7",
        "collections": {
            "users": {
                "get": {
                    "calls": 4,
                    "errors": 3,
                    "errors_by_code": {"not_found": 2, "unknown": 1},
                    "documents": 1,
                    "total_ms": 4.0,
                }
            }
        },
    }


# ---- drained deltas ------------------------------------------------------------------------


def test_drained_deltas_add_up_to_the_totals() -> None:
    rng = random.Random(7)
    clock = FakeClock()
    rec = recorder(clock, slow_threshold_ms=500)
    batches: list[dict[str, Any]] = []
    expected_calls = expected_errors = expected_docs = 0
    for step in range(5000):
        clock.now += rng.uniform(0, 0.2)
        ok = rng.random() > 0.1
        docs = rng.randint(0, 5)
        op = rng.choice(["find", "count", "insert"])
        rec.record(
            "users",
            op,
            rng.uniform(0.05, 800),
            docs,
            f"{op} users {rng.randint(0, 9)}",
            ok,
            None if ok else rng.choice(["not_found", "statement_timeout"]),
        )
        expected_calls += 1
        expected_errors += not ok
        expected_docs += docs
        if step % 97 == 0 and (batch := rec.drain_batch()) is not None:
            batches.append(batch)
    if (batch := rec.drain_batch()) is not None:
        batches.append(batch)
    assert rec.drain_batch() is None  # nothing new

    for b in batches:
        parse_batch(b)
    entries = [p for b in batches for p in b["patterns"]]
    assert sum(p["calls"] for p in entries) == expected_calls
    assert sum(sum(p["errors"].values()) for p in entries) == expected_errors
    assert sum(p["documents"] for p in entries) == expected_docs
    assert sum(n for p in entries for _, n in p["buckets"]) == expected_calls
    totals = rec.totals()["collections"]["users"]
    assert sum(t["calls"] for t in totals.values()) == expected_calls
    assert sum(p["total_ms"] for p in entries) == pytest.approx(
        sum(t["total_ms"] for t in totals.values())
    )
    slow_ids = [s["query_id"] for b in batches for s in b["slow"]]
    assert len(slow_ids) == len(set(slow_ids))  # each slow query shipped once
    for earlier, later in itertools.pairwise(batches):
        assert earlier["ended_at"] == later["started_at"]  # contiguous intervals
        assert earlier["batch_id"] != later["batch_id"]


def test_record_is_cheap() -> None:
    rec = recorder()
    patterns = [f"find users {i}" for i in range(50)]
    started = time.perf_counter()
    for i in range(50_000):
        rec.record("users", "find", 0.5 + (i % 300), 1, patterns[i % 50], i % 13 != 0, "not_found")
    per_call = (time.perf_counter() - started) / 50_000
    assert per_call < 50e-6  # a few microseconds in practice; generous for busy CI machines


@given(
    st.lists(
        st.tuples(
            st.sampled_from([("users", "find", "find users {}"), ("orders", "get", "get orders")]),
            st.floats(0, 400, allow_nan=False),  # ms, some above the 200 ms slow threshold
            st.integers(0, 5),  # documents
            st.sampled_from([None, "not_found", "timeout"]),  # error code (None: success)
        ),
        max_size=40,
    )
)
def test_record_many_is_record_per_item(
    ops: list[tuple[tuple[str, str, str], float, int, str | None]],
) -> None:
    """What the buffered hot path hands over in groups ends up exactly as if each
    operation had been recorded on its own: totals, windows, slow log, collector batch."""
    one, many = recorder(FakeClock()), recorder(FakeClock())
    for (coll, op, pattern), ms, docs, code in ops:
        one.record(coll, op, ms, docs, pattern, code is None, code)
    groups: dict[tuple[Any, ...], tuple[list[float], list[int]]] = {}
    for (coll, op, pattern), ms, docs, code in ops:
        durations, documents = groups.setdefault((coll, op, pattern, code), ([], []))
        durations.append(ms)
        documents.append(docs)
    for (coll, op, pattern, code), (durations, documents) in groups.items():
        if all(d <= 200 for d in durations):  # slow ones keep their own documents count
            many.record_many(coll, op, pattern, durations, sum(documents), code is None, code)
        else:
            for d, n in zip(durations, documents, strict=True):
                many.record(coll, op, d, n, pattern, code is None, code)

    def comparable(rec: StatsRecorder) -> Any:
        def order(slow: list[dict[str, Any]]) -> None:
            for entry in slow:
                entry.pop("query_id")
            slow.sort(key=lambda e: repr(sorted(e.items())))

        perf = rec.performance()
        order(perf["slow_queries"])
        batch = rec.drain_batch()
        if batch is not None:
            batch.pop("batch_id")
            order(batch["slow"])
            batch["patterns"].sort(key=lambda p: (p["collection"], p["pattern"]))
        return rec.totals(), perf, batch

    a, b = comparable(one), comparable(many)
    assert _close(a, b)


def _close(a: Any, b: Any) -> bool:
    """Equal, floats up to summation order."""
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        return all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        assert len(a) == len(b)
        return all(_close(x, y) for x, y in zip(a, b, strict=True))
    assert a == b, (a, b)
    return True
