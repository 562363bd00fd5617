"""Running statements on the endpoints: one statement on the endpoint the router chose, a
primary connection for housekeeping; every wait ends by the request's deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from proxy import context
from proxy.backends.postgres.deadline import GRACE_SECONDS, budget
from proxy.backends.postgres.errors import no_answer, translate
from proxy.backends.postgres.pool import (
    SESSION_LOST,
    Endpoint,
    EndpointSet,
    release,
    session_lost,
)
from proxy.config import Limits
from proxy.errors import CommitOutcomeUnknown, PoolExhausted, ProxyError, Timeout, Unavailable

# an aggregation that once ran this long (ms) is planned for its values on every later run
LONG_RUN_MS = 20.0


class LongRuns:
    """The aggregation statements (texts) that ran for ``LONG_RUN_MS`` or more: each is
    later prepared afresh (unnamed) and planned for its values, not run from asyncpg's
    statement cache.

    A cached statement is a named prepared statement, and after five runs PostgreSQL gives
    it a generic plan, which evaluates every parameter anew for each row it tests or
    computes: a ``doc @> $1`` filter and three ``doc -> $k`` arguments cost a 100,000-row
    aggregation 2-4 ms (3-6 %) more than the same statement planned with its values, where
    planning it costs 0.2-1 ms. For a statement that takes milliseconds the generic plan
    is cheaper (no planning), so only statements seen to run long are planned per run; one
    that then runs in under a quarter of ``LONG_RUN_MS`` (it was slow only while the server
    was busy) goes back to the cache. At most ``size`` are remembered (the oldest
    forgotten first)."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._texts: dict[str, None] = {}

    def __contains__(self, sql: str) -> bool:
        return sql in self._texts

    def add(self, sql: str) -> None:
        if sql in self._texts:
            return
        if len(self._texts) >= self.size:
            del self._texts[next(iter(self._texts))]
        self._texts[sql] = None

    def discard(self, sql: str) -> None:
        self._texts.pop(sql, None)

    def __len__(self) -> int:
        return len(self._texts)


async def fetch_planned(
    conn: asyncpg.Connection, sql: str, args: tuple[Any, ...], wait: float
) -> list[asyncpg.Record]:
    """``conn.fetch`` through the connection's unnamed statement: parsed and planned for
    these values (PostgreSQL plans an unnamed statement for its parameters each time),
    nothing left to close. Both round trips end within ``wait`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    stmt = await conn.prepare(sql, name="", timeout=wait)
    rows: list[asyncpg.Record] = await stmt.fetch(*args, timeout=max(deadline - loop.time(), 0.001))
    return rows


class Executor:
    """Statements on an endpoint set, each fed to its endpoint's breaker."""

    def __init__(self, endpoints: EndpointSet, limits: Limits, acquire_timeout: float) -> None:
        self.endpoints = endpoints
        self.limits = limits
        self._acquire_timeout = acquire_timeout
        self._releasing: set[asyncio.Future[None]] = set()
        self.long_runs = LongRuns()
        self.long_run_ms = LONG_RUN_MS

    @asynccontextmanager
    async def conn(self, wait: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A primary connection for housekeeping and monitoring queries (and DDL). One
        that timed out is closed, not returned: waiting for the server to acknowledge the
        cancel would hang on a server that does not answer."""
        pool = self.endpoints.primary.pool
        if pool is None:
            raise Unavailable(
                self.endpoints.primary.down_reason or "the database pool is not open",
                retry_after=1,
            )
        try:
            conn = await pool.acquire(
                timeout=max(wait, 0.001) if wait is not None else self._acquire_timeout
            )
        except TimeoutError:
            raise PoolExhausted(
                "no database connection became free in time", retry_after=1
            ) from None
        except Exception as exc:
            raise translate(exc) from None
        try:
            yield conn
        except (TimeoutError, asyncio.CancelledError):
            conn.terminate()
            raise
        finally:
            await release(pool, conn)  # asyncpg shields the release from cancellation

    def timeout(self) -> tuple[float, bool]:
        """This statement's client-side timeout (what is left of the request's deadline;
        with the grace when it is the global timeout, so the server's own cancel comes
        first), and whether running into it means the server is unresponsive (a
        per-service cap below the global one is the client's own)."""
        left, hard = budget(self.limits)
        return (left + GRACE_SECONDS if hard else left), hard

    @staticmethod
    def _timed_out(hard: bool, sent: bool, write: bool) -> ProxyError:
        if write and sent:  # an autocommit statement is its own COMMIT
            return CommitOutcomeUnknown(
                "the database did not answer in time; the write may or may not have been applied"
            )
        if hard:
            return no_answer()
        return Timeout("the statement took longer than the service's statement timeout")

    async def run_on(
        self,
        ep: Endpoint,
        sql: str,
        args: tuple[Any, ...],
        write: bool = False,
        analytic: bool = False,
    ) -> list[asyncpg.Record]:
        """One statement on one endpoint, its outcome fed to the endpoint's breaker; every
        wait ends by the request's deadline. A timed-out statement is never retried here
        and its connection is closed (its state is unknown). An ``analytic`` one (an
        aggregation) seen to run long is planned for its values from then on (``LongRuns``);
        other statements always run from the cache, as a short one that ran long only
        because the server was busy would pay for planning on every run."""
        eps = self.endpoints
        timeout, hard = self.timeout()
        if timeout <= 0:
            ep.breaker.release()
            raise self._timed_out(hard, False, write)
        conn = await eps.acquire(ep, min(self._acquire_timeout, timeout))
        losses = ep.losses
        timeout, hard = self.timeout()
        context.last_statement.set((sql, args))
        ep.statements += 1
        ep.state.outstanding += 1
        started = time.perf_counter()
        lost = False
        try:
            if timeout <= 0:
                eps.record(ep, None)
                raise self._timed_out(hard, False, write)
            rows: list[asyncpg.Record]
            planned = analytic and sql in self.long_runs
            if planned:
                rows = await fetch_planned(conn, sql, args, timeout)
            else:
                rows = await conn.fetch(sql, *args, timeout=timeout)
        except TimeoutError as exc:
            lost = True
            eps.record(ep, exc if hard else None)
            raise self._timed_out(hard, True, write) from None
        except asyncio.CancelledError:
            lost = True
            ep.breaker.release()
            raise
        except ProxyError:
            raise
        except BaseException as exc:
            if not isinstance(exc, SESSION_LOST) or await session_lost(ep, losses):
                eps.record(ep, exc)
            else:  # a connection taken before its pool was found dropped: counted already
                ep.breaker.release()
            raise
        else:
            ms = (time.perf_counter() - started) * 1000.0
            eps.record(ep, None, ms)
            if analytic and ms >= self.long_run_ms:
                self.long_runs.add(sql)
            elif planned and ms < self.long_run_ms / 4:
                self.long_runs.discard(sql)
            return rows
        finally:
            ep.state.outstanding -= 1
            if ep.pool is not None:
                if lost:  # asyncpg sent a cancel: the release waits for its answer
                    self._release_later(ep.pool, conn)
                else:
                    await release(ep.pool, conn)

    def _release_later(self, pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
        """Give back a connection whose statement was cancelled without making the request
        wait: asyncpg waits (at most the acquire timeout, then closes it) for the server to
        acknowledge the cancel, which a server that does not answer never does."""
        task = asyncio.ensure_future(pool.release(conn, timeout=self._acquire_timeout))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Future[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled():
            task.exception()  # a connection that could not be reset was closed: fine
