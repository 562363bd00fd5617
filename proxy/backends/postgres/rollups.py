"""The collector's rollups in PostgreSQL (schema ``dbproxy_collector``): the schema, the
additive merges and the fleet queries, over asyncpg; rows in and out are plain values."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import asyncpg

from proxy.backends.postgres.errors import translate
from proxy.backends.postgres.pool import CONNECTION_ERRORS
from proxy.collector.store import FleetRows
from proxy.config.redact import redact_dsn
from proxy.errors import ProxyError, Unavailable

__all__ = ["SCHEMA", "PostgresRollups"]

log = logging.getLogger(__name__)

SCHEMA: Final = "dbproxy_collector"

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


# A connection that died under a merge (the session was ended, the server restarted),
# with what asyncpg raises when it dies mid-protocol; a timeout is not retried (``_conn``).
_LOST: Final = CONNECTION_ERRORS

_INSERT_BATCH: Final = (
    f"INSERT INTO {_S}.batches (batch_id, service, instance) VALUES ($1, $2, $3) "
    "ON CONFLICT DO NOTHING RETURNING true"
)
_FORGET_BATCHES: Final = (
    f"DELETE FROM {_S}.batches WHERE received_at < now() - make_interval(secs => $1)"
)
_FORGET_SLOW: Final = (
    f"DELETE FROM {_S}.slow_queries WHERE at < (SELECT at FROM {_S}.slow_queries "
    "ORDER BY at DESC OFFSET $1 LIMIT 1)"
)


class PostgresRollups:
    """The rollup tables. ``start`` creates the schema; if the database is not reachable yet
    it keeps trying in the background and answers 503 meanwhile."""

    def __init__(self, dsn: str, *, max_connections: int = 5, timeout_seconds: float = 5.0) -> None:
        self._dsn = dsn
        self._max_connections = max_connections
        self._timeout = timeout_seconds
        self.pool: asyncpg.Pool | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._last_error: str | None = None
        self._retry_now = asyncio.Event()  # set when new credentials arrive

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
                self._dsn, min_size=1, max_size=self._max_connections, **self._connect_kwargs()
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

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "timeout": self._timeout,
            "command_timeout": self._timeout * 2,
            "server_settings": {"application_name": "dbproxy-collector"},
        }

    async def rotate_credentials(self, dsn: str) -> None:
        """A secret of the URL changed: new connections use ``dsn``; pooled ones are
        replaced as they come back (asyncpg's generation); a pool that could not be
        opened yet is tried again at once."""
        self._dsn = dsn
        if self.pool is not None:
            self.pool.set_connect_args(dsn, **self._connect_kwargs())
            await self.pool.expire_connections()
        self._retry_now.set()
        log.info("collector database: credentials reloaded (%s)", redact_dsn(dsn))

    async def _reconnect(self) -> None:
        delay = 0.5
        while self.pool is None:
            self._retry_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_now.wait(), delay)
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
    async def _conn(
        self, raw: tuple[type[BaseException], ...] = ()
    ) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; a driver error is translated, but those of ``raw``."""
        if self.pool is None:
            raise Unavailable("the collector database is not reachable", retry_after=1)
        try:
            async with self.pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except ProxyError:
            raise
        except Exception as exc:
            if isinstance(exc, raw) and not isinstance(exc, TimeoutError):
                raise
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

    async def merge(
        self,
        batch: tuple[str, str, str],
        rollups: Sequence[tuple[Any, ...]],
        slow: Sequence[tuple[Any, ...]],
    ) -> bool:
        """Record ``batch`` (id, service, instance) and merge its rows, all or nothing; False
        (and nothing changed) when that batch id was stored before."""
        for attempt in (0, 1, 2):  # the pool may hold several dead connections
            try:
                return await self._merge_once(batch, rollups, slow)
            except _LOST:
                # Lost before COMMIT: nothing was written. Lost after: the batch id is
                # stored, and the next attempt finds it. Either way, trying again is safe.
                if attempt == 2:
                    raise Unavailable("the collector database connection was lost") from None
        raise AssertionError("unreachable")

    async def _merge_once(
        self,
        batch: tuple[str, str, str],
        rollups: Sequence[tuple[Any, ...]],
        slow: Sequence[tuple[Any, ...]],
    ) -> bool:
        batch_id, service, instance = batch
        async with self._conn(raw=_LOST) as conn, conn.transaction():
            fresh = await conn.fetchval(_INSERT_BATCH, batch_id, service, instance)
            if not fresh:
                return False
            await conn.execute(_SEEN_INSTANCE, service, instance)
            if rollups:
                await conn.executemany(_MERGE_ROLLUP, rollups)
            if slow:
                await conn.executemany(_INSERT_SLOW, slow)
        return True

    async def prune(self, batch_id_retention_seconds: float, slow_retention: int) -> None:
        """Forget batch ids older than the retention and all but the newest slow queries."""
        async with self._conn() as conn:
            await conn.execute(_FORGET_BATCHES, batch_id_retention_seconds)
            await conn.execute(_FORGET_SLOW, slow_retention)

    async def instances(self) -> list[tuple[str, str]]:
        """(service, instance) of every sidecar that ever pushed."""
        async with self._conn() as conn:
            rows = await conn.fetch(f"SELECT service, instance FROM {_S}.instances")
        return [(r[0], r[1]) for r in rows]

    async def fleet(self, service: str | None, top: int, slow: int) -> FleetRows:
        """The rows of the fleet view (``service`` None: the whole fleet)."""
        async with self._conn() as conn:
            return FleetRows(
                operations=await conn.fetch(_FLEET_OPERATIONS, service),
                buckets=await conn.fetch(_FLEET_BUCKETS, service),
                patterns=await conn.fetch(_FLEET_PATTERNS, service, top),
                slow=await conn.fetch(_FLEET_SLOW, service, slow),
                services=await conn.fetch(_FLEET_SERVICES, service),
            )
