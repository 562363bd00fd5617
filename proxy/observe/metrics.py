"""Prometheus metrics of one sidecar: the request histogram counted on the hot path, and a
live collector reading every other figure at scrape time (see docs/observability.md)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

MAX_COLLECTIONS = 200
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

Snapshot = Callable[[], dict[str, Any]]


class _Series:
    """One label set of the request histogram: per-bucket counts (the last one is +Inf)
    and the sum of the observed seconds."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0


class Metrics:
    """The request histogram is kept here as plain counters (one dict lookup, one bisect
    and two additions per request; the event loop is the only writer, so no locks) and
    rendered as a Prometheus histogram at scrape time, by the live collector."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._collections: set[str] = set()
        self._series: dict[tuple[str, str, int], _Series] = {}  # by what observe() gets
        self._by_labels: dict[tuple[str, str, str], _Series] = {}  # by exported labels
        self.errors = Counter(
            "dbproxy_errors", "Errors by stable error code", ("code",), registry=self.registry
        )
        self.sources: dict[str, Snapshot] = {}
        self.registry.register(_LiveCollector(self))

    def collection_label(self, name: str) -> str:
        if name in self._collections:
            return name
        if len(self._collections) < MAX_COLLECTIONS:
            self._collections.add(name)
            return name
        return "<other>"

    def observe(
        self, operation: str, collection: str, status: int, seconds: float, code: str | None
    ) -> None:
        self.observe_many(operation, collection, status, (seconds,), code)

    def observe_many(
        self,
        operation: str,
        collection: str,
        status: int,
        seconds: Sequence[float],
        code: str | None,
    ) -> None:
        """``observe`` for several requests with the same labels and outcome."""
        key = (operation, collection, status // 100)
        series = self._series.get(key)
        if series is None:
            series = self._new_series(key)
        counts = series.counts
        for s in seconds:
            counts[bisect_left(LATENCY_BUCKETS, s)] += 1
        series.total += sum(seconds)
        if code is not None:
            self.errors.labels(code).inc(len(seconds))

    def _new_series(self, key: tuple[str, str, int]) -> _Series:
        operation, collection, klass = key
        labels = (operation, self.collection_label(collection), f"{klass}xx")
        series = self._by_labels.get(labels)
        if series is None:
            series = self._by_labels[labels] = _Series()
        if len(self._series) < 10_000:  # names folded into "<other>" share its series
            self._series[key] = series
        return series

    def request_histogram(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "dbproxy_request_duration_seconds",
            "Request latency by operation, collection and status class",
            labels=["operation", "collection", "status"],
        )
        bounds = [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
        for labels, series in list(self._by_labels.items()):
            cumulative = list(accumulate(series.counts))
            family.add_metric(
                list(labels), list(zip(bounds, cumulative, strict=True)), series.total
            )
        return family


class _LiveCollector(Collector):
    """Reads gauges and counters kept elsewhere (no double counting on the hot path)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        yield self.metrics.request_histogram()
        src = self.metrics.sources
        connections = src.get("connections", dict)()
        yield from _pools(connections)
        yield _upkeep(connections)
        yield from _gate(src.get("gate", dict)())
        yield from _transactions(src.get("transactions", dict)())
        yield from _cache(src.get("cache", dict)())
        yield from _pusher(src.get("pusher", dict)())
        yield from _schemas(src.get("schemas", dict)(), self.metrics.collection_label)
        fast = CounterMetricFamily(
            "dbproxy_fast_path_requests", "GET-by-id requests served by the shortcut"
        )
        shortcuts = src.get("fast_path", dict)()
        fast.add_metric([], shortcuts.get("requests", 0))
        yield fast
        fast_q = CounterMetricFamily(
            "dbproxy_fast_path_queries", "POST .../query requests served by the shortcut"
        )
        fast_q.add_metric([], shortcuts.get("queries", 0))
        yield fast_q
        lane = CounterMetricFamily(
            "dbproxy_fast_lane_requests",
            "Shortcut requests parsed and answered past aiohttp (the fast lane)",
        )
        lane.add_metric([], shortcuts.get("lane", 0))
        yield lane
        clients = src.get("clients", dict)()
        open_ = GaugeMetricFamily("dbproxy_client_connections", "Open client connections")
        open_.add_metric([], clients.get("open", 0))
        refused = CounterMetricFamily(
            "dbproxy_client_connections_refused",
            "Requests and connections answered 503 too_many_connections (the cap)",
        )
        refused.add_metric([], clients.get("refused", 0))
        yield from (open_, refused)


