"""PostgreSQL endpoints: one asyncpg pool per endpoint (primary, replicas), each with its
circuit breaker and bounded wait queue; replica lag and read routing (docs/postgres.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from proxy.config import DatabaseConfig, Limits
from proxy.errors import PoolExhausted, ProxyError, Unavailable
from proxy.resilience.breaker import BreakerSettings, BreakerState, CircuitBreaker
from proxy.resilience.routing import EndpointState, Role, Router, format_lsn, parse_lsn

log = logging.getLogger(__name__)

# The one list of driver errors that mean "the connection or the server is broken": they
# trip the endpoint's breaker and answer 503 (retryable); everything else is the client's.
# InternalClientError covers what asyncpg raises when a server dies under it mid-protocol
# (and its subclass OutdatedSchemaCacheError).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.IncompleteReadError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)
BREAKER_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, TimeoutError)
# An open session that died under a statement (ended by the server, its socket closed);
# a connection that could not be made, or a timeout, is not one of them.
SESSION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.AdminShutdownError,
    asyncio.IncompleteReadError,
    ConnectionError,
)


async def session_lost(ep: Endpoint, losses: int) -> bool:
    """A session of ``ep`` taken when ``losses`` sessions had been found dead died under a
    statement: the first such death since that connection was taken expires every pooled
    connection (all are replaced as next acquired: the server may have ended all of them)
    and counts once for the breaker (True); the deaths of connections taken before it add
    nothing (False). New connections that cannot be made are counted each, as ever."""
    if losses != ep.losses:
        return False
    ep.losses += 1
    if ep.pool is not None:
        await ep.pool.expire_connections()
    return True


async def release(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """Give a connection back, whatever happened on it: one still inside a transaction is
    rolled back first, and one that cannot be made clean is closed, never pooled again.
    Never raises: a broken connection is asyncpg's to replace, not the request's error."""
    try:
        if not conn.is_closed() and conn.is_in_transaction():
            await conn.execute("ROLLBACK")
    except Exception:
        with contextlib.suppress(Exception):
            conn.terminate()  # unclean: the pool opens a new one; the server rolls back
    with contextlib.suppress(Exception):  # asyncpg terminates a connection it cannot reset
        await pool.release(conn)


def replica_dsn(primary: str, host: str, port: int) -> str:
    """The primary's DSN with another host and port (same user, password, database)."""
    parts = urlsplit(primary)
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset hook, run when a connection is released: nothing to do.

    asyncpg's default reset sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` on every release: one more round trip per statement, which doubled the
    statements PostgreSQL ran for a point read. dbproxy writes all of its SQL itself and
    never leaves session state behind (its advisory locks are transaction-scoped; it
    never LISTENs, never SETs, never declares a cursor outside a transaction); asyncpg
    still rolls back a transaction left open before calling this hook, and
    ``tests/integration/test_pgpool_reset.py`` holds the pool to both."""
    return None


class Endpoint:
    """One server: its pool, breaker and routing state."""

    def __init__(
        self,
        name: str,
        role: Role,
        dsn: str,
        breaker: CircuitBreaker,
    ) -> None:
        self.name = name
        self.role = role
        self.dsn = dsn
        self.pool: asyncpg.Pool | None = None
        self.state = EndpointState(name, role, breaker)
        self.waiting = 0
        self.down_reason: str | None = None  # why the pool is not open, safe to show
        self.statements = 0  # statements run here (reads and writes), for /connections
        self.last_answer = 0.0  # when the server last answered anything (monotonic)
        self.probe: asyncpg.Connection | None = None  # the watchdog's own connection
        self.losses = 0  # times open sessions were found dead (each expired the pool)

    def stalled(self, now: float, after: float) -> bool:
        """Work is waiting on this server and it has answered nothing for ``after`` s."""
        return (self.state.outstanding > 0 or self.waiting > 0) and now - self.last_answer > after

    @property
    def breaker(self) -> CircuitBreaker:
        return self.state.breaker

    def snapshot(self, max_size: int) -> dict[str, Any]:
        pool = self.pool
        size = pool.get_size() if pool else 0
        idle = pool.get_idle_size() if pool else 0
        return {
            "name": self.name,
            "role": self.role.value,
            "pool": {
                "size": size,
                "in_use": size - idle,
                "idle": idle,
                "waiting": self.waiting,
                "max": max_size,
            },
            "status": "up" if pool is not None and self.state.healthy else "down",
            "breaker": self.breaker.snapshot(),
            "outstanding": self.state.outstanding,
            "statements": self.statements,
            "latency_ms": self.state.latency_ewma_ms,
            "lag_bytes": self.state.lag_bytes,
            "lag_seconds": self.state.lag_seconds,
            "replayed_lsn": format_lsn(self.state.replayed_lsn)
            if self.state.replayed_lsn is not None
            else None,
            "last_error": self.state.last_error,
        }


class EndpointSet:
    """The primary and replicas of one database, and the choice among them."""

    def __init__(
        self,
        config: DatabaseConfig,
        limits: Limits,
        *,
        breaker: BreakerSettings | None = None,
        max_lag_seconds: float = 5.0,
        max_lag_bytes: int | None = 16 * 1024 * 1024,
        health_interval: float = 1.0,
        max_waiting: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        stall_seconds: float = 0.5,
        probe_timeout: float = 1.0,
        watch_interval: float = 0.25,
    ) -> None:
        self.config = config
        self.limits = limits
        self.health_interval = health_interval
        # the watchdog: when work has waited on an endpoint for ``stall_seconds`` without
        # any answer, a ``SELECT 1`` on a connection of its own must answer within
        # ``probe_timeout``, else the breaker opens at once (a frozen server is found in
        # about stall + interval + probe = 1.75 s, long before requests time out)
        self.stall_seconds = stall_seconds
        self.probe_timeout = probe_timeout
        self.watch_interval = watch_interval
        self._clock = clock
        self._watchdog: asyncio.Task[None] | None = None
        ps = config.pool_settings
        self.max_waiting = max_waiting if max_waiting is not None else ps.max_connections * 50
        settings = breaker or BreakerSettings()
        self.primary = Endpoint(
            "primary",
            Role.PRIMARY,
            config.connection_string,
            CircuitBreaker(f"{config.name}/primary", settings, clock),
        )
        self.replicas = [
            Endpoint(
                f"{r.host}:{r.port}",
                Role.ANALYTICS if r.role == "analytics" else Role.REPLICA,
                replica_dsn(config.connection_string, r.host, r.port),
                CircuitBreaker(f"{config.name}/{r.host}:{r.port}", settings, clock),
            )
            for r in config.replicas
        ]
        self.router = Router(
            self.primary.state,
            [r.state for r in self.replicas],
            max_lag_seconds=max_lag_seconds,
            max_lag_bytes=max_lag_bytes,
        )
        self._by_state = {id(e.state): e for e in (self.primary, *self.replicas)}
        self.primary_lsn = 0
        self.rotations = 0  # credential changes applied (secret file rewritten)
        self._monitor: asyncio.Task[None] | None = None

    @property
    def endpoints(self) -> list[Endpoint]:
        return [self.primary, *self.replicas]

    # -- pools -------------------------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        """What every new connection of a pool is opened with, besides its DSN."""
        timeout_ms = int(self.limits.statement_timeout_seconds * 1000)
        return {
            "server_settings": {
                "statement_timeout": str(timeout_ms),
                "idle_in_transaction_session_timeout": str(max(timeout_ms * 6, 30000)),
                "application_name": "dbproxy",
                # JIT compiles a compiled pipeline's many jsonb expressions for seconds
                # (941 functions, 9.7 s measured for a 5-row $lookup + $sort) where running
                # them takes milliseconds; dbproxy's statements never gain from it
                "jit": "off",
            },
        }

    async def open_pool(self, endpoint: Endpoint) -> asyncpg.Pool:
        ps = self.config.pool_settings
        pool: asyncpg.Pool = await asyncpg.create_pool(
            endpoint.dsn,
            min_size=ps.min_connections if endpoint.role is Role.PRIMARY else 0,
            max_size=ps.max_connections,
            timeout=ps.timeout_seconds,
            reset=keep_session,
            **self._connect_kwargs(),
        )
        return pool

    async def rotate(self, dsn: str) -> None:
        """New credentials (a secret file changed): every new connection uses ``dsn`` (its
        replicas the same user and password); pooled connections are replaced gracefully,
        an idle one when next acquired, a busy one when released (asyncpg's generation)."""
        self.config = replace(self.config, connection_string=dsn)
        self.primary.dsn = dsn
        for replica, settings in zip(self.replicas, self.config.replicas, strict=True):
            replica.dsn = replica_dsn(dsn, settings.host, settings.port)
        for ep in self.endpoints:
            if ep.probe is not None:
                ep.probe.terminate()
                ep.probe = None
            if ep.pool is not None:
                ep.pool.set_connect_args(ep.dsn, **self._connect_kwargs())
                await ep.pool.expire_connections()
        self.rotations += 1

    async def start_replicas(self) -> None:
        for replica in self.replicas:
            try:
                replica.pool = await self.open_pool(replica)
            except Exception as exc:  # a replica that is down only degrades
                replica.state.healthy = False
                replica.state.last_error = type(exc).__name__
        if self.replicas:
            self._monitor = asyncio.create_task(self._watch())

    async def close(self) -> None:
        for task in (self._monitor, self._watchdog):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._monitor = self._watchdog = None
        for ep in self.endpoints:
            if ep.probe is not None:
                ep.probe.terminate()
                ep.probe = None
            if ep.pool is not None:
                await ep.pool.close()
                ep.pool = None

    # -- the watchdog: a server that stopped answering --------------------------------

    def start_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch_stalls())

    async def _watch_stalls(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval)
            now = self._clock()
            stalled = [
                ep
                for ep in self.endpoints
                if ep.pool is not None and ep.stalled(now, self.stall_seconds)
            ]
            if stalled:
                try:
                    await asyncio.gather(*(self.probe(ep) for ep in stalled))
                except Exception:
                    log.exception("endpoint watchdog failed")

    async def probe(self, ep: Endpoint) -> bool:
        """Does the server answer a ``SELECT 1`` in time? If not, its breaker opens now."""
        try:
            async with asyncio.timeout(self.probe_timeout):
                if ep.probe is None or ep.probe.is_closed():
                    ep.probe = await asyncpg.connect(
                        ep.dsn, server_settings={"application_name": "dbproxy-probe"}
                    )
                await ep.probe.fetchval("SELECT 1")
        except (TimeoutError, OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
            if ep.probe is not None:
                ep.probe.terminate()
                ep.probe = None
            if ep.breaker.state is not BreakerState.OPEN:
                log.warning("endpoint %s does not answer; opening its breaker", ep.name)
            ep.state.last_error = "unresponsive"
            ep.breaker.trip()
            return False
        except asyncpg.PostgresError:  # it answered (full, starting up...): alive
            pass
        ep.last_answer = self._clock()
        return True

    # -- choosing and using an endpoint ---------------------------------------------------

    def choose(self, kind: str, preference: str | None, min_lsn: int | None) -> Endpoint:
        """The endpoint for one statement; fails fast when the primary's breaker is open."""
        if not self.replicas:
            ep = self.primary
        else:
            state = self.router.choose(kind, preference or self.config.read_preference, min_lsn)
            ep = self._by_state[id(state)]
        if not ep.breaker.allow():
            raise Unavailable(
                "the database is failing; its circuit breaker is open",
                code="database_unavailable",
                retry_after=max(1.0, ep.breaker.retry_after()),
            )
        return ep

    async def acquire(self, ep: Endpoint, wait: float) -> asyncpg.Connection:
        pool = ep.pool
        if pool is None:
            ep.breaker.release()
            raise Unavailable(ep.down_reason or "the database pool is not open", retry_after=1)
        if ep.waiting >= self.max_waiting:
            ep.breaker.release()
            raise PoolExhausted("too many requests waiting for a connection", retry_after=1)
        # with a free slot, a timeout means connecting hung: the server is sick, not busy
        could_connect = pool.get_idle_size() > 0 or pool.get_size() < pool.get_max_size()
        ep.waiting += 1
        try:
            conn: asyncpg.Connection = await pool.acquire(timeout=max(wait, 0.001))
            return conn
        except TimeoutError as exc:
            if could_connect:
                self.record(ep, exc)
                raise Unavailable(
                    "the database did not accept a connection in time", retry_after=1
                ) from None
            ep.breaker.release()
            if self.not_answering(ep):  # the connections are stuck on a server that does not answer
                raise Unavailable(
                    "the database is not answering", retry_after=max(1.0, ep.breaker.retry_after())
                ) from None
            raise PoolExhausted(
                "no database connection became free in time", retry_after=1
            ) from None
        except BaseException as exc:
            self.record(ep, exc)
            raise
        finally:
            ep.waiting -= 1

    def not_answering(self, ep: Endpoint) -> bool:
        """The breaker is not closed, or work waits on a server silent for the stall time."""
        return ep.breaker.state is not BreakerState.CLOSED or ep.stalled(
            self._clock(), self.stall_seconds
        )

    def record(self, ep: Endpoint, exc: BaseException | None, ms: float | None = None) -> None:
        """Feed one outcome to the endpoint's breaker (only sickness counts as failure)."""
        if exc is None or (isinstance(exc, ProxyError) and exc.status < 500):
            ep.breaker.record_success()
            ep.last_answer = self._clock()
            if ms is not None:
                self.router.record_latency(ep.state, ms)
        elif isinstance(exc, BREAKER_ERRORS) or _server_trouble(exc):
            ep.breaker.record_failure()
            ep.state.last_error = type(exc).__name__
        else:
            ep.breaker.record_success()  # the server answered: it is alive
            ep.last_answer = self._clock()

    # -- replication lag ----------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.measure()
            except Exception:
                log.exception("replica measurement failed")

    async def measure(self) -> None:
        """Primary LSN, then each replica's replayed LSN and replay delay."""
        if self.primary.pool is not None:
            try:
                text = await self.primary.pool.fetchval(
                    "SELECT pg_current_wal_lsn()::text", timeout=1.0
                )
                self.primary_lsn = parse_lsn(text)
                self.primary.state.healthy = True
            except Exception as exc:
                self.primary.state.healthy = False
                self.record(self.primary, exc)
        await asyncio.gather(*(self._measure_replica(r) for r in self.replicas))

    async def _measure_replica(self, ep: Endpoint) -> None:
        if ep.pool is None:
            try:
                ep.pool = await self.open_pool(ep)
            except Exception as exc:
                ep.state.healthy = False
                ep.state.last_error = type(exc).__name__
                self.record(ep, exc)
                return
        try:
            row = await ep.pool.fetchrow(
                "SELECT pg_last_wal_replay_lsn()::text, "
                "extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8",
                timeout=1.0,
            )
        except Exception as exc:
            ep.state.healthy = False
            ep.state.last_error = type(exc).__name__
            self.record(ep, exc)
            return
        assert row is not None
        replayed = parse_lsn(row[0]) if row[0] else 0
        caught_up = replayed >= self.primary_lsn
        ep.state.replayed_lsn = replayed
        ep.state.lag_bytes = max(0, self.primary_lsn - replayed)
        ep.state.lag_seconds = 0.0 if caught_up else max(0.0, float(row[1] or 0.0))
        ep.state.healthy = True
        self.record(ep, None)

    async def replayed(self, ep: Endpoint) -> int | None:
        """Ask one replica directly how far it has replayed (for a token read)."""
        if ep.pool is None:
            return None
        try:
            text = await ep.pool.fetchval("SELECT pg_last_wal_replay_lsn()::text", timeout=0.5)
        except Exception:
            return None
        if not text:
            return None
        lsn = parse_lsn(text)
        ep.state.replayed_lsn = max(lsn, ep.state.replayed_lsn or 0)
        return lsn

    def snapshot(self) -> list[dict[str, Any]]:
        size = self.config.pool_settings.max_connections
        return [ep.snapshot(size) for ep in self.endpoints]


def _server_trouble(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", "") or ""
    return state.startswith("53") or state.startswith("57P") or state == "08006"


def now_ms() -> float:
    return time.perf_counter() * 1000.0


__all__ = [
    "BREAKER_ERRORS",
    "CONNECTION_ERRORS",
    "SESSION_LOST",
    "Endpoint",
    "EndpointSet",
    "format_lsn",
    "parse_lsn",
    "replica_dsn",
    "session_lost",
]
