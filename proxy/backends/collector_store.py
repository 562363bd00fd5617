"""The collector's store: strict validation of pushed stat batches and the fleet rollups in
PostgreSQL (schema ``dbproxy_collector``), merged additively so they survive restarts.

Batch format (version 1, produced by ``proxy.stats.StatsRecorder.drain_batch``)::

    {"version": 1, "batch_id": "<8-64 of [A-Za-z0-9_-]>", "service": "...", "instance": "...",
     "started_at": <epoch s>, "ended_at": <epoch s>,
     "patterns": [{"collection", "operation", "pattern", "calls": n, "errors": {code: n},
                   "total_ms", "max_ms", "documents": n, "buckets": [[index, n], ...],
                   "index_used": bool | null}],
     "slow": [{"query_id", "timestamp", "collection", "operation", "pattern",
               "execution_time_ms", "documents", "success", "error_code", "index_used",
               "plan"}]}

Every key is required, no other key is accepted, bucket counts add up to ``calls``. A batch
is stored at most once (``batch_id``), in one transaction, or not at all.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

import asyncpg
import orjson

from proxy.backends.postgres import translate
from proxy.errors import BadRequest, ProxyError, Unavailable
from proxy.observe.stats import (
    BATCH_VERSION,
    COLLECTION_RE,
    ERROR_CODE_RE,
    INSTANCE_RE,
    NUM_BUCKETS,
    OPERATION_RE,
    PATTERN_MAX_CHARS,
    PLAN_MAX_CHARS,
    SERVICE_RE,
    summary,
)

__all__ = [
    "MAX_BATCH_PATTERNS",
    "MAX_BATCH_SLOW",
    "SCHEMA",
    "Batch",
    "CollectorStore",
    "PatternRollup",
    "SlowQuery",
    "parse_batch",
]

log = logging.getLogger(__name__)

SCHEMA: Final = "dbproxy_collector"
MAX_BATCH_PATTERNS: Final = 10_000
MAX_BATCH_SLOW: Final = 1_000
MAX_COUNT: Final = 2**53 - 1  # integers JSON carries exactly
MAX_MS: Final = 1e12
MAX_EPOCH: Final = 1e11  # seconds; far beyond any real clock, within timestamptz
_MAX_PROBLEMS: Final = 20
_BATCH_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{8,64}")
_QUERY_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BATCH_KEYS: Final = frozenset(
    {"version", "batch_id", "service", "instance", "started_at", "ended_at", "patterns", "slow"}
)
_PATTERN_KEYS: Final = frozenset(
    {
        "collection",
        "operation",
        "pattern",
        "calls",
        "errors",
        "total_ms",
        "max_ms",
        "documents",
        "buckets",
        "index_used",
    }
)
_SLOW_KEYS: Final = frozenset(
    {
        "query_id",
        "timestamp",
        "collection",
        "operation",
        "pattern",
        "execution_time_ms",
        "documents",
        "success",
        "error_code",
        "index_used",
        "plan",
    }
)


# ---- the validated batch -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PatternRollup:
    collection: str
    operation: str
    pattern: str
    calls: int
    errors: dict[str, int]
    total_ms: float
    max_ms: float
    documents: int
    buckets: tuple[int, ...]  # dense, NUM_BUCKETS long
    index_used: bool | None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.collection, self.operation, self.pattern)


@dataclass(frozen=True, slots=True)
class SlowQuery:
    query_id: str
    timestamp: float
    collection: str
    operation: str
    pattern: str
    execution_time_ms: float
    documents: int
    success: bool
    error_code: str | None
    index_used: bool | None
    plan: str | None


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: str
    service: str
    instance: str
    started_at: float
    ended_at: float
    patterns: tuple[PatternRollup, ...]
    slow: tuple[SlowQuery, ...]


# ---- validation ----------------------------------------------------------------------------


class _Problems:
    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    @property
    def full(self) -> bool:
        return len(self.items) >= _MAX_PROBLEMS


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Reader:
    """Typed access to one JSON object of the batch; each problem noted with its path."""

    __slots__ = ("ok", "path", "problems", "raw")

    def __init__(self, raw: object, keys: frozenset[str], path: str, problems: _Problems) -> None:
        self.path, self.problems, self.ok = path, problems, True
        if not isinstance(raw, dict):
            self.fail(path, "must be an object")
            self.raw: Mapping[str, Any] = {}
            return
        self.raw = raw
        for key in sorted(set(raw) - keys, key=str)[:3]:
            self.fail(f"{path}.{str(key)[:40]}", "unknown key")
        for key in sorted(keys - set(raw)):
            self.fail(f"{path}.{key}", "is required")

    def fail(self, where: str, message: str) -> None:
        self.ok = False
        self.problems.add(where, message)

    def count(self, key: str, low: int = 0) -> int:
        value = self.raw.get(key)
        if _is_int(value) and low <= value <= MAX_COUNT:
            return value
        if key in self.raw:
            self.fail(f"{self.path}.{key}", f"must be an integer between {low} and {MAX_COUNT}")
        return 0

    def number(self, key: str, high: float) -> float:
        value = self.raw.get(key)
        if _is_number(value) and math.isfinite(value) and 0 <= value <= high:
            return float(value)
        if key in self.raw:
            self.fail(f"{self.path}.{key}", f"must be a number between 0 and {high:g}")
        return 0.0

    def text(self, key: str, pattern: re.Pattern[str] | None, max_len: int = 0) -> str:
        value = self.raw.get(key)
        if key not in self.raw:
            return ""
        if not isinstance(value, str):
            self.fail(f"{self.path}.{key}", "must be a string")
            return ""
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(f"{self.path}.{key}", f"must match {pattern.pattern}")
        elif pattern is None and not (0 < len(value) <= max_len and "\x00" not in value):
            self.fail(f"{self.path}.{key}", f"must be 1 to {max_len} characters, no NUL")
        return value

    def optional_text(self, key: str, pattern: re.Pattern[str] | None, max_len: int) -> str | None:
        return None if self.raw.get(key) is None else self.text(key, pattern, max_len)

    def flag(self, key: str, *, nullable: bool) -> bool | None:
        value = self.raw.get(key)
        if key in self.raw and not (isinstance(value, bool) or (nullable and value is None)):
            self.fail(f"{self.path}.{key}", "must be true or false" + (" or null" * nullable))
            return None
        return value if isinstance(value, bool) else None

    def items(self, key: str, max_items: int) -> list[Any]:
        value = self.raw.get(key)
        if key in self.raw and not isinstance(value, list):
            self.fail(f"{self.path}.{key}", "must be an array")
            return []
        if isinstance(value, list) and len(value) > max_items:
            self.fail(f"{self.path}.{key}", f"must hold at most {max_items} items")
            return []
        return value if isinstance(value, list) else []


def _errors(r: _Reader, calls: int) -> dict[str, int]:
    raw = r.raw.get("errors")
    where = f"{r.path}.errors"
    if "errors" not in r.raw:
        return {}
    if not isinstance(raw, dict) or len(raw) > 64:
        r.fail(where, "must be an object of at most 64 error codes")
        return {}
    errors: dict[str, int] = {}
    for code, n in raw.items():
        if not ERROR_CODE_RE.fullmatch(code) or not _is_int(n) or not 1 <= n <= MAX_COUNT:
            r.fail(where, "keys must be error codes, values positive integers")
            return {}
        errors[code] = n
    if sum(errors.values()) > calls:
        r.fail(where, "count more errors than calls")
    return errors


def _buckets(r: _Reader, calls: int) -> tuple[int, ...]:
    raw = r.items("buckets", NUM_BUCKETS)
    where = f"{r.path}.buckets"
    dense = [0] * NUM_BUCKETS
    last = -1
    for pair in raw:
        valid = isinstance(pair, list) and len(pair) == 2 and all(_is_int(x) for x in pair)
        if not valid or not last < pair[0] < NUM_BUCKETS or not 1 <= pair[1] <= MAX_COUNT:
            r.fail(where, f"must be [index, count] pairs, indexes rising below {NUM_BUCKETS}")
            return tuple(dense)
        last = pair[0]
        dense[pair[0]] = pair[1]
    if "buckets" in r.raw and sum(dense) != calls:
        r.fail(where, "bucket counts must add up to calls")
    return tuple(dense)


def _pattern(raw: object, path: str, problems: _Problems) -> PatternRollup | None:
    r = _Reader(raw, _PATTERN_KEYS, path, problems)
    calls = r.count("calls", 1)
    total_ms, max_ms = r.number("total_ms", MAX_MS), r.number("max_ms", MAX_MS)
    if max_ms > total_ms * (1 + 1e-9) + 1e-6:
        r.fail(f"{path}.max_ms", "must not exceed total_ms")
    rollup = PatternRollup(
        collection=r.text("collection", COLLECTION_RE),
        operation=r.text("operation", OPERATION_RE),
        pattern=r.text("pattern", None, PATTERN_MAX_CHARS),
        calls=calls,
        errors=_errors(r, calls),
        total_ms=total_ms,
        max_ms=max_ms,
        documents=r.count("documents"),
        buckets=_buckets(r, calls),
        index_used=r.flag("index_used", nullable=True),
    )
    return rollup if r.ok else None


def _slow(raw: object, path: str, problems: _Problems) -> SlowQuery | None:
    r = _Reader(raw, _SLOW_KEYS, path, problems)
    slow = SlowQuery(
        query_id=r.text("query_id", _QUERY_ID_RE),
        timestamp=r.number("timestamp", MAX_EPOCH),
        collection=r.text("collection", COLLECTION_RE),
        operation=r.text("operation", OPERATION_RE),
        pattern=r.text("pattern", None, PATTERN_MAX_CHARS),
        execution_time_ms=r.number("execution_time_ms", MAX_MS),
        documents=r.count("documents"),
        success=bool(r.flag("success", nullable=False)),
        error_code=r.optional_text("error_code", ERROR_CODE_RE, 64),
        index_used=r.flag("index_used", nullable=True),
        plan=r.optional_text("plan", None, PLAN_MAX_CHARS),
    )
    return slow if r.ok else None


def parse_batch(raw: Any) -> Batch:
    """The validated batch; BadRequest ``invalid_batch`` listing the problems otherwise."""
    problems = _Problems()
    r = _Reader(raw, _BATCH_KEYS, "batch", problems)
    version = r.raw.get("version")
    if "version" in r.raw and (not _is_int(version) or version != BATCH_VERSION):
        r.fail("batch.version", f"must be {BATCH_VERSION}")
    started, ended = r.number("started_at", MAX_EPOCH), r.number("ended_at", MAX_EPOCH)
    if started > ended:
        r.fail("batch.ended_at", "must not be before started_at")
    patterns: list[PatternRollup] = []
    seen: set[tuple[str, str, str]] = set()
    for i, item in enumerate(r.items("patterns", MAX_BATCH_PATTERNS)):
        if problems.full:
            break
        rollup = _pattern(item, f"batch.patterns[{i}]", problems)
        if rollup is not None and rollup.key in seen:
            problems.add(f"batch.patterns[{i}]", "repeats the key of an earlier entry")
        elif rollup is not None:
            seen.add(rollup.key)
            patterns.append(rollup)
    slow: list[SlowQuery] = []
    for i, item in enumerate(r.items("slow", MAX_BATCH_SLOW)):
        if problems.full:
            break
        entry = _slow(item, f"batch.slow[{i}]", problems)
        if entry is not None:
            slow.append(entry)
    batch = Batch(
        batch_id=r.text("batch_id", _BATCH_ID_RE),
        service=r.text("service", SERVICE_RE),
        instance=r.text("instance", INSTANCE_RE),
        started_at=started,
        ended_at=ended,
        patterns=tuple(patterns),
        slow=tuple(slow),
    )
    if problems.items:
        shown = problems.items[:_MAX_PROBLEMS]
        raise BadRequest(
            f"invalid stats batch: {shown[0]}"
            + (f" (and {len(problems.items) - 1} more)" if len(problems.items) > 1 else ""),
            code="invalid_batch",
            details={"problems": shown},
        )
    return batch


# ---- storage -------------------------------------------------------------------------------

_S = SCHEMA
_DDL: Final = f"""
CREATE SCHEMA IF NOT EXISTS {_S};
CREATE TABLE IF NOT EXISTS {_S}.batches (
  batch_id text PRIMARY KEY,
  service text NOT NULL,
  instance text NOT NULL,
  received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS batches_received_at ON {_S}.batches (received_at);
CREATE TABLE IF NOT EXISTS {_S}.instances (
  service text NOT NULL,
  instance text NOT NULL,
  first_seen timestamptz NOT NULL DEFAULT now(),
  last_seen timestamptz NOT NULL DEFAULT now(),
  batches bigint NOT NULL DEFAULT 0,
  PRIMARY KEY (service, instance)
);
CREATE TABLE IF NOT EXISTS {_S}.rollups (
  service text NOT NULL,
  collection text NOT NULL,
  operation text NOT NULL,
  pattern text NOT NULL,
  calls bigint NOT NULL,
  errors bigint NOT NULL,
  errors_by_code jsonb NOT NULL,
  total_ms double precision NOT NULL,
  max_ms double precision NOT NULL,
  documents bigint NOT NULL,
  buckets bigint[] NOT NULL,
  index_used boolean,
  first_seen timestamptz NOT NULL DEFAULT now(),
  last_seen timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (service, collection, operation, pattern)
);
CREATE TABLE IF NOT EXISTS {_S}.slow_queries (
  service text NOT NULL,
  instance text NOT NULL,
  query_id text NOT NULL,
  at timestamptz NOT NULL,
  collection text NOT NULL,
  operation text NOT NULL,
  pattern text NOT NULL,
  execution_time_ms double precision NOT NULL,
  documents bigint NOT NULL,
  success boolean NOT NULL,
  error_code text,
  index_used boolean,
  plan text,
  received_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (service, instance, query_id)
);
CREATE INDEX IF NOT EXISTS slow_queries_at ON {_S}.slow_queries (at DESC);
"""

_MERGE_ROLLUP: Final = f"""
INSERT INTO {_S}.rollups AS r (service, collection, operation, pattern, calls, errors,
  errors_by_code, total_ms, max_ms, documents, buckets, index_used)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10, $11::bigint[], $12)
