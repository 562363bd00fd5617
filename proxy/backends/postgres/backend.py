"""PostgresBackend: the pooled backend's lifecycle, health, routing of reads and writes to
its endpoints, monitoring (connections, collections, plans, audit log) and transactions."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any

import asyncpg
import orjson

from proxy import context
from proxy.backends.base import Capabilities, TransactionShare, TxKind
from proxy.backends.postgres.aggregate import Speculation
from proxy.backends.postgres.coalesced import CoalescingDocuments
from proxy.backends.postgres.ddl import create_schema
from proxy.backends.postgres.describe import add_partitions
from proxy.backends.postgres.describe import describe_collection as describe_one
from proxy.backends.postgres.describe import load_schemas as read_schemas
from proxy.backends.postgres.errors import MISSING_RETRY_AFTER, dsn_database, no_answer, translate
from proxy.backends.postgres.execute import Executor
from proxy.backends.postgres.migrations import PgMigrations
from proxy.backends.postgres.partitions import stale_layout
from proxy.backends.postgres.pool import CONNECTION_ERRORS, EndpointSet, release
from proxy.backends.postgres.sql import (
    AUDIT_LOG,
    DESCRIBE_COLLECTIONS,
    SCHEMAS_CHANNEL,
    glob_to_posix,
)
from proxy.backends.postgres.timeparts import UpkeepCounts, run_upkeep
from proxy.backends.postgres.transaction import ISOLATION_LEVELS, PostgresTransaction
from proxy.config import DatabaseConfig, Limits
from proxy.errors import BadRequest, ProxyError, Unavailable
from proxy.ids import IdGenerator
from proxy.query.spec import AuditScope

log = logging.getLogger(__name__)


async def _listen(conn: asyncpg.Connection, changed: Callable[[], Awaitable[None]]) -> None:
    """Serve one listening connection until it is lost."""
    woken = asyncio.Event()
    lost = asyncio.Event()

    def notified(*_: Any) -> None:
        woken.set()

    def ended(_: Any) -> None:
        lost.set()
        woken.set()

    conn.add_termination_listener(ended)
    await conn.add_listener(SCHEMAS_CHANNEL, notified)
    woken.set()  # what changed before this connection listened
    while not lost.is_set():
        try:
            await asyncio.wait_for(woken.wait(), 30.0)
        except TimeoutError:  # quiet: make sure the connection still answers
            try:
                await conn.fetchval("SELECT 1", timeout=5.0)
            except Exception:
                return
            continue
        woken.clear()
        if lost.is_set():
            return
        try:
            await changed()
        except ProxyError as err:
            log.debug("schemas not reloaded after a notification: %s", err.code)


class PostgresBackend(CoalescingDocuments):
    """Documents in ``<schema>."<collection>"``: _id text PK, doc jsonb, _version, timestamps.

    Statements go to the endpoint the router picks: writes and transactions to the primary,
    reads by preference (and consistency token) to a replica or the primary."""

    capabilities = Capabilities(
        explain=True,
        describe_collections=True,
        audit_log=True,
        endpoints=True,
        coalesce=True,
        schemas=True,
        aggregate=True,
        search=True,
    )

    def __init__(
        self,
        config: DatabaseConfig,
        limits: Limits,
        *,
        schema: str = "dbproxy",
        ids: IdGenerator | None = None,
        audit: bool = True,
        endpoints: EndpointSet | None = None,
        coalesce: bool = True,
        partman: bool = True,
    ) -> None:
        super().__init__(config.name, limits, schema, ids or IdGenerator(), set(), audit, coalesce)
        self.config = config
        self.endpoints = endpoints or EndpointSet(config, limits)
        self.transaction_share = TransactionShare(config.pool_settings.max_connections)
        self._acquire_timeout = config.pool_settings.timeout_seconds
        self._exec = Executor(self.endpoints, limits, self._acquire_timeout)
        self._reconnect_task: asyncio.Task[None] | None = None
        self._retry_now = asyncio.Event()  # set by a credential rotation: reconnect at once
        self._schema_conn: asyncpg.Connection | None = None  # the schema watch's LISTEN
        self._last_error: str | None = None
        self.upkeep_counts = UpkeepCounts()  # time-partition upkeep, for /metrics
        self.partman = partman  # False: the sidecar keeps time partitions even with pg_partman
        self._speculation = Speculation()  # aggregate: speculative statements that failed

    @property
    def pool(self) -> asyncpg.Pool | None:
        return self.endpoints.primary.pool

    @pool.setter
    def pool(self, value: asyncpg.Pool | None) -> None:
        self.endpoints.primary.pool = value

    @property
    def waiting(self) -> int:
        return self.endpoints.primary.waiting

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pools; if the primary is not reachable yet, keep trying in the
        background (requests get 503 database_unavailable meanwhile, health says why)."""
        try:
            await self._open()
        except ProxyError as err:
            log.warning(
                "database %s (%s) not ready: %s; retrying in the background",
                self.name,
                self.config.redacted_dsn(),
                err.message,
            )
            self._reconnect_task = asyncio.create_task(self._reconnect())
        await self.endpoints.start_replicas()
        self.endpoints.start_watchdog()

    async def _open(self) -> None:
        ps = self.config.pool_settings
        pool = None
        try:
            pool = await self.endpoints.open_pool(self.endpoints.primary)
            async with pool.acquire(timeout=ps.timeout_seconds) as conn, conn.transaction():
                await create_schema(conn, self._schema_ident)
        except Exception as exc:
            if pool is not None:
                pool.terminate()
            err = translate(exc)
            if getattr(exc, "sqlstate", None) == "3D000":
                name = dsn_database(self.config.connection_string)
                what = f"database {name}" if name else "the configured database"
                err = Unavailable(f"{what} does not exist", retry_after=MISSING_RETRY_AFTER)
            self._down(err)
            raise err from None
        self.pool = pool
        self._last_error = None
        self.endpoints.primary.down_reason = None

    def _down(self, err: ProxyError) -> None:
        """Remember why the primary's pool is not open: health and requests say so."""
        self._last_error = err.code
        self.endpoints.primary.down_reason = err.message

    async def _reconnect(self) -> None:
        delay = 0.5
        while self.pool is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_now.wait(), delay)
            self._retry_now.clear()
            before = self.endpoints.primary.down_reason
            try:
                await self._open()
                log.info("database %s is reachable now", self.name)
            except ProxyError as err:
                if err.message != before:  # once per reason, not once per attempt
                    log.warning("database %s not ready: %s", self.name, err.message)
                delay = min(delay * 2, 15.0)

    async def rotate_credentials(self, dsn: str) -> None:
        """A secret the connection string reads has changed: new connections (primary,
        replicas, probes, the schema watch) use ``dsn``; pooled ones are replaced as they
        come back; a primary that could not connect tries again at once."""
        self.config = replace(self.config, connection_string=dsn)
        await self.endpoints.rotate(dsn)
        self._retry_now.set()
        if self._schema_conn is not None:  # it listens again with the new credentials
            self._schema_conn.terminate()  # (and reloads what changed in between)
        log.info("database %s: credentials reloaded (%s)", self.name, self.config.redacted_dsn())

    async def close(self) -> None:
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            await asyncio.gather(self._reconnect_task, return_exceptions=True)
            self._reconnect_task = None
        await self.endpoints.close()

    async def health(self) -> dict[str, Any]:
        """Ready when the primary answers; replicas only degrade."""
        started = time.perf_counter()
        if self.pool is None:
            gone: dict[str, Any] = {"status": "down", "error": self._last_error or "not_connected"}
            if self.endpoints.primary.down_reason:
                gone["message"] = self.endpoints.primary.down_reason
            return gone
        try:
            async with self._conn(wait=2.0) as conn:
                await conn.fetchval("SELECT 1", timeout=2.0)
        except Exception as exc:
            err = translate(exc)
            return {"status": "down", "error": err.code}
        pool = self.pool
        assert pool is not None
        out: dict[str, Any] = {
            "status": "up",
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "pool": {
                "size": pool.get_size(),
                "idle": pool.get_idle_size(),
                "max": pool.get_max_size(),
            },
        }
        if self.endpoints.replicas:
            down = [r.name for r in self.endpoints.replicas if not r.state.healthy]
            out["replicas"] = {"total": len(self.endpoints.replicas), "down": down}
            if down:
                out["degraded"] = True
        return out

    def _conn(self, wait: float | None = None) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A primary connection for housekeeping and monitoring queries (and DDL)."""
        return self._exec.conn(wait)

    async def _learn(self, collection: str) -> None:
        if collection in self._known_tables:
            return
        try:
            async with self._conn(self._wait()) as conn:
                await self._ensure_table(conn, collection)
        except Exception as exc:
            raise translate(exc) from None

    async def _write(self, collection: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run a write on the primary, creating the collection's table on first use; with
        replicas, note the WAL position for the response's consistency token."""
        try:
            if collection not in self._known_tables:
                async with self._conn(self._wait()) as conn:
                    await self._ensure_table(conn, collection)
            ep = self.endpoints.choose("write", None, None)
            try:
                rows = await self._exec.run_on(ep, sql, args, write=True)
            except asyncpg.exceptions.UndefinedTableError:
                self._known_tables.discard(collection)  # dropped behind our back
                async with self._conn(self._wait()) as conn:
                    await self._ensure_table(conn, collection)
                rows = await self._exec.run_on(ep, sql, args, write=True)
            if self.endpoints.replicas:
                await self._note_write_position()
            return rows
        except Exception as exc:
            raise self._layout_moved(collection, exc) or translate(exc) from None

    def _layout_moved(self, collection: str, exc: BaseException) -> ProxyError | None:
        """A write built for the table this process knew, on a table since re-created with
        another layout (partitioned or not): relearnt on the next write, retried."""
        if not stale_layout(exc, self._key(collection) is not None):
            return None
        self._known_tables.discard(collection)
        return Unavailable(
            "the collection's partitioning changed under this write; nothing was written",
            code="partitioning_changed",
            retry_after=1,
        )

    async def _note_write_position(self) -> None:
        async with self._conn(self._wait()) as conn:
            lsn = await conn.fetchval(
                "SELECT pg_current_wal_lsn()::text", timeout=max(self._wait(), 0.001)
            )
        context.write_token.set(lsn)

    async def _read(
        self, collection: str, sql: str, *args: Any, kind: str = "read"
    ) -> list[asyncpg.Record] | None:
        """Run a read where the router says; None when the collection has no table. A
        connection lost under a read is retried, twice at most (reads are idempotent)."""
        ctx = context.current.get()
        try:
            for attempt in (0, 1, 2):  # the pool may hold several dead ones
                ep = self.endpoints.choose(kind, ctx.read_preference, ctx.min_lsn)
                try:
                    return await self._exec.run_on(ep, sql, args, analytic=kind == "aggregate")
                except asyncpg.exceptions.UndefinedTableError:
                    return None
                except TimeoutError:  # an OSError, but never retried: it may run again
                    raise
                except CONNECTION_ERRORS:
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")
        except ProxyError:
            raise
        except Exception as exc:
            raise translate(exc) from None

    async def _analytics(self, collection: str, sql: str, *args: Any) -> list[Any] | None:
        return await self._read(collection, sql, *args, kind="aggregate")

    def connections(self) -> dict[str, Any]:
        """Per endpoint: role, pool figures, breaker, lag, last error (never secrets)."""
        endpoints = self.endpoints.snapshot()
        if self._last_error and endpoints:
            endpoints[0]["last_error"] = endpoints[0]["last_error"] or self._last_error
        return {
            "type": "postgresql",
            "dsn": self.config.redacted_dsn(),
            "read_preference": self.config.read_preference,
            "endpoints": endpoints,
            "partition_upkeep": self.upkeep_counts.snapshot(),
        }

    async def load_schemas(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """Every declared schema, from the primary (what migrations last committed)."""
        async with self._conn(self._wait()) as conn:
            try:
                schemas = await read_schemas(conn, self._schema_ident, self._wait())
            except Exception as exc:
                raise translate(exc) from None
        self.learn_partitioning(schemas)
        return schemas

    async def watch_schemas(self, changed: Callable[[], Awaitable[None]]) -> None:
        """Until cancelled: LISTEN on the schemas channel (a migration anywhere NOTIFYs it
        in its transaction) and await ``changed`` on each notification, and once on every
        (re)connection for what was missed while not listening."""
        delay = 1.0
        while True:
            try:
                conn = await asyncpg.connect(
                    self.endpoints.primary.dsn,
                    server_settings={"application_name": "dbproxy-schemas"},
                    timeout=5.0,
                )
            except Exception as exc:
                log.debug("schema watch of %s cannot connect: %s", self.name, type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            delay = 1.0
            self._schema_conn = conn
            try:
                await _listen(conn, changed)
            finally:
                self._schema_conn = None
                conn.terminate()

    async def describe_collection(self, collection: str, sample: int) -> dict[str, Any]:
        async with self._conn(self._wait()) as conn:
            try:
                return await describe_one(conn, self._table(collection), sample, self._wait())
            except Exception as exc:
                raise translate(exc) from None

    async def describe_collections(self) -> dict[str, Any]:
        """Row estimates, table/index sizes and dead tuples of every collection table."""
        async with self._conn() as conn:
            try:
                rows = await conn.fetch(DESCRIBE_COLLECTIONS, self.schema)
                out: dict[str, dict[str, Any]] = {
                    r[0]: {
                        "rows_estimate": max(int(r[1]), int(r[5])),
                        "table_bytes": int(r[2]),
                        "index_bytes": int(r[3]),
                        "dead_tuples": int(r[4]),
                    }
                    for r in rows
                }
                for name in [r[0] for r in rows if r[6] == "p"]:
                    await add_partitions(conn, out[name], self._table(name), self._wait())
            except Exception as exc:
                raise translate(exc) from None
        return out

    async def explain(self, sql: str, args: tuple[Any, ...]) -> tuple[bool, str]:
        """The plan of a statement (EXPLAIN without ANALYZE): whether an index is used, and a
        one-line summary."""
        async with self._conn() as conn:
            try:
                raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args, timeout=2.0)
            except Exception as exc:
                raise translate(exc) from None
        plan = (orjson.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
        nodes = []
        stack = [plan]
        while stack:
            node = stack.pop()
            nodes.append(node.get("Node Type", "?"))
            stack.extend(node.get("Plans", []))
        index_used = any("Index" in n for n in nodes)
        summary = f"{plan.get('Node Type')} (cost {plan.get('Total Cost')}): " + " > ".join(nodes)
        return index_used, summary[:500]

    async def audit_log(
        self,
        *,
        scope: AuditScope | None = None,
        service: str | None = None,
        collection: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Audit records, oldest first, filtered; times are Unix seconds."""
        sql = AUDIT_LOG.format(schema=self._schema_ident)
        s = scope or AuditScope((), (), "")
        regexes = [glob_to_posix(g) for g in s.globs]
        args = (service, collection, since, until, after_id, limit, scope is None, s.names)
        async with self._conn() as conn:
            try:
                rows = await conn.fetch(sql, *args, regexes, s.service)
            except Exception as exc:
                raise translate(exc) from None
        return [dict(r) for r in rows]

    async def maintain(self) -> None:
        """Periodic housekeeping: forget expired idempotency keys, keep time partitions."""
        async with self._conn() as conn:
            await conn.execute(
                f"DELETE FROM {self._schema_ident}._idempotency WHERE expires_at < now()"
            )
        await self.partition_upkeep()

    async def partition_upkeep(self, now: dt.datetime | None = None) -> bool:
        """Time partitions made ahead and dropped past retention (``now``: the clock's
        time); False when another process holds the fleet-wide upkeep lock."""
        timed = {
            name: (self._table(name), key)
            for name, key in self._partitioned.items()
            if key.spec.strategy == "time"
        }
        if not timed:
            return False
        when = now or dt.datetime.now(dt.UTC)
        async with self._conn() as conn:
            try:
                return await run_upkeep(conn, self.schema, timed, when, self.upkeep_counts)
            except Exception as exc:
                raise translate(exc) from None

    def migrations(self) -> PgMigrations:
        """This database's migration side (records, lock, DDL) for proxy.migrate's runner."""
        return PgMigrations(self)

    # -- transactions ------------------------------------------------------------------

    async def begin(
        self, isolation: str = "read_committed", kind: TxKind = TxKind.SINGLE
    ) -> PostgresTransaction:
        """Pin a pooled connection and open a transaction on it; batches and interactive
        transactions only within the pool's transaction share."""
        if isolation not in ISOLATION_LEVELS:
            raise BadRequest(
                f"isolation must be one of {', '.join(ISOLATION_LEVELS)}", code="invalid_isolation"
            )
        ep = self.endpoints.choose("transaction", None, None)
        wait = self._wait()
        if wait <= 0:
            ep.breaker.release()
            raise no_answer()
        share = self.transaction_share
        try:
            shared = await share.take(kind, min(self._acquire_timeout, wait))
        except BaseException as exc:
            ep.breaker.release()
            if isinstance(exc, Unavailable) and self.endpoints.not_answering(ep):
                # the holders are stuck on a server that does not answer: say that, not
                # that transactions are too many
                raise Unavailable(
                    "the database is not answering",
                    retry_after=max(1.0, ep.breaker.retry_after()),
                ) from None
            raise
        try:
            conn = await self.endpoints.acquire(ep, min(self._acquire_timeout, self._wait()))
        except BaseException as exc:
            if shared:
                share.give()
            if isinstance(exc, Exception) and not isinstance(exc, ProxyError):
                raise translate(exc) from None
            raise
        pool = ep.pool
        assert pool is not None
        self.endpoints.record(ep, None)
        give = share.give if shared else None
        cap = context.current.get().statement_timeout
        try:
            tx = conn.transaction(isolation=isolation)
            async with asyncio.timeout(max(self._wait(), 0.001)):
                await tx.start()
                if cap is not None and cap < self.limits.statement_timeout_seconds:
                    # the service's own statement timeout, enforced by the server for
                    # every statement of this transaction (batch or interactive)
                    await conn.execute(
                        "SELECT set_config('statement_timeout', $1, true)",
                        str(max(1, int(cap * 1000))),
                    )
        except BaseException as exc:
            if isinstance(exc, TimeoutError | asyncio.CancelledError):
                conn.terminate()
            await release(pool, conn)
            if give is not None:
                give()
            if isinstance(exc, Exception):
                raise translate(exc) from None
            raise
        return PostgresTransaction(self, pool, conn, tx, isolation, give, ep, kind)