def _upkeep(connections: dict[str, Any]) -> Any:
    family = CounterMetricFamily(
        "dbproxy_partition_upkeep",
        "Time-partition upkeep: partitions created, dropped (retention), skipped, runs",
        labels=["database", "action"],
    )
    for db, info in connections.items():
        for action, n in (info.get("partition_upkeep") or {}).items():
            family.add_metric([db, action], n)
    return family


def _pools(connections: dict[str, Any]) -> Iterable[Any]:
    size = GaugeMetricFamily(
        "dbproxy_pool_size", "Open connections", labels=["database", "endpoint"]
    )
    in_use = GaugeMetricFamily(
        "dbproxy_pool_in_use", "Connections lent out", labels=["database", "endpoint"]
    )
    waiting = GaugeMetricFamily(
        "dbproxy_pool_waiting", "Requests waiting for a connection", labels=["database", "endpoint"]
    )
    breaker = GaugeMetricFamily(
        "dbproxy_breaker_state",
        "Circuit breaker state (1 for the current one)",
        labels=["database", "endpoint", "state"],
    )
    trips = CounterMetricFamily(
        "dbproxy_breaker_trips", "Times the breaker opened", labels=["database", "endpoint"]
    )
    lag = GaugeMetricFamily(
        "dbproxy_replica_lag_seconds", "Measured replay delay", labels=["database", "endpoint"]
    )
    for db, info in connections.items():
        for ep in info.get("endpoints", []):
            labels = [db, ep.get("name", "primary")]
            pool = ep.get("pool", {})
            size.add_metric(labels, pool.get("size", 0))
            in_use.add_metric(labels, pool.get("in_use", 0))
            waiting.add_metric(labels, pool.get("waiting", 0))
            brk = ep.get("breaker")
            if brk:
                for state in ("closed", "open", "half-open"):
                    breaker.add_metric([*labels, state], 1.0 if brk["state"] == state else 0.0)
                trips.add_metric(labels, brk.get("trips", 0))
            if ep.get("lag_seconds") is not None:
                lag.add_metric(labels, ep["lag_seconds"])
    yield from (size, in_use, waiting, breaker, trips, lag)


def _gate(gate: dict[str, Any]) -> Iterable[Any]:
    limited = CounterMetricFamily(
        "dbproxy_rate_limited", "Requests refused by rate limits or in-flight caps"
    )
    limited.add_metric([], gate.get("rate_limited", 0))
    redis = CounterMetricFamily(
        "dbproxy_rate_limit_redis_failures",
        "Global rate-limit decisions Redis could not make (decided by the fail mode)",
    )
    redis.add_metric([], gate.get("redis_failures", 0))
    reloads = CounterMetricFamily("dbproxy_policy_reloads", "Successful policy reloads")
    reloads.add_metric([], gate.get("reloads", 0))
    yield from (limited, redis, reloads)


def _transactions(tx: dict[str, Any]) -> Iterable[Any]:
    done = CounterMetricFamily(
        "dbproxy_transactions", "Interactive transactions by outcome", labels=["outcome"]
    )
    for outcome in ("begun", "committed", "rolled_back", "aborted", "expired"):
        done.add_metric([outcome], tx.get(outcome, 0))
    open_ = GaugeMetricFamily("dbproxy_transactions_open", "Open interactive transactions")
    open_.add_metric([], tx.get("open", 0))
    yield from (done, open_)


def _cache(cache: dict[str, Any]) -> Iterable[Any]:
    events = CounterMetricFamily(
        "dbproxy_cache_events", "Read cache events", labels=["level", "event"]
    )
    for key, value in cache.items():  # "near:hit", "redis:miss", ...
        level, _, event = key.partition(":")
        events.add_metric([level, event], value)
    yield events


def _pusher(pusher: dict[str, Any]) -> Iterable[Any]:
    shipped = CounterMetricFamily(
        "dbproxy_stats_batches", "Stats batches for the collector", labels=["outcome"]
    )
    for outcome in ("sent", "failures", "rejected", "dropped"):
        shipped.add_metric([outcome], pusher.get(outcome, 0))
    yield shipped


def _schemas(schemas: dict[str, Any], label: Callable[[str], str]) -> Iterable[Any]:
    warned = CounterMetricFamily(
        "dbproxy_schema_warnings",
        "Writes a collection schema let through with problems (validation.action: warn)",
        labels=["collection"],
    )
    refused = CounterMetricFamily(
        "dbproxy_schema_violations",
        "Writes refused with schema_violation",
        labels=["collection"],
    )
    for family, key in ((warned, "warnings"), (refused, "violations")):
        folded: dict[str, int] = {}
        for collection, n in schemas.get(key, {}).items():
            name = label(collection)
            folded[name] = folded.get(name, 0) + n
        for name, n in folded.items():
            family.add_metric([name], n)
    yield from (warned, refused)