ON CONFLICT (service, collection, operation, pattern) DO UPDATE SET
  calls = r.calls + EXCLUDED.calls,
  errors = r.errors + EXCLUDED.errors,
  errors_by_code = (
    SELECT coalesce(jsonb_object_agg(code, n), '{{}}'::jsonb)
    FROM (SELECT code, sum(n)::bigint AS n
          FROM (SELECT key AS code, value::bigint AS n FROM jsonb_each_text(r.errors_by_code)
                UNION ALL
                SELECT key, value::bigint FROM jsonb_each_text(EXCLUDED.errors_by_code)) e
          GROUP BY code) g),
  total_ms = r.total_ms + EXCLUDED.total_ms,
  max_ms = greatest(r.max_ms, EXCLUDED.max_ms),
  documents = r.documents + EXCLUDED.documents,
  buckets = (SELECT array_agg(coalesce(a, 0) + coalesce(b, 0) ORDER BY i)
             FROM unnest(r.buckets, EXCLUDED.buckets) WITH ORDINALITY AS u(a, b, i)),
  index_used = coalesce(EXCLUDED.index_used, r.index_used),
  last_seen = now()
"""

_INSERT_SLOW: Final = f"""
INSERT INTO {_S}.slow_queries (service, instance, query_id, at, collection, operation,
  pattern, execution_time_ms, documents, success, error_code, index_used, plan)
VALUES ($1, $2, $3, to_timestamp($4), $5, $6, $7, $8, $9, $10, $11, $12, $13)
ON CONFLICT DO NOTHING
"""

_SEEN_INSTANCE: Final = f"""
INSERT INTO {_S}.instances AS i (service, instance, batches) VALUES ($1, $2, 1)
ON CONFLICT (service, instance) DO UPDATE SET last_seen = now(), batches = i.batches + 1
"""

# Optional service filter: $1 is NULL for the whole fleet.
_FLEET_OPERATIONS: Final = f"""
SELECT operation, collection, sum(calls)::bigint AS calls, sum(errors)::bigint AS errors,
       sum(total_ms) AS total_ms, max(max_ms) AS max_ms, sum(documents)::bigint AS documents,
       count(DISTINCT service)::int AS services
FROM {_S}.rollups WHERE $1::text IS NULL OR service = $1
GROUP BY operation, collection
"""
_FLEET_BUCKETS: Final = f"""
SELECT r.operation, r.collection, (u.i - 1)::int AS bucket, sum(u.n)::bigint AS n
FROM {_S}.rollups r, unnest(r.buckets) WITH ORDINALITY AS u(n, i)
WHERE u.n <> 0 AND ($1::text IS NULL OR r.service = $1)
GROUP BY 1, 2, 3
"""
_FLEET_PATTERNS: Final = f"""
SELECT collection, operation, pattern, sum(calls)::bigint AS calls,
       sum(errors)::bigint AS errors, sum(total_ms) AS total_ms, max(max_ms) AS max_ms,
       sum(documents)::bigint AS documents, array_agg(DISTINCT service) AS services,
       bool_and(index_used) AS index_used
FROM {_S}.rollups WHERE $1::text IS NULL OR service = $1
GROUP BY collection, operation, pattern
ORDER BY sum(total_ms) DESC, collection, operation, pattern
LIMIT $2
"""
_FLEET_SLOW: Final = f"""
SELECT service, instance, query_id, extract(epoch FROM at)::float8 AS timestamp, collection,
       operation, pattern, execution_time_ms, documents, success, error_code, index_used, plan
FROM {_S}.slow_queries WHERE $1::text IS NULL OR service = $1
ORDER BY at DESC, query_id LIMIT $2
"""
_FLEET_SERVICES: Final = f"""
SELECT i.service, i.instances, i.batches, extract(epoch FROM i.last_seen)::float8 AS last_seen,
       coalesce(r.calls, 0)::bigint AS calls, coalesce(r.errors, 0)::bigint AS errors,
       coalesce(r.total_ms, 0) AS total_ms, coalesce(r.documents, 0)::bigint AS documents,
       coalesce(r.patterns, 0)::bigint AS patterns
FROM (SELECT service, count(*)::int AS instances, sum(batches)::bigint AS batches,
             max(last_seen) AS last_seen
      FROM {_S}.instances GROUP BY service) i
LEFT JOIN (SELECT service, sum(calls) AS calls, sum(errors) AS errors,
                  sum(total_ms) AS total_ms, sum(documents) AS documents, count(*) AS patterns
           FROM {_S}.rollups GROUP BY service) r USING (service)
WHERE $1::text IS NULL OR i.service = $1
ORDER BY i.service
"""


class CollectorStore:
    """The fleet rollups in PostgreSQL. ``start`` creates the schema; if the database is not
    reachable yet it keeps trying in the background and answers 503 meanwhile."""

    def __init__(
        self,
        dsn: str,
        *,
        max_connections: int = 5,
        timeout_seconds: float = 5.0,
        slow_retention: int = 10_000,
        batch_id_retention_seconds: float = 86_400.0,
    ) -> None:
        self._dsn = dsn
        self._max_connections = max_connections
        self._timeout = timeout_seconds
        self.slow_retention = slow_retention
        self.batch_id_retention_seconds = batch_id_retention_seconds
        self.pool: asyncpg.Pool | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._last_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._open()
        except ProxyError as err:
            log.warning("collector database not ready: %s; retrying in the background", err.code)
            self._last_error = err.code
            self._reconnect_task = asyncio.create_task(self._reconnect())

    async def _open(self) -> None:
        pool = None
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._max_connections,
                timeout=self._timeout,
                command_timeout=self._timeout * 2,
                server_settings={"application_name": "dbproxy-collector"},
            )
            async with pool.acquire(timeout=self._timeout) as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('dbproxy:collector'))")
                await conn.execute(_DDL)
        except Exception as exc:
            if pool is not None:
                pool.terminate()
            raise translate(exc) from None
        self.pool = pool
        self._last_error = None

    async def _reconnect(self) -> None:
        delay = 0.5
        while self.pool is None:
            await asyncio.sleep(delay)
            try:
                await self._open()
                log.info("collector database is reachable now")
            except ProxyError as err:
                self._last_error = err.code
                delay = min(delay * 2, 15.0)

    async def close(self) -> None:
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            await asyncio.gather(self._reconnect_task, return_exceptions=True)
            self._reconnect_task = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        if self.pool is None:
            raise Unavailable("the collector database is not reachable", retry_after=1)
        try:
            async with self.pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except ProxyError:
            raise
        except Exception as exc:
            raise translate(exc) from None

    async def health(self) -> dict[str, Any]:
        if self.pool is None:
            return {"status": "down", "error": self._last_error or "not_connected"}
        started = time.perf_counter()
        try:
            async with self._conn() as conn:
                await conn.fetchval("SELECT 1", timeout=2.0)
        except ProxyError as err:
            return {"status": "down", "error": err.code}
        return {
            "status": "up",
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "pool": {"size": self.pool.get_size(), "max": self.pool.get_max_size()},
        }

    # -- writing -------------------------------------------------------------------------

    async def ingest(self, batch: Batch) -> bool:
        """Merge ``batch`` into the rollups, all or nothing. False (and nothing changed)
        when a batch with the same id was stored before: pushers retry after timeouts."""
        rows = [
            (
                batch.service,
                p.collection,
                p.operation,
                p.pattern,
                p.calls,
                sum(p.errors.values()),
                orjson.dumps(p.errors).decode(),
                p.total_ms,
                p.max_ms,
                p.documents,
                list(p.buckets),
                p.index_used,
            )
            for p in sorted(batch.patterns, key=lambda p: p.key)  # one lock order: no deadlock
        ]
        slow = [
            (
                batch.service,
                batch.instance,
                s.query_id,
                s.timestamp,
                s.collection,
                s.operation,
                s.pattern,
                s.execution_time_ms,
                s.documents,
                s.success,
                s.error_code,
                s.index_used,
                s.plan,
            )
            for s in batch.slow
        ]
        async with self._conn() as conn, conn.transaction():
            fresh = await conn.fetchval(
                f"INSERT INTO {_S}.batches (batch_id, service, instance) VALUES ($1, $2, $3) "
                "ON CONFLICT DO NOTHING RETURNING true",
                batch.batch_id,
                batch.service,
                batch.instance,
            )
            if not fresh:
                return False
            await conn.execute(_SEEN_INSTANCE, batch.service, batch.instance)
            if rows:
                await conn.executemany(_MERGE_ROLLUP, rows)
            if slow:
                await conn.executemany(_INSERT_SLOW, slow)
        return True

    async def maintain(self) -> None:
        """Forget old batch ids and all but the newest ``slow_retention`` slow queries."""
        async with self._conn() as conn:
            await conn.execute(
                f"DELETE FROM {_S}.batches WHERE received_at < now() - make_interval(secs => $1)",
                self.batch_id_retention_seconds,
            )
            await conn.execute(
                f"DELETE FROM {_S}.slow_queries WHERE at < (SELECT at FROM {_S}.slow_queries "
                "ORDER BY at DESC OFFSET $1 LIMIT 1)",
                self.slow_retention,
            )

    # -- reading ---------------------------------------------------------------------------

    async def instances(self) -> list[tuple[str, str]]:
        """(service, instance) of every sidecar that ever pushed."""
        async with self._conn() as conn:
            rows = await conn.fetch(f"SELECT service, instance FROM {_S}.instances")
        return [(r[0], r[1]) for r in rows]

    async def fleet_performance(
        self, service: str | None = None, top: int = 20, slow: int = 50
    ) -> dict[str, Any]:
        """Fleet-wide percentiles per (operation, collection) from merged buckets, the top
        patterns by total time, the newest slow queries, and a per-service table."""
        async with self._conn() as conn:
            operations = await conn.fetch(_FLEET_OPERATIONS, service)
            buckets = await conn.fetch(_FLEET_BUCKETS, service)
            patterns = await conn.fetch(_FLEET_PATTERNS, service, top)
            slow_rows = await conn.fetch(_FLEET_SLOW, service, slow)
            services = await conn.fetch(_FLEET_SERVICES, service)
        return {
            "scope": "fleet",
            "service": service,
            "operations": _operations(operations, buckets),
            "top_patterns": [_pattern_row(r) for r in patterns],
            "slow_queries": [_slow_row(r) for r in slow_rows],
            "services": [_service_row(r) for r in services],
        }


def _operations(rows: list[asyncpg.Record], buckets: list[asyncpg.Record]) -> list[dict[str, Any]]:
    dense: dict[tuple[str, str], list[int]] = {}
    for b in buckets:
        counts = dense.setdefault((b["operation"], b["collection"]), [0] * NUM_BUCKETS)
        if 0 <= b["bucket"] < NUM_BUCKETS:
            counts[b["bucket"]] += b["n"]
    out = []
    for r in rows:
        counts = dense.get((r["operation"], r["collection"]), [0] * NUM_BUCKETS)
        out.append(
            {
                "operation": r["operation"],
                "collection": r["collection"],
                **summary(r["calls"], r["errors"], r["total_ms"], r["max_ms"], counts),
                "documents": r["documents"],
                "services": r["services"],
            }
        )
    out.sort(key=lambda o: (-o["total_ms"], o["collection"], o["operation"]))
    return out


def _pattern_row(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "collection": r["collection"],
        "operation": r["operation"],
        "pattern": r["pattern"],
        "calls": r["calls"],
        "errors": r["errors"],
        "total_ms": round(r["total_ms"], 3),
        "mean_ms": round(r["total_ms"] / r["calls"], 3) if r["calls"] else None,
        "max_ms": round(r["max_ms"], 3),
        "documents": r["documents"],
        "services": sorted(r["services"]),
        "index_used": r["index_used"],
    }


def _slow_row(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "service_name": r["service"],
        "instance": r["instance"],
        "query_id": r["query_id"],
        "timestamp": r["timestamp"],
        "collection": r["collection"],
        "operation_type": r["operation"],
        "query_pattern": r["pattern"],
        "execution_time_ms": r["execution_time_ms"],
        "documents_processed": r["documents"],
        "success": r["success"],
        "error_code": r["error_code"],
        "index_used": r["index_used"],
        "plan": r["plan"],
    }


def _service_row(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "service": r["service"],
        "instances": r["instances"],
        "batches": r["batches"],
        "last_seen": r["last_seen"],
        "calls": r["calls"],
        "errors": r["errors"],
        "total_ms": round(r["total_ms"], 3),
        "documents": r["documents"],
        "patterns": r["patterns"],
    }
